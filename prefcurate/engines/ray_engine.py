"""The Ray engine: the row-wise part of a stage mapped over the input's Parquet shards with Ray Data.

Design:

- The unit of work is one row group of one input shard (``ShardWriter`` writes one row group
  per shard of up to 100k rows), listed from the Parquet footers on the driver with its
  global row offset. A worker reads its row group with pyarrow in the input's own schema
  and walks it in batches of ``batch_rows``, as the local engine does.
- Row-wise stages (``process_batch`` implemented, ``process`` left to the base) are mapped
  whole. Two-phase stages (see ``prefcurate.engines``: ``plan`` + ``apply_batch``) make their
  first pass on the driver over only the columns they need; the plan goes to the object
  store once and workers apply it by row offset. Any other stage (FAISS clustering, an
  ingest reading raw files) runs on the driver exactly as under the local engine.
- Workers are an actor pool: each actor builds the stage once from its config (a model a
  stage loads is loaded once per actor, not per batch) and gets one GPU when the stage sets
  ``uses_gpu = True`` and the cluster has GPUs.
- A worker returns, per batch, one row holding the kept and the rejected rows as Arrow IPC
  bytes: the two tables have different schemas, and packing keeps both exact. The driver
  unpacks them into ``BatchResult``s in input order (``preserve_order``), and the stage base
  writes shards, rejects, counts and the manifest as it does locally: the same rows in the
  same order as the local engine.
- ``ctx.extra`` figures recorded per batch in workers are summed (numbers) or last-wins.
- ``RAY_ADDRESS`` selects a running cluster (``ray start --head``); without it a local Ray
  instance is started. On a cluster, stage directories must be on storage every node can
  read; the driver writes the output.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prefcurate.engines import is_row_wise, is_two_phase
from prefcurate.errors import MissingDependency, PrefcurateError, StageFailed
from prefcurate.shards import DEFAULT_BATCH_ROWS, shard_paths
from prefcurate.stages.base import BatchResult, NullProgress, Stage, StageContext, StageInput


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependency("ray", extra="ray", purpose="--engine ray") from None
    return ray


def _ensure_ray(ray: Any) -> None:
    # Ray Data logs every execution plan on stderr; our progress bars say enough, and worker
    # failures come back as exceptions.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    _check_reachable(address)
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) address that takes no TCP connection is one line
    now: ``ray.init`` retries such an address for minutes, logging, before it gives up."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise StageFailed(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({exc.strerror or exc})",
            "start the cluster (ray start --head), fix RAY_ADDRESS, or unset it for a local Ray",
        ) from None


def work_items(source: StageInput) -> list[dict[str, Any]]:
    """One item per row group: path, row group index and global row offset (footers only)."""
    items, offset = [], 0
    for path in shard_paths(source.dir):
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if n:
                items.append({"path": str(path), "row_group": rg, "offset": offset})
            offset += n
    return items


def _ipc(table: pa.Table | None) -> bytes | None:
    if table is None:
        return None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(blob: bytes | None) -> pa.Table | None:
    return None if blob is None else pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


class StageWorker:
    """A Ray actor: builds the stage once, then turns row groups into packed batch results."""

    def __init__(
        self,
        stage_cls: type[Stage],
        config: dict[str, Any],
        plan: list[Any] | None,
        paths: dict[str, str],
        batch_rows: int,
    ) -> None:
        import ray

        self.stage = stage_cls(stage_cls.config_cls.model_validate(config))
        # The plan travels as [ObjectRef] so Ray does not resolve it implicitly; fetched once per actor.
        self.plan = ray.get(plan[0]) if plan else None
        self.batch_rows = batch_rows
        self.ctx = StageContext(
            workdir=Path(paths["workdir"]),
            output=Path(paths["output"]),
            progress=NullProgress(),
            cache_dir=Path(paths["cache_dir"]),
        )

    def __call__(self, items: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for path, rg, offset in zip(items["path"], items["row_group"], items["offset"], strict=True):
            pf = pq.ParquetFile(str(path))
            offset = int(offset)
            for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=[int(rg)]):
                self.ctx.extra = {}
                if self.plan is not None:
                    result = self.stage.apply_batch(batch, self.plan, offset, self.ctx)  # type: ignore[attr-defined]
                else:
                    result = self.stage.process_batch(batch, self.ctx)
                offset += batch.num_rows
                yield {
                    "kept": [_ipc(result.kept)],
                    "rejected": [_ipc(result.rejected)],
                    "consumed": [result.rows_consumed],
                    "extra": [json.dumps(self.ctx.extra, default=str)],
                }


class FnWorker:
    """A Ray actor for ``map_batches``: builds ``fn`` once, applies it to its row groups' batches."""

    def __init__(
        self, make_fn: Callable[[], Callable[[pa.RecordBatch], Any]], columns: list[str] | None, batch_rows: int
    ) -> None:
        self.fn = make_fn()
        self.columns = columns
        self.batch_rows = batch_rows

    def __call__(self, items: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for path, rg in zip(items["path"], items["row_group"], strict=True):
            pf = pq.ParquetFile(str(path))
            for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=[int(rg)], columns=self.columns):
                yield {"result": [pickle.dumps(self.fn(batch), protocol=pickle.HIGHEST_PROTOCOL)]}


def merge_extra(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Fold one batch's ``ctx.extra`` into the run's: numbers add up, dicts merge, else last wins."""
    for key, value in part.items():
        old = total.get(key)
        if isinstance(value, dict):
            if not isinstance(old, dict):
                total[key] = old = {}
            merge_extra(old, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[key] = (old if isinstance(old, int | float) and not isinstance(old, bool) else 0) + value
        else:
            total[key] = value


class RayEngine:
    name = "ray"

    def __init__(self, batch_rows: int = DEFAULT_BATCH_ROWS, concurrency: int | None = None) -> None:
        self.ray = import_ray()
        self.batch_rows = batch_rows
        self.concurrency = concurrency

    def process(self, stage: Stage, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]:
        if source is None or source.num_rows == 0:
            return stage.process(source, ctx)
        if is_two_phase(stage):
            return self._map(stage, source, ctx, plan=stage.plan(source, ctx))  # type: ignore[attr-defined]
        if is_row_wise(stage):
            return self._map(stage, source, ctx, plan=None)
        return stage.process(source, ctx)  # a global step: on the driver

    def map_batches(
        self,
        make_fn: Callable[[], Callable[[pa.RecordBatch], Any]],
        source: StageInput,
        *,
        columns: Sequence[str] | None,
        batch_rows: int,
        uses_gpu: bool,
    ) -> Iterator[Any]:
        """``prefcurate.engines.map_batches`` on an actor pool; results come back in input order."""
        items = work_items(source)
        if not items:
            return
        args = (make_fn, list(columns) if columns is not None else None, batch_rows)
        for row in self._execute(FnWorker, args, items, uses_gpu, what="map_batches"):
            yield pickle.loads(row["result"])

    def _pool(self, uses_gpu: bool, n_items: int) -> dict[str, Any]:
        """Actor pool options: one GPU per actor for GPU work when the cluster has GPUs."""
        resources = self.ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if uses_gpu and gpus:
            size = min(self.concurrency or gpus, n_items)
            return {"compute": self.ray.data.ActorPoolStrategy(size=size), "num_gpus": 1}
        size = min(self.concurrency or max(1, int(resources.get("CPU", 1))), n_items)
        return {"compute": self.ray.data.ActorPoolStrategy(min_size=1, max_size=size), "num_cpus": 1}

    def _map(self, stage: Stage, source: StageInput, ctx: StageContext, plan: Any) -> Iterator[BatchResult]:
        paths = {"workdir": str(ctx.workdir), "output": str(ctx.output), "cache_dir": str(ctx.cache_dir)}
        _ensure_ray(self.ray)  # before ``put``, which would start Ray on its own terms
        plan_arg = [self.ray.put(plan)] if plan is not None else None
        args = (type(stage), stage.config.model_dump(mode="json"), plan_arg, paths, self.batch_rows)
        task = ctx.progress.task(stage.name, total=source.num_rows)
        for row in self._execute(StageWorker, args, work_items(source), getattr(stage, "uses_gpu", False), stage.name):
            merge_extra(ctx.extra, json.loads(row["extra"]))
            task.advance(row["consumed"])
            yield BatchResult(_from_ipc(row["kept"]), _from_ipc(row["rejected"]), row["consumed"])

    def _execute(
        self, worker: type, args: tuple[Any, ...], items: list[dict[str, Any]], uses_gpu: bool, what: str
    ) -> Iterator[dict[str, Any]]:
        """Run ``worker`` over the work items on an actor pool; yield its output rows in order."""
        ray = self.ray
        _ensure_ray(ray)
        data_ctx = ray.data.DataContext.get_current()
        saved = (data_ctx.execution_options.preserve_order, data_ctx.enable_progress_bars)
        data_ctx.execution_options.preserve_order = True
        data_ctx.enable_progress_bars = False
        try:
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                worker,
                batch_size=1,
                batch_format="numpy",
                fn_constructor_args=args,
                **self._pool(uses_gpu, len(items)),
            )
            for packed in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                yield from packed.to_pylist()
        except PrefcurateError:
            raise
        except Exception as exc:  # Ray wraps worker errors: surface ours as they are
            cause = _prefcurate_cause(exc)
            if cause is not None:
                raise cause from None
            raise StageFailed(f"{what}: a Ray worker failed ({type(exc).__name__}: {_last_line(exc)})") from exc
        finally:
            data_ctx.execution_options.preserve_order, data_ctx.enable_progress_bars = saved


def _prefcurate_cause(exc: BaseException) -> PrefcurateError | None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PrefcurateError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else ""
