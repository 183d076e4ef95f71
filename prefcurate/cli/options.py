"""Build a typer command from a stage's pydantic config model.

One model, two faces: the recipe validates against the model and the command's options are
generated from its fields, so a recipe stage takes exactly the options of its command and a
field's docstring is its ``--help`` text. Supported field types: str, int, float, bool, Path,
Literal (shown as a choice), Optional of those, lists of those (repeatable options) and
``dict[str, str]`` (repeatable ``KEY=VALUE``).

Per-field CLI hints live in ``json_schema_extra={"cli": {...}}``:
``argument`` (positional), ``flags`` (extra option names such as ``-m``).

Precedence: a flag beats ``PREFCURATE_<STAGE>_<FIELD>``, which beats the field's default
(the variables are documented once in the README rather than under every option).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from prefcurate.errors import ConfigError

_SCALARS = (str, int, float, bool, Path)


def env_var(stage: str, field: str) -> str:
    return f"PREFCURATE_{stage}_{field}".upper().replace("-", "_")


def _unwrap_optional(annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _cli_type(annotation: Any) -> tuple[Any, str]:
    """(type typer understands, how to convert back): 'plain' | 'list' | 'dict'."""
    ann = _unwrap_optional(annotation)
    origin = get_origin(ann)
    if origin is Literal:
        return ann, "plain"  # typer renders a Literal as a choice and validates it
    if origin in (list, tuple, set, typing.Sequence) or ann in (list,):
        (inner,) = get_args(ann)[:1] or (str,)
        inner = _unwrap_optional(inner)
        if get_origin(inner) is Literal:
            return list[str], "list"  # typer has no list of choices; pydantic validates, help lists them
        return list[inner if inner in _SCALARS else str], "list"
    if origin is dict:
        return list[str], "dict"
    if ann in _SCALARS:
        return ann, "plain"
    return str, "plain"


def _help(field: FieldInfo, annotation: Any) -> str:
    text = (field.description or "").strip()
    ann = _unwrap_optional(annotation)
    if get_origin(ann) is list and get_args(ann) and get_origin(_unwrap_optional(get_args(ann)[0])) is Literal:
        text += f" [choices: {', '.join(map(str, get_args(_unwrap_optional(get_args(ann)[0]))))}]"
    if get_origin(_unwrap_optional(annotation)) is dict:
        text += " (KEY=VALUE, repeatable)"
    return text


def _parse_dict(name: str, items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--{name.replace('_', '-')} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def build_params(
    config_cls: type[BaseModel], stage: str, skip: set[str] = frozenset()
) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """typer parameters for a model's fields, and each field's conversion kind."""
    params: list[inspect.Parameter] = []
    kinds: dict[str, str] = {}
    for name, field in config_cls.model_fields.items():
        if name in skip:
            continue
        hints = (field.json_schema_extra or {}).get("cli", {}) if isinstance(field.json_schema_extra, dict) else {}
        if hints.get("hidden"):
            continue
        cli_type, kind = _cli_type(field.annotation)
        kinds[name] = kind
        required = field.is_required()
        default: Any = ... if required else field.get_default(call_default_factory=True)
        if kind == "dict":
            default = ... if required else [f"{k}={v}" for k, v in (default or {}).items()]
        elif kind == "list" and default is not ... and default is not None:
            default = list(default)
        help_text = _help(field, field.annotation)
        if hints.get("argument"):
            info = typer.Argument(help=help_text, show_default=not required)
        else:
            option_name = "--" + name.replace("_", "-")
            decls = [option_name, *hints.get("flags", [])]
            if cli_type is bool:
                decls = [f"{option_name}/--no-{name.replace('_', '-')}", *hints.get("flags", [])]
            info = typer.Option(
                *decls, help=help_text, envvar=env_var(stage, name), show_envvar=False, show_default=not required
            )
        annotation = Annotated[cli_type if (required or default is not None) else cli_type | None, info]  # noqa: UP007
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    # typer wants arguments (no default) before options with defaults only for positional
    # parameters; keyword-only parameters can come in any order.
    return params, kinds


def to_config_dict(values: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
    """Convert typer values back to the model's shape (KEY=VALUE lists to dicts)."""
    out = {}
    for name, value in values.items():
        if kinds.get(name) == "dict" and value is not None:
            value = _parse_dict(name, list(value))
        out[name] = value
    return out


def make_command(
    func: Callable[..., Any],
    extra_params: list[inspect.Parameter],
    config_cls: type[BaseModel],
    stage: str,
    skip: set[str] = frozenset(),
) -> Callable[..., Any]:
    """Wrap ``func(config_values: dict, **extra)`` as a typer callback with generated options."""
    params, kinds = build_params(config_cls, stage, skip)
    extra_names = {p.name for p in extra_params}

    def command(**kwargs: Any) -> Any:
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k in extra_names}
        return func(to_config_dict(kwargs, kinds), **extra)

    all_params = sorted([*extra_params, *params], key=lambda p: 0 if _is_argument(p) else 1)
    command.__signature__ = inspect.Signature(all_params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in all_params}
    command.__doc__ = inspect.getdoc(config_cls) or ""
    command.__name__ = stage
    return command


def _is_argument(param: inspect.Parameter) -> bool:
    meta = getattr(param.annotation, "__metadata__", ())
    return any(isinstance(m, typer.models.ArgumentInfo) for m in meta)
