"""The stage contract and the logic every stage shares.

A stage is a library object configured by a pydantic model. It reads a ``StageInput`` (a
stage directory it can stream, more than once when it has a global step) and yields
``BatchResult``s: the rows it keeps and the rows it removes with a reason. The base does the
rest, once for every stage: it writes shards and rejects, counts per reason, checks that
rows in = rows out + rows rejected, times the run, writes the manifest, and skips the run
when the input fingerprint and options are unchanged.

Row-wise stages implement ``process_batch`` only; a global stage (clustering, cross-fitting)
overrides ``process`` and makes a first pass over only the columns it needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from prefcurate import __version__
from prefcurate.errors import InputError, StageFailed
from prefcurate.schema import REJECT_REASON, REJECT_STAGE, SCHEMA
from prefcurate.shards import (
    DEFAULT_BATCH_ROWS,
    Manifest,
    StageOutput,
    check_output_dir,
    count_rows,
    fingerprint,
    iter_batches,
    read_schema,
    require_stage_dir,
)

if TYPE_CHECKING:
    from prefcurate.engines import Engine


class StageConfig(BaseModel):
    """Base of every stage's options. ``extra="forbid"``: an unknown key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def requires(self) -> set[str]:
        """Columns this stage needs from upstream (checked by ``pipeline --check``)."""
        return {"id", "prompt", "chosen", "rejected"}

    def produces(self) -> set[str]:
        """Columns this stage adds."""
        return set()

    def fingerprint_params(self) -> dict[str, Any]:
        """The options that change the output (all of them unless a stage says otherwise)."""
        return self.model_dump(mode="json")


class ProgressTask(Protocol):
    def advance(self, n: int = 1) -> None: ...
    def set_total(self, total: int | None) -> None: ...
    def describe(self, text: str) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None = None, unit: str = "rows") -> ProgressTask: ...
    def note(self, text: str) -> None: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def set_total(self, total: int | None) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


class NullProgress:
    """Progress that shows nothing (library use, tests)."""

    def task(self, description: str, total: int | None = None, unit: str = "rows") -> ProgressTask:
        return _NullTask()

    def note(self, text: str) -> None:
        pass


def default_cache_dir() -> Path:
    """Shared cache (embeddings, distilled models): ``$PREFCURATE_CACHE_DIR`` or ``~/.cache/prefcurate``."""
    env = os.environ.get("PREFCURATE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "prefcurate"


def request_cache(workdir: str | Path) -> tuple[Path, str]:
    """(the directory of the run's per-run caches: the judge's request cache, what it is
    called in errors). No stage output may be, hold or lie in it (``check_output_dir``)."""
    path = Path(workdir) / "cache"
    return path, f"the request cache {path}"


@dataclass
class StageContext:
    """What a running stage may use besides its input."""

    workdir: Path
    """The run's working directory: per-run caches (e.g. the judge's request cache) live here."""
    output: Path
    """The stage's (temporary) output directory, for side files that ship with the stage."""
    progress: Progress = field(default_factory=NullProgress)
    cache_dir: Path = field(default_factory=default_cache_dir)
    extra: dict[str, Any] = field(default_factory=dict)
    """Stage-specific figures for the manifest (token usage, cluster sizes, ...)."""
    engine: Engine | None = None
    """The engine running this stage (None: local). Heavy per-batch work inside a global step
    (reward models) can go through ``prefcurate.engines.map_batches(ctx, ...)`` to use it."""


class StageInput:
    """A finished stage directory a stage reads, as many times as it needs."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = require_stage_dir(directory)
        self.manifest = Manifest.load(self.dir)
        self.num_rows = count_rows(self.dir)
        self.schema = read_schema(self.dir)

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names) if self.schema is not None else []

    def batches(
        self,
        columns: Sequence[str] | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Rows ``[start, stop)`` in batches (``shards.iter_batches``)."""
        return iter_batches(self.dir, columns, batch_rows, start=start, stop=stop)


@dataclass
class BatchResult:
    """The rows a stage keeps, and the rows it removes (with a ``reject_reason`` column)."""

    kept: pa.Table
    rejected: pa.Table | None = None
    consumed: int | None = None
    """Input rows this result accounts for (default: kept + rejected)."""

    @property
    def rows_consumed(self) -> int:
        if self.consumed is not None:
            return self.consumed
        return self.kept.num_rows + (self.rejected.num_rows if self.rejected is not None else 0)


def as_table(data: pa.Table | pa.RecordBatch) -> pa.Table:
    return data if isinstance(data, pa.Table) else pa.Table.from_batches([data])


def split(
    data: pa.Table | pa.RecordBatch,
    keep: np.ndarray | pa.Array | Sequence[bool],
    reasons: Sequence[str | None] | np.ndarray | str,
    extra: dict[str, Sequence[Any] | pa.Array] | None = None,
) -> BatchResult:
    """Split rows by a keep mask; removed rows carry their reason and any ``extra`` columns.

    ``reasons`` is one reason for every removed row or one entry per input row (entries of
    kept rows are ignored). ``extra`` columns are per input row and added to rejects only.
    """
    table = as_table(data)
    mask = np.asarray(keep, dtype=bool)
    if mask.shape != (table.num_rows,):
        raise ValueError(f"keep mask has {mask.shape} entries for {table.num_rows} rows")
    kept = table.filter(pa.array(mask))
    if mask.all():
        return BatchResult(kept)
    drop = ~mask
    rejected = table.filter(pa.array(drop))
    idx = np.flatnonzero(drop)
    if isinstance(reasons, str):
        reason_col = pa.array([reasons] * len(idx), pa.string())
    else:
        reason_arr = np.asarray(reasons, dtype=object)
        reason_col = pa.array(reason_arr[idx].tolist(), pa.string())
    rejected = rejected.append_column(REJECT_REASON, reason_col)
    for name, values in (extra or {}).items():
        col = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(list(values))
        rejected = rejected.append_column(name, col.take(pa.array(idx)))
    return BatchResult(kept, rejected)


def check_canonical(source: StageInput, needed: set[str], stage: str) -> None:
    """An ``InputError`` when ``source`` lacks a canonical column the stage needs, or holds
    one with another type: an export directory (TRL, OpenRLHF or KTO layout, prompts as
    text) or other outside data used as a stage input crashed deep in the stage instead. An
    export directory is refused whatever its columns (OpenRLHF's chosen holds the prompt too)."""
    if source.manifest is not None and source.manifest.stage == "export":
        raise InputError(
            f"{source.dir}: an export (a training layout, not the canonical schema), not a stage input",
            "give the stage directory it was exported from, or `prefcurate ingest` it",
        )
    hint = "give a prefcurate stage directory; other data (an export, a TRL dataset) goes through `prefcurate ingest`"
    names = set(source.columns)
    missing = sorted(c for c in needed & set(SCHEMA.names) if c not in names)
    if missing:
        raise InputError(f"{source.dir}: {stage} needs column(s) {', '.join(missing)}, which it lacks", hint)
    assert source.schema is not None or not names
    for name in sorted(needed & set(SCHEMA.names)):
        have, want = source.schema.field(name).type, SCHEMA.field(name).type
        if not _same_shape(have, want):
            raise InputError(f"{source.dir}: column {name} is {have}, not the canonical {want}", hint)


def _same_shape(have: pa.DataType, want: pa.DataType) -> bool:
    """Equal up to list-item names, string widths, struct field order and nullability."""
    if pa.types.is_string(want) or pa.types.is_large_string(want):
        return pa.types.is_string(have) or pa.types.is_large_string(have)
    if pa.types.is_list(want) or pa.types.is_large_list(want):
        return (pa.types.is_list(have) or pa.types.is_large_list(have)) and _same_shape(
            have.value_type, want.value_type
        )
    if pa.types.is_struct(want):
        fields = {f.name: f.type for f in have} if pa.types.is_struct(have) else {}
        return set(fields) == {f.name for f in want} and all(_same_shape(fields[f.name], f.type) for f in want)
    return have == want


class Stage:
    """Base of every stage. Subclasses set ``name`` and ``config_cls`` and implement
    ``process_batch`` (row-wise) or ``process`` (global)."""

    name: ClassVar[str]
    config_cls: ClassVar[type[StageConfig]]
    reject_extras: ClassVar[dict[str, pa.DataType]] = {}
    """Columns this stage adds to its rejects (typed, so every rejects shard has one schema)."""

    def __init__(self, config: StageConfig) -> None:
        self.config = config

    # -- what subclasses implement -------------------------------------------------------
    def process(self, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]:
        assert source is not None, f"{self.name} needs an input directory"
        task = ctx.progress.task(self.name, total=source.num_rows)
        for batch in source.batches():
            result = self.process_batch(batch, ctx)
            task.advance(result.rows_consumed)
            yield result

    def process_batch(self, batch: pa.RecordBatch, ctx: StageContext) -> BatchResult:
        raise NotImplementedError(f"{type(self).__name__} implements neither process nor process_batch")

    def input_fingerprint(self, source: StageInput | None) -> str:
        assert source is not None
        return source.manifest.fingerprint

    def manifest_params(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    def empty_output(self, source: StageInput | None) -> pa.Table | None:
        """The (empty) data written when the stage produced no batch at all: the input's
        columns (a stage that adds columns and met no row cannot say their types)."""
        return source.schema.empty_table() if source is not None and source.schema is not None else None

    def input_paths(self) -> list[Path]:
        """Local files or directories the stage reads besides its input directory (ingest's
        sources, dedupe's evaluation sets): the output may neither be nor hold nor lie in one."""
        return []

    def open_output(self, output_dir: str | Path, rows_per_shard: int | None = None) -> StageOutput:
        """Where the run writes. A stage with its own on-disk layout (export: Hub-style files)
        returns a ``StageOutput`` subclass; the base's counting and manifest stay the same."""
        return StageOutput(output_dir, **({"rows_per_shard": rows_per_shard} if rows_per_shard else {}))

    # -- shared logic --------------------------------------------------------------------
    def run(
        self,
        input_dir: str | Path | None,
        output_dir: str | Path,
        *,
        workdir: str | Path | None = None,
        progress: Progress | None = None,
        fresh: bool = False,
        rows_per_shard: int | None = None,
        engine: Engine | None = None,
    ) -> tuple[Manifest, bool]:
        """Run the stage from ``input_dir`` into ``output_dir``; returns (manifest, skipped)."""
        workdir = Path(workdir).expanduser() if workdir is not None else None
        inputs = [*([input_dir] if input_dir is not None else []), *self.input_paths()]
        # WORKDIR (the output's parent by default) holds the request cache
        cache = request_cache(workdir or Path(output_dir).expanduser().resolve().parent)
        output_dir = check_output_dir(output_dir, inputs, [cache])
        source = StageInput(input_dir) if input_dir is not None else None
        if source is not None:
            check_canonical(source, self.config.requires(), self.name)
        in_fp = self.input_fingerprint(source)
        out_fp = fingerprint(self.name, __version__, in_fp, self.config.fingerprint_params())
        previous = Manifest.try_load(output_dir)
        if not fresh and previous is not None and previous.fingerprint == out_fp:
            return previous, True
        output = self.open_output(output_dir, rows_per_shard)
        ctx = StageContext(
            workdir=workdir if workdir is not None else output_dir.parent,
            output=output.path,
            progress=progress or NullProgress(),
            engine=engine,
        )
        try:
            # An engine (prefcurate.engines) may run process_batch elsewhere; the base still drains.
            results = engine.process(self, source, ctx) if engine is not None else self.process(source, ctx)
            counts = self._drain(results, output)
            if not output.data.started:  # nothing came out (an empty input): data/ still has the schema
                empty = self.empty_output(source)
                if empty is not None:
                    output.data.write(empty)
        except BaseException:
            output.abort()
            raise
        rows_in, rows_out, rows_rejected, reasons = counts
        if source is not None and rows_in != source.num_rows:
            output.abort()
            raise StageFailed(f"{self.name}: accounted for {rows_in} of {source.num_rows} input rows (a bug)")
        manifest = Manifest(
            stage=self.name,
            version=__version__,
            params=self.manifest_params(),
            input=str(source.dir) if source is not None else None,
            input_fingerprint=in_fp,
            fingerprint=out_fp,
            rows_in=rows_in,
            rows_out=rows_out,
            rows_rejected=rows_rejected,
            reject_reasons=reasons,
            extra=ctx.extra,
            lineage=list(source.manifest.lineage) if source is not None else [],
        )
        try:
            output.commit(manifest)
        except BaseException:
            output.abort()
            raise
        return manifest, False

    def _drain(self, results: Iterator[BatchResult], output: StageOutput) -> tuple[int, int, int, dict[str, int]]:
        rows_in = rows_out = rows_rejected = 0
        reasons: dict[str, int] = {}
        for result in results:
            rows_in += result.rows_consumed
            if result.kept.num_rows or output.data.rows == 0:
                output.data.write(result.kept)
            rows_out += result.kept.num_rows
            rej = result.rejected
            if rej is not None and rej.num_rows:
                rej = self._conform_rejects(rej)
                output.rejects.write(rej)
                rows_rejected += rej.num_rows
                for value in pc.value_counts(rej[REJECT_REASON]).to_pylist():
                    reasons[value["values"]] = reasons.get(value["values"], 0) + value["counts"]
        if rows_in != rows_out + rows_rejected:
            raise StageFailed(f"{self.name}: {rows_in} rows in but {rows_out} out + {rows_rejected} rejected (a bug)")
        return rows_in, rows_out, rows_rejected, reasons

    def _conform_rejects(self, rejected: pa.Table) -> pa.Table:
        """Give every rejects shard one column order: data columns, extras, stage, reason."""
        for name, dtype in self.reject_extras.items():
            if name not in rejected.column_names:
                rejected = rejected.append_column(name, pa.nulls(rejected.num_rows, dtype))
        if REJECT_REASON not in rejected.column_names:
            raise StageFailed(f"{self.name}: rejected rows without {REJECT_REASON} (a bug)")
        if REJECT_STAGE in rejected.column_names:
            rejected = rejected.drop_columns([REJECT_STAGE])
        rejected = rejected.append_column(REJECT_STAGE, pa.array([self.name] * rejected.num_rows, pa.string()))
        tail = [*self.reject_extras, REJECT_STAGE, REJECT_REASON]
        head = [c for c in rejected.column_names if c not in tail]
        return rejected.select(head + tail)


class TwoPhaseStage(Stage):
    """A global stage in two passes, so an engine can spread the second one.

    ``plan(source, ctx)`` makes every global decision in a first pass over only the columns it
    needs (quantiles, cross-fitted margins); ``apply_batch(batch, plan, offset, ctx)`` applies
    it to the rows starting at global row ``offset``. Locally ``process`` is simply the two in
    sequence; the Ray engine runs ``plan`` on the driver and maps ``apply_batch`` over row groups.
    """

    apply_label: ClassVar[str | None] = None
    """Progress label of the second pass (default: the stage name)."""

    def plan(self, source: StageInput, ctx: StageContext) -> Any:
        raise NotImplementedError

    def apply_batch(self, batch: pa.Table, plan: Any, offset: int, ctx: StageContext) -> BatchResult:
        raise NotImplementedError

    def process(self, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]:
        assert source is not None, f"{self.name} needs an input directory"
        plan = self.plan(source, ctx)
        task = ctx.progress.task(self.apply_label or self.name, total=source.num_rows)
        offset = 0
        for table in whole_tables(source):
            result = self.apply_batch(table, plan, offset, ctx)
            offset += table.num_rows
            task.advance(table.num_rows)
            yield result


def whole_tables(source: StageInput) -> Iterator[pa.Table]:
    """The input's batches as tables; an empty input gives one empty table, so the output
    still gets the new columns in its schema."""
    seen = False
    for batch in source.batches():
        seen = True
        yield pa.Table.from_batches([batch])
    if not seen and source.schema is not None:
        yield source.schema.empty_table()
