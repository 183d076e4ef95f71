"""The CLI as a user meets it: help everywhere, docs true, one-line errors."""

from __future__ import annotations

import re

from prefcurate.cli.app import app
from tests.conftest import REPO


def _commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)


def test_every_command_has_help_and_is_in_the_readme(cli):
    readme = (REPO / "README.md").read_text()
    commands = _commands()
    assert {"ingest", "export", "stats", "pipeline"} <= set(commands)
    for name in commands:
        result = cli(name, "--help")
        assert result.exit_code == 0, result.stderr
        assert "Usage:" in result.stdout
        summary = result.stdout.split("Usage:", 1)[1].split("╭", 1)[0]
        assert len(summary.strip().splitlines()) >= 2, f"{name} has no help text"
        assert re.search(rf"prefcurate {name}\b", readme), f"README does not show `prefcurate {name}`"


def test_every_generated_option_has_help_text():
    import typer.main

    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert (param.help or "").strip(), f"{name} {param.opts[0]} has no help text"


def test_version_and_no_args(cli):
    assert cli("--version").stdout.startswith("prefcurate ")
    result = cli()
    assert "pipeline" in result.stdout + result.stderr


def test_bad_input_is_one_line_exit_2_and_debug_shows_the_traceback(cli, tmp_path):
    result = cli("stats", tmp_path / "missing")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0]
    assert "Traceback" not in result.stderr
    debug = cli("--debug", "stats", tmp_path / "missing")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "InputError" in debug.stderr


def test_unknown_option_is_a_usage_error(cli, tmp_path):
    result = cli("export", tmp_path, "--no-such-option")
    assert result.exit_code == 2
    assert "No such option" in result.stderr


def test_the_readme_options_reference_is_the_generated_one():
    from prefcurate.cli.docs import BEGIN, END, options_reference

    readme = (REPO / "README.md").read_text()
    assert BEGIN in readme and END in readme
    current = readme[readme.index(BEGIN) : readme.index(END) + len(END)]
    assert current == options_reference(), "README is stale: paste `python -m prefcurate.cli.docs` into it"
    for option in (
        "--min-gap",
        "--part-threshold",
        "--verdict-tie",
        "--keep-top-fraction",
        "--test-size",
        "--revision",
    ):
        assert f"`{option}`" in current


def test_an_empty_input_flows_on_and_an_unsafe_output_is_refused(cli, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert cli("ingest", tmp_path / "empty.jsonl", "-o", tmp_path / "e").exit_code == 0
    assert list((tmp_path / "e" / "data").glob("*.parquet"))  # the schema, for the stages after it
    after = cli("filter", tmp_path / "e", "-o", tmp_path / "f", "--drop-ties")
    assert after.exit_code == 0, after.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    refused = cli("ingest", tmp_path / "empty.jsonl", "-o", tmp_path / "notes")
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "not a prefcurate stage directory" in refused.stderr
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
