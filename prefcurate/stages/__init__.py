"""The stage registry: name -> class, imported on first use.

Stage modules keep heavy imports (torch, faiss, openai) inside functions, so importing a
stage for its config (CLI help, recipe validation) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefcurate.stages.base import Stage

# In pipeline order. ``ingest`` starts a recipe (its ``input``), ``export`` ends it (``output``).
STAGES: dict[str, str] = {
    "ingest": "prefcurate.stages.ingest:IngestStage",
    "dedupe": "prefcurate.stages.dedupe:DedupeStage",
    "judge": "prefcurate.stages.judge:JudgeStage",
    "score": "prefcurate.stages.score:ScoreStage",
    "filter": "prefcurate.stages.filter:FilterStage",
    "export": "prefcurate.stages.export:ExportStage",
}

# Stages a recipe may list under ``stages:`` (between ingest and export).
MIDDLE = ("dedupe", "judge", "score", "filter")


def stage_names() -> list[str]:
    return list(STAGES)


def get_stage(name: str) -> type[Stage]:
    try:
        module, _, attr = STAGES[name].partition(":")
    except KeyError:
        from prefcurate.errors import ConfigError

        raise ConfigError(f"unknown stage {name!r}", f"one of: {', '.join(STAGES)}") from None
    return getattr(importlib.import_module(module), attr)
