"""Engines decide where a stage's batches are processed; stages never know which one runs them.

- ``local`` (the default): the stage's own ``process`` in this process, streaming batches.
- ``ray``: the row-parallel part of a stage is mapped over the input's Parquet row groups with
  Ray Data, on a local Ray instance or the cluster named by ``RAY_ADDRESS``: row-wise stages
  whole, two-phase stages (``filter``, ``score``) after their first pass on the driver, and
  ``hf:`` reward members' forward passes (``map_batches``, one GPU per actor when the
  cluster has GPUs). Other global stages (``dedupe``'s clustering, ``judge``, ``export``,
  ``ingest``) run on the driver as they do locally. Either way the stage base writes the
  shards, rejects, counts and manifest, so the output is the same.

An engine is one method: ``process(stage, source, ctx) -> Iterator[BatchResult]``, called by
``Stage.run`` in place of ``stage.process``.

What a stage can do to be parallel under Ray (nothing changes for the local engine):

- implement only ``process_batch`` (row-wise): mapped whole;
- or be *two-phase*: ``plan(source, ctx) -> plan`` makes every global decision in a first
  pass over only the columns it needs (on the driver; the plan must pickle), and
  ``apply_batch(batch, plan, offset, ctx) -> BatchResult`` applies it to the rows starting at
  global row ``offset``; its own ``process`` stays ``plan`` followed by ``apply_batch`` over
  ``source.batches()``, so both engines share one code path;
- set ``uses_gpu = True`` to get one GPU per Ray actor when the cluster has GPUs;
- inside a global step, send heavy per-batch work (a reward model's forward passes) through
  ``map_batches(ctx, make_fn, source, ...)``: in process under the local engine, an actor
  pool (one GPU each when asked and present) under Ray, results in input order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pyarrow as pa

    from prefcurate.stages.base import BatchResult, Stage, StageContext, StageInput

ENGINES = ("local", "ray")


class Engine(Protocol):
    name: str

    def process(self, stage: Stage, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]: ...


def map_batches(
    ctx: StageContext,
    make_fn: Callable[[], Callable[[pa.RecordBatch], Any]],
    source: StageInput,
    *,
    columns: Sequence[str] | None = None,
    batch_rows: int = 1024,
    uses_gpu: bool = False,
) -> Iterator[Any]:
    """``fn(batch)`` for every batch of ``source`` (only ``columns``), in input order.

    ``make_fn`` builds ``fn`` once per worker (load a model there, not per batch) and must
    pickle (a module-level class or ``functools.partial``) for the Ray engine.
    """
    engine = ctx.engine
    if engine is not None and hasattr(engine, "map_batches"):
        yield from engine.map_batches(make_fn, source, columns=columns, batch_rows=batch_rows, uses_gpu=uses_gpu)
        return
    fn = make_fn()
    for batch in source.batches(columns=columns, batch_rows=batch_rows):
        yield fn(batch)


def is_row_wise(stage: Stage) -> bool:
    """A stage that implements ``process_batch`` and leaves ``process`` to the base."""
    from prefcurate.stages.base import Stage

    cls = type(stage)
    return cls.process is Stage.process and cls.process_batch is not Stage.process_batch


def is_two_phase(stage: Stage) -> bool:
    """A stage with a driver-side ``plan`` and a row-wise ``apply_batch`` (by row offset)."""
    return callable(getattr(stage, "plan", None)) and callable(getattr(stage, "apply_batch", None))


def get_engine(name: str | None = None) -> Engine:
    """The engine called ``name`` (``local`` when None); ``ray`` checks Ray is installed now."""
    from prefcurate.errors import ConfigError

    if name in (None, "local"):
        from prefcurate.engines.local import LocalEngine

        return LocalEngine()
    if name == "ray":
        from prefcurate.engines.ray_engine import RayEngine

        return RayEngine()
    raise ConfigError(f"--engine {name!r}: unknown engine", f"one of: {', '.join(ENGINES)}")
