"""The typer app. Commands are thin: parse, build the config model, call the library.

``main()`` is the one error boundary: a ``PrefcurateError`` becomes one line on stderr with
exit code 2 (bad input or config) or 1 (runtime failure); ``--debug`` (or
``PREFCURATE_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.exceptions import TyperException

from prefcurate import __version__
from prefcurate.cli.options import make_command
from prefcurate.errors import PrefcurateError
from prefcurate.stages import STAGES, get_stage

app = typer.Typer(
    name="prefcurate",
    help="Curate preference data (prompt, chosen, rejected) into clean training sets for reward models, DPO and RLHF.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Modules with a ``register(app)`` for commands that are not stages (push, ...).
EXTRA_COMMANDS: list[str] = ["prefcurate.cli.push"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prefcurate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    if debug:
        os.environ["PREFCURATE_DEBUG"] = "1"


def _run_stage(
    name: str,
    values: dict[str, Any],
    input: Path | None = None,
    output: Path = Path("."),
    fresh: bool = False,
    quiet: bool = False,
    engine: str = "local",
) -> None:
    from prefcurate.cli.output import err_console, progress_display, stage_table
    from prefcurate.engines import get_engine
    from prefcurate.recipe import validate_config

    cls = get_stage(name)
    config = validate_config(cls.config_cls, values, name)
    with progress_display(quiet) as progress:
        manifest, skipped = cls(config).run(input, output, progress=progress, fresh=fresh, engine=get_engine(engine))
    if not quiet:
        err_console.print(stage_table([(name, str(output), manifest, skipped)], title=name))
        err_console.print(f"output: {output}")


_OUTPUT = inspect.Parameter(
    "output",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=Annotated[Path, typer.Option("-o", "--output", help="Directory to write (a stage directory).")],
)
_INPUT = inspect.Parameter(
    "input",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=Annotated[
        Path, typer.Argument(metavar="IN", help="Stage directory to read (the output of an earlier stage).")
    ],
)
_FRESH = inspect.Parameter(
    "fresh",
    inspect.Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[
        bool, typer.Option("--fresh", help="Rerun even if OUTPUT is up to date for this input and these options.")
    ],
)
_QUIET = inspect.Parameter(
    "quiet",
    inspect.Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")],
)
_ENGINE_HELP = "Where row-wise work runs: local (this process) or ray (Ray Data; RAY_ADDRESS picks a cluster)."
_ENGINE = inspect.Parameter(
    "engine",
    inspect.Parameter.KEYWORD_ONLY,
    default="local",
    annotation=Annotated[str, typer.Option("--engine", envvar="PREFCURATE_ENGINE", help=_ENGINE_HELP)],
)


def _register_stages() -> None:
    for name in STAGES:
        cls = get_stage(name)
        takes_input = getattr(cls, "takes_input", True)
        extra = [_INPUT, _OUTPUT, _FRESH, _QUIET, _ENGINE] if takes_input else [_OUTPUT, _FRESH, _QUIET, _ENGINE]

        def runner(values: dict[str, Any], _name: str = name, **kw: Any) -> None:
            _run_stage(_name, values, **kw)

        command = make_command(runner, extra, cls.config_cls, name)
        help_text = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        app.command(name=name, help=help_text)(command)


_register_stages()  # first, so `--help` lists the stages in pipeline order


@app.command()
def pipeline(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    check: Annotated[
        bool, typer.Option("--check", help="Validate the recipe and the column chain, then stop.")
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Rerun every stage, even unchanged ones.")] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override an option: STAGE.FIELD=VALUE (repeatable).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    engine: Annotated[str, typer.Option("--engine", envvar="PREFCURATE_ENGINE", help=_ENGINE_HELP)] = "local",
) -> None:
    """Run a whole recipe, resumably: stages whose input and options are unchanged are skipped."""
    from prefcurate.cli.output import err_console, progress_display, stage_table
    from prefcurate.recipe import load_recipe
    from prefcurate.runner import check_recipe, run_recipe

    loaded = load_recipe(recipe, sets=set_ or [])
    if check:  # a run checks the recipe itself, before its first stage
        check_recipe(loaded)
        names = " -> ".join(["ingest", *(s.name for s in loaded.stages), *(["export"] if loaded.output else [])])
        err_console.print(f"[green]ok[/] {recipe}: {names}")
        return
    with progress_display(quiet) as progress:
        summary = run_recipe(loaded, fresh=fresh, progress=progress, engine=engine)
    rows = [(s.name, str(s.directory), s.manifest, s.skipped) for s in summary.stages]
    err_console.print(stage_table(rows, title=f"recipe {summary.recipe}"))
    err_console.print(f"workdir: {summary.workdir}")
    if summary.output:
        err_console.print(f"output: [bold]{summary.output}[/]")
    if summary.pushed:
        err_console.print(f"pushed: [bold]{summary.pushed}[/]")


@app.command()
def stats(
    directory: Annotated[Path, typer.Argument(help="A stage directory (any stage's output).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on stdout.")] = False,
) -> None:
    """Figures of a stage directory: rows, sources, lengths, length bias, ties, rejects, scores."""
    from prefcurate.stats import compute_stats

    figures = compute_stats(directory)
    if as_json:
        sys.stdout.write(json.dumps(figures, indent=2, default=str) + "\n")
        sys.stdout.flush()
        return
    from prefcurate.cli.stats_view import render_stats

    render_stats(figures)


def _load_extra_commands() -> None:
    for module in EXTRA_COMMANDS:
        importlib.import_module(module).register(app)


_load_extra_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point and the one error boundary."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("PREFCURATE_DEBUG") == "1"
    try:
        code = app(args=args, standalone_mode=False, prog_name="prefcurate")
    except PrefcurateError as exc:
        if debug:
            raise
        _fail(str(exc), exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fail("aborted", 130)
    except TyperException as exc:  # usage errors: typer prints them as click did
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume", 130)
    except (BrokenPipeError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        if debug:
            raise
        _fail(f"{exc.filename or ''}: {exc.strerror}".lstrip(": "), 2)
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(message: str, code: int) -> None:
    hint = "" if os.environ.get("PREFCURATE_DEBUG") else "  (--debug for the traceback)"
    typer.echo(f"error: {message}{hint}", err=True)
    sys.exit(code)
