"""The filter stage: each named rule on known inputs, flipping, thresholds, requirements, laws."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefcurate.backends.reward import combine_margins
from prefcurate.errors import ConfigError, InputError
from prefcurate.shards import Manifest, count_rows, read_table
from prefcurate.stages.filter import FilterConfig, FilterStage, parse_threshold
from tests.conftest import make_stage_dir, write_jsonl


def scored_pairs(a: list[float], b: list[float] | None = None, **extra: list) -> list[dict]:
    """Pairs with score-stage columns for members a (with rewards) and b; ``extra`` adds columns."""
    margins = {"a": np.array(a, float)}
    if b is not None:
        margins["b"] = np.array(b, float)
    std, agg, _ = combine_margins(margins)
    rows = []
    for i in range(len(a)):
        row = {
            "prompt": f"question {i}",
            "chosen": "good answer " * (i + 1),
            "rejected": "bad answer",
            "chosen_rating": float(i),
            "rejected_rating": -float(i),
            "reward_chosen__a": 10.0 + i,
            "reward_rejected__a": 10.0 + i - a[i],
        }
        row.update({f"margin__{k}": float(v[i]) for k, v in std.items()})
        row.update({k: float(v[i]) for k, v in agg.items()})
        row.update({k: v[i] for k, v in extra.items()})
        rows.append(row)
    return rows


def run(tmp_path: Path, rows: list[dict], **options) -> tuple[list[dict], list[dict], Manifest]:
    src = make_stage_dir(tmp_path / "in", rows)
    manifest, _ = FilterStage(FilterConfig(**options)).run(src, tmp_path / "out", fresh=True)
    return (
        read_table(tmp_path / "out").to_pylist(),
        read_table(tmp_path / "out", subdir="rejects").to_pylist(),
        manifest,
    )


def test_flip_swaps_responses_ratings_rewards_and_margin_signs(tmp_path):
    rows = scored_pairs(
        [-3.0, -3.0, -3.0, 1.0],
        [-2.0, 0.5, -2.0, 1.0],
        judge_pref=[0.2, 0.4, 0.3, 0.9],
        tie=[False, False, True, False],
    )
    kept, rejected, manifest = run(tmp_path, rows, flip=True, flip_below="-0.5")
    assert not rejected and len(kept) == 4  # flipped rows stay in data/
    assert [r["flipped"] for r in kept] == [True, False, False, False]  # row 1: members disagree; row 2: a tie
    before, after = rows[0], kept[0]
    assert after["chosen"][0]["content"] == before["rejected"] and after["rejected"][0]["content"] == before["chosen"]
    assert (after["chosen_rating"], after["rejected_rating"]) == (before["rejected_rating"], before["chosen_rating"])
    assert (after["reward_chosen__a"], after["reward_rejected__a"]) == (
        before["reward_rejected__a"],
        before["reward_chosen__a"],
    )
    for col in ("margin__a", "margin__b", "margin_mean"):
        assert after[col] == pytest.approx(-before[col])
    assert after["margin_agree"] == 1.0 and after["margin_worst"] == pytest.approx(
        -max(before["margin__a"], before["margin__b"])
    )
    assert after["margin_std"] == pytest.approx(before["margin_std"])
    assert after["judge_pref"] == pytest.approx(0.8)
    assert kept[1]["chosen"][0]["content"] == rows[1]["chosen"] and kept[1]["margin_mean"] == pytest.approx(
        rows[1]["margin_mean"]
    )
    assert manifest.extra["rules"] == {"flip": 1}


def test_flipped_records_the_orientation_relative_to_the_source(tmp_path):
    # Row 0 was already swapped upstream (judge --relabel); flipping it again restores the source order.
    rows = scored_pairs([-3.0, -3.0, 2.0], [-2.0, -2.0, 1.0], flipped=[True, False, False])
    kept, _, _ = run(tmp_path, rows, flip=True, flip_below="0")
    assert [r["flipped"] for r in kept] == [False, True, False]


def test_quantile_and_absolute_thresholds(tmp_path):
    a = [float(v) for v in range(-5, 5)]  # margin_mean -5 .. 4 (one member: standardized by RMS)
    rows = scored_pairs(a)
    kept, _, m = run(tmp_path, rows, flip=True, flip_below="q0.2", flip_max_agree=0.5)
    assert [r["flipped"] for r in kept] == [True, True] + [False] * 8
    assert m.extra["thresholds"]["flip_below"] == pytest.approx(np.quantile([r["margin_mean"] for r in rows], 0.2))
    rms = np.sqrt(np.mean(np.square(a)))
    kept, _, _ = run(tmp_path, rows, flip=True, flip_below=str(-3.5 / rms))
    assert [r["flipped"] for r in kept] == [True, True] + [False] * 8
    assert parse_threshold("q0.1") == ("quantile", 0.1) and parse_threshold("-2") == ("abs", -2.0)
    assert FilterConfig(flip_below=-2).flip_below == "-2"  # a YAML number is an absolute threshold
    for bad in ("q1.5", "ten", "q"):
        with pytest.raises(ValueError):
            FilterConfig(flip_below=bad)


def test_drop_ambiguous_by_weak_strength_or_large_spread(tmp_path):
    rows = scored_pairs([0.1, -0.2, 3.0, 2.0, -3.0], [0.1, -0.1, 3.0, -2.0, -3.0])
    kept, rejected, m = run(tmp_path, rows, drop_ambiguous=True, ambiguous_below="0.3")
    assert {r["reject_reason"] for r in rejected} == {"ambiguous"}
    assert sorted(r["prompt"][0]["content"] for r in rejected) == ["question 0", "question 1", "question 3"]
    kept, rejected, _ = run(tmp_path, rows, drop_ambiguous=True, ambiguous_below="0.0", ambiguous_std_above="q0.9")
    assert [r["prompt"][0]["content"] for r in rejected] == ["question 3"]  # members disagree the most
    assert m.extra["rules"] == {"ambiguous": 3}


def test_drop_judge_inconsistent_ties_and_length_ratio(tmp_path):
    rows = scored_pairs(
        [1.0] * 5, judge_consistent=[True, False, None, True, True], tie=[False, False, False, True, False]
    )
    kept, rejected, m = run(tmp_path, rows, drop_judge_inconsistent=True, drop_ties=True, max_length_ratio=8.0)
    reasons = {r["prompt"][0]["content"]: r["reject_reason"] for r in rejected}
    # chosen has 2*(i+1) words vs 2: ratio i+1, so row 4 (ratio 5) passes max 8 but fails max 4 below.
    assert reasons == {"question 1": "judge-inconsistent", "question 3": "tie"}
    assert len(kept) == 3 and m.reject_reasons == {"judge-inconsistent": 1, "tie": 1}
    kept, rejected, m = run(tmp_path, rows, min_length_ratio=2.0, max_length_ratio=4.0)
    assert {r["prompt"][0]["content"]: r["reject_reason"] for r in rejected} == {
        "question 0": "length-ratio",
        "question 4": "length-ratio",
    }
    assert m.extra["rules"] == {"length-ratio": 2}


def _words(messages: list[dict]) -> int:
    return max(len(" ".join(m["content"] for m in messages).split()), 1)


@pytest.mark.parametrize(
    ("bounds", "rejected_rows"),
    [({"min_length_ratio": 0.9, "max_length_ratio": 3.5}, [1, 3]), ({"max_length_ratio": 1.5}, [2, 3])],
)
def test_length_ratio_is_judged_on_the_flipped_pair(tmp_path, bounds, rejected_rows):
    # Stored chosen/rejected word ratios are 1, 2, 3, 4; rows 0 and 1 flip, so as written they are 1, 0.5, 3, 4.
    rows = scored_pairs([-3.0, -3.0, 2.0, 1.0])
    kept, rejected, m = run(tmp_path, rows, flip=True, flip_below="0", **bounds)
    assert {r["prompt"][0]["content"] for r in kept + rejected if r["flipped"]} == {"question 0", "question 1"}
    assert sorted(r["prompt"][0]["content"] for r in rejected) == [f"question {i}" for i in rejected_rows]
    assert {r["reject_reason"] for r in rejected} == {"length-ratio"} and m.extra["rules"]["flip"] == 2
    low, high = bounds.get("min_length_ratio", 0.0), bounds["max_length_ratio"]
    for r in kept:  # what is written meets the bounds, and what was removed for them does not
        assert low <= _words(r["chosen"]) / _words(r["rejected"]) <= high
    for r in rejected:
        assert not low <= _words(r["chosen"]) / _words(r["rejected"]) <= high


def test_keep_top_fraction_and_count_rank_by_strength_after_flipping(tmp_path):
    rows = scored_pairs([-4.0, 1.0, 2.0, 0.5, 3.0, -0.5])
    kept, rejected, _ = run(tmp_path, rows, keep_top_count=2)
    assert sorted(r["prompt"][0]["content"] for r in kept) == ["question 2", "question 4"]
    assert {r["reject_reason"] for r in rejected} == {"below-top"}
    kept, _, _ = run(tmp_path, rows, flip=True, flip_below="-1.5", keep_top_fraction=0.5)
    assert sorted(r["prompt"][0]["content"] for r in kept) == ["question 0", "question 2", "question 4"]
    assert next(r for r in kept if r["prompt"][0]["content"] == "question 0")["flipped"]
    with pytest.raises(ValueError):
        FilterConfig(keep_top_fraction=0.5, keep_top_count=3)


def test_adaptive_margin_is_a_scaled_nonnegative_strength(tmp_path):
    rows = scored_pairs([-2.0, 0.5, 2.0])
    kept, _, _ = run(tmp_path, rows, adaptive_margin_scale=2.0)
    assert [r["adaptive_margin"] for r in kept] == pytest.approx(
        [0.0, 2 * rows[1]["margin_mean"], 2 * rows[2]["margin_mean"]]
    )


def test_requires_reflects_the_rules():
    assert "margin_mean" not in FilterConfig(drop_ties=True).requires()
    assert {"margin_mean", "margin_agree"} <= FilterConfig(flip=True).requires()
    assert "margin_std" in FilterConfig(drop_ambiguous=True, ambiguous_std_above="q0.9").requires()
    assert "judge_consistent" in FilterConfig(drop_judge_inconsistent=True).requires()


def test_missing_columns_fail_before_work_in_the_stage_and_in_pipeline_check(tmp_path, cli):
    src = make_stage_dir(tmp_path / "in", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(InputError, match="margin_mean"):
        FilterStage(FilterConfig(flip=True)).run(src, tmp_path / "out")
    result = cli("filter", src, "-o", tmp_path / "out", "--drop-ambiguous")
    assert result.exit_code == 2 and "prefcurate score" in result.stderr and "Traceback" not in result.stderr
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    recipe = {"input": {"sources": ["d.jsonl"]}, "stages": [{"filter": {"drop_judge_inconsistent": True}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    check = cli("pipeline", "--check", tmp_path / "r.yaml")
    assert check.exit_code == 2 and "judge_consistent" in check.stderr
    with pytest.raises(ConfigError):
        from prefcurate.recipe import validate_config

        validate_config(FilterConfig, {"flip_below": "q2"}, "stages[0].filter")


def test_cli_report_and_rows_in_equal_out_plus_rejects(tmp_path, cli):
    rows = scored_pairs([-3.0, -0.1, 0.05, 2.0, 1.0, 0.2], tie=[False, False, False, False, True, False])
    src = make_stage_dir(tmp_path / "in", rows)
    result = cli(
        "filter",
        src,
        "-o",
        tmp_path / "out",
        "--flip",
        "--drop-ties",
        "--drop-ambiguous",
        "--ambiguous-below",
        "0.1",
        "--keep-top-count",
        "2",
        "--report",
    )
    assert result.exit_code == 0, result.stderr
    assert "flip" in result.stderr and "below-top" in result.stderr and "strength after" in result.stderr
    m = Manifest.load(tmp_path / "out")
    assert m.rows_in == 6 == count_rows(tmp_path / "out") + count_rows(tmp_path / "out", "rejects")
    assert m.extra["rules"]["flip"] == 1 and m.extra["rules"]["tie"] == 1
    assert sum(v for k, v in m.extra["rules"].items() if k != "flip") == m.rows_rejected == 4
    assert m.extra["strength_after"]["n"] == 2


def _report(stderr: str) -> list[str]:
    """The body of the filter report (the lines under its header)."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("filter report")), None)
    return [] if start is None else [line for line in lines[start + 1 :] if line.startswith("  ")]


def test_report_of_a_run_skipped_as_unchanged_comes_from_the_existing_output(tmp_path, cli):
    rows = scored_pairs([-3.0, -0.1, 0.05, 2.0, 1.0, 0.2], tie=[False, False, False, False, True, False])
    src = make_stage_dir(tmp_path / "in", rows)
    options = ["--flip", "--drop-ties", "--drop-ambiguous", "--ambiguous-below", "0.1", "--keep-top-count", "2"]
    first = cli("filter", src, "-o", tmp_path / "out", *options)
    assert first.exit_code == 0, first.stderr
    assert "filter report" not in first.stderr
    written = (tmp_path / "out" / "manifest.json").read_text()
    again = cli("filter", src, "-o", tmp_path / "out", *options, "--report")
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "out" / "manifest.json").read_text() == written  # skipped: the output is untouched
    fresh = cli("filter", src, "-o", tmp_path / "fresh", *options, "--report")
    assert fresh.exit_code == 0, fresh.stderr
    body = _report(fresh.stderr)
    assert any("below-top" in line for line in body) and any("strength after" in line for line in body)
    assert _report(again.stderr) == body


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    a=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=30),
    flip=st.booleans(),
    ambiguous=st.sampled_from([None, "q0.3", "0.2"]),
    top=st.one_of(st.none(), st.floats(0.05, 1.0)),
)
def test_a_filter_never_adds_rows(a, flip, ambiguous, top):
    rows = scored_pairs(a, [x * 0.5 - 0.1 for x in a])
    options = {
        "flip": flip,
        "drop_ambiguous": ambiguous is not None,
        "ambiguous_below": ambiguous or "q0.1",
        "keep_top_fraction": top,
    }
    with tempfile.TemporaryDirectory() as tmp:
        kept, rejected, m = run(Path(tmp), rows, **options)
    assert len(kept) <= len(rows) and len(kept) + len(rejected) == len(rows) == m.rows_in
    assert sorted(r["id"] for r in kept + rejected) == sorted(r["id"] for r in read_back_ids(rows))
    assert all(r["reject_reason"] for r in rejected)


def read_back_ids(rows: list[dict]) -> list[dict]:
    from prefcurate.schema import assistant, pair_id, user

    return [{"id": pair_id(user(r["prompt"]), assistant(r["chosen"]), assistant(r["rejected"]))} for r in rows]
