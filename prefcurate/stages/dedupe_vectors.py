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
encoding alone worse, 1.30 vs 1.16).

``finish`` then embeds the rows the exact pass kept that were not provisional (another
``--keep`` policy picked a later row of its group, or two group keys agreed on 64 bits) in
a short second pass over only the batches that hold them, and returns the vectors in row
order. Provisional rows the pass removed are dropped.

Layout: one (rows, names x dim) float32 matrix, filled in place. A row vector is its parts'
unit vectors over sqrt(#parts), so a dot product is the mean per-part cosine; an extra
prompt block (decontamination with ``--on response``) stays unit and outside the row vector.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from prefcurate.backends.embed import get_embedder
from prefcurate.stages.base import StageContext, StageInput
from prefcurate.stages.dedupe_keys import part_columns


class RowVectors:
    """Encodes the rows fed to it; ``finish`` returns them in row order."""

    def __init__(self, cfg, ctx: StageContext, n_rows: int, parts: tuple[str, ...], need_prompt: bool) -> None:
        self.names = list(dict.fromkeys([*parts, *(["prompt"] if need_prompt else [])]))
        self.n_parts = len(parts)
        # Per block of a row: the parts' unit vectors over sqrt(#parts); an extra prompt block stays unit.
        blocks = [len(parts) ** -0.5 if k < len(parts) else 1.0 for k in range(len(self.names))]
        self._scale = np.array(blocks, np.float32)
        self.need_prompt = need_prompt
        self.n_rows = n_rows
        self.matrix: np.ndarray | None = None
        self._ctx = ctx
        self._slot_rows: list[np.ndarray] = []  # global row of each filled slot, in slot order
        self._slots = 0
        self._seen: set[int] = set()
        self._started = time.perf_counter()
        self.embedder = get_embedder(cfg.model, cfg.device, ctx.cache_dir)  # a bad --model fails before any work
        ctx.extra["model_load_seconds"] = round(time.perf_counter() - self._started, 3)
        ctx.progress.note(f"dedupe: embedding with {self.embedder.name} on {self.embedder.device}")
        self._task = ctx.progress.task("dedupe: embedding", total=n_rows * len(self.names), unit="texts")

    def feed(
        self, batch: pa.RecordBatch, start: int, group_keys: np.ndarray, skip: np.ndarray, first_only: bool
    ) -> None:
        """Encode the provisional rows of ``batch`` (global rows from ``start``): all rows but
        ``skip`` (exactly contaminated), or with ``first_only`` (exact duplicates removed) only
        the first row of each exact group key (S16) seen so far."""
        if first_only:
            seen = self._seen
            rows = []
            for i, key in enumerate(group_keys.view(np.uint64)[::2].tolist()):  # 64 bits: a collision costs a re-read
                if key not in seen:
                    seen.add(key)
                    if not skip[i]:
                        rows.append(i)
            rows = np.asarray(rows, np.int64)
        else:
            rows = np.flatnonzero(~skip)
        if len(rows):
            self._encode(batch.take(pa.array(rows)))
            self._slot_rows.append(rows + start)

    def _encode(self, batch: pa.RecordBatch) -> None:
        """Embed every row of ``batch`` into the next slots."""
        embedder, count, slot = self.embedder, batch.num_rows, self._slots
        dim = embedder.dim
        if self.matrix is None:  # a slot per input row at most: provisional + re-read rows <= rows
            self.matrix = np.empty((max(1, self.n_rows), len(self.names) * dim), np.float32)
        flat = embedder.encode(_texts(batch, self.names), progress=self._task, float16=True)
        for k in range(len(self.names)):  # float16 -> float32 and the row scale in one pass
            block = self.matrix[slot : slot + count, k * dim : (k + 1) * dim]
            np.multiply(flat[k * count : (k + 1) * count], self._scale[k], out=block)
        self._slots += count

    # -- after the exact pass --------------------------------------------------------------
    def finish(
        self, cand: np.ndarray, source: StageInput, batch_rows: int
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(row vectors, unit prompt vectors or None), one row per ``cand`` (sorted global rows)."""
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
            prompt = np.ascontiguousarray(matrix[:, k * dim : (k + 1) * dim]) / self._scale[k]
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
                self._encode(batch.take(pa.array(rows[lo:hi] - start)))
            start = stop

    def _in_order(self, src: np.ndarray) -> np.ndarray:
        """The matrix rows ``src`` in that order. When the order is the slots' own order with
        rows left out (no re-read rows), rows move forward in place, chunk by chunk (a target
        row is never after its source, so no source is overwritten before it is read): no
        second matrix, which at 1M rows would be another 3 GB."""
        if self.matrix is None:
            return np.zeros((len(src), len(self.names) * self.embedder.dim), np.float32)
        if len(src) and np.all(src[1:] > src[:-1]):
            for lo in range(0, len(src), 8192):
                part = src[lo : lo + 8192]
                if part[0] != lo or part[-1] != lo + len(part) - 1:  # nothing to move where slots match
                    self.matrix[lo : lo + len(part)] = self.matrix[part]
            return self.matrix[: len(src)]
        return self.matrix[src]


def _texts(batch: pa.RecordBatch, names: list[str]) -> pa.Array:
    """The texts of ``names`` for every row of ``batch``, name after name, as one column
    (large strings: no 2 GB offset limit)."""
    return pa.concat_arrays([c.cast(pa.large_string()) for c in part_columns(batch, names)])
