"""The local engine: the stage's own ``process``, streaming batches in this process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefcurate.stages.base import BatchResult, Stage, StageContext, StageInput


class LocalEngine:
    name = "local"

    def process(self, stage: Stage, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]:
        return stage.process(source, ctx)
