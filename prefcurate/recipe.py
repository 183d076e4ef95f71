"""Recipes: YAML -> validated stage configs, with ``${ENV}`` interpolation.

A recipe::

    name: quickstart
    workdir: runs/quickstart        # stage directories go here (relative to this file)
    input:                          # the options of `prefcurate ingest`
      sources: [../sample_data/hh-rlhf-harmless-base.jsonl.gz]
    stages:                         # each: {stage-name: options of `prefcurate <stage-name>`}
      - dedupe: {exact: true}
      - filter: {drop_ties: true}
    output:                         # the options of `prefcurate export`, plus `dir` (and `push`)
      dir: out/quickstart
      format: trl
      to: jsonl

Relative paths are relative to the recipe file. Values may use ``${VAR}`` or
``${VAR:-default}``. Precedence, highest first: ``pipeline --set stage.field=value``, then
``PREFCURATE_<STAGE>_<FIELD>``, then the recipe, then the option's default. Errors name the
key path: ``stages[2].judge.model: Field required``.

Beyond each option's type, a stage's options that can be resolved without loading a model or
reading data are resolved at load too (``check_options``: the score stage's reward members,
say), so ``pipeline --check`` and a run catch them before any stage starts:
``stages[1].score.member[0]: unknown reward member 'bogus'``.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from prefcurate.cli.options import env_var
from prefcurate.errors import ConfigError
from prefcurate.stages import MIDDLE, STAGES, get_stage
from prefcurate.stages.base import StageConfig

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOP_KEYS = {"name", "workdir", "input", "stages", "output"}


class _Yaml12BoolLoader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false. PyYAML follows YAML 1.1, where ``on``, ``off``,
    ``yes`` and ``no`` are booleans, which would turn ``dedupe: {on: prompt}`` into ``{True: ...}``."""


_BOOL = "tag:yaml.org,2002:bool"
_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


@dataclass
class StageSpec:
    name: str
    config: StageConfig
    where: str  # key path in the recipe, for messages


@dataclass
class OutputSpec:
    dir: Path
    config: StageConfig
    push: dict[str, Any] | None = None


@dataclass
class Recipe:
    name: str
    workdir: Path
    input: StageSpec
    stages: list[StageSpec]
    output: OutputSpec | None
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def format_validation_error(where: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    path = f"{where}.{loc}" if loc else where
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{path}: {first['msg']}{more}"


def validate_config(cls: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """Validate ``data`` against ``cls``; a failure is a one-line ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(where, exc)) from None
    except ConfigError as exc:  # a validator's own error (pydantic passes it through): add the key path
        raise ConfigError(f"{where}: {exc.message}", exc.hint) from None


def interpolate(value: Any, where: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{where}: environment variable {name} is not set", f"export {name}=... or use ${{{name}:-default}}"
            )

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _env_overrides(stage: str, cls: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in cls.model_fields:
        raw = os.environ.get(env_var(stage, name))
        if raw is not None:
            out[name] = _parse_scalar(raw)
    return out


def _parse_scalar(raw: str) -> Any:
    text = raw.strip()
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    return raw


def _path_fields(cls: type[BaseModel]) -> dict[str, str]:
    """Fields typed Path (or list of Path): resolved relative to the recipe file."""
    out = {}
    for name, f in cls.model_fields.items():
        ann = f.annotation
        if get_origin(ann) in (typing.Union, types.UnionType):
            ann = next((a for a in get_args(ann) if a is not type(None)), ann)
        if ann is Path:
            out[name] = "one"
        elif get_origin(ann) is list and get_args(ann) and get_args(ann)[0] is Path:
            out[name] = "list"
    return out


def _resolve_paths(cls: type[BaseModel], data: dict[str, Any], base: Path) -> dict[str, Any]:
    data = dict(data)
    for name, kind in _path_fields(cls).items():
        if data.get(name) is None:
            continue
        if kind == "one":
            data[name] = str(_rel(base, data[name]))
        elif isinstance(data[name], list):
            data[name] = [str(_rel(base, v)) for v in data[name]]
    resolver = getattr(cls, "resolve_recipe_paths", None)
    return resolver(data, base) if resolver else data


def _rel(base: Path, value: Any) -> Path:
    p = Path(str(value)).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def parse_sets(sets: list[str]) -> dict[str, dict[str, Any]]:
    """``--set judge.model=gpt-4o`` -> {"judge": {"model": "gpt-4o"}} (also input./output.)."""
    out: dict[str, dict[str, Any]] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        target, dot, fld = key.partition(".")
        if not sep or not dot or not fld:
            raise ConfigError(f"--set {item!r}: expected STAGE.FIELD=VALUE", "e.g. --set judge.model=gpt-4o-mini")
        out.setdefault(target.strip(), {})[fld.strip()] = _parse_scalar(value)
    return out


def _build(
    stage: str,
    data: dict[str, Any],
    where: str,
    base: Path,
    sets: dict[str, dict[str, Any]],
    extra_keys: tuple[str, ...] = (),
) -> tuple[StageConfig, dict[str, Any]]:
    cls = get_stage(stage).config_cls
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {type(data).__name__}")
    data = dict(data)
    kept = {k: data.pop(k) for k in extra_keys if k in data}
    merged = {**data, **_env_overrides(stage, cls), **sets.get(stage, {})}
    merged = _resolve_paths(cls, merged, base)
    return validate_config(cls, merged, where), kept


def load_recipe(path: str | Path, sets: list[str] | None = None) -> Recipe:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Yaml12BoolLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    return build_recipe(raw, base=path.resolve().parent, sets=sets, path=path)


def build_recipe(raw: Any, base: Path, sets: list[str] | None = None, path: Path | None = None) -> Recipe:
    if not isinstance(raw, dict):
        raise ConfigError("recipe: expected a mapping with input, stages and output")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key", f"a recipe has {', '.join(sorted(_TOP_KEYS))}")
    raw = interpolate(raw)
    overrides = parse_sets(sets or [])
    if "input" not in raw:
        raise ConfigError("input: field required", "give the sources and options of `prefcurate ingest`")
    ingest_cfg, _ = _build("ingest", raw["input"], "input", base, overrides)
    specs = []
    stages = raw.get("stages") or []
    if not isinstance(stages, list):
        raise ConfigError("stages: expected a list of {stage: options}")
    for i, entry in enumerate(stages):
        where = f"stages[{i}]"
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{where}: expected one stage as {{name: options}}")
        ((name, options),) = entry.items()
        if name not in MIDDLE or name not in STAGES:
            avail = [s for s in MIDDLE if s in STAGES]
            raise ConfigError(f"{where}.{name}: unknown stage", f"one of: {', '.join(avail)}")
        cfg, _ = _build(name, options, f"{where}.{name}", base, overrides)
        spec = StageSpec(name, cfg, f"{where}.{name}")
        check_options(spec)
        specs.append(spec)
    output = None
    if raw.get("output") is not None:
        out_raw = raw["output"]
        if not isinstance(out_raw, dict) or "dir" not in out_raw:
            raise ConfigError("output.dir: field required", "where the exported dataset goes")
        cfg, kept = _build("export", out_raw, "output", base, overrides, extra_keys=("dir", "push"))
        output = OutputSpec(dir=_rel(base, kept["dir"]), config=cfg, push=kept.get("push"))
    unknown_sets = sorted(set(overrides) - {"ingest", "export", *(s.name for s in specs)})
    if unknown_sets:
        raise ConfigError(f"--set {unknown_sets[0]}.*: no such stage in this recipe")
    workdir = _rel(base, raw.get("workdir") or f".prefcurate/{raw.get('name', 'run')}")
    if os.environ.get("PREFCURATE_WORKDIR"):
        workdir = Path(os.environ["PREFCURATE_WORKDIR"]).expanduser()
    return Recipe(
        name=str(raw.get("name") or (path.stem if path else "recipe")),
        workdir=workdir,
        input=StageSpec("ingest", ingest_cfg, "input"),
        stages=specs,
        output=output,
        path=path,
        raw=raw,
    )


def check_columns(recipe: Recipe) -> list[str]:
    """Each stage's required columns must be produced upstream. Returns the problems found."""
    problems = []
    available = set(recipe.input.config.produces())
    chain = [*recipe.stages, *([StageSpec("export", recipe.output.config, "output")] if recipe.output else [])]
    for spec in chain:
        missing = sorted(spec.config.requires() - available)
        if missing:
            problems.append(f"{spec.where}: needs column(s) {', '.join(missing)}, which no earlier stage produces")
        available |= spec.config.produces()
    return problems


def check_options(spec: StageSpec) -> None:
    """Resolve the options of ``spec`` that its stage would otherwise check only when it runs,
    as far as that needs no model and no data; a problem is a ConfigError naming the key."""
    check = _OPTION_CHECKS.get(spec.name)
    if check is not None:
        check(spec.config, spec.where)


def _check_score(cfg: Any, where: str) -> None:
    """Every reward member parses (the stage's own parser: kind and name), there is at least
    one, no two share a column name; the device is one the members accept."""
    from prefcurate.backends.reward import parse_member, parse_members

    options = cfg.member_options()
    first: dict[str, int] = {}
    for i, spec in enumerate(cfg.member):
        path = f"{where}.member[{i}]"
        try:
            member = parse_member(spec, options)
        except ConfigError as exc:
            subject = f"member {spec.strip()!r}: "
            detail = f"{exc.message.removeprefix(subject)} {spec!r}" if exc.message.startswith(subject) else exc.message
            raise ConfigError(f"{path}: {detail}", exc.hint) from None
        if member.name in first:
            raise ConfigError(
                f"{path}: {spec!r} has the same column name ({member.name}) as member[{first[member.name]}]",
                "list each member once",
            )
        first[member.name] = i
    try:
        parse_members(cfg.member, options)  # the list as a whole (at least one member)
    except ConfigError as exc:
        text = exc.message
        raise ConfigError(
            f"{where}.{text}" if text.startswith("member") else f"{where}.member: {text}", exc.hint
        ) from None
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{where}.device: expected auto, cpu or cuda, got {cfg.device!r}")


def _check_dedupe(cfg: Any, where: str) -> None:
    if cfg.index == "hnsw" and cfg.device == "cuda":
        raise ConfigError(f"{where}.index: FAISS has no HNSW index on GPU", "use index: ivf or flat with device: cuda")


_OPTION_CHECKS: dict[str, Any] = {"score": _check_score, "dedupe": _check_dedupe}
