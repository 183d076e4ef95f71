"""Recipes: validation errors name the key path; interpolation; precedence; column chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prefcurate.errors import ConfigError
from prefcurate.recipe import check_columns, load_recipe
from tests.conftest import llmbar_rows, write_jsonl


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipes" / "r.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def _base(**over) -> dict:
    recipe = {
        "name": "t",
        "workdir": "../work",
        "input": {"sources": ["../data/natural.jsonl"]},
        "stages": [{"dedupe": {"semantic": False}}, {"filter": {"drop_ties": True}}],
        "output": {"dir": "../out", "format": "trl", "to": "jsonl"},
    }
    recipe.update(over)
    return recipe


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"stages": [{"dedupe": {"bogus": True}}]}, "stages[0].dedupe.bogus: Extra inputs are not permitted"),
        (
            {"stages": [{"dedupe": {}}, {"filter": {"flip_max_agree": "lots"}}]},
            "stages[1].filter.flip_max_agree: Input should be a valid number",
        ),
        ({"stages": [{"judge": {"concurrency": 4}}]}, "stages[0].judge.model: Field required"),
        ({"stages": [{"sharpen": {}}]}, "stages[0].sharpen: unknown stage"),
        ({"stages": [{"dedupe": {}, "filter": {}}]}, "stages[0]: expected one stage"),
        ({"output": {"format": "trl"}}, "output.dir: field required"),
        ({"output": {"dir": "x", "format": "csv"}}, "output.format: Input should be"),
        ({"input": {"sources": ["a"], "format": "nope"}}, "input.format: Input should be"),
    ],
)
def test_errors_name_the_key_path(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(_write(tmp_path, _base(**change)))
    assert str(err.value).startswith(message)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("input:\n  sources: [a\nstages: {")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_recipe(path)


def test_env_interpolation_with_defaults_and_missing_vars(tmp_path, monkeypatch):
    monkeypatch.setenv("EVAL_SET", "evals/prompts.jsonl")
    recipe = _base(stages=[{"dedupe": {"against": ["../${EVAL_SET}"], "model": "${EMBED:-static}"}}])
    loaded = load_recipe(_write(tmp_path, recipe))
    dedupe = loaded.stages[0].config
    assert [Path(p) for p in dedupe.against] == [tmp_path / "evals" / "prompts.jsonl"]
    assert dedupe.model == "static"
    recipe["stages"][0]["dedupe"]["model"] = "${EMBED_MODEL_UNSET}"
    with pytest.raises(
        ConfigError, match=r"stages\[0\]\.dedupe\.model: environment variable EMBED_MODEL_UNSET is not set"
    ):
        load_recipe(_write(tmp_path, recipe))


def test_relative_paths_are_relative_to_the_recipe_file(tmp_path):
    loaded = load_recipe(_write(tmp_path, _base()))
    here = tmp_path / "recipes"
    assert loaded.workdir == (here / ".." / "work").resolve()
    assert loaded.output.dir == (here / ".." / "out").resolve()
    assert [Path(s).resolve() for s in loaded.input.config.sources] == [(tmp_path / "data" / "natural.jsonl").resolve()]


def test_precedence_flag_over_env_over_recipe_over_default(tmp_path, monkeypatch):
    path = _write(tmp_path, _base())
    assert load_recipe(path).output.config.format == "trl"  # recipe over default (trl-chat)
    monkeypatch.setenv("PREFCURATE_EXPORT_FORMAT", "kto")
    assert load_recipe(path).output.config.format == "kto"  # env over recipe
    assert load_recipe(path, sets=["export.format=openrlhf"]).output.config.format == "openrlhf"  # flag over env
    with pytest.raises(ConfigError, match="--set score"):
        load_recipe(path, sets=["score.folds=3"])
    with pytest.raises(ConfigError, match="STAGE.FIELD=VALUE"):
        load_recipe(path, sets=["format=kto"])


def test_column_chain_is_checked_before_work(tmp_path, cli):
    bad = _base(stages=[{"filter": {"flip": True}}, {"score": {"member": ["embedding-bt"]}}])
    problems = check_columns(load_recipe(_write(tmp_path, bad)))
    assert problems and problems[0].startswith("stages[0].filter: needs column(s)") and "margin_mean" in problems[0]
    result = cli("pipeline", "--check", _write(tmp_path, bad))
    assert (
        result.exit_code == 2 and "stages[0].filter" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    )
    good = _base(stages=[{"score": {"member": ["embedding-bt"]}}, {"filter": {"flip": True}}])
    ok = cli("pipeline", "--check", _write(tmp_path, good))
    assert ok.exit_code == 0, ok.stderr
    assert not (tmp_path / "work").exists()  # --check touches no data


def test_check_runs_without_the_input_existing_but_run_fails_cleanly(tmp_path, cli):
    path = _write(tmp_path, _base())
    result = cli("pipeline", path)
    assert result.exit_code == 2
    assert "natural.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_a_recipe_runs_from_any_working_directory(tmp_path, cli, monkeypatch):
    write_jsonl(tmp_path / "data" / "natural.jsonl", llmbar_rows("natural"))
    path = _write(tmp_path, _base())
    monkeypatch.chdir(tmp_path / "recipes")
    result = cli("pipeline", path.name)
    assert result.exit_code == 0, result.stderr
    assert any((tmp_path / "out").rglob("*.jsonl"))


def test_yaml_on_off_yes_no_are_strings_not_booleans(tmp_path):
    recipe = _base(stages=[{"dedupe": {"on": "prompt", "semantic": True, "exact": False}}])
    text = yaml.safe_dump(recipe).replace("'on'", "on")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert "\n    on: prompt" in text or "on: prompt" in text
    dedupe = load_recipe(path).stages[0].config
    assert (dedupe.on, dedupe.semantic, dedupe.exact) == ("prompt", True, False)


def test_every_shipped_recipe_validates(cli):
    from tests.conftest import REPO

    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert {p.name for p in recipes} >= {"quickstart.yaml", "hh-rlhf.yaml", "judge-local.yaml"}
    for path in recipes:
        result = cli("pipeline", "--check", path)
        assert result.exit_code == 0, f"{path.name}: {result.stderr}"
        assert not check_columns(load_recipe(path))


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (
            [{"dedupe": {"model": "static"}}, {"score": {"member": ["bogus"]}}],
            "stages[1].score.member[0]: unknown reward member 'bogus'",
        ),
        ([{"dedupe": {}}, {"score": {"member": []}}], "stages[1].score.member: give at least one reward member"),
        (
            [{"score": {"member": ["embedding-bt", "hf:"]}}],
            "stages[0].score.member[1]: unknown reward member 'hf:'",
        ),
        (
            [{"score": {"member": ["hf:org-a/rm", "hf:org-b/rm"]}}],
            "stages[0].score.member[1]: 'hf:org-b/rm' has the same column name (hf_rm) as member[0]",
        ),
        ([{"score": {"device": "gpu"}}], "stages[0].score.device: expected auto, cpu or cuda, got 'gpu'"),
        (
            [{"dedupe": {"normalize": ["none", "case"]}}],
            "stages[0].dedupe: --normalize none cannot be combined",
        ),
        ([{"dedupe": {"index": "hnsw", "device": "cuda"}}], "stages[0].dedupe.index: FAISS has no HNSW index on GPU"),
    ],
)
def test_stage_options_checked_only_at_run_time_are_resolved_at_load(tmp_path, stages, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(_write(tmp_path, _base(stages=stages)))
    assert str(err.value).startswith(message)


def test_a_bad_score_member_is_an_error_before_any_work(tmp_path, cli):
    """`pipeline --check` and a run both stop at a reward member that cannot exist, with the key
    path, before a stage runs (the run used to ingest and dedupe first)."""
    write_jsonl(tmp_path / "data" / "natural.jsonl", llmbar_rows("natural"))
    for members, message in (
        (["bogus"], "stages[1].score.member[0]: unknown reward member 'bogus'"),
        ([], "stages[1].score.member: give at least one reward member"),
    ):
        stages = [{"dedupe": {"model": "static"}}, {"score": {"member": members}}]
        path = _write(tmp_path, _base(stages=stages))
        for args in (("--check", path), (path,)):
            result = cli("pipeline", *args)
            assert result.exit_code == 2, (args, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
        assert not (tmp_path / "work").exists()  # no stage ran
    good = _base(stages=[{"dedupe": {"model": "static"}}, {"score": {"member": ["embedding-bt:static", "judge"]}}])
    result = cli("pipeline", "--check", _write(tmp_path, good))
    assert result.exit_code == 2 and "needs column(s) judge_pref" in result.stderr  # members parse; chain checked
