"""Streaming accumulators behind ``prefcurate.stats`` and the export's card figures.

Each keeps fixed-size state whatever the row count: integer lengths in a ``bincount``
(bounded by the longest text, capped at 2**20), floats in a 2,000-bin grid over a range known
in advance, ensemble agreement in a few running sums, sources in a capped counter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion")
MEMBER_PREFIX = "margin__"
QUANTILES = {"p5": 0.05, "p50": 0.5, "p95": 0.95}
FINE_BINS = 2000
DISPLAY_BINS = 20
MAX_EXACT_LENGTH = 1 << 20
MAX_SOURCES = 10_000
BATCH_ROWS = 16_384
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True


# -- lengths -----------------------------------------------------------------------------
def word_counts(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Whitespace-separated words per string (nulls count 0), on the raw buffers."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.int64)
    if pa.types.is_string_view(arr.type) or not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())
    bufs = arr.buffers()
    odt = np.int32 if pa.types.is_string(arr.type) else np.int64
    offs = np.frombuffer(bufs[1], dtype=odt)[arr.offset : arr.offset + n + 1].astype(np.int64)
    if bufs[2] is None or offs[-1] == offs[0]:
        return np.zeros(n, np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8)[offs[0] : offs[-1]]
    rel = offs - offs[0]
    word = ~_SPACE[data]
    start = word.copy()
    start[1:] &= ~word[:-1]
    # A word at the first byte of a row starts there whatever the previous row ended with.
    heads = rel[:-1][rel[:-1] < len(data)]
    start[heads] = word[heads]
    cum = np.zeros(len(data) + 1, np.int64)
    np.cumsum(start, out=cum[1:])
    out = cum[rel[1:]] - cum[rel[:-1]]
    if arr.null_count:
        out[~np.asarray(arr.is_valid())] = 0
    return out


def text_lengths(col: pa.Array | pa.ChunkedArray, unit: str = "words") -> np.ndarray | None:
    """Length of each row of a string or message-list column; None for other types."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    count = word_counts if unit == "words" else _char_counts
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type):
        return count(col)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        return None
    value_type = col.type.value_type
    if not pa.types.is_struct(value_type) or value_type.get_field_index("content") < 0:
        return None
    flat = pc.list_flatten(col)
    per_message = count(pc.struct_field(flat, "content"))
    parents = np.asarray(pc.list_parent_indices(col))
    return np.bincount(parents, weights=per_message, minlength=len(col)).astype(np.int64)


def _char_counts(arr: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.utf8_length(arr), 0), dtype=np.int64)


class IntDistribution:
    """Exact distribution of non-negative integers (lengths) via a growing bincount."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, np.int64)
        self.n = 0
        self.total = 0
        self.max = 0

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        self.n += len(values)
        self.total += int(values.sum())
        self.max = max(self.max, int(values.max()))
        counts = np.bincount(np.minimum(values, MAX_EXACT_LENGTH))
        if len(counts) > len(self.counts):
            counts[: len(self.counts)] += self.counts
            self.counts = counts
        else:
            self.counts[: len(counts)] += counts

    def quantile(self, q: float) -> int:
        cum = np.cumsum(self.counts)
        return int(np.searchsorted(cum, q * self.n, side="left"))

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            return {"count": 0}
        out: dict[str, Any] = {"count": self.n, "mean": round(self.total / self.n, 2)}
        out.update({name: self.quantile(q) for name, q in QUANTILES.items()})
        out["max"] = self.max
        # Fixed log2 bins: 0, 1, 2-3, 4-7, ...: comparable across datasets.
        values = np.arange(len(self.counts))
        bins = np.zeros(len(values), np.int64)
        bins[1:] = np.floor(np.log2(values[1:])).astype(np.int64) + 1
        per_bin = np.bincount(bins, weights=self.counts).astype(np.int64)
        out["histogram"] = [
            {"lo": 0 if b == 0 else 1 << (b - 1), "hi": 0 if b == 0 else (1 << b) - 1, "count": int(c)}
            for b, c in enumerate(per_bin)
        ]
        return out


def _round(x: float) -> float:
    return float(f"{x:.6g}")


class FloatDistribution:
    """Moments of a float column, plus a fine fixed grid when its range is known."""

    def __init__(self, lo: float | None = None, hi: float | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.grid = np.zeros(FINE_BINS, np.int64) if lo is not None and hi is not None else None
        self.n = self.nulls = 0
        self.sum = self.sumsq = 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, col: pa.Array | pa.ChunkedArray) -> None:
        values = np.asarray(pc.fill_null(col, np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)
        ok = np.isfinite(values)
        self.nulls += int((~ok).sum())
        values = values[ok]
        if not len(values):
            return
        self.n += len(values)
        self.sum += float(values.sum())
        self.sumsq += float((values * values).sum())
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))
        if self.grid is not None:
            self.grid += np.bincount(self._bin(values), minlength=FINE_BINS)

    def _bin(self, values: np.ndarray) -> np.ndarray:
        width = (self.hi - self.lo) or 1.0
        idx = np.floor((values - self.lo) / width * FINE_BINS).astype(np.int64)
        return np.clip(idx, 0, FINE_BINS - 1)

    def _quantile(self, q: float) -> float:
        cum = np.cumsum(self.grid)
        target = q * self.n
        b = int(np.searchsorted(cum, target, side="left"))
        before = cum[b - 1] if b else 0
        inside = (target - before) / self.grid[b] if self.grid[b] else 0.0
        width = (self.hi - self.lo) / FINE_BINS
        return float(min(max(self.lo + (b + inside) * width, self.min), self.max))

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.n, "nulls": self.nulls}
        if not self.n:
            return out
        mean = self.sum / self.n
        out.update(mean=mean, std=math.sqrt(max(self.sumsq / self.n - mean * mean, 0.0)), min=self.min)
        if self.grid is not None:
            out.update({name: self._quantile(q) for name, q in QUANTILES.items()})
        out["max"] = self.max
        if self.grid is not None:
            step = FINE_BINS // DISPLAY_BINS
            coarse = self.grid.reshape(DISPLAY_BINS, step).sum(axis=1)
            width = (self.hi - self.lo) / DISPLAY_BINS
            out["histogram"] = [
                {"lo": _round(self.lo + i * width), "hi": _round(self.lo + (i + 1) * width), "count": int(c)}
                for i, c in enumerate(coarse)
            ]
        return out


class Agreement:
    """Pairwise agreement of ensemble members (``margin__<member>`` columns)."""

    def __init__(self, members: Sequence[str]) -> None:
        self.members = list(members)
        k = len(self.members)
        self.n = np.zeros((k, k), np.int64)
        self.sx, self.sy, self.sxx, self.syy, self.sxy = (np.zeros((k, k)) for _ in range(5))
        self.same_sign = np.zeros((k, k), np.int64)
        self.positive = np.zeros(k, np.int64)
        self.seen = np.zeros(k, np.int64)

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        cols = [
            np.asarray(pc.fill_null(batch[m], np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)
            for m in self.members
        ]
        for i, x in enumerate(cols):
            ok = np.isfinite(x)
            self.seen[i] += int(ok.sum())
            self.positive[i] += int((x[ok] > 0).sum())
            for j in range(i + 1, len(cols)):
                y = cols[j]
                both = ok & np.isfinite(y)
                a, b = x[both], y[both]
                self.n[i, j] += len(a)
                self.sx[i, j] += a.sum()
                self.sy[i, j] += b.sum()
                self.sxx[i, j] += (a * a).sum()
                self.syy[i, j] += (b * b).sum()
                self.sxy[i, j] += (a * b).sum()
                self.same_sign[i, j] += int((np.sign(a) == np.sign(b)).sum())

    def result(self) -> dict[str, Any]:
        pairs = []
        for i in range(len(self.members)):
            for j in range(i + 1, len(self.members)):
                n = int(self.n[i, j])
                pearson = None
                if n > 1:
                    cov = self.sxy[i, j] / n - (self.sx[i, j] / n) * (self.sy[i, j] / n)
                    vx = self.sxx[i, j] / n - (self.sx[i, j] / n) ** 2
                    vy = self.syy[i, j] / n - (self.sy[i, j] / n) ** 2
                    pearson = float(cov / math.sqrt(vx * vy)) if vx > 0 and vy > 0 else None
                pairs.append(
                    {
                        "a": self.members[i],
                        "b": self.members[j],
                        "n": n,
                        "pearson": pearson,
                        "sign_agreement": self.same_sign[i, j] / n if n else None,
                    }
                )
        label = {
            m: (int(self.positive[i]) / int(self.seen[i]) if self.seen[i] else None) for i, m in enumerate(self.members)
        }
        return {"members": self.members, "pairs": pairs, "label_agreement": label}


# -- one pass over a table stream ---------------------------------------------------------
class FigureAccumulator:
    """Every per-row figure of a stream of batches; ``result()`` gives the JSON-able dict.

    Columns are picked from ``schema``; ``float_ranges`` gives each float column's range
    (columns without one get moments only). The export stage feeds its own batches through
    one of these so the dataset card costs no second read.
    """

    def __init__(
        self, schema: pa.Schema, unit: str = "words", float_ranges: dict[str, tuple[float, float]] | None = None
    ) -> None:
        self.unit = unit
        names = set(schema.names)
        self.rows = 0
        self.text = [c for c in TEXT_COLUMNS if c in names]
        self.lengths = {c: IntDistribution() for c in self.text}
        ranges = float_ranges or {}
        self.floats = {
            f.name: FloatDistribution(*ranges.get(f.name, (None, None))) for f in schema if pa.types.is_floating(f.type)
        }
        members = sorted(c for c in self.floats if c.startswith(MEMBER_PREFIX))
        self.agreement = Agreement(members) if len(members) > 1 else None
        self.sources: dict[str, int] | None = {} if "source" in names else None
        self.ties = 0 if "tie" in names else None
        self.labels = {"true": 0, "false": 0} if "label" in names else None
        self.bias = np.zeros(3, np.int64) if {"chosen", "rejected"} <= names else None
        self.length_diff = 0

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        self.rows += batch.num_rows
        lengths = {}
        for c in self.text:
            values = text_lengths(batch[c], self.unit)
            if values is not None:
                lengths[c] = values
                self.lengths[c].add(values)
        if self.bias is not None and "chosen" in lengths and "rejected" in lengths:
            diff = lengths["chosen"] - lengths["rejected"]
            self.bias += [int((diff > 0).sum()), int((diff < 0).sum()), int((diff == 0).sum())]
            self.length_diff += int(diff.sum())
        for name, dist in self.floats.items():
            dist.add(batch[name])
        if self.agreement is not None:
            self.agreement.add(batch)
        if self.sources is not None:
            self._count_sources(batch["source"])
        if self.ties is not None:
            self.ties += int(pc.sum(pc.fill_null(batch["tie"], False).cast(pa.int64())).as_py() or 0)
        if self.labels is not None:
            true = int(pc.sum(pc.fill_null(batch["label"], False).cast(pa.int64())).as_py() or 0)
            self.labels["true"] += true
            self.labels["false"] += batch.num_rows - true

    def _count_sources(self, col: pa.Array) -> None:
        for item in pc.value_counts(col).to_pylist():
            key = item["values"] if item["values"] is not None else "(none)"
            if key not in self.sources and len(self.sources) >= MAX_SOURCES:
                key = "(other)"
            self.sources[key] = self.sources.get(key, 0) + item["counts"]

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": self.rows, "unit": self.unit}
        if self.sources is not None:
            out["sources"] = dict(sorted(self.sources.items(), key=lambda kv: -kv[1]))
        if self.ties is not None:
            out["ties"] = {"count": self.ties, "share": self.ties / self.rows if self.rows else 0.0}
        if self.labels is not None:
            out["labels"] = self.labels
        if self.bias is not None:
            pairs = int(self.bias.sum())
            out["length_bias"] = {
                "pairs": pairs,
                "chosen_longer": int(self.bias[0]),
                "rejected_longer": int(self.bias[1]),
                "equal": int(self.bias[2]),
                "share_chosen_longer": self.bias[0] / pairs if pairs else None,
                "mean_difference": self.length_diff / pairs if pairs else None,
            }
        out["lengths"] = {c: d.result() for c, d in self.lengths.items()}
        out["scores"] = {c: d.result() for c, d in self.floats.items()}
        if self.agreement is not None:
            out["agreement"] = self.agreement.result()
        return out
