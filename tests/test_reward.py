"""Reward members as a library: combination, judge margins, names, the cross-fitted BT model."""

from __future__ import annotations

import numpy as np
import pytest

from prefcurate.backends.reward import MemberOptions, combine_margins, judge_margin, member_name, parse_members
from prefcurate.backends.reward_bt import CrossFitBT, Embedded, train_sample
from prefcurate.errors import ConfigError
from tests.conftest import TINY_LAYERS


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


# -- hf: members whose model takes fewer tokens than --max-length --------------------------------

WORDS = 400


def _long_pairs(n: int = 10) -> list[dict]:
    """Real HH rows: the whole chosen transcript as the prompt (long), the responses' ends (short)."""
    from tests.conftest import hh_rows

    return [{"prompt": r["chosen"], "chosen": r["chosen"][-150:], "rejected": r["rejected"][-150:]} for r in hh_rows(n)]


def _vocab(specials: list[str]) -> dict[str, int]:
    from collections import Counter

    text = " ".join(p["prompt"] + " " + p["chosen"] + " " + p["rejected"] for p in _long_pairs())
    words = [w for w, _ in Counter(text.split()).most_common(WORDS)] + ["User:", "Assistant:"]
    return {w: i for i, w in enumerate(dict.fromkeys([*specials, *words]))}


def _build_encoder_rm(path, kind: str, positions: int, tokenizer_max: int | None):
    """A tiny random BERT or RoBERTa reward model (1 label), its word-level tokenizer adding
    ``[CLS] ... [SEP]`` / ``<s> ... </s>``; ``tokenizer_max=None`` leaves model_max_length unset."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        PreTrainedTokenizerFast,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    if kind == "bert":
        specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    else:  # RoBERTa's ids: <s>=0, <pad>=1 (the position table's padding_idx), </s>=2
        specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    vocab = _vocab(list(specials.values()))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    first, last = ("[CLS]", "[SEP]") if kind == "bert" else ("<s>", "</s>")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}", special_tokens=[(first, vocab[first]), (last, vocab[last])]
    )
    extra = {"model_max_length": tokenizer_max} if tokenizer_max else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials, **extra)
    common = dict(vocab_size=len(vocab), **TINY_LAYERS, max_position_embeddings=positions, num_labels=1)
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(**common, pad_token_id=vocab["[PAD]"]))
    else:
        model = RobertaForSequenceClassification(RobertaConfig(**common, pad_token_id=1, type_vocab_size=1))
    fast.save_pretrained(path)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def limited_rms(tmp_path_factory):
    root = tmp_path_factory.mktemp("limited-rms")
    return {
        # BERT with 128 positions and a tokenizer that says so (the QA case)
        "bert": (_build_encoder_rm(root / "tiny-bert", "bert", 128, 128), 128, "model_max_length 128"),
        # the tokenizer does not say: the config's positions are the limit
        "bert-nolimit": (_build_encoder_rm(root / "bert-nolimit", "bert", 96, None), 96, "max_position_embeddings 96"),
        # RoBERTa numbers positions from padding_idx + 1: 66 embeddings hold 64 tokens
        "roberta": (
            _build_encoder_rm(root / "tiny-roberta", "roberta", 66, None),
            64,
            "max_position_embeddings 66 less 2 reserved",
        ),
    }


class _Notes:
    """A Progress that records its notes."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def task(self, description, total=None, unit="rows"):
        from prefcurate.stages.base import NullProgress

        return NullProgress().task(description, total, unit)

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.mark.parametrize("name", ["bert", "bert-nolimit", "roberta"])
def test_hf_member_caps_max_length_at_the_models_positions(tmp_path, limited_rms, name):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefcurate.schema import render_transcript
    from prefcurate.shards import read_table
    from prefcurate.stages.score import ScoreConfig, ScoreStage
    from tests.conftest import make_stage_dir

    path, limit, why = limited_rms[name]
    member = f"hf_{path.name.replace('-', '_')}"
    src = make_stage_dir(tmp_path / "in", _long_pairs())
    progress = _Notes()
    # The default --max-length 1024 is above what the model takes: scored at the model's limit.
    manifest, _ = ScoreStage(ScoreConfig(member=[f"hf:{path}"], batch_size=4)).run(
        src, tmp_path / "out", progress=progress
    )
    info = manifest.extra["members"][member]
    assert info["max_length"] == limit and info["max_length_requested"] == 1024
    assert why in info["max_length_limited_by"]
    lowered = [n for n in progress.notes if "lowered" in n]
    assert len(lowered) == 1 and f"--max-length 1024 lowered to {limit}" in lowered[0] and why in lowered[0]

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    rows = read_table(tmp_path / "out").to_pylist()
    texts = [(r, side, render_transcript([*r["prompt"], *r[side]])) for r in rows for side in ("chosen", "rejected")]
    lengths = [len(tok(t)["input_ids"]) for _, _, t in texts]
    assert max(lengths) > limit and min(lengths) < limit  # both kinds were scored
    assert info["truncated"] == sum(n > limit for n in lengths)
    assert any(f"longer than the model's limit of {limit} tokens" in n for n in progress.notes)
    # Every reward is the model's on the text's last `limit` tokens (special tokens included).
    tok.truncation_side = "left"
    for row, side, text in texts:
        ids = tok([text], truncation=True, max_length=limit, return_tensors="pt")
        assert ids["input_ids"].shape[1] <= limit
        with torch.no_grad():
            expected = float(model(**ids).logits[0, -1])
        assert row[f"reward_{side}__{member}"] == pytest.approx(expected, abs=1e-4)


def test_model_limits_ignore_the_no_limit_sentinel_and_a_smaller_max_length(tmp_path, limited_rms):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefcurate.backends.reward_hf import HFRewardScorer, model_limits

    path, _, _ = limited_rms["roberta"]
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.model_max_length > 10**20  # transformers' "unset"
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert model_limits(tok, model) == {"the model's max_position_embeddings 66 less 2 reserved": 64}
    bert, _, _ = limited_rms["bert"]
    assert list(
        model_limits(
            AutoTokenizer.from_pretrained(bert), AutoModelForSequenceClassification.from_pretrained(bert)
        ).values()
    ) == [128, 128]
    assert HFRewardScorer(str(path), "cpu", max_length=32).max_length == 32  # below the limit: as asked
    assert HFRewardScorer(str(path), "cpu", max_length=1024).max_length == 64


def test_model_limits_leave_relative_position_models_to_max_length(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefcurate.backends.reward_hf import model_limits
    from tests.test_score import _build_rm

    path = _build_rm(tmp_path / "llama", ["hello", "world"], template=False)  # rotary positions, 512 declared
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 32
    assert model_limits(tok, AutoModelForSequenceClassification.from_pretrained(path)) == {}  # no table to run past
