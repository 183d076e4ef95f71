"""The first rows' columns, kept from dedupe's exact pass for its write pass (``Retained``)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from prefcurate.stages.base import StageInput

# The first pass's columns of the first rows, up to this many bytes, are kept for the write
# pass (``Retained``)
RETAIN_BYTES = 256 << 20


class Retained:
    """The first pass's batches (its columns) of the input's first rows, kept while they fit
    ``budget`` bytes (default ``RETAIN_BYTES``), so that the write pass reads only the other
    columns of those rows.

    Why: the write pass read every column of every row again, and at 200k bench rows that
    read was 0.62 s of its 0.79 s on the 2-core AMD EPYC VM (the writer threads compressing
    beside it). Kept in memory it costs nothing more, as the first pass has read those
    batches anyway: the write pass and commit at 20k rows 0.19 -> 0.11 s (6 interleaved pairs),
    0.16 -> 0.10 s (8 more, with the model read directly). At 200k rows the write pass and
    commit went 1.17 -> 1.01 s (3 pairs) and 1.09 -> 0.86 s (3 more), but in those 3 the first
    pass's time outside the model rose by as much (1.58 -> 1.81 s; the in-run ratio 1.183 both),
    while a fourth pair with per-phase counters had it equal (1.61 vs 1.58 s) and fewer page
    faults in the first pass with the batches kept (177k vs 217k): not a cost found, and not a
    gain at that size either. The budget bounds the memory (256 MiB: ~250k HH-RLHF rows); the
    rows past it are read again as before."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = RETAIN_BYTES if budget is None else budget
        self.batches: list[pa.RecordBatch] = []
        self.rows = 0
        self._bytes = 0
        self._full = False

    def add(self, batch: pa.RecordBatch) -> None:
        """The pass's next batch: kept if every batch before it was and it fits."""
        if self._full or self._bytes + batch.nbytes > self.budget:
            self._full = True
            return
        self.batches.append(batch)
        self.rows += batch.num_rows
        self._bytes += batch.nbytes

    def rows_again(self, source: StageInput, batch_rows: int) -> Iterator[pa.Table | pa.RecordBatch]:
        """Every row of ``source`` again, all columns, in order: the kept rows with their other
        columns read from disk, then the rest of the rows read whole (the shards and row
        groups before them skipped by their footers)."""
        if self.rows:
            kept = pa.Table.from_batches(self.batches)
            self.batches = []
            schema = source.schema
            others = [name for name in schema.names if name not in kept.column_names]
            at = 0  # (with no other columns, the batches read carry only their row counts)
            for piece in source.batches(others, batch_rows, stop=self.rows):
                yield _assemble(schema, kept.slice(at, piece.num_rows), piece)
                at += piece.num_rows
        yield from source.batches(batch_rows=batch_rows, start=self.rows)


def _assemble(schema: pa.Schema, part: pa.Table, other: pa.RecordBatch) -> pa.Table:
    """The columns of ``schema`` from ``part`` (kept) or ``other`` (read again), in its order."""
    kept = set(part.column_names)
    return pa.Table.from_arrays(
        [part.column(name) if name in kept else other.column(name) for name in schema.names], schema=schema
    )
