"""``prefcurate push``: upload an export directory to the Hugging Face Hub.

The command's options are generated from ``PushConfig``, the same model that validates a
recipe's ``output.push``, so the two faces cannot drift apart.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from prefcurate.backends.hub import PushConfig
from prefcurate.cli.options import make_command

_DIRECTORY = inspect.Parameter(
    "directory",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=Annotated[Path, typer.Argument(help="Export output directory (data/, README.md, manifest.json).")],
)
_RECIPE = inspect.Parameter(
    "recipe",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        Path | None, typer.Option("--recipe", help="Recipe file to publish with the data as recipe.yaml.")
    ],
)


def _push(values: dict[str, Any], directory: Path, recipe: Path | None = None) -> None:
    from prefcurate.backends.hub import push_dataset
    from prefcurate.cli.output import err_console
    from prefcurate.recipe import validate_config

    config = validate_config(PushConfig, values, "push")
    url = push_dataset(directory, config, recipe_path=recipe)
    err_console.print(f"pushed: [bold]{url}[/]")


def register(app: typer.Typer) -> None:
    command = make_command(_push, [_DIRECTORY, _RECIPE], PushConfig, "push")
    app.command(
        name="push",
        help="Upload an exported dataset to the Hugging Face Hub: shards, dataset card and recipe in one commit.",
    )(command)
