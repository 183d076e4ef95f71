"""Running recipes: stage directories, skip-unchanged resume, reruns after a change."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prefcurate.errors import ConfigError
from prefcurate.recipe import StageSpec, load_recipe
from prefcurate.runner import run_recipe
from prefcurate.shards import Manifest, count_rows
from prefcurate.stages.score import ScoreConfig
from tests.conftest import hh_rows, llmbar_rows, write_jsonl


def _recipe(tmp_path: Path, min_ratio: float = 0.2) -> Path:
    write_jsonl(tmp_path / "data" / "hh.jsonl", hh_rows(150))
    write_jsonl(tmp_path / "data" / "natural.jsonl", llmbar_rows("natural"))
    recipe = {
        "name": "resume",
        "workdir": "work",
        "input": {"sources": ["data/hh.jsonl", "data/natural.jsonl"]},
        "stages": [
            {"dedupe": {"semantic": False}},
            {"filter": {"drop_ties": True, "min_length_ratio": min_ratio}},
        ],
        "output": {"dir": "out", "format": "trl-chat", "to": "parquet"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_stages_write_numbered_directories_and_counts_add_up(tmp_path):
    summary = run_recipe(_recipe(tmp_path))
    assert [s.name for s in summary.stages] == ["ingest", "dedupe", "filter", "export"]
    assert [s.directory.name for s in summary.stages[:3]] == ["00-ingest", "01-dedupe", "02-filter"]
    for run in summary.stages:
        m = run.manifest
        assert m.rows_in == m.rows_out + m.rows_rejected, run.name
        assert count_rows(run.directory, "rejects") == m.rows_rejected
    ingest, dedupe, filt, export = (s.manifest for s in summary.stages)
    assert ingest.rows_out + ingest.rows_rejected == ingest.rows_in and ingest.rows_out > 200
    assert dedupe.rows_in == ingest.rows_out and filt.rows_in == dedupe.rows_out and export.rows_in == filt.rows_out
    assert [s["stage"] for s in export.lineage] == ["ingest", "dedupe", "filter", "export"]


def test_rerun_skips_everything_and_an_option_change_reruns_from_that_stage(tmp_path):
    path = _recipe(tmp_path)
    first = run_recipe(path)
    again = run_recipe(path)
    assert [s.skipped for s in again.stages] == [True, True, True, True]
    changed = run_recipe(load_recipe(path, sets=["filter.min_length_ratio=0.5"]))
    assert [s.skipped for s in changed.stages] == [True, True, False, False]
    assert changed.stages[2].manifest.rows_rejected > first.stages[2].manifest.rows_rejected
    fresh = run_recipe(path, fresh=True)
    assert not any(s.skipped for s in fresh.stages)


def test_a_changed_input_file_reruns_everything(tmp_path):
    path = _recipe(tmp_path)
    run_recipe(path)
    write_jsonl(tmp_path / "data" / "natural.jsonl", llmbar_rows("natural")[:50])
    rerun = run_recipe(path)
    assert not any(s.skipped for s in rerun.stages)
    assert Manifest.load(tmp_path / "work" / "00-ingest").rows_in < rerun.stages[0].manifest.rows_in + 51


def test_pipeline_command_prints_a_summary_and_resumes(tmp_path, cli):
    path = _recipe(tmp_path)
    result = cli("pipeline", path)
    assert result.exit_code == 0, result.stderr
    assert "recipe resume" in result.stderr and "02-filter" in result.stderr
    again = cli("pipeline", path)
    assert again.exit_code == 0 and again.stderr.count("skipped") >= 4


def test_a_run_checks_stage_options_and_eval_sets_before_the_first_stage(tmp_path, cli):
    path = _recipe(tmp_path)
    recipe = load_recipe(path)  # then a stage added by hand, past load_recipe's checks
    recipe.stages.append(StageSpec("score", ScoreConfig(member=["embedding-bt", "nope"]), "stages[2].score"))
    with pytest.raises(ConfigError, match=r"^stages\[2\]\.score\.member\[1\]: unknown reward member 'nope'"):
        run_recipe(recipe)
    assert not (tmp_path / "work").exists()

    raw = yaml.safe_load(path.read_text())
    raw["stages"][0]["dedupe"]["against"] = ["data/natural.jsonl", "evals/missing.jsonl"]
    path.write_text(yaml.safe_dump(raw))
    check = cli("pipeline", "--check", path)  # --check touches no data: it does not look
    assert check.exit_code == 0, check.stderr
    result = cli("pipeline", path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stages[0].dedupe.against[1]: "), result.stderr
    assert "missing.jsonl: no such file or directory" in lines[0]
    assert not (tmp_path / "work").exists()  # ingest did not run first


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("data/export", "is inside the input"),  # read back as data by the next run's ingest
        ("work/01-dedupe", "is the stage directory"),  # export would replace dedupe's output
        ("keep", "not a prefcurate stage directory"),  # a directory holding someone's files
    ],
)
def test_a_run_refuses_an_unsafe_output_before_the_first_stage(tmp_path, cli, output, message):
    path = _recipe(tmp_path)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    raw = yaml.safe_load(path.read_text())
    raw["output"]["dir"] = output
    raw["input"]["sources"] = ["data"]  # the directory of both files
    path.write_text(yaml.safe_dump(raw))
    result = cli("pipeline", path)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists() and (tmp_path / "keep" / "notes.txt").read_text() == "mine"
