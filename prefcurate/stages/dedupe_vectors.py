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
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa

from prefcurate.backends.embed import (
    Embedder,
    PreparedTexts,
    get_embedder,
    loads_quietly,
    prepare_steps,
    serial_torch,
)
from prefcurate.stages.base import StageContext, StageInput
from prefcurate.stages.dedupe_ahead import IdleGate
from prefcurate.stages.dedupe_keys import part_columns, render_column
from prefcurate.steps import Steps


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
        if self.matrix is None:  # a slot per input row at most: provisional + re-read rows <= rows
            self.matrix = np.empty((max(1, self.n_rows), len(self.names) * dim), np.float16)
        columns = prepared or dict(zip(self.names, part_columns(batch, self.names), strict=True))
        which = None if count == batch.num_rows else rows
        for k, name in enumerate(self.names):
            vecs, inverse = embedder.encode_distinct(columns[name], progress=self._task, rows=which)
            # torch's gather moves rows with vector copies, numpy's element by element (2 bytes)
            block = torch.from_numpy(self.matrix)[slot : slot + count, k * dim : (k + 1) * dim]
            with serial_torch():
                block.copy_(torch.from_numpy(vecs).index_select(0, torch.from_numpy(inverse.astype(np.int64))))
        self._slots += count

    # -- after the exact pass --------------------------------------------------------------
    def finish(
        self, cand: np.ndarray, source: StageInput, batch_rows: int
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(row vectors, unit prompt vectors or None), one row per ``cand`` (sorted global
        rows). The row vectors are float16, their parts' unit vectors side by side: times
        1/sqrt(#parts) they are the row vectors of the search (a view of the matrix, no copy)."""
        embedder = self.embedder
        filled = np.concatenate(self._slot_rows) if self._slot_rows else np.zeros(0, np.int64)
        at = np.minimum(np.searchsorted(filled, cand), max(0, len(filled) - 1))
        have = (filled[at] == cand) if len(filled) else np.zeros(len(cand), bool)
        missing = cand[~have]
        src = np.empty(len(cand), np.int64)
        src[have] = at[have]
        src[~have] = self._slots + np.arange(len(missing))
        self._reread(missing, source, batch_rows)
        self._task.set_total(self._slots * len(self.names))
        # hashing and embedding are one pass now: their wall time together, the model load included
        self._ctx.extra["hash_and_embed_seconds"] = round(time.perf_counter() - self._started, 3)
        matrix = self._in_order(src)
        dim = embedder.dim
        prompt = None
        if self.need_prompt:
            k = self.names.index("prompt")
            prompt = matrix[:, k * dim : (k + 1) * dim].astype(np.float32)
        if not self.n_parts:
            return None, prompt
        return matrix[:, : self.n_parts * dim], prompt

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

    def _in_order(self, src: np.ndarray) -> np.ndarray:
        """The matrix rows ``src`` in that order. When the order is the slots' own order with
        rows left out (no re-read rows), rows move forward in place, chunk by chunk (a target
        row is never after its source, so no source is overwritten before it is read): no
        second matrix, which at 1M rows would be another 1.5 GB."""
        if self.matrix is None:
            return np.zeros((len(src), len(self.names) * self.embedder.dim), np.float16)
        if len(src) and np.all(src[1:] > src[:-1]):
            for lo in range(0, len(src), 8192):
                part = src[lo : lo + 8192]
                if part[0] != lo or part[-1] != lo + len(part) - 1:  # nothing to move where slots match
                    self.matrix[lo : lo + len(part)] = self.matrix[part]
            return self.matrix[: len(src)]
        return self.matrix[src]


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

    def result(self):
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
