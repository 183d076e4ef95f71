"""The IVF join: all-vs-all near pairs on CPU, each cell of a FAISS k-means compared with the
rows that probe it in one matrix product (see ``ivf_join``), and its row operands
(``JoinOperands``), which dedupe builds ahead while its encoder runs.

Split from ``index`` (which picks the index and holds the exact and GPU paths) to keep each
module to one job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from prefcurate.backends.index import (
    _PCA_SAMPLE,
    _SEARCH_CHUNK,
    FILTER_DIM,
    IVF_NPROBE,
    REDUCED_DIM,
    IndexInfo,
    _as_tensor,
    _bound,
    _chunks,
    _f32,
    _faiss,
    _nlist,
    _sample,
    join_precision,
    pair_cosines,
    pca,
)
from prefcurate.stages.base import ProgressTask
from prefcurate.steps import Steps

_JOIN_BLOCK = 1 << 20  # at most this many distances per GEMM block in the IVF join
# rows per block (bf16 on AMX: 1024 x 64k members ran fastest, 2048 slower; on Zen 4, 2048 rows
# joined 200k rows in 2.27 s against 2.24 s, medians of 12 interleaved runs)
_JOIN_ROWS = 1024
_BF16_PAD = 64  # a cell's members padded to a multiple of this in bf16 (one kernel per shape)
_BF16_ROWS = 128  # in bf16, a cell's last block of probers is padded to a multiple of this
_OPERAND_ROWS = 1 << 16  # member rows turned into right operands at once (``_cell_operands``)
# In bf16, a row with more than k candidates in a cell keeps this many times k by the filter's
# value, then the k nearest of those by exact cosine (bf16 cannot order close neighbours, and
# exact cosines for every candidate of a giant cell cost 5x more: 6,000 identical rows 19 s,
# 3.6 s with the cut, 1.9 s in float32, which ranks by its own filter values)
_BF16_RANK = 4
_FILL_CHUNK = 1024  # rows per step when the operands are filled ahead (a few ms on one thread)
# A basis fitted on the first rows is kept when, on a uniform sample of all rows, it keeps at
# least this share of what it kept of the early rows held out of its fit (else the join fits a
# fresh one: ``JoinOperands.fits``)
_FIT_SHARE = 0.9
_CHECK_ROWS = 2048  # rows of the uniform sample in that test (~0.01 s)


def ivf_join(
    vectors: np.ndarray,
    threshold: float,
    k: int,
    progress: ProgressTask | None,
    nprobe: int = IVF_NPROBE,
    scale: float = 1.0,
    precision: str = "auto",
    operands: JoinOperands | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, IndexInfo]:
    """All-vs-all near pairs on CPU as an IVF *join*: the same cells and probes as a FAISS IVF
    search, but each cell is compared with every row that probes it in one matrix product,
    instead of one query at a time.

    1. Centered PCA to ``FILTER_DIM`` components; k-means (FAISS) on the top ``REDUCED_DIM``
       gives ``nlist`` cells; each row lives in its nearest cell and probes its ``nprobe``
       nearest.
    2. Per cell, one product gives ``-|q - m|^2 / 2`` on the ``FILTER_DIM`` components for
       every (row probing it, member) pair (``JoinOperands.fill``: no pass over the block to
       turn dot products into distances). A pair is a candidate when that is within the bound
       of the threshold (lossless: a projection never lengthens a difference), keeping each
       row's ``k`` nearest per cell, so one giant cluster cannot flood memory.
    3. Each distinct candidate pair is re-scored once with the full vectors.

    The product runs in torch, whose CPU GEMM and row gathers (``index_select``) beat numpy's
    here; where the CPU has native bf16 (``join_precision``) it runs in bfloat16 with float32
    accumulation. bf16 keeps 8 significant bits, so each pair's bound is widened by the
    worst-case rounding error, which rides in the product itself (``JoinOperands.fill``): still
    lossless, at the price of more candidates for the exact re-score. oneDNN builds a kernel
    per matrix shape, so in bf16 a cell's members are padded to a multiple of ``_BF16_PAD``
    (padding scores -1e4: never a candidate) and its probers to a multiple of ``_BF16_ROWS``
    (the last row repeated, its results dropped); with a shape per cell, building kernels took
    longer than the arithmetic (on the Intel AMX VM). Probers used to be padded to a whole
    ``_JOIN_ROWS`` block, but a cell has ~1.8k of them at 200k rows (~560 at 20k), so the last
    block was half padding on average: 21% of the products at 200k rows. On the AMD Zen 4 VM a
    new shape costs ~0.3 ms once, and padding to 128 rows (~100 shapes in all) took the join
    from 2.12 to 1.99 s at 200k rows and from 0.176 to 0.155 s at 20k (medians of 6 and 10
    interleaved runs, the same edges); 64 rows, or members padded to 32 or 16, changed nothing.

    Measured at 200k static pair vectors (768-d) on 2 cores: 3x faster than FAISS IVFFlat
    top-k search in 64-d plus re-scoring, with the same or more edges (no global top-k cap).
    The join itself at 200k rows (medians of 3 interleaved runs): numpy float32 4.8 s, torch
    float32 3.8 s, torch bf16 on AMX 3.0 s, all with the same 10,592 edges (20k rows: 0.49 /
    0.44 / 0.46 s, where fixed costs dominate). Then the PCA's eigh moved from numpy float64 to
    torch float32 (``pca``) and the member operands came to be built for many cells at once
    (``_cell_operands``): 20k rows 0.50 -> 0.28 s; 200k rows ~2.8 s (medians, noisy).
    Tried and dropped: fitting the cells and projecting each block on a background thread
    while the encoder runs. The encoder keeps ~1.5 of the 2 cores busy, and the stolen time
    cost it more than the search saved (20k rows: 5.74 s vs 5.53 s over 4 runs each; 200k:
    51.1 s vs 50.0 s). Building the operands (``JoinOperands``) on dedupe's gated helper,
    which works only while the tokenizer's threads are idle, pays a little from ~50k rows and
    loses below (``dedupe_vectors``' notes). ``operands``, when given, are those rows for
    ``vectors`` in order; they are used when their basis still fits the data
    (``JoinOperands.fits``), else rebuilt.
    """
    import torch

    faiss = _faiss()
    n, dim = vectors.shape
    nlist = _nlist(n)
    nprobe = min(nprobe, nlist)
    bf16 = join_precision(precision) == "bf16"
    info = IndexInfo("ivf", "cpu", n, min(dim, FILTER_DIM), nlist, nprobe, join=True, gemm="bf16" if bf16 else "fp32")
    floor = -0.5 * _bound(threshold)  # a candidate has -|q - m|^2/2 >= floor
    if operands is not None and operands.fits(vectors, scale, bf16):
        ops = operands.table
        info.ahead = True
    else:
        ops = JoinOperands.build(vectors, fit_projection(_sample(vectors, _PCA_SAMPLE), scale), bf16).table
    coarse = ops[:, :REDUCED_DIM].float().contiguous().numpy()
    # 5 iterations: cells only route pairs; 3 vs 10 iterations found the same edges at 200k rows
    kmeans = faiss.Kmeans(REDUCED_DIM, nlist, niter=5, seed=1234, max_points_per_centroid=40)
    kmeans.train(_sample(coarse, 40 * nlist))
    _, probes = kmeans.index.search(coarse, nprobe)  # column 0: the row's own cell
    del coarse
    members, member_start = _by_cell(probes[:, 0], nlist)
    # rank-major, so each cell's probers start with its own members, in the members' order:
    # a row meets itself on the diagonal of the cell's first rows, masked below
    probers, prober_start = _by_cell(probes.T.ravel(), nlist)
    probers %= n  # flat position -> row
    members_t, probers_t = torch.from_numpy(members), torch.from_numpy(probers)
    # the floor in the block's dtype, rounded down (a bf16 comparison rounds the scalar too)
    lim = torch.tensor(floor * (1 + 2 * (_BF16_U if bf16 else 2.0**-24)), dtype=ops.dtype)
    assert lim.item() <= floor
    packed: list[np.ndarray] = []
    group, at, first = None, None, 0
    for cell in range(nlist):
        if group is None or cell >= first + len(at) - 1:  # the next cells' member operands, at once
            first = cell
            group, at = _cell_operands(ops, members_t, member_start, cell, floor, bf16)
        mem = members[member_start[cell] : member_start[cell + 1]]
        if not len(mem) or prober_start[cell] == prober_start[cell + 1]:
            continue
        mem_t = group[at[cell - first] : at[cell - first + 1]].T
        block = min(_JOIN_ROWS, max(1, _JOIN_BLOCK // mem_t.shape[1]))
        for start in range(prober_start[cell], prober_start[cell + 1], block):
            stop = min(start + block, prober_start[cell + 1])
            idx = probers_t[start:stop]
            if bf16 and len(idx) % _BF16_ROWS:  # a shape of few: repeat the last row, ignore its results
                idx = torch.cat([idx, idx[-1:].expand(-len(idx) % _BF16_ROWS)])
            d = (torch.index_select(ops, 0, idx) @ mem_t)[: stop - start]
            own = start - prober_start[cell]  # this block's first position among the cell's probers
            if own < len(mem):  # rows [own, len(mem)) of the cell's probers are its members
                diag = torch.arange(own, min(len(mem), stop - prober_start[cell]))
                d[diag - own, diag] = -1e4
            near = np.flatnonzero((d.amax(1) >= lim).numpy())  # a fast reduction first: few rows have any
            if not len(near):
                continue
            sub = d.index_select(0, torch.from_numpy(near))
            qi, mi = np.nonzero((sub >= lim).numpy())
            q = probers[start:stop][near]
            a, b = q[qi], mem[mi]
            counts = np.bincount(qi, minlength=len(q))
            if counts.max(initial=0) > k:  # keep each row's k nearest in this cell
                score = sub[torch.from_numpy(qi), torch.from_numpy(mi)].float().numpy()
                if bf16:  # too coarse to rank close neighbours: a wide cut, then exact cosines
                    qi, a, b = _nearest_k(score, qi, a, b, counts, _BF16_RANK * k)
                    counts = np.bincount(qi, minlength=len(q))
                    score = pair_cosines(vectors, a, b, scale)
                qi, a, b = _nearest_k(score, qi, a, b, counts, k)
            packed.append(np.minimum(a, b) * n + np.maximum(a, b))
        if progress is not None:
            progress.advance(len(mem))
    pairs = np.unique(np.concatenate(packed)) if packed else np.zeros(0, np.int64)
    i, j = pairs // n, pairs % n
    s = pair_cosines(vectors, i, j, scale)
    hit = s >= threshold
    return i[hit], j[hit], s[hit], info


_BF16_U = 2.0**-8  # bfloat16's unit roundoff (8 significant bits, round to nearest)
_ACC = 264 * 2.0**-24  # float32 accumulation over the operands' columns, relative to the magnitudes


@dataclass
class Projection:
    """A centered PCA basis for the join's filter: a row ``x`` becomes ``p = (scale x) P - offset``."""

    proj: np.ndarray  # (dim, width) float32, orthonormal columns
    offset: np.ndarray  # (width,) float32: the fit sample's mean times ``proj``
    scale: float
    held_out_share: float | None = None  # the share of held-out rows' variance it keeps


def fit_projection(sample: np.ndarray, scale: float, hold_out: int = 0) -> Projection:
    """The top ``FILTER_DIM`` principal directions of ``scale`` times ``sample``'s rows; with
    ``hold_out``, fitted on all but the last ``hold_out`` rows, on which it is then measured
    (``Projection.held_out_share``, for ``JoinOperands.fits``)."""
    x = _f32(sample, scale)
    fit, held = (x[:-hold_out], x[-hold_out:]) if 0 < hold_out < len(x) // 2 else (x, None)
    proj, offset = pca(fit, FILTER_DIM)
    return Projection(proj, offset, scale, _kept_share(held, proj) if held is not None else None)


def _kept_share(x: np.ndarray, proj: np.ndarray) -> float:
    """The share of the centered rows' squared length that the projection keeps."""
    centered = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
    total = float(np.einsum("ij,ij->", centered, centered, dtype=np.float64))
    kept = centered @ proj
    return float(np.einsum("ij,ij->", kept, kept, dtype=np.float64)) / total if total > 0 else 1.0


class JoinOperands:
    """The join's row operands: a torch ``(rows, width + 8)`` table (bfloat16 or float32) of
    projected rows and their bound terms, filled a range of rows at a time.

    Why ahead: building them is a (rows x 768) by (768 x 256) product plus a pass over the
    table, 0.9-1.0 s of a 3.7 s search at 200k rows (2-core AMD EPYC VM), on the critical path
    after the encoder. dedupe builds them instead on its helper thread while the encoder
    runs (``dedupe_vectors``), a unit of rows at a time as they are embedded, in the gaps the
    tokenizer leaves, from a basis fitted on the first rows (``fill_steps``); measured, that
    saves about half its cost at 200k rows, as the gap work slows the encoder (hence only from
    50k rows, ``dedupe_vectors``). Any orthonormal
    basis keeps the filter lossless; a basis that fits the data worse only lets more pairs
    through to the exact re-score, and ``fits`` sends the join back to a fresh basis when the
    early rows were not like the rest. The values do not depend on which thread filled a
    range: dedupe fills them with torch on one thread (``serial_torch``) in fixed chunks."""

    def __init__(self, rows: int, width: int, bf16: bool, empty: Callable | None = None) -> None:
        """``empty(shape, numpy dtype)``, when given, makes the table's storage (dedupe's
        ``VectorStorage``: memory or a mapped file); else torch allocates it."""
        self.bf16 = bf16
        self.width = width
        self.table = _table(rows, width + 8, bf16, empty)
        self.projection: Projection | None = None

    @classmethod
    def build(cls, vectors: np.ndarray, projection: Projection, bf16: bool) -> JoinOperands:
        """The operands of every row of ``vectors``, at once."""
        ops = cls(len(vectors), projection.proj.shape[1], bf16)
        ops.projection = projection
        for start, stop in _chunks(len(vectors), _SEARCH_CHUNK):
            ops.fill(vectors[start:stop], start)
        return ops

    def fill_steps(self, vectors: np.ndarray, start: int, chunk: int = _FILL_CHUNK) -> Steps[None]:
        """``fill`` in chunks of ``chunk`` rows, as steps (``prefcurate.steps``)."""
        for lo in range(0, len(vectors), chunk):
            self.fill(vectors[lo : lo + chunk], start + lo)
            yield

    def fill(self, vectors: np.ndarray, start: int) -> None:
        """Rows ``start : start + len(vectors)`` from those rows of ``vectors`` (float16 or
        float32, times the projection's ``scale`` the unit vectors compared). With
        ``h = |p|^2 / 2 - (|x|^2 - 1) / 2`` a row is::

            [p, 1, 1, -h', -h'', |p|, |h|, 1, 0]      and a member (``_cell_operands``)
            [p, -h', -h'', 1, 1, a |p|, b, b |h| + c, 0]

        (``h'`` + ``h''`` is h in two bf16 numbers, so it loses no bits), and a row times a
        member is ``-|q - m|^2/2 + (|x_q|^2 + |x_m|^2)/2 - 1``, which is at least ``floor`` when
        ``x_q . x_m`` reaches the threshold (``_bound``: the float16 unit vectors' norms are not
        quite 1), plus, in bf16, the most that rounding can take off it:
        ``a |q| |m| + b (|h_q| + |h_m|) + c`` (a rank-3 term, so the GEMM adds it). Rounding the
        inputs to bf16 moves ``q.m`` by at most ``(2u + u^2)|q||m|`` and each split h by ``u^2
        h``; float32 accumulation adds ``_ACC`` of the magnitudes; the result's own rounding
        moves it by ``u`` of itself, ``u |floor|`` near the floor; 10% on top covers the rounding
        of the slack columns themselves (~3u of them). In float32 the slack columns stay 0."""
        import torch

        assert self.projection is not None, "fit a projection first"
        width, p_ = self.width, self.projection
        if not len(vectors):
            return
        x = _as_tensor(vectors).float()
        p = x @ torch.from_numpy(p_.proj * np.float32(p_.scale))  # (scale x) P = x (scale P)
        p -= torch.from_numpy(p_.offset)
        h = 0.5 * torch.linalg.vecdot(p, p, dim=1)
        excess = 0.5 * (p_.scale * p_.scale * torch.linalg.vector_norm(x, dim=1).square() - 1)  # 9x einsum's speed
        rows = self.table[start : start + len(vectors)]
        rows[:, :width] = p
        rows[:, width : width + 2] = 1
        rows[:, width + 2] = excess - h
        rows[:, width + 3] = (excess - h - rows[:, width + 2].float()) if self.bf16 else 0  # what bf16 dropped
        if self.bf16:
            rows[:, width + 4] = torch.sqrt(2 * h)
            rows[:, width + 5] = (h - excess).abs()
            rows[:, width + 6] = 1
        else:
            rows[:, width + 4 : width + 7] = 0
        rows[:, width + 7] = 0

    def fits(self, vectors: np.ndarray, scale: float, bf16: bool) -> bool:
        """Whether these operands serve a join of ``vectors``: one row each, the same number
        format, and a basis fitted on the first rows (dedupe: ``_FIT_ROWS``) that keeps as
        much of a uniform sample's variance, within ``_FIT_SHARE``, as of the early rows held
        out of its fit. Both are rows it was not fitted on (on its own sample it keeps more:
        0.80 against 0.75 on 200k bench rows, where a basis fitted on a uniform sample keeps
        the same 0.75), so the test is not fooled by overfitting, and data that drifts after
        the first rows (another source appended, say) fails it. Why it matters: a basis blind
        to the later rows' variance would put them all in a few k-means cells, and the join's
        work grows with the square of a cell's size."""
        p_ = self.projection
        if p_ is None or len(self.table) != len(vectors) or self.bf16 != bf16 or p_.scale != scale:
            return False
        if p_.held_out_share is None:
            return True
        uniform = _kept_share(_f32(_sample(vectors, _CHECK_ROWS), scale), p_.proj)
        return uniform >= _FIT_SHARE * p_.held_out_share

    def take(self, rows: np.ndarray, empty: Callable | None = None) -> JoinOperands:
        """The operands of ``rows`` (indices, or a boolean mask), in that order: a copy (with
        ``empty``, into storage it makes, a block of rows at a time)."""
        import torch

        rows = np.flatnonzero(rows) if rows.dtype == bool else np.asarray(rows, np.int64)
        index = torch.from_numpy(rows)
        if empty is None:
            return self._with(self.table.index_select(0, index))
        table = _table(len(rows), self.table.shape[1], self.bf16, empty)
        for start, stop in _chunks(len(rows), _SEARCH_CHUNK):
            table[start:stop] = self.table.index_select(0, index[start:stop])
        return self._with(table)

    def head(self, n: int) -> JoinOperands:
        """The operands of the first ``n`` rows: a view."""
        return self._with(self.table[:n])

    def _with(self, table) -> JoinOperands:
        out = JoinOperands.__new__(JoinOperands)
        out.bf16, out.width, out.projection, out.table = self.bf16, self.width, self.projection, table
        return out


def _table(rows: int, width: int, bf16: bool, empty: Callable | None):
    """An uninitialized (rows, width) torch table, bfloat16 or float32, in storage from
    ``empty(shape, numpy dtype)`` when given (bfloat16 as int16 storage: numpy has no
    bfloat16, and a view keeps the bits)."""
    import torch

    if empty is None:
        return torch.empty((rows, width), dtype=torch.bfloat16 if bf16 else torch.float32)
    table = torch.from_numpy(empty((rows, width), np.int16 if bf16 else np.float32))
    return table.view(torch.bfloat16) if bf16 else table


def _cell_operands(ops, members_t, member_start: np.ndarray, cell: int, floor: float, bf16: bool):
    """The members of cells ``cell, cell + 1, ...`` (up to ``_OPERAND_ROWS`` rows, at least
    one cell) as right sides of the product (see ``JoinOperands.fill``), stacked: cell
    ``cell + c``'s rows are ``[at[c], at[c + 1])``. In bf16 each cell is padded to a multiple
    of ``_BF16_PAD`` rows that score -1e4 against any row. Built for many cells at once:
    per cell, the ~20 small tensor operations cost more than their arithmetic (280 cells at
    20k rows: 0.057 s)."""
    import torch

    nlist = len(member_start) - 1
    stop = int(np.searchsorted(member_start, member_start[cell] + _OPERAND_ROWS, side="right")) - 1
    stop = min(nlist, max(stop, cell + 1))
    sizes = np.diff(member_start[cell : stop + 1])
    padded = -(-sizes // _BF16_PAD) * _BF16_PAD if bf16 else sizes
    at = np.r_[0, np.cumsum(padded)]
    width = ops.shape[1] - 8
    m = torch.index_select(ops, 0, members_t[member_start[cell] : member_start[stop]])
    m[:, width : width + 4] = m[:, [width + 2, width + 3, width, width + 1]]
    if bf16:
        u = _BF16_U
        grow = 1.1 * (1 + u)
        # each member's norm and h, from their bf16 copies (which may have rounded down)
        norm, half = m[:, width + 4].float() * (1 + u), m[:, width + 5].float() * (1 + u)
        m[:, width + 4] = grow * (2 * u + u * u + _ACC) * norm
        m[:, width + 5] = grow * (u * u + _ACC)
        m[:, width + 6] = grow * (u * u + _ACC) * half + 1.1 * u * -floor
    if not bf16:
        return m, at
    out = torch.zeros((int(at[-1]), ops.shape[1]), dtype=ops.dtype)
    dest = np.arange(len(m)) + np.repeat(at[:-1] - np.r_[0, np.cumsum(sizes)][:-1], sizes)
    out.index_copy_(0, torch.from_numpy(dest), m)
    pad = np.ones(len(out), bool)
    pad[dest] = False
    out[torch.from_numpy(np.flatnonzero(pad)), width] = -1e4
    return out, at


def _nearest_k(score, qi, a, b, counts, k):
    """Of the candidate (a, b) pairs of block rows ``qi`` (``score`` grows as the distance
    shrinks), keep at most the ``k`` nearest per block row."""
    order = np.lexsort((-score, qi))  # by row, then nearest first
    starts = np.r_[0, np.cumsum(counts)][qi[order]]
    rank = np.arange(len(order)) - starts
    keep = order[rank < k]
    return qi[keep], a[keep], b[keep]


def _by_cell(cells: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions sorted by cell, start offset of each cell) for ``cells`` (ints in [0, nlist)).
    As uint16 where they fit, numpy's stable sort is a radix sort: 1.6M probes 0.10 -> 0.02 s."""
    if nlist <= 1 << 16:
        cells = cells.astype(np.uint16)
    order = np.argsort(cells, kind="stable")
    return order, np.searchsorted(cells[order], np.arange(nlist + 1))
