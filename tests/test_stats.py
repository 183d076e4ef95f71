"""stats: figures on known inputs, rejects across the lineage, the CLI (--json and rich)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import Field

from prefcurate.stages.base import BatchResult, Stage, StageConfig, StageContext, split
from prefcurate.stages.export import ExportConfig, ExportStage
from prefcurate.stats import FigureAccumulator, IntDistribution, compute_stats, text_lengths, word_counts
from tests.conftest import hh_rows, make_stage_dir
from tests.test_export import hh_pairs, llmbar_pairs

_ASCII_WS = re.compile(r"[ \t\n\r\x0b\x0c]+")


def words(text: str) -> int:
    return len([w for w in _ASCII_WS.split(text) if w])


def inverted_cdf(values, q: float) -> float:
    return float(np.quantile(np.asarray(values), q, method="inverted_cdf"))


class DropShortConfig(StageConfig):
    min_words: int = Field(3, description="Drop pairs whose chosen has fewer words.")


class DropShort(Stage):
    """A small real row-wise stage, to build a lineage with rejects."""

    name: ClassVar[str] = "dropshort"
    config_cls: ClassVar[type[StageConfig]] = DropShortConfig

    def process_batch(self, batch: pa.RecordBatch, ctx: StageContext) -> BatchResult:
        keep = text_lengths(batch["chosen"]) >= self.config.min_words
        return split(batch, keep, "short")


def test_word_counts_match_python_on_real_text() -> None:
    texts = [r["chosen"] for r in hh_rows(300)] + ["", "  ", "a", " a  b ", None]
    got = word_counts(pa.array(texts))
    assert got.tolist() == [words(t) if t else 0 for t in texts]
    assert word_counts(pa.array(texts).slice(7, 50)).tolist() == got[7:57].tolist()


def test_figures_on_known_input(tmp_path: Path) -> None:
    pairs = [
        {"prompt": "one two three", "chosen": "a b c d", "rejected": "a", "source": "x"},
        {"prompt": "one", "chosen": "a", "rejected": "a b", "source": "x", "tie": True},
        {"prompt": "one two", "chosen": "a b", "rejected": "c d", "source": "y"},
        {
            "prompt": [
                {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "and more"},
            ],
            "chosen": "a b c",
            "rejected": "a",
            "source": "x",
        },
    ]
    src = make_stage_dir(tmp_path / "in", pairs)
    f = compute_stats(src)
    assert f["rows"] == 4 and f["stage"] == "fixture"
    assert f["sources"] == {"x": 3, "y": 1}
    assert f["ties"] == {"count": 1, "share": 0.25}
    assert f["length_bias"] == {
        "pairs": 4,
        "chosen_longer": 2,
        "rejected_longer": 1,
        "equal": 1,
        "share_chosen_longer": 0.5,
        "mean_difference": (3 - 1 + 0 + 2) / 4,
    }
    prompt_words = [3, 1, 2, 5]  # the multi-turn prompt counts every message's words
    lengths = f["lengths"]["prompt"]
    assert lengths["max"] == 5 and lengths["mean"] == pytest.approx(np.mean(prompt_words))
    for name, q in (("p5", 0.05), ("p50", 0.5), ("p95", 0.95)):
        assert lengths[name] == inverted_cdf(prompt_words, q)
    hist = {(h["lo"], h["hi"]): h["count"] for h in lengths["histogram"]}
    assert hist == {(0, 0): 0, (1, 1): 1, (2, 3): 2, (4, 7): 1}


def test_real_lengths_quantiles_exact(tmp_path: Path) -> None:
    pairs = hh_pairs(200)
    src = make_stage_dir(tmp_path / "in", pairs)
    f = compute_stats(src)
    chosen = [words(p["chosen"][0]["content"]) for p in pairs]
    rejected = [words(p["rejected"][0]["content"]) for p in pairs]
    for name, q in (("p5", 0.05), ("p50", 0.5), ("p95", 0.95)):
        assert f["lengths"]["chosen"][name] == inverted_cdf(chosen, q)
    assert f["lengths"]["rejected"]["max"] == max(rejected)
    assert f["length_bias"]["chosen_longer"] == sum(c > r for c, r in zip(chosen, rejected, strict=True))
    assert sum(h["count"] for h in f["lengths"]["chosen"]["histogram"]) == len(pairs)


def test_float_scores_and_member_agreement(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pairs = llmbar_pairs()
    base = rng.normal(size=len(pairs))
    a, b = base + rng.normal(scale=0.3, size=len(pairs)), base + rng.normal(scale=1.0, size=len(pairs))
    c = -base
    for i, p in enumerate(pairs):
        p.update(
            {
                "margin__a": float(a[i]),
                "margin__b": float(b[i]),
                "margin__c": float(c[i]),
                "margin_mean": float((a[i] + b[i] + c[i]) / 3),
                "similarity": None if i % 10 == 0 else 0.5,
            }
        )
    src = make_stage_dir(tmp_path / "in", pairs)
    f = compute_stats(src)
    s = f["scores"]["margin__a"]
    assert s["count"] == len(pairs) and s["mean"] == pytest.approx(a.mean()) and s["std"] == pytest.approx(a.std())
    width = (a.max() - a.min()) / 2000
    for name, q in (("p5", 0.05), ("p50", 0.5), ("p95", 0.95)):
        assert abs(s[name] - inverted_cdf(a, q)) <= width + 1e-12
    assert f["scores"]["similarity"]["nulls"] == 10
    assert sum(h["count"] for h in s["histogram"]) == len(pairs)
    ag = f["agreement"]
    assert ag["members"] == ["margin__a", "margin__b", "margin__c"]
    by = {(p["a"], p["b"]): p for p in ag["pairs"]}
    assert by[("margin__a", "margin__b")]["pearson"] == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert by[("margin__a", "margin__c")]["pearson"] < -0.9
    assert by[("margin__a", "margin__b")]["sign_agreement"] == pytest.approx(np.mean(np.sign(a) == np.sign(b)))
    assert ag["label_agreement"]["margin__c"] == pytest.approx(np.mean(c > 0))


def _chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    pairs = llmbar_pairs()
    for i in range(0, 100, 9):
        pairs[i]["tie"] = True
    fixture = make_stage_dir(tmp_path / "00-fixture", pairs)
    short = tmp_path / "01-dropshort"
    DropShort(DropShortConfig(min_words=20)).run(fixture, short)
    out = tmp_path / "out"
    ExportStage(ExportConfig(format="kto", to="jsonl")).run(short, out)
    return fixture, short, out


def test_rejects_by_stage_over_the_lineage(tmp_path: Path) -> None:
    fixture, short, out = _chain(tmp_path)
    short_rejects = pq.read_table(short / "rejects").num_rows
    f = compute_stats(out)
    by = {s["stage"]: s for s in f["rejects"]["by_stage"]}
    assert list(by) == ["fixture", "dropshort", "export"]
    assert by["dropshort"] == {
        "stage": "dropshort",
        "from": "rejects",
        "directory": str(short),
        "total": short_rejects,
        "reasons": {"short": short_rejects},
    }
    export_manifest = json.loads((out / "manifest.json").read_text())
    assert by["export"]["reasons"] == export_manifest["reject_reasons"] == {"tie": by["export"]["total"]}
    assert f["rejects"]["total"] == short_rejects + by["export"]["total"]
    assert f["format"] == "kto" and f["labels"]["true"] == f["labels"]["false"] == f["rows"] // 2
    # A rerun of an upstream stage with other options: its directory no longer holds the
    # lineage's run, so the lineage's own counts are reported.
    DropShort(DropShortConfig(min_words=1)).run(fixture, short)
    again = {s["stage"]: s for s in compute_stats(out)["rejects"]["by_stage"]}
    assert again["dropshort"]["from"] == "manifest" and again["dropshort"]["total"] == short_rejects
    shutil.rmtree(short)
    assert {s["stage"]: s["from"] for s in compute_stats(out)["rejects"]["by_stage"]}["dropshort"] == "manifest"


def test_stats_on_loose_rejects_dir(tmp_path: Path) -> None:
    _, short, _ = _chain(tmp_path)
    f = compute_stats(short / "rejects")
    assert f["stage"] is None and f["rows"] == f["rejects"]["total"] > 0
    assert f["rejects"]["by_stage"][0]["reasons"] == {"short": f["rows"]}


def test_lineage_extras_are_reported(tmp_path: Path) -> None:
    _, _, out = _chain(tmp_path)
    f = compute_stats(out)
    export = f["lineage"][-1]
    assert export["stage"] == "export" and export["extra"]["rows_written"]["train"] == f["rows"]


def test_cli_json_and_rich(cli, tmp_path: Path) -> None:
    _, _, out = _chain(tmp_path)
    result = cli("stats", out, "--json")
    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["rows"] == compute_stats(out)["rows"]
    shown = cli("stats", tmp_path / "00-fixture")
    assert shown.exit_code == 0, shown.stderr
    fixture = compute_stats(tmp_path / "00-fixture")
    text = shown.stdout
    assert "chosen longer (length bias)" in text
    assert f"{fixture['length_bias']['share_chosen_longer']:.1%}" in text
    assert f"{fixture['ties']['count']:,}" in text and "rejects by stage" in text
    assert "█" in text
    missing = cli("stats", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "nowhere" in missing.stderr


def test_rich_rendering_of_scores_and_extras(tmp_path: Path) -> None:
    from rich.console import Console

    from prefcurate.cli.stats_view import bar, render_stats

    pairs = llmbar_pairs()[:30]
    for i, p in enumerate(pairs):
        p.update({"margin__a": i - 15.0, "margin__b": 15.0 - i})
    src = make_stage_dir(tmp_path / "in", pairs)
    out = tmp_path / "out"
    ExportStage(ExportConfig()).run(src, out)
    console = Console(record=True, width=120)
    render_stats(compute_stats(src), console=console)
    text = console.export_text()
    assert "ensemble member agreement" in text and "margin__a histogram" in text
    render_stats(compute_stats(out), console=console)
    assert "export: stage figures" in console.export_text()
    assert bar(1, 2, 10) == "█" * 5 and bar(1, 2, 1) == "▌" and bar(0, 5) == ""


def test_memory_does_not_grow_with_rows() -> None:
    """The accumulators keep fixed-size state, whatever the row count."""
    dist = IntDistribution()
    for _ in range(50):
        dist.add(np.random.default_rng(0).integers(0, 300, size=20_000))
    assert dist.n == 1_000_000 and len(dist.counts) <= 300
    acc = FigureAccumulator(pa.schema([("source", pa.string())]))
    for start in range(0, 30_000, 10_000):
        acc.add(pa.table({"source": [f"s{i}" for i in range(start, start + 10_000)]}))
    sources = acc.result()["sources"]
    assert len(sources) == 10_001 and sum(sources.values()) == 30_000 and sources["(other)"] == 20_000


def test_ingest_output_and_its_rejects(tmp_path: Path) -> None:
    from tests.conftest import write_jsonl

    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in llmbar_pairs()[:20]]
    rows += [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "", "rejected": "x"}]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    from prefcurate.stages.ingest import IngestConfig, IngestStage

    manifest, _ = IngestStage(IngestConfig(sources=[str(raw)])).run(None, tmp_path / "ingested")
    f = compute_stats(tmp_path / "ingested")
    assert f["rows"] == manifest.rows_out == 20
    ingest = f["rejects"]["by_stage"][0]
    assert ingest["stage"] == "ingest" and ingest["from"] == "rejects"
    assert ingest["reasons"] == manifest.reject_reasons and ingest["total"] == 2
    loose = compute_stats(tmp_path / "ingested" / "rejects")
    assert loose["rows"] == 2 and "raw" in loose["columns"] and loose["lengths"] == {}


def test_a_loose_directory_mixing_datasets_is_one_line_error(cli, tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    (loose / "b.jsonl").write_text(json.dumps({"chosen": "Human: hi Assistant: a", "rejected": "x"}) + "\n")
    result = cli("stats", loose)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "b.jsonl" in result.stderr and "prompt" in result.stderr
    (loose / "b.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "c", "rejected": "d"}) + "\n")
    assert compute_stats(loose)["rows"] == 2


def test_a_directory_whose_rows_are_under_data_without_a_manifest(cli, tmp_path: Path) -> None:
    """A stage or export directory copied without its manifest.json: its rows are read from
    data/ (figures equal those of the directory with its manifest, lineage aside)."""
    src = make_stage_dir(tmp_path / "stage", llmbar_pairs()[:30])
    ExportStage(ExportConfig(format="trl", to="jsonl")).run(src, tmp_path / "export")
    for name in ("stage", "export"):
        with_manifest = compute_stats(tmp_path / name)
        bare = tmp_path / f"bare-{name}"
        shutil.copytree(tmp_path / name, bare)
        (bare / "manifest.json").unlink()
        f = compute_stats(bare)
        assert f["stage"] is None and f["rows"] == with_manifest["rows"] == 30
        assert f["columns"] == with_manifest["columns"] and f["lengths"] == with_manifest["lengths"]
    result = cli("stats", tmp_path / "bare-export")
    assert result.exit_code == 0, result.stderr
    assert "(no manifest)" in result.stdout and "30" in result.stdout
    empty = tmp_path / "nothing"
    (empty / "data").mkdir(parents=True)
    result = cli("stats", empty)
    assert result.exit_code == 2 and "no .parquet or .jsonl files" in result.stderr
