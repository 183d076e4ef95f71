"""Reward members as a library: combination, judge margins, names, the cross-fitted BT model."""

from __future__ import annotations

import numpy as np
import pytest

from prefcurate.backends.reward import MemberOptions, combine_margins, judge_margin, member_name, parse_members
from prefcurate.backends.reward_bt import CrossFitBT, Embedded, train_sample
from prefcurate.errors import ConfigError


def test_standardization_removes_a_members_scale_but_keeps_signs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(size=200) + 0.3
    _, agg, scales = combine_margins({"a": a, "b": b})
    _, agg100, scales100 = combine_margins({"a": a, "b": 100 * b})
    np.testing.assert_allclose(agg100["margin_mean"], agg["margin_mean"])
    np.testing.assert_allclose(agg100["margin_worst"], agg["margin_worst"])
    assert scales100["b"] == pytest.approx(100 * scales["b"])
    std, _, _ = combine_margins({"b": b})
    assert np.array_equal(np.sign(std["b"]), np.sign(b))  # not centered: no pair changes side
    assert np.sqrt(np.mean(std["b"] ** 2)) == pytest.approx(1.0)


def test_aggregates_agree_worst_and_nulls():
    a = np.array([1.0, -1.0, 2.0, np.nan])
    b = np.array([1.0, 1.0, -2.0, np.nan])
    c = np.array([1.0, 1.0, np.nan, np.nan])
    std, agg, _ = combine_margins({"a": a, "b": b, "c": c})
    np.testing.assert_allclose(agg["margin_agree"][:3], [1.0, 2 / 3, 0.5])
    assert agg["margin_worst"][1] == pytest.approx(std["a"][1])
    assert agg["margin_std"][0] == pytest.approx(np.std([std["a"][0], std["b"][0], std["c"][0]]))
    assert np.isnan(agg["margin_mean"][3]) and np.isnan(agg["margin_agree"][3])


def test_judge_margin_is_the_clipped_logit():
    m = judge_margin(np.array([0.5, 0.8, 1.0, 0.0, np.nan]))
    assert m[0] == pytest.approx(0.0)
    assert m[1] == pytest.approx(np.log(4.0))
    assert np.isfinite(m[2]) and m[2] == pytest.approx(-m[3]) and m[2] > 6
    assert np.isnan(m[4])


def test_member_names_are_column_safe_and_unique():
    assert member_name("embedding-bt") == "embedding_bt"
    assert member_name("hf:OpenAssistant/reward-model-deberta-v3-large-v2") == "hf_reward_model_deberta_v3_large_v2"
    assert member_name("hf:/tmp/models/Tiny.RM/") == "hf_tiny_rm"
    assert member_name("embedding-bt:minilm") == "embedding_bt_minilm"
    members = parse_members(["embedding-bt", "embedding-bt:minilm"], MemberOptions(embed_model="static"))
    assert [m.embed_model for m in members] == ["static", "minilm"]
    with pytest.raises(ConfigError, match="unknown reward member"):
        parse_members(["gpt-judge"], MemberOptions())
    with pytest.raises(ConfigError, match="share the column name"):
        parse_members(["hf:/a/rm", "hf:/b/rm"], MemberOptions())


def _planted(n: int = 400, dim: int = 12, seed: int = 0) -> tuple[Embedded, np.ndarray]:
    """Pairs whose true preference is a direction u in embedding space (plus noise)."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    e_p, e_c, e_r = (unit(rng.normal(size=(n, dim))) for _ in range(3))
    u = unit(rng.normal(size=(1, dim)))[0]
    prefers_c = (e_c - e_r) @ u + 0.05 * rng.normal(size=n) > 0
    e_c, e_r = np.where(prefers_c[:, None], e_c, e_r), np.where(prefers_c[:, None], e_r, e_c)
    words = rng.integers(5, 50, size=(2, n)).astype(float)
    emb = Embedded(
        np.arange(n),
        e_p.astype(np.float16),
        e_c.astype(np.float16),
        e_r.astype(np.float16),
        words[0],
        words[1],
        np.zeros(n, bool),
    )
    return emb, (e_c - e_r) @ u


def _fit(emb: Embedded, seeds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    model = CrossFitBT(len(emb.index), folds=4, seeds=seeds)
    model.fit(emb)
    return model.rewards(emb)


def test_bradley_terry_learns_a_planted_preference_from_held_out_folds():
    emb, true_margin = _planted()
    rc, rr = _fit(emb)
    margin = rc - rr
    assert (margin > 0).mean() > 0.85  # data says chosen is better; held-out models agree
    assert np.corrcoef(margin, true_margin)[0, 1] > 0.8


def test_cross_fitting_holds_each_row_out_of_its_own_model():
    emb, _ = _planted()
    rc, rr = _fit(emb)
    i = 7
    swapped = emb.take(np.arange(len(emb.index)))
    swapped.e_c[i], swapped.e_r[i] = emb.e_r[i], emb.e_c[i]
    swapped.words_c[i], swapped.words_r[i] = emb.words_r[i], emb.words_c[i]
    rc2, rr2 = _fit(swapped)
    # Row i's own label flipped: the models that score it never saw it, so its rewards just swap.
    assert rc2[i] == pytest.approx(rr[i], abs=1e-9) and rr2[i] == pytest.approx(rc[i], abs=1e-9)
    # ...while the models that did train on row i changed.
    others = np.arange(len(rc)) != i
    assert np.abs((rc2 - rr2)[others] - (rc - rr)[others]).max() > 1e-6


def test_ties_are_not_trained_on():
    emb, _ = _planted()
    tied = emb.take(np.arange(len(emb.index)))
    tied.tie[:] = False
    tied.tie[:200] = True
    rc, rr = _fit(tied)
    # Turning rows that are ties into noise does not change the model at all.
    noisy = tied.take(np.arange(len(tied.index)))
    noisy.e_c[:200], noisy.e_r[:200] = tied.e_r[:200], tied.e_c[:200]
    rc2, rr2 = _fit(noisy)
    np.testing.assert_allclose((rc2 - rr2)[200:], (rc - rr)[200:], atol=1e-9)


def test_train_sample_is_bounded_and_seeded():
    assert train_sample(50, 100).all()
    mask = train_sample(1000, 100)
    assert mask.sum() == 100 and np.array_equal(mask, train_sample(1000, 100))
