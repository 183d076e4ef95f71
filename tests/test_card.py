"""The dataset card: Hub front matter that parses, numbers that match the manifests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefcurate.card import build_card, size_category
from prefcurate.stages.export import ExportConfig, ExportStage
from tests.conftest import make_stage_dir
from tests.test_export import hh_pairs, llmbar_pairs
from tests.test_stats import DropShort, DropShortConfig


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, "the card starts with YAML front matter"
    return yaml.safe_load(match.group(1))


def table_rows(card: str, header_start: str) -> list[list[str]]:
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    pairs = llmbar_pairs() + hh_pairs(60)
    for i, p in enumerate(pairs):
        p["margin_mean"] = (i % 7) - 2.5
        p["tie"] = i % 25 == 0
    src = make_stage_dir(tmp_path / "00-in", pairs)
    DropShort(DropShortConfig(min_words=5)).run(src, tmp_path / "01-dropshort")
    out = tmp_path / "my-prefs"
    ExportStage(ExportConfig(format="trl-chat", test_size=0.2, license="cc-by-4.0", shard_rows=50)).run(
        tmp_path / "01-dropshort", out
    )
    return out


def test_front_matter(exported: Path) -> None:
    card = (exported / "README.md").read_text()
    meta = front_matter(card)
    manifest = json.loads((exported / "manifest.json").read_text())
    assert meta["license"] == "cc-by-4.0"
    assert meta["task_categories"] == ["text-generation"]
    assert {"dpo", "rlhf", "preference"} <= set(meta["tags"])
    assert meta["size_categories"] == ["n<1K"]
    data_files = meta["configs"][0]["data_files"]
    assert [f["split"] for f in data_files] == ["train", "test"]
    for entry in data_files:
        matched = sorted(exported.glob(entry["path"]))
        assert [f"data/{p.name}" for p in matched] == manifest["extra"]["files"][entry["split"]]
    assert card == build_card(exported)  # the same text whenever it is rebuilt (push reuses it)


def test_lineage_table_matches_manifests(exported: Path) -> None:
    card = (exported / "README.md").read_text()
    lineage = json.loads((exported / "manifest.json").read_text())["lineage"]
    rows = table_rows(card, "| stage |")
    assert [r[0] for r in rows] == [e["stage"] for e in lineage] == ["fixture", "dropshort", "export"]
    for row, entry in zip(rows, lineage, strict=True):
        assert [int(x.replace(",", "")) for x in row[2:5]] == [
            entry["rows_in"],
            entry["rows_out"],
            entry["rows_rejected"],
        ]
        for reason, n in entry["reject_reasons"].items():
            assert f"{reason}: {n:,}" in row[5]
    assert "min_words=5" in rows[1][1]
    assert "rows_written.train=" in rows[2][7]


def test_bias_ties_and_strength(exported: Path) -> None:
    card = (exported / "README.md").read_text()
    extra = json.loads((exported / "manifest.json").read_text())["extra"]
    bias = extra["figures"]["length_bias"]
    assert f"**{bias['share_chosen_longer']:.1%}** of {bias['pairs']:,} pairs" in card
    assert f"in the input: **{extra['ties']['count']:,}**, dropped" in card
    hist = table_rows(card, "| from | to | pairs |")
    assert sum(int(r[2].replace(",", "")) for r in hist) == extra["pairs_exported"]
    assert "## Preference strength" in card and "margin_mean" in card
    assert 'load_dataset("parquet"' in card


def test_no_margin_no_strength_section(tmp_path: Path) -> None:
    src = make_stage_dir(tmp_path / "in", llmbar_pairs()[:8])
    ExportStage(ExportConfig(format="kto", to="jsonl")).run(src, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Preference strength" not in card
    meta = front_matter(card)
    assert meta["license"] == "other" and "kto" in meta["tags"]
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*.jsonl"}]
    assert 'load_dataset("json"' in card


def test_datasets_loads_the_directory_by_its_card(exported: Path) -> None:
    from datasets import load_dataset

    manifest = json.loads((exported / "manifest.json").read_text())
    ds = load_dataset(str(exported))
    assert {k: len(v) for k, v in ds.items()} == manifest["extra"]["rows_written"]
    assert ds["train"][0]["chosen"][0]["role"] == "assistant"


@pytest.mark.parametrize(("rows", "bucket"), [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (2_000_000, "1M<n<10M")])
def test_size_category(rows: int, bucket: str) -> None:
    assert size_category(rows) == bucket


def test_card_has_no_cli_dependency() -> None:
    code = "import sys, prefcurate.card; print('typer' in sys.modules or 'rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_card_names_no_local_paths(tmp_path: Path) -> None:
    from prefcurate.stages.ingest import IngestConfig, IngestStage
    from tests.conftest import write_jsonl

    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in llmbar_pairs()[:10]]
    raw = write_jsonl(tmp_path / "private" / "prefs.jsonl", rows)
    IngestStage(IngestConfig(sources=[str(raw)])).run(None, tmp_path / "ingested")
    ExportStage(ExportConfig()).run(tmp_path / "ingested", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "prefs.jsonl" in card and str(tmp_path) not in card


@pytest.mark.parametrize(
    ("value", "public"),
    [
        ("hf:/tmp/x/tiny-rm", "hf:tiny-rm"),
        ("hf:/tmp/x/tiny-rm/", "hf:tiny-rm"),
        ("hf:~/models/rm", "hf:rm"),
        ("hf:./models/rm", "hf:rm"),
        ("embedding-bt:/path/to/model", "embedding-bt:model"),
        ("embedding-bt:../minilm", "embedding-bt:minilm"),
        ("/home/me/data/prefs.jsonl", "prefs.jsonl"),
        ("C:\\Users\\me\\prefs.jsonl", "prefs.jsonl"),
        ("file:///home/me/prefs.jsonl", "prefs.jsonl"),
        # kept: Hub ids, named members, URLs, plain words
        ("hf:OpenAssistant/reward-model-deberta-v3-large-v2", "hf:OpenAssistant/reward-model-deberta-v3-large-v2"),
        ("embedding-bt:minilm", "embedding-bt:minilm"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("judge", "judge"),
    ],
)
def test_public_strips_local_paths_inside_member_specs(value: str, public: str) -> None:
    from prefcurate.card import _public

    assert _public(value) == public
    assert _public({"members": {"m": {"spec": value}}, value: 1}) == {"members": {"m": {"spec": public}}, public: 1}


def test_card_names_no_local_model_paths(tmp_path: Path) -> None:
    from prefcurate.stages.score import ScoreConfig, ScoreStage
    from tests.test_score import _build_rm, _pairs

    words = sorted({w for p in _pairs(6) for w in (p["prompt"] + " " + p["chosen"] + " " + p["rejected"]).split()})
    rm = _build_rm(tmp_path / "private" / "models" / "tiny-rm", words, template=True)
    src = make_stage_dir(tmp_path / "in", _pairs(6))
    ScoreStage(ScoreConfig(member=[f"hf:{rm}"])).run(src, tmp_path / "scored")
    ExportStage(ExportConfig()).run(tmp_path / "scored", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(tmp_path) not in card and "/private/" not in card
    assert 'member=["hf:tiny-rm"]' in card and "spec=hf:tiny-rm" in card
