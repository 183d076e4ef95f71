"""Row vectors for dedupe, encoded as the exact pass streams the input.

The exact pass reads every row's texts anyway, so it hands each batch's *provisional* rows
to ``RowVectors.feed``, which encodes them at once: rows whose exact group key it has not
seen before and that are not exactly contaminated (every such row when exact duplicates are
kept). Under ``--keep first`` (the default) these are exactly the rows the exact pass keeps,
and the texts are read once instead of twice (on an input larger than the page cache, the
second read was a second trip to disk).

Tried and dropped: encoding on a worker thread while the pass hashes on. The static
encoder keeps ~1.5 of 2 cores busy and holds the GIL for its pooling, so the pass's work
slowed it by about what it saved (20k rows, 6 interleaved runs each: median total 8.21 s
threaded vs 8.32 s for the two-pass serial code, within the noise, and the median ratio to
encoding alone worse, 1.30 vs 1.16). Nor did reading and hashing the next batch on a worker
thread while this one is embedded, though the pass averages 1.77 of the 2 cores (20k rows,
6 interleaved runs each: median 6.59 s vs 6.54 s serial; in-run ratio 1.262 vs 1.260).
Nor that helper at the lowest CPU priority (Linux ``SCHED_IDLE``), which runs only in the
gaps the model leaves (its pooling after each tokenizer call is single-threaded, ~12% of
the model's time), with the caller hashing whatever the helper had not finished: at 200k
rows the time outside the model fell from 8.9 to 7.2 s (in-run 1.20 -> 1.16; 20k rows: no
change), but with two CPU hogs running beside it one run's search took 18 s instead of
1.3 s. A starved low-priority Python thread stalls every other thread that hands it the
GIL (CPython's forced switching waits for the taker to run): priority inversion. At normal
priority the gain was ~0.5 s at 200k, not worth a thread. What pays: that helper at normal
priority, held at a gate while the tokenizer's threads run and working only between them
(``dedupe_ahead``): time outside the model 1.35 -> 1.17 s at 20k rows (4 interleaved pairs),
9.5 -> 8.4 s at 200k (2 pairs), the same decisions; preparing each unit's texts there as well
(``prepare_steps``): 1.14 -> 1.06 s and 8.5 -> 7.7 s.

The near-duplicate join's operands (``ivf_join.JoinOperands``: each row projected on a
256-d PCA basis, 0.9-1.0 s of a 3.7 s search at 200k rows) are built here too, as the rows
are embedded: once ``_FIT_ROWS`` rows are in, a basis is fitted on them, and each whole
``_JOIN_CHUNK`` of rows after that becomes a side task for the exact pass's helper, which
runs it in the encoder's gaps after its own reading and hashing (``ReadAhead.submit``); what
it has not done when the pass ends, both threads finish (``drain``). The search checks the
early basis against a uniform sample before it uses it (``JoinOperands.fits``). With a
static model on CPU the pass runs torch on one thread (``serial_torch``), so the values do
not depend on which thread built which chunk, and the chunks start at fixed rows, so they
do not depend on the batch size. The gaps are not free: on a 2-core AMD EPYC VM the work
done in them slowed the model's own calls by about half of what it took off the search.
200k bench rows, 4 interleaved pairs with and without: search 2.85 -> 2.26 s, model 25.80 ->
25.89 s, total 31.34 -> 30.82 s (in-run ratio 1.218 -> 1.191); 20k rows, 6 pairs: search
0.30 -> 0.25 s, model 2.76 -> 2.91 s, total 3.47 -> 3.56 s, a loss. Hence only from
``_AHEAD_MIN_ROWS`` rows (the crossover by those two points is ~47k), or with ``--index
ivf``.

``finish`` then embeds the rows the exact pass kept that were not provisional (another
``--keep`` policy picked a later row of its group, or two group keys agreed on 64 bits) in
a short second pass over only the batches that hold them, and returns the vectors in row
order. Provisional rows the pass removed are dropped.

Layout: one (rows, names x dim) float16 matrix of the parts' unit vectors, filled in place:
each part column's distinct vectors (float16 in the cache already) are gathered straight
into their block. A row vector is that row times 1/sqrt(#parts), so its dot
product with another is the mean per-part cosine; the search applies the scale as it turns
blocks of rows into float32 (``similar_pairs(scale=...)``), and an extra prompt block
(decontamination with ``--on response``) stays outside the row vector.

Why float16 and unit parts: a float32 matrix of scaled parts cost a float16 -> float32
multiply per element as it filled (numpy's float16 casts are not vectorized: ~3 ns an
element) and twice the memory (1M rows x 3 parts x 256-d: 3 GB vs 1.5 GB). Faulting in
fresh pages on this VM costs ~1.3 s a GB, so at 200k rows the fill took 1.35 s of the
stage; the gather is a copy. The values are the cache's own, so a cached rerun still sees
the same bits.

Where the matrix (and the join's operands) live: in memory, or past ``--vector-memory``
(default: half the memory available at the start) in unnamed temporary files beside the
output, mapped (``VectorStorage``): they are most of what the stage holds.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from prefcurate.backends.embed import (
    Embedder,
    PreparedTexts,
    get_embedder,
    loads_quietly,
    prepare_steps,
    resolve_model,
    serial_torch,
)
from prefcurate.stages.base import StageContext, StageInput
from prefcurate.stages.dedupe_ahead import IdleGate
from prefcurate.stages.dedupe_keys import part_columns, render_column
from prefcurate.steps import Steps, run_steps

if TYPE_CHECKING:
    from prefcurate.backends.ivf_join import JoinOperands

_FIT_ROWS = 4096  # rows embedded before the join's basis is fitted on them (``index._PCA_SAMPLE``)
_JOIN_CHUNK = 1024  # the join's operands are filled this many rows at a time (a few ms on one thread)
_HOLD_OUT = 1024  # of those, held out of the fit to measure the basis on (``JoinOperands.fits``)
_AHEAD_MIN_ROWS = 50_000  # the join's operands are built during the pass from this many rows on
_MOVE_ROWS = 8192  # rows moved at a time when the vectors are put in row order (``_in_order``)


class RowVectors:
    """Encodes the rows fed to it; ``finish`` returns them in row order."""

    def __init__(self, cfg, ctx: StageContext, n_rows: int, parts: tuple[str, ...], need_prompt: bool) -> None:
        self.names = list(dict.fromkeys([*parts, *(["prompt"] if need_prompt else [])]))
        self.n_parts = len(parts)
        self.need_prompt = need_prompt
        self.n_rows = n_rows
        self.matrix: np.ndarray | None = None
        self._ctx = ctx
        self._slot_rows: list[np.ndarray] = []  # global row of each filled slot, in slot order
        self._slots = 0
        self._seen = np.zeros(0, np.uint64)  # first 64 bits of each group key fed, sorted
        self._started = time.perf_counter()
        self._embedder: Embedder | None = None
        self.gate = IdleGate()  # shut while a CPU encoder's call takes every core
        quiet = loads_quietly(cfg.model, cfg.device, ctx.cache_dir)
        self._loading = _Background(get_embedder, cfg.model, cfg.device, ctx.cache_dir, thread=quiet)
        self._task = ctx.progress.task("dedupe: embedding", total=n_rows * len(self.names), unit="texts")
        # A static model on CPU: no torch inside the model, so the pass runs torch on one thread
        # (``serial_torch``), and gaps for the helper to build the join's operands in.
        self.static_cpu = resolve_model(cfg.model, cfg.device) == ("static", "cpu")
        self._join_ahead = self.static_cpu and bool(parts) and _builds_join_ahead(cfg.index, n_rows)
        self._device, self._index = cfg.device, cfg.index
        self._vector_memory = cfg.vector_memory
        self.storage = VectorStorage(ctx.workdir, in_file=False)  # decided with the first batch (``_allocate``)
        self._join: JoinOperands | None = None
        self._join_next = 0  # slots handed to join tasks so far
        self._fit_lock = threading.Lock()
        self._tasks: list[functools.partial] = []

    def settle(self) -> None:
        """Let the model's background load end (``_Background.settle``)."""
        self._loading.settle()

    @property
    def embedder(self) -> Embedder:
        """The model. A distilled static model loads on a background thread while the exact
        pass reads and hashes its first batch (0.1-0.25 s, 2-5% of a 20k-row dedupe), and
        the first use waits for it; anything else (distilling, a transformer) loads before
        the pass, as it silences stderr meanwhile (``loads_quietly``). A bad ``--model``
        raises before anything is embedded or written."""
        if self._embedder is None:
            waited = time.perf_counter()
            self._embedder = self._loading.result()
            self._embedder.cache.defer = True  # a segment per 64k texts, not per part and batch (closed by the stage)
            if self._embedder.device == "cpu":
                self._embedder.parallel_section = self.gate.busy
            self._ctx.extra["model_load_seconds"] = round(self._loading.seconds, 3)
            self._ctx.extra["model_wait_seconds"] = round(time.perf_counter() - waited, 3)
            self._ctx.progress.note(f"dedupe: embedding with {self._embedder.name} on {self._embedder.device}")
        return self._embedder

    def feed(
        self,
        batch: pa.RecordBatch,
        start: int,
        group_keys: np.ndarray,
        skip: np.ndarray,
        first_only: bool,
        prepared: dict[str, PreparedTexts] | None = None,
    ) -> None:
        """Encode the provisional rows of ``batch`` (global rows from ``start``): all rows but
        ``skip`` (exactly contaminated), or with ``first_only`` (exact duplicates removed) only
        the first row of each exact group key (S16) seen so far. ``prepared``: the batch's
        part columns from ``prepare_steps`` (done ahead by the exact pass's helper)."""
        rows = self._first_seen(group_keys, skip) if first_only else np.flatnonzero(~skip)
        if len(rows):
            self._encode(batch, rows, prepared)
            self._slot_rows.append(rows + start)
            self._queue_join()

    # -- the join's operands, built as the rows are embedded ----------------------------------
    def take_tasks(self) -> list[functools.partial]:
        """Work made by the last ``feed`` (or ``end_pass``) for the exact pass's helper
        (``ReadAhead.submit``): each a step generator, building the near-duplicate join's
        operands of a range of embedded rows (``ivf_join.JoinOperands``)."""
        tasks, self._tasks = self._tasks, []
        return tasks

    def end_pass(self) -> None:
        """The exact pass has fed its last batch: the last rows' join task (``take_tasks``)."""
        self._queue_join(final=True)

    def _queue_join(self, final: bool = False) -> None:
        """A task for the whole ``_JOIN_CHUNK``-row chunks of slots filled since the last one
        (``final``: the rest too). The basis is fitted on the first ``_FIT_ROWS`` slots, and
        every chunk starts at a multiple of ``_JOIN_CHUNK``: what is computed does not depend
        on the batch size, nor on which thread runs which task (torch runs on one thread
        meanwhile, ``serial_torch``), so neither can change a decision."""
        if self._join is None or (self._slots < _FIT_ROWS and not final):
            return
        hi = self._slots if final else self._slots - self._slots % _JOIN_CHUNK
        if hi > self._join_next:
            self._tasks.append(functools.partial(self._join_steps, self._join_next, hi))
            self._join_next = hi

    def _join_steps(self, lo: int, hi: int) -> Steps[None]:
        from prefcurate.backends.ivf_join import fit_projection

        join, width, scale = self._join, self.n_parts * self.embedder.dim, self.n_parts**-0.5
        assert join is not None and self.matrix is not None
        with self._fit_lock:  # the first task fits the basis; a task run beside it waits
            if join.projection is None:
                rows = self.matrix[: min(self._slots, _FIT_ROWS), :width]
                join.projection = fit_projection(rows, scale, hold_out=_HOLD_OUT)
        yield
        yield from join.fill_steps(self.matrix[lo:hi, :width], lo, chunk=_JOIN_CHUNK)

    def prepare_steps(self, batch: pa.RecordBatch, start: int) -> Steps[dict[str, PreparedTexts]]:
        """Each part column of ``batch`` (global rows from ``start``) rendered and prepared for
        ``encode_distinct``: the work on a batch's texts that needs neither the model nor the
        cache. Run ahead (``dedupe_ahead``), it also writes zeros over the matrix rows the
        batch's slots will take at most, so their pages are mapped before the stage's thread
        fills them (the first write to a fresh page costs ~1.3 s a GB on this VM; at 200k rows
        the stage's gathers into the matrix went from 0.85 to 0.70 s). Slots never run ahead
        of rows, and the stage fills the slots of earlier batches only, below ``start``, so
        the two threads never touch the same row."""
        out = {}
        for name in self.names:
            text = render_column(batch.column(name), roles=False)
            yield
            out[name] = yield from prepare_steps(text)
        matrix = self.matrix  # allocated by the stage's thread with the first batch
        if matrix is not None:
            matrix[start : start + batch.num_rows].fill(0)
        return out

    def _first_seen(self, group_keys: np.ndarray, skip: np.ndarray) -> np.ndarray:
        """Rows whose group key (its first 64 bits: a collision costs a re-read) no earlier
        row had, but not ``skip``. The keys seen so far are one sorted array, so a batch
        is a few vectorized searches and one merge instead of a Python set probe per row."""
        keys = np.ascontiguousarray(group_keys).view(np.uint64)[::2]
        uniq, first = np.unique(keys, return_index=True)
        seen = self._seen
        at = np.minimum(np.searchsorted(seen, uniq), max(0, len(seen) - 1))
        new = seen[at] != uniq if len(seen) else np.ones(len(uniq), bool)
        self._seen = np.insert(seen, np.searchsorted(seen, uniq[new]), uniq[new])  # a merge, no re-sort
        rows = np.sort(first[new])
        return rows[~skip[rows]]

    def _encode(
        self, batch: pa.RecordBatch, rows: np.ndarray, prepared: dict[str, PreparedTexts] | None = None
    ) -> None:
        """Embed ``rows`` of ``batch`` into the next slots: each part column's distinct texts
        once, their float16 unit vectors gathered straight into the part's block."""
        import torch  # here, not at import: the CLI starts without it

        embedder, count, slot = self.embedder, len(rows), self._slots
        dim = embedder.dim
        if self.matrix is None:
            self._allocate(dim)
        columns = prepared or dict(zip(self.names, part_columns(batch, self.names), strict=True))
        which = None if count == batch.num_rows else rows
        for k, name in enumerate(self.names):
            vecs, inverse = embedder.encode_distinct(columns[name], progress=self._task, rows=which)
            # torch's gather moves rows with vector copies, numpy's element by element (2 bytes)
            block = torch.from_numpy(self.matrix)[slot : slot + count, k * dim : (k + 1) * dim]
            with serial_torch():
                block.copy_(torch.from_numpy(vecs).index_select(0, torch.from_numpy(inverse.astype(np.int64))))
        self._slots += count

    def _allocate(self, dim: int) -> None:
        """The matrix, a slot per input row at most (provisional + re-read rows <= rows), and
        the join's operands when they are built during the pass: in memory, or in temporary
        files when together they would pass the budget (``VectorStorage``)."""
        rows, width = max(1, self.n_rows), self.n_parts * dim
        need = rows * len(self.names) * dim * 2
        join = None
        if self._join_ahead:
            from prefcurate.backends.index import FILTER_DIM, join_precision, resolve_index_device, uses_cpu_join

            # GPU FAISS searches without them; "cuda" is not resolved here, as without a GPU
            # it is the search's error to raise
            where = "cuda" if self._device == "cuda" else resolve_index_device(self._device)
            if uses_cpu_join(self.n_rows, width, where, self._index):
                bf16 = join_precision() == "bf16"
                join = (min(width, FILTER_DIM), bf16)
                need += rows * (join[0] + 8) * (2 if bf16 else 4)
        budget = memory_budget(self._vector_memory)
        self.storage = VectorStorage(self._ctx.workdir, in_file=need > budget)
        self.matrix = self.storage.empty((rows, len(self.names) * dim), np.float16)
        if join is not None:
            from prefcurate.backends.ivf_join import JoinOperands

            self._join = JoinOperands(rows, *join, empty=self.storage.empty)
        if self.storage.in_file:
            self._ctx.progress.note(
                f"dedupe: row vectors ({need / 2**30:.1f} GiB) in a temporary file under {self.storage.directory}: "
                f"past {budget / 2**30:.1f} GiB of memory (--vector-memory)"
            )

    # -- after the exact pass --------------------------------------------------------------
    def finish(
        self, cand: np.ndarray, source: StageInput, batch_rows: int
    ) -> tuple[np.ndarray | None, np.ndarray | None, JoinOperands | None]:
        """(row vectors, unit prompt vectors or None, the join's operands or None), one row
        per ``cand`` (sorted global rows). The row vectors are float16, their parts' unit
        vectors side by side: times 1/sqrt(#parts) they are the row vectors of the search (a
        view of the matrix, no copy). The exact pass must have drained its join tasks."""
        embedder = self.embedder
        filled = np.concatenate(self._slot_rows) if self._slot_rows else np.zeros(0, np.int64)
        at = np.minimum(np.searchsorted(filled, cand), max(0, len(filled) - 1))
        have = (filled[at] == cand) if len(filled) else np.zeros(len(cand), bool)
        missing = cand[~have]
        src = np.empty(len(cand), np.int64)
        src[have] = at[have]
        src[~have] = self._slots + np.arange(len(missing))
        self._reread(missing, source, batch_rows)
        self._queue_join(final=True)
        with serial_torch():  # the re-read rows' operands (few): here and now, as the pass did them
            for task in self.take_tasks():
                run_steps(task())
        self._task.set_total(self._slots * len(self.names))
        # hashing and embedding are one pass now: their wall time together, the model load included
        self._ctx.extra["hash_and_embed_seconds"] = round(time.perf_counter() - self._started, 3)
        matrix, join = self._in_order(src)
        if self.storage.in_file:
            self._ctx.extra["vectors_in_file_bytes"] = self.storage.bytes
        dim = embedder.dim
        prompt = None
        if self.need_prompt:
            k = self.names.index("prompt")
            prompt = matrix[:, k * dim : (k + 1) * dim].astype(np.float32)
        if not self.n_parts:
            return None, prompt, None
        return matrix[:, : self.n_parts * dim], prompt, join

    def _reread(self, rows: np.ndarray, source: StageInput, batch_rows: int) -> None:
        """Embed ``rows`` (sorted global rows), into the slots after the fed ones."""
        if not len(rows):
            return
        start = 0
        for batch in source.batches(self.names, batch_rows):
            stop = start + batch.num_rows
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi > lo:
                self._encode(batch, rows[lo:hi] - start)
            start = stop

    def _in_order(self, src: np.ndarray) -> tuple[np.ndarray, JoinOperands | None]:
        """The matrix rows ``src`` in that order, and the join's operands of those rows. When
        the order is the slots' own order with rows left out (no re-read rows), rows move
        forward in place, chunk by chunk (a target row is never after its source, so no
        source is overwritten before it is read): no second matrix, which at 1M rows would
        be another 1.5 GB."""
        import torch

        join = self._join
        if self.matrix is None:
            return np.zeros((len(src), len(self.names) * self.embedder.dim), np.float16), None
        if len(src) and np.all(src[1:] > src[:-1]):
            for lo in range(0, len(src), _MOVE_ROWS):
                part = src[lo : lo + _MOVE_ROWS]
                if part[0] != lo or part[-1] != lo + len(part) - 1:  # nothing to move where slots match
                    self.matrix[lo : lo + len(part)] = self.matrix[part]
                    if join is not None:
                        join.table[lo : lo + len(part)] = join.table.index_select(0, torch.from_numpy(part))
            return self.matrix[: len(src)], join.head(len(src)) if join is not None else None
        if not self.storage.in_file:
            return self.matrix[src], join.take(src) if join is not None else None
        out = self.storage.empty((len(src), self.matrix.shape[1]), np.float16)
        for lo in range(0, len(src), _MOVE_ROWS):  # a chunk at a time: no (rows x width) temporary
            out[lo : lo + _MOVE_ROWS] = self.matrix[src[lo : lo + _MOVE_ROWS]]
        return out, join.take(src, empty=self.storage.empty) if join is not None else None


def memory_budget(gib: float | None) -> float:
    """Bytes the row vectors and the join's operands may take in memory: ``gib`` GiB, or by
    default half the memory the machine has available now (Linux ``MemAvailable``, else half
    its physical memory)."""
    if gib is not None:
        return gib * 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 2
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    except (AttributeError, ValueError, OSError):
        return float("inf")


class VectorStorage:
    """Where dedupe's per-row arrays live (the row vectors: 1.5 GB per million rows with the
    static model and ``--on pair``; the join's operands: 0.5 GB more): in memory, or, past
    the budget (``memory_budget``), each in a temporary file under ``directory`` (the run's
    working directory, beside the output), mapped into memory. The file has no name (on
    Linux it never has one), so it goes when its array does, and a crash leaves nothing.

    Why: they are most of what dedupe holds. On 1M rows, with both in files, its peak
    anonymous memory was 1.90 GB against 3.96 GB in memory (2.06 GB of these arrays), so at
    10M rows (~20 GB of them) they are what stops fitting. Mapped, their pages belong to the
    page cache, which the kernel writes out and drops under pressure, where anonymous memory
    would be swapped or the process killed. Under such pressure the search's gathers read
    from disk, which is slow, but the run finishes. Below the budget they stay plain arrays:
    a mapped file's dirty pages are written back to disk as the pass fills them, which cost
    the 1M-row run 187 -> 207 s, work that a run which fits has no reason to pay."""

    def __init__(self, directory: Path, in_file: bool) -> None:
        self.directory, self.in_file = Path(directory), in_file
        self.bytes = 0

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialized array (a zero-filled one when in a file)."""
        if not self.in_file or 0 in shape:
            return np.empty(shape, dtype)
        with tempfile.TemporaryFile(dir=self.directory, prefix=".prefcurate-vectors-") as f:
            out = np.memmap(f, dtype=dtype, mode="w+", shape=shape)  # the map keeps the file open
        self.bytes += out.nbytes
        return out


def _builds_join_ahead(index: str, n_rows: int) -> bool:
    """Whether to build the IVF join's operands during the pass: when the search is forced to
    be the join, or would be and there are ``_AHEAD_MIN_ROWS`` rows (see the module notes)."""
    return index == "ivf" or (index == "auto" and n_rows >= _AHEAD_MIN_ROWS)


class _Background:
    """``fn(*args)`` on a daemon thread (so an interrupted run does not wait for a model
    still loading to exit), or with ``thread=False`` here and now (its error raised at
    once); ``result`` waits and returns it, or raises its error in the caller's thread."""

    def __init__(self, fn, *args, thread: bool = True) -> None:
        self._value = self._error = None
        self.seconds = 0.0

        def run() -> None:
            started = time.perf_counter()
            try:
                self._value = fn(*args)
            except BaseException as exc:  # re-raised by result(), in the stage's thread
                self._error = exc
            self.seconds = time.perf_counter() - started

        self._thread: threading.Thread | None = None
        if not thread:
            run()
            if self._error is not None:  # a bad --model fails here, before any work
                raise self._error
            return
        self._thread = threading.Thread(target=run, name="prefcurate-model-load", daemon=True)
        self._thread.start()

    def settle(self) -> None:
        """Wait for the load to end, its outcome unused: a stage that fails while the model
        loads waits for it before unwinding, as a daemon thread still inside the model's
        native code when the interpreter exits can abort the process ("FATAL: exception not
        rethrown", exit 134) instead of letting the stage's one-line error through. Loading
        a distilled static model, the only one loaded this way, takes ~0.05-0.3 s."""
        if self._thread is not None:
            self._thread.join()

    def result(self):
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
