"""Run a recipe: each stage into ``workdir/NN-name``, skipping stages whose input and options
are unchanged, so a crash or an edit costs only the stages it touches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prefcurate.engines import Engine, get_engine
from prefcurate.errors import ConfigError, InputError
from prefcurate.recipe import Recipe, StageSpec, check_columns, check_options, load_recipe
from prefcurate.shards import Manifest, check_output_dir
from prefcurate.stages import get_stage
from prefcurate.stages.base import NullProgress, Progress, request_cache
from prefcurate.stages.ingest_read import HUB_PREFIX, expand_globs


@dataclass
class StageRun:
    name: str
    directory: Path
    manifest: Manifest
    skipped: bool


@dataclass
class RunSummary:
    recipe: str
    workdir: Path
    stages: list[StageRun] = field(default_factory=list)
    output: Path | None = None
    pushed: str | None = None


def stage_dirs(recipe: Recipe) -> list[tuple[StageSpec, Path]]:
    """Where each stage of a recipe writes."""
    out = [(recipe.input, recipe.workdir / "00-ingest")]
    for i, spec in enumerate(recipe.stages, start=1):
        out.append((spec, recipe.workdir / f"{i:02d}-{spec.name}"))
    return out


def check_recipe(recipe: Recipe) -> None:
    """Validate before work, touching no data: configs validated at load (their options resolved
    too, ``recipe.check_options``, again here for a Recipe built by hand); here the column chain."""
    for spec in recipe.stages:
        check_options(spec)
    problems = check_columns(recipe)
    if problems:
        raise ConfigError(problems[0], "add the stage that produces the column earlier in `stages`")
    if recipe.output is not None and recipe.output.push is not None:
        from prefcurate.backends.hub import push_config

        push_config(recipe.output.push)


def check_run_inputs(recipe: Recipe) -> None:
    """Before the first stage of a run: the local files a later stage reads besides its input
    (dedupe's evaluation sets) exist, so a typo does not surface after the earlier stages ran.
    (``--check`` touches no data: it does not look.)"""
    against: list[Path] = []
    for spec in recipe.stages:
        for i, path in enumerate(getattr(spec.config, "against", None) or []):
            if not Path(path).exists():
                raise InputError(
                    f"{spec.where}.against[{i}]: {path}: no such file or directory",
                    "give a stage directory, a .txt file, JSON/JSONL or Parquet",
                )
            against.append(Path(path))
    # Every directory the run will replace, checked now rather than when its stage comes: an
    # output over the recipe's inputs or over another stage's directory is refused before work.
    sources = [Path(s) for s in expand_globs(list(recipe.input.config.sources)) if not s.startswith(HUB_PREFIX)]
    dirs = [directory for _, directory in stage_dirs(recipe)]
    cache = request_cache(recipe.workdir)
    for directory in dirs:
        check_output_dir(directory, [*sources, *against], [cache])
    if recipe.output is not None:
        reserved = [cache] + [(d, f"the stage directory {d}") for d in dirs]
        check_output_dir(recipe.output.dir, [*sources, *against], reserved)


def run_recipe(
    recipe: Recipe | str | Path,
    *,
    fresh: bool = False,
    progress: Progress | None = None,
    on_stage: Callable[[StageRun], None] | None = None,
    engine: str | Engine | None = None,
) -> RunSummary:
    """Run every stage of a recipe in order; returns what each stage did.

    ``engine``: ``"local"`` (default) or ``"ray"`` (see ``prefcurate.engines``); same output.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    check_recipe(recipe)
    check_run_inputs(recipe)
    if recipe.output is not None and recipe.output.push:
        from prefcurate.backends.hub import resolve_token

        resolve_token()  # no token: fail now, not after every stage ran
    engine = get_engine(engine) if engine is None or isinstance(engine, str) else engine
    progress = progress or NullProgress()
    summary = RunSummary(recipe=recipe.name, workdir=recipe.workdir)
    previous: Path | None = None
    for spec, directory in stage_dirs(recipe):
        stage = get_stage(spec.name)(spec.config)
        manifest, skipped = stage.run(
            previous, directory, workdir=recipe.workdir, progress=progress, fresh=fresh, engine=engine
        )
        run = StageRun(spec.name, directory, manifest, skipped)
        summary.stages.append(run)
        if on_stage:
            on_stage(run)
        previous = directory
    if recipe.output is not None:
        stage = get_stage("export")(recipe.output.config)
        manifest, skipped = stage.run(
            previous, recipe.output.dir, workdir=recipe.workdir, progress=progress, fresh=fresh, engine=engine
        )
        run = StageRun("export", recipe.output.dir, manifest, skipped)
        summary.stages.append(run)
        summary.output = recipe.output.dir
        if on_stage:
            on_stage(run)
        if recipe.output.push:
            from prefcurate.backends.hub import push_from_recipe

            summary.pushed = push_from_recipe(recipe.output.dir, recipe.output.push, recipe)
    return summary
