"""export: each layout's exact rows on real data, Hub file layout, splits, ties, margins."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefcurate.schema import render_text, render_transcript
from prefcurate.shards import Manifest
from prefcurate.stages.export import ExportConfig, ExportStage, HubDatasetWriter
from prefcurate.stages.export_layouts import concat_lists, prompt_text, stable_fraction
from tests.conftest import hh_rows, llmbar_rows, make_stage_dir

_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _messages(transcript: str) -> list[dict]:
    parts = _TURN.split(transcript)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def hh_pairs(n: int) -> list[dict]:
    """Real HH-RLHF rows as canonical pairs: multi-turn prompts, last assistant turn compared."""
    pairs = []
    for row in hh_rows(n):
        chosen, rejected = _messages(row["chosen"]), _messages(row["rejected"])
        if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            continue
        pairs.append({"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:], "source": "hh-rlhf"})
    return pairs


def llmbar_pairs() -> list[dict]:
    """Real LLMBar rows as single-turn pairs."""
    out = []
    for row in llmbar_rows("natural"):
        good, bad = (row["output_1"], row["output_2"]) if row["label"] == 1 else (row["output_2"], row["output_1"])
        out.append({"prompt": row["input"], "chosen": good, "rejected": bad, "source": "llmbar"})
    return out


def read_rows(out: Path, split: str = "train") -> list[dict]:
    rows = []
    for path in sorted((out / "data").glob(f"{split}-*")):
        if path.suffix == ".parquet":
            rows += pq.read_table(path).to_pylist()
        else:
            rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def export(src: Path, out: Path, **options) -> Manifest:
    manifest, _ = ExportStage(ExportConfig(**options)).run(src, out)
    return manifest


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, list[dict]]:
    pairs = hh_pairs(40)[:30] + llmbar_pairs()[:20]
    assert any(len(p["prompt"]) > 1 for p in pairs), "HH gives multi-turn prompts"
    src = make_stage_dir(tmp_path / "in", pairs)
    return src, pq.read_table(src / "data").to_pylist()


@pytest.mark.parametrize("to", ["parquet", "jsonl"])
def test_trl_layout_is_plain_strings(mixed, tmp_path: Path, to: str) -> None:
    src, canonical = mixed
    m = export(src, tmp_path / "out", format="trl", to=to)
    rows = read_rows(tmp_path / "out")
    assert list(rows[0]) == ["id", "prompt", "chosen", "rejected", "source"]
    assert m.rows_out == len(rows) == len(canonical)
    for row, pair in zip(rows, canonical, strict=True):
        p = pair["prompt"]
        single = len(p) == 1 and p[0]["role"] == "user"
        assert row["prompt"] == (p[0]["content"] if single else render_transcript(p) + "\n\nAssistant:")
        assert row["chosen"] == render_text(pair["chosen"])
        assert row["rejected"] == render_text(pair["rejected"])
        assert (row["id"], row["source"]) == (pair["id"], pair["source"])


@pytest.mark.parametrize("to", ["parquet", "jsonl"])
def test_trl_chat_layout_keeps_message_lists(mixed, tmp_path: Path, to: str) -> None:
    src, canonical = mixed
    export(src, tmp_path / "out", format="trl-chat", to=to)
    rows = read_rows(tmp_path / "out")
    expected = [{k: pair[k] for k in ("id", "prompt", "chosen", "rejected", "source")} for pair in canonical]
    assert rows == expected


@pytest.mark.parametrize("to", ["parquet", "jsonl"])
def test_openrlhf_layout_has_full_conversations(mixed, tmp_path: Path, to: str) -> None:
    src, canonical = mixed
    export(src, tmp_path / "out", format="openrlhf", to=to)
    rows = read_rows(tmp_path / "out")
    for row, pair in zip(rows, canonical, strict=True):
        assert row["chosen"] == pair["prompt"] + pair["chosen"]
        assert row["rejected"] == pair["prompt"] + pair["rejected"]
        assert row["prompt"] == pair["prompt"]
        # What OpenRLHF's DPO path takes as the prompt: the chosen conversation minus its reply.
        assert row["chosen"][:-1] == pair["prompt"]


@pytest.mark.parametrize("to", ["parquet", "jsonl"])
def test_kto_gives_two_rows_per_pair(mixed, tmp_path: Path, to: str) -> None:
    src, canonical = mixed
    m = export(src, tmp_path / "out", format="kto", to=to)
    rows = read_rows(tmp_path / "out")
    assert list(rows[0]) == ["id", "prompt", "completion", "label", "source"]
    assert len(rows) == 2 * len(canonical)
    assert m.rows_out == len(canonical) and m.extra["rows_written"] == {"train": 2 * len(canonical)}
    for i, pair in enumerate(canonical):
        good, bad = rows[2 * i], rows[2 * i + 1]
        assert (good["label"], bad["label"]) == (True, False)
        assert good["completion"] == pair["chosen"] and bad["completion"] == pair["rejected"]
        assert good["prompt"] == bad["prompt"] == pair["prompt"]
        assert good["id"] == bad["id"] == pair["id"]


def _tie_pairs() -> list[dict]:
    pairs = llmbar_pairs()[:12]
    for i in (1, 4, 7):
        pairs[i]["tie"] = True
    return pairs


def test_ties_drop_goes_to_rejects(tmp_path: Path) -> None:
    src = make_stage_dir(tmp_path / "in", _tie_pairs())
    m = export(src, tmp_path / "out", format="trl")
    assert (m.rows_in, m.rows_out, m.rows_rejected) == (12, 9, 3)
    assert m.reject_reasons == {"tie": 3}
    rejects = pq.read_table(tmp_path / "out" / "rejects").to_pylist()
    assert {r["reject_reason"] for r in rejects} == {"tie"} and all(r["tie"] for r in rejects)
    assert "tie" not in read_rows(tmp_path / "out")[0]
    assert m.extra["ties"] == {"count": 3, "policy": "drop"}


def test_ties_keep_marks_them(tmp_path: Path) -> None:
    src = make_stage_dir(tmp_path / "in", _tie_pairs())
    m = export(src, tmp_path / "out", format="trl-chat", ties="keep")
    rows = read_rows(tmp_path / "out")
    assert (m.rows_out, m.rows_rejected) == (12, 0)
    assert [r["tie"] for r in rows].count(True) == 3


def test_margin_from_score_and_adaptive_margin_pass_through(tmp_path: Path) -> None:
    pairs = llmbar_pairs()[:10]
    for i, p in enumerate(pairs):
        p["margin_mean"] = i - 4.5
        p["adaptive_margin"] = max(0.0, i - 4.5)
    src = make_stage_dir(tmp_path / "in", pairs)
    m = export(src, tmp_path / "out", format="openrlhf")
    rows = read_rows(tmp_path / "out")
    assert [r["margin"] for r in rows] == [p["margin_mean"] for p in pairs]
    assert [r["adaptive_margin"] for r in rows] == [p["adaptive_margin"] for p in pairs]
    assert m.extra["margin_from"] == "margin_mean"


def test_margin_from_judge_pref_is_its_logit(tmp_path: Path) -> None:
    pairs = llmbar_pairs()[:4]
    for p, pref in zip(pairs, (0.5, 0.9, 0.1, 1.0), strict=True):
        p["judge_pref"] = pref
    src = make_stage_dir(tmp_path / "in", pairs)
    export(src, tmp_path / "out", format="trl", to="jsonl")
    margins = [r["margin"] for r in read_rows(tmp_path / "out")]
    assert margins[0] == pytest.approx(0.0, abs=1e-12)
    assert margins[1] == pytest.approx(np.log(9)) and margins[2] == pytest.approx(-np.log(9))
    assert np.isfinite(margins[3]) and margins[3] > 6  # a certain verdict stays finite


def test_no_score_no_margin_column(tmp_path: Path) -> None:
    src = make_stage_dir(tmp_path / "in", llmbar_pairs()[:5])
    m = export(src, tmp_path / "out", format="kto")
    assert "margin" not in read_rows(tmp_path / "out")[0]
    assert m.extra["margin_from"] is None


def _empty_like(src: Path, out: Path) -> Path:
    """A stage directory with ``src``'s columns and no row (an input every row left)."""
    from prefcurate.shards import write_stage_dir

    write_stage_dir(out, [pq.read_table(src / "data").slice(0, 0)], stage="fixture", key="empty")
    return out


@pytest.mark.parametrize("fmt", ["trl", "trl-chat", "openrlhf", "kto"])
@pytest.mark.parametrize("scored", ["margin_mean", "judge_pref", None])
def test_empty_input_exports_the_columns_of_a_non_empty_one(tmp_path: Path, fmt: str, scored: str | None) -> None:
    """An empty input gives the layout's columns a non-empty input with the same columns and
    options gives: no ``tie`` with ``--ties drop``, ``margin`` from a scored or judged input."""
    pairs = _tie_pairs()
    for i, p in enumerate(pairs):
        if scored == "margin_mean":
            p["margin_mean"], p["adaptive_margin"] = i - 4.5, max(0.0, i - 4.5)
        elif scored == "judge_pref":
            p["judge_pref"] = (i % 5) / 4
    full = make_stage_dir(tmp_path / "full", pairs)
    empty = _empty_like(full, tmp_path / "empty")
    for ties in ("drop", "keep"):
        options = {"format": fmt, "ties": ties}
        m = export(empty, tmp_path / f"e-{ties}.parquet", **options)
        assert (m.rows_in, m.rows_out) == (0, 0)
        export(full, tmp_path / f"f-{ties}.parquet", **options)
        (empty_file,) = (tmp_path / f"e-{ties}.parquet" / "data").glob("train-*")
        (full_file,) = (tmp_path / f"f-{ties}.parquet" / "data").glob("train-*")
        schema = pq.read_schema(empty_file)
        assert schema == pq.read_schema(full_file)
        assert ("tie" in schema.names) == (ties == "keep")
        assert ("margin" in schema.names) == (scored is not None)
        # JSON Lines: the empty export is one empty file; the rows of a non-empty one hold
        # exactly the columns the same options give an empty Parquet export.
        export(empty, tmp_path / f"e-{ties}.jsonl", to="jsonl", **options)
        export(full, tmp_path / f"f-{ties}.jsonl", to="jsonl", **options)
        assert read_rows(tmp_path / f"e-{ties}.jsonl") == []
        assert {tuple(r) for r in read_rows(tmp_path / f"f-{ties}.jsonl")} == {tuple(schema.names)}


def test_hub_layout_shards_and_card(tmp_path: Path) -> None:
    src = make_stage_dir(tmp_path / "in", llmbar_pairs())
    m = export(src, tmp_path / "out", format="trl", to="jsonl", shard_rows=30)
    names = sorted(p.name for p in (tmp_path / "out" / "data").iterdir())
    assert names == [f"train-{i:05d}-of-00004.jsonl" for i in range(4)]  # 100 rows / 30
    assert m.extra["files"]["train"] == [f"data/{n}" for n in names]
    assert (tmp_path / "out" / "README.md").is_file() and (tmp_path / "out" / "manifest.json").is_file()
    assert [r["id"] for r in read_rows(tmp_path / "out")] == [r["id"] for r in pq.read_table(src / "data").to_pylist()]


def test_test_split_is_stable_by_id(tmp_path: Path) -> None:
    pairs = llmbar_pairs() + hh_pairs(120)
    src = make_stage_dir(tmp_path / "in", pairs)
    m = export(src, tmp_path / "out", format="trl-chat", test_size=0.25, shard_rows=40)
    train, test = read_rows(tmp_path / "out", "train"), read_rows(tmp_path / "out", "test")
    ids = {p["id"] for p in pq.read_table(src / "data").to_pylist()}
    assert {r["id"] for r in train} | {r["id"] for r in test} == ids
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert 0.1 < len(test) / len(ids) < 0.4
    assert m.extra["rows_written"] == {"train": len(train), "test": len(test)}
    # Same ids in test whatever the order and batching of the input.
    src2 = make_stage_dir(tmp_path / "in2", list(reversed(pairs)))
    export(src2, tmp_path / "out2", format="trl-chat", test_size=0.25)
    assert {r["id"] for r in read_rows(tmp_path / "out2", "test")} == {r["id"] for r in test}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=30))
def test_stable_fraction_depends_on_the_id_alone(ids: list[str]) -> None:
    together = stable_fraction(pa.array(ids))
    alone = np.array([stable_fraction(pa.array([i]))[0] for i in ids])
    assert np.array_equal(together, alone)
    assert ((together >= 0) & (together < 1)).all()
    sliced = stable_fraction(pa.array(["x", *ids]).slice(1))
    assert np.array_equal(sliced, together)


def test_stable_fraction_is_uniform_enough() -> None:
    values = stable_fraction(pa.array([f"id-{i}" for i in range(20000)]))
    counts = np.histogram(values, bins=10, range=(0, 1))[0]
    assert counts.min() > 1700 and counts.max() < 2300


def test_vectorised_helpers_match_python(tmp_path: Path) -> None:
    pairs = hh_pairs(60)
    prompts = pa.array([p["prompt"] for p in pairs])
    chosen = pa.array([p["chosen"] for p in pairs])
    expected = [
        p["prompt"][0]["content"]
        if len(p["prompt"]) == 1 and p["prompt"][0]["role"] == "user"
        else render_transcript(p["prompt"]) + "\n\nAssistant:"
        for p in pairs
    ]
    assert prompt_text(prompts).to_pylist() == expected
    assert prompt_text(prompts.slice(3, 10)).to_pylist() == expected[3:13]
    joined = concat_lists(prompts.slice(5, 20), chosen.slice(5, 20)).to_pylist()
    assert joined == [p["prompt"] + p["chosen"] for p in pairs[5:25]]


def test_trl_renders_an_empty_prompt_the_same_whatever_else_is_in_the_batch(tmp_path: Path) -> None:
    with_prompt = llmbar_pairs()[:6]
    # Implicit pairs with no shared prefix: no prompt messages at all.
    implicit = [dict(p, prompt=[], source="implicit") for p in llmbar_pairs()[6:9]]
    mixed = [with_prompt[0], implicit[0], *with_prompt[1:4], implicit[1], implicit[2], *with_prompt[4:]]
    src = make_stage_dir(tmp_path / "mixed", mixed)
    export(src, tmp_path / "out", format="trl")
    rows = {r["id"]: r for r in read_rows(tmp_path / "out")}
    canonical = pq.read_table(src / "data").to_pylist()
    assert len(rows) == len(canonical) == 9 and sum(not p["prompt"] for p in canonical) == 3
    for i, pair in enumerate(canonical):
        if pair["prompt"]:
            assert rows[pair["id"]]["prompt"] == pair["prompt"][0]["content"]
            continue
        alone = make_stage_dir(tmp_path / f"alone-{i}", [pair])
        export(alone, tmp_path / f"alone-{i}-out", format="trl")
        assert rows[pair["id"]]["prompt"] == read_rows(tmp_path / f"alone-{i}-out")[0]["prompt"] == ""


def test_writer_streams_to_disk(tmp_path: Path) -> None:
    """Batches reach disk while writing (at most MAX_PENDING behind): nothing waits for close."""
    src = make_stage_dir(tmp_path / "in", llmbar_pairs())
    table = pq.read_table(src / "data").select(["id", "prompt", "chosen", "rejected", "source"])
    for to in ("jsonl", "parquet"):
        writer = HubDatasetWriter(tmp_path / to, ExportConfig(format="trl", to=to))
        sizes = []
        for start in range(0, 100, 10):
            writer.write(table.slice(start, 10))
            sizes.append(sum(p.stat().st_size for p in (tmp_path / to).glob("*")))
        writer.close()
        final = sum(p.stat().st_size for p in (tmp_path / to).glob("*"))
        assert len(writer._pending) == 0 and sizes == sorted(sizes)
        assert sizes[HubDatasetWriter.MAX_PENDING] > 0  # the first batch is written before the 4th arrives
        # 8 of the 10 batches at least were on disk before close (a Parquet footer comes at close).
        assert sizes[-1] >= (0.7 * final if to == "jsonl" else 1)


def test_cli_export(cli, tmp_path: Path) -> None:
    src = make_stage_dir(tmp_path / "in", _tie_pairs())
    result = cli("export", src, "-o", tmp_path / "out", "--format", "kto", "--to", "jsonl", "--license", "mit")
    assert result.exit_code == 0, result.stderr
    assert len(read_rows(tmp_path / "out")) == 2 * 9
    assert "license: mit" in (tmp_path / "out" / "README.md").read_text()
    bad = cli("export", src, "-o", tmp_path / "bad", "--format", "nope")
    assert bad.exit_code == 2 and "nope" in bad.stderr


def test_rerun_unchanged_is_skipped(tmp_path: Path) -> None:
    src = make_stage_dir(tmp_path / "in", llmbar_pairs()[:5])
    stage = ExportStage(ExportConfig(format="trl"))
    stage.run(src, tmp_path / "out")
    _, skipped = stage.run(src, tmp_path / "out")
    assert skipped
    _, skipped = ExportStage(ExportConfig(format="kto")).run(src, tmp_path / "out")
    assert not skipped and "completion" in read_rows(tmp_path / "out")[0]


# -- round trips through ingest -----------------------------------------------------------
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=25).filter(
    lambda s: s.strip()
)


@st.composite
def _pair(draw: st.DrawFn) -> dict:
    turns = draw(st.integers(0, 2))
    prompt = [{"role": "system", "content": draw(_text)}] if draw(st.booleans()) else []
    for _ in range(turns):
        prompt += [{"role": "user", "content": draw(_text)}, {"role": "assistant", "content": draw(_text)}]
    prompt.append({"role": "user", "content": draw(_text)})
    chosen = draw(_text)
    rejected = draw(_text.filter(lambda s: s.strip() != chosen.strip()))
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}  # fmt: skip


def _ingest(files: Path, out: Path) -> list[dict]:
    from prefcurate.stages.ingest import IngestConfig, IngestStage

    manifest, _ = IngestStage(IngestConfig(sources=[str(files)])).run(None, out, fresh=True)
    assert manifest.rows_rejected == 0, manifest.reject_reasons
    return pq.read_table(out / "data").to_pylist()


def _content(rows: list[dict]) -> list[tuple]:
    return [(r["id"], r["prompt"], r["chosen"], r["rejected"]) for r in rows]


@settings(max_examples=12, deadline=None)
@given(st.lists(_pair(), min_size=1, max_size=6), st.sampled_from(["parquet", "jsonl"]))
def test_ingest_export_trl_chat_ingest_is_the_identity(pairs: list[dict], to: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for i, p in enumerate(pairs):
            p["id"] = f"pair-{i}"
        src = make_stage_dir(tmp_path / "in", pairs)
        export(src, tmp_path / "out", format="trl-chat", to=to)
        again = _ingest(tmp_path / "out" / "data", tmp_path / "again")
        assert _content(again) == _content(pq.read_table(src / "data").to_pylist())


def test_real_data_round_trips_through_the_cli(cli, tmp_path: Path) -> None:
    src = make_stage_dir(tmp_path / "in", hh_pairs(40) + llmbar_pairs())
    original = _content(pq.read_table(src / "data").to_pylist())
    assert cli("export", src, "-o", tmp_path / "chat", "--to", "jsonl").exit_code == 0
    assert cli("ingest", tmp_path / "chat" / "data", "-o", tmp_path / "again").exit_code == 0
    assert _content(pq.read_table(tmp_path / "again" / "data").to_pylist()) == original


def test_export_trl_then_ingest_keeps_single_turn_pairs(tmp_path: Path) -> None:
    src = make_stage_dir(tmp_path / "in", llmbar_pairs())
    original = pq.read_table(src / "data").to_pylist()
    export(src, tmp_path / "out", format="trl", to="jsonl")
    assert _content(_ingest(tmp_path / "out" / "data", tmp_path / "again")) == _content(original)
