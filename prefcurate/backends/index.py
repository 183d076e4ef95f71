"""Near-neighbour search over embeddings: FAISS on GPU when there is one, exact or
approximate by size.

Inner product on L2-normalized vectors is cosine similarity. Near-duplicate edges are pairs
at or above a threshold, with each row's neighbours capped at k (nearest first), so one
giant cluster of templated rows cannot flood memory; connectivity does not suffer: a cluster
bigger than k still becomes one connected component because every member links to k others
inside it, and a row similar to only one member finds that member from its own search.

Every approximate path is *candidates, then an exact check*, and the candidate filters are
lossless: ``x . y >= t`` means ``|x - y|^2 <= |x|^2 + |y|^2 - 2t`` (``2(1 - t)`` for exactly
unit vectors; the float16 ones dedupe hands over are unit to ~1e-4, which counts at the
threshold), and a projection never lengthens a difference, so a pair failing that bound on
projected vectors cannot be an edge. The ``similarity`` reported for an edge is always the
exact cosine of the full vectors.

- **flat** (small sets; GPU up to ``GPU_EXACT_MAX_ROWS``): FAISS ``IndexFlatIP``, exact.
- **ivf on CPU: an IVF join** (``ivf_join.ivf_join``). Cells come from FAISS k-means on a 64-d
  centered PCA projection; each row probes its ``IVF_NPROBE`` nearest cells, like a FAISS IVF
  search, but each cell is compared with all the rows probing it in one matrix product on
  the top ``FILTER_DIM`` (256) components (bfloat16 on CPUs with native bf16, its rounding error
  added to the bound), and only pairs within the bound there are re-scored.
  Why not FAISS's own IVF search: it scans inverted lists one query at a time, and in 64-d
  the bound is loose (HH-RLHF rows sit at cosine ~0.85 from each other, close to the 0.92
  threshold), so its top-k handed 2M candidates to the full re-score at 200k rows; 256-d
  keeps 3% of them. Measured at 200k static pair vectors on 2 cores: 11.7 s (FAISS IVFFlat
  top-k + re-score) -> 3.6 s, with more of the edges that nprobe=24 finds (99.2% vs 99.1%).
- **ivf on GPU / hnsw**: FAISS ``IndexIVFFlat`` (GPU) or ``IndexHNSWFlat`` top-k search on
  the 64-d projection, then the 256-d bound, then the full re-score.

Index choice (``kind="auto"``): exact up to ``CPU_EXACT_MAX_ROWS`` rows on CPU
(``GPU_EXACT_MAX_ROWS`` on a GPU, where brute force is what the device does best), IVF past
that.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from prefcurate.errors import InputError, MissingDependency
from prefcurate.stages.base import ProgressTask

if TYPE_CHECKING:
    from prefcurate.backends.ivf_join import JoinOperands

# Crossover measured on this 2-core CPU with 768-d static pair vectors, k=16, all-vs-all, build
# included (benchmarks/bench_dedupe.py --index-sweep, faiss on SkylakeX kernels): 4k rows flat
# 0.17 s vs IVF join 0.28 s; 5k 0.27 vs 0.22-0.24 s; 7k 0.48 vs 0.26 s; 10k 0.89 vs 0.35 s; 20k
# 3.3 vs 0.48 s, the join finding 100% of the exact edges up to 10k and 99.9% at 20k.
CPU_EXACT_MAX_ROWS = 5_000
# A GPU brute-forces 1M x 1M x 768 in about a minute; IVF only past that.
GPU_EXACT_MAX_ROWS = 1_000_000
REDUCED_DIM = 64
# Candidates are checked on this many top components before the full vectors: 1/3 of the bytes
# gathered, and the tighter bound leaves few pairs for the full re-score.
FILTER_DIM = 256
IVF_NPROBE = 8
_PCA_SAMPLE = 4096  # rows for the covariance: the top 64 directions of 768 are stable by then
_SEARCH_CHUNK = 8192
_RESCORE_CHUNK = 2048  # queries per search call in the approximate path
_PAIR_CHUNK = 4096  # candidate pairs per exact re-score: 2 x 12 MB gathered, reused by malloc (a 100 MB
# gather is a fresh mmap each time, and its page faults cost more than the arithmetic)


@dataclass
class IndexInfo:
    kind: str
    device: str
    rows: int
    dim: int
    nlist: int | None = None
    nprobe: int | None = None
    join: bool = False  # all-vs-all IVF join (CPU) instead of a FAISS search per query
    gemm: str = ""  # the join's product: fp32, or bf16 on CPUs with native bf16 (AMX, AVX-512 BF16)
    ahead: bool = False  # the join's operands were built while the rows were embedded

    def describe(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self.nlist else ""
        if self.join:
            ahead = ", operands built ahead" if self.ahead else ""
            cells = f"FAISS k-means cells, {self.dim}-d {self.gemm} filter{ahead}"
            return f"IVF join on {self.device} ({self.rows} rows, {cells}{extra})"
        return f"FAISS {self.kind} on {self.device} ({self.rows} rows, {self.dim}-d{extra})"


def _faiss():
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    coretype = openblas_coretype(_cpu_flags())
    if coretype:
        os.environ["OPENBLAS_CORETYPE"] = coretype
    try:
        import faiss
    except ImportError:
        raise MissingDependency("faiss-cpu", purpose="near-duplicate search") from None
    finally:
        if coretype:  # read once, when faiss's OpenBLAS loads: no other library sees it
            del os.environ["OPENBLAS_CORETYPE"]
    return faiss


def openblas_coretype(flags: set[str] | None) -> str | None:
    """The OpenBLAS kernels to ask for before faiss loads, or None to leave its choice.

    Why: faiss-cpu's wheels bundle their own OpenBLAS (0.3.15 in faiss-cpu 1.15), whose
    run-time CPU detection predates recent x86 cores. On this project's 2-core VM (an AVX-512
    Xeon) it fell back to its generic ``Prescott`` (SSE3) kernels, so every FAISS GEMM ran at
    a tenth of numpy's speed: k-means on 36k x 64-d points 0.9 s -> 0.35 s and the 8-nearest
    cells of 200k rows 1.3 s -> 0.6 s once told ``SkylakeX``. A user's own
    ``OPENBLAS_CORETYPE`` is left alone; otherwise the kernels named are the newest that the
    CPU's flags (x86-64 Linux) say it surely runs, and elsewhere OpenBLAS chooses."""
    if os.environ.get("OPENBLAS_CORETYPE") or not flags:
        return None
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags on x86-64 Linux (``/proc/cpuinfo``), else None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_index_device(device: str = "auto") -> str:
    """``auto``: GPU FAISS when a GPU build sees a device, else CPU; ``cuda`` without one is an error."""
    if device == "cpu":
        return "cpu"
    if gpu_available():
        return "cuda"
    if device == "cuda":
        raise MissingDependency("faiss-gpu-cu12", extra="gpu", purpose="FAISS on CUDA (or use --device cpu)")
    return "cpu"


def choose_kind(rows: int, device: str, kind: str = "auto") -> str:
    if kind not in ("auto", "flat", "ivf", "hnsw"):
        raise InputError(f"index {kind!r} is not one of auto, flat, ivf, hnsw")
    if kind == "hnsw" and device == "cuda":
        raise InputError("FAISS has no HNSW index on GPU", "use --index ivf or flat with --device cuda")
    if kind != "auto":
        return kind
    limit = GPU_EXACT_MAX_ROWS if device == "cuda" else CPU_EXACT_MAX_ROWS
    return "flat" if rows <= limit else "ivf"


def uses_cpu_join(rows: int, dim: int, where: str, kind: str = "auto") -> bool:
    """Whether ``similar_pairs`` of ``rows`` vectors of ``dim`` values, searched on ``where``
    (a resolved device: ``resolve_index_device``) with index ``kind``, runs the CPU IVF join
    (``ivf_join``), which alone takes operands built ahead (dedupe builds them when so)."""
    return where == "cpu" and choose_kind(rows, where, kind) == "ivf" and dim > REDUCED_DIM


class NeighborIndex:
    """A FAISS index over ``vectors`` (float32, L2-normalized rows) answering "which rows may
    be at cosine >= t of this query": ``candidates`` returns neighbour ids (-1 for none).

    Exact (``flat``): inner product on the full vectors; the answer is final. Approximate
    (``ivf``/``hnsw``): L2 search on a centered PCA projection. A projection never
    lengthens a difference, so cos >= t, i.e. ``|x - y|^2 <= 2(1 - t)``, implies the same
    bound on the projected vectors: filtering on it loses no true pair; the survivors are
    re-scored with the full vectors by the caller.
    """

    def __init__(self, vectors: np.ndarray, device: str = "auto", kind: str = "auto", nprobe: int = IVF_NPROBE) -> None:
        faiss = _faiss()
        n, dim = vectors.shape
        self.device = resolve_index_device(device)
        kind = choose_kind(n, self.device, kind)
        self.info = IndexInfo(kind, self.device, n, dim)
        self.exact = kind == "flat"
        self._proj: np.ndarray | None = None
        self.wide: np.ndarray | None = None  # rows on the top FILTER_DIM components (approximate path)
        if not self.exact and dim > REDUCED_DIM and n > REDUCED_DIM:
            self._fit_projection(_sample(vectors, _PCA_SAMPLE))
            if dim > FILTER_DIM:
                self.wide = _project(vectors, self._wide_proj, self._wide_offset)
                base = np.ascontiguousarray(self.wide[:, :REDUCED_DIM])
            else:
                base = self._reduce(vectors)
        else:
            base = np.ascontiguousarray(vectors, dtype=np.float32)
        self.base = base
        # squared row norms, for the approximate paths' bounds (not needed by an exact search)
        self.sq = None if self.exact else _sq_norms(vectors)
        self.sq_max = 1.0 if self.sq is None else float(self.sq.max(initial=0.0))
        index = self._make(faiss, kind, base.shape[1], n, nprobe)
        if self.device == "cuda":
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        if kind == "ivf":
            index.train(_sample(base, 40 * self.info.nlist))
        if n:
            index.add(base)
        self.index = index

    def _fit_projection(self, sample: np.ndarray) -> None:
        self._wide_proj, self._wide_offset = pca(sample, FILTER_DIM)
        self._proj = np.ascontiguousarray(self._wide_proj[:, :REDUCED_DIM])
        self._offset = np.ascontiguousarray(self._wide_offset[:REDUCED_DIM])

    def _reduce(self, vectors: np.ndarray) -> np.ndarray:
        if self._proj is None:
            return np.ascontiguousarray(vectors, dtype=np.float32)
        return _project(vectors, self._proj, self._offset)

    def _make(self, faiss, kind: str, dim: int, n: int, nprobe: int):
        self.info.dim = dim
        if kind == "flat":
            return faiss.IndexFlatIP(dim)
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, 16, faiss.METRIC_L2)
            index.hnsw.efConstruction, index.hnsw.efSearch = 40, 64
            return index
        nlist = _nlist(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
        index.cp.niter = 10  # near duplicates need cells, not a converged clustering
        index.nprobe = min(nprobe, nlist)
        self.info.nlist, self.info.nprobe = nlist, index.nprobe
        return index

    def candidates(self, queries: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of up to ``k`` rows per query that may reach ``threshold``; ids -1
        elsewhere. Scores are exact cosines for a flat index, projected distances otherwise."""
        k = max(1, min(k, self.info.rows))
        if self.info.rows == 0 or len(queries) == 0:
            return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
        return self._search(self._reduce(queries), k, threshold, _sq_max(queries))

    def candidates_of_rows(self, start: int, stop: int, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """``candidates`` for the index's own rows ``start:stop`` (no second projection)."""
        k = max(1, min(k, self.info.rows))
        return self._search(self.base[start:stop], k, threshold, self.sq_max)

    def _search(self, reduced: np.ndarray, k: int, threshold: float, query_sq: float) -> tuple[np.ndarray, np.ndarray]:
        d, ids = self.index.search(reduced, k)
        ok = d >= threshold if self.exact else d <= _bound(threshold, query_sq + self.sq_max)
        return d, np.where(ok, ids, -1)


def pca(sample: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Centered PCA: (dim x dims projection, mean @ projection), from an eigendecomposition of
    the sample covariance (dim x dim: cheap). Both in float32 (torch's ``eigh``: 768-d in
    0.026 s against 0.06 s for numpy's float64 one, a fifth of the 20k-row search's fixed
    cost). The search only needs a projection that never lengthens a difference, i.e.
    orthonormal columns: float32's are orthonormal to ~3e-6 (spectral norm of ``P^T P - I``),
    which lengthens a squared distance by ~5e-7 at the threshold, far inside ``_bound``'s
    1e-4 slack. Which directions are kept only decides how tight the filter is."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    mean = x.mean(dim=0, dtype=torch.float64).float()
    centered = x - mean
    _, vecs = torch.linalg.eigh(centered.T @ centered)
    proj = vecs.flip(1)[:, : min(dims, sample.shape[1])].contiguous().numpy()
    return proj, (mean.numpy() @ proj).astype(np.float32)


def _nlist(n: int) -> int:
    return max(1, min(int(2 * math.sqrt(n)), n // 39 or 1))  # FAISS wants >= 39 training points per list


def _bound(threshold: float, sq_sum: float | np.ndarray = 2.0) -> float | np.ndarray:
    """The largest squared distance of two vectors whose dot product reaches ``threshold``,
    when their squared norms sum to ``sq_sum`` (+ float32 slack): ``|x - y|^2 = |x|^2 +
    |y|^2 - 2 x.y``. For unit vectors (the default) that is ``2 (1 - t)``. The vectors
    compared are float16 unit vectors, whose norms are 1 only to ~1e-4, and pairs right at
    the threshold were lost when the filter took them for exactly 1."""
    return sq_sum - 2 * threshold + 1e-4


def _project(vectors: np.ndarray, proj: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(x - mean) P, computed as x P - mean P (no centered copy of x), in bounded chunks."""
    out = np.empty((len(vectors), proj.shape[1]), np.float32)
    for start, stop in _chunks(len(vectors), _SEARCH_CHUNK):
        np.matmul(np.asarray(vectors[start:stop], np.float32), proj, out=out[start:stop])
        out[start:stop] -= offset
    return out


def _as_tensor(a: np.ndarray):
    """A torch view of a numpy array, strided ones included (e.g. one part's columns of the
    dedupe matrix); a copy only when it is read-only or has a negative stride."""
    import torch

    a = np.asarray(a)
    if not a.flags.writeable or any(s < 0 for s in a.strides):
        a = np.array(a)
    return torch.from_numpy(a)


def _sq_norms(vectors: np.ndarray) -> np.ndarray:
    """Each row's squared norm (float32), a chunk at a time."""
    import torch

    table, out = _as_tensor(vectors), torch.empty(len(vectors), dtype=torch.float32)
    for start, stop in _chunks(len(vectors), _SEARCH_CHUNK):
        out[start:stop] = torch.linalg.vector_norm(table[start:stop].float(), dim=1).square()
    return out.numpy()


def _sq_max(vectors: np.ndarray) -> float:
    """The largest squared row norm (1 for unit vectors; 0 for none)."""
    return float(_sq_norms(vectors).max(initial=0.0))


def _sample(vectors: np.ndarray, size: int) -> np.ndarray:
    if len(vectors) <= size:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    return np.ascontiguousarray(vectors[np.sort(np.random.default_rng(0).choice(len(vectors), size, replace=False))])


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _exact_scores(queries: np.ndarray, base: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Cosine of each query with each of its candidate rows (-inf where the id is -1)."""
    sims = np.einsum("qd,qkd->qk", queries, base[np.where(ids >= 0, ids, 0)])
    return np.where(ids >= 0, sims, -np.inf).astype(np.float32)


def similar_pairs(
    vectors: np.ndarray,
    threshold: float,
    k: int = 16,
    device: str = "auto",
    kind: str = "auto",
    progress: ProgressTask | None = None,
    scale: float = 1.0,
    precision: str = "auto",
    operands: JoinOperands | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, IndexInfo]:
    """All-vs-all: edges (i, j, cosine) with i < j and cosine >= ``threshold``, each edge once.

    ``vectors`` (float32 or float16) times ``scale`` are the unit vectors compared: dedupe
    hands its float16 matrix of unit parts and 1/sqrt(#parts), and the CPU join turns it
    into float32 a block at a time (no float32 copy of the whole matrix).

    Approximate indexes give candidates only; each distinct candidate pair is re-scored once
    with the full vectors (a pair is usually found from both of its ends). ``operands``: the
    CPU join's row operands built ahead (``ivf_join.JoinOperands``), used by that path only."""
    if len(vectors) < 2:  # nothing to pair (and no cells to train for an IVF index)
        none = np.zeros(0, np.int64)
        return none, none, np.zeros(0, np.float32), IndexInfo("flat", "cpu", len(vectors), vectors.shape[1])
    if uses_cpu_join(len(vectors), vectors.shape[1], resolve_index_device(device), kind):
        from prefcurate.backends.ivf_join import ivf_join

        return ivf_join(vectors, threshold, k, progress, scale=scale, precision=precision, operands=operands)
    vectors = _f32(vectors, scale)
    index = NeighborIndex(vectors, device, kind)
    chunk = _SEARCH_CHUNK if index.exact else _RESCORE_CHUNK
    n = max(1, len(vectors))
    packed, sims = [], []
    for start, stop in _chunks(len(vectors), chunk):
        d, ids = index.candidates_of_rows(start, stop, k + 1, threshold)  # +1: a vector finds itself
        q, slot = np.nonzero(ids >= 0)
        a, b = q + start, ids[q, slot]
        other = a != b
        a, b = a[other], b[other]
        packed.append(np.minimum(a, b) * n + np.maximum(a, b))
        if index.exact:
            sims.append(d[q[other], slot[other]])
        if progress is not None:
            progress.advance(stop - start)
    pairs = np.concatenate(packed) if packed else np.zeros(0, np.int64)
    pairs, first = np.unique(pairs, return_index=True)
    i, j = pairs // n, pairs % n
    if index.exact:
        s = np.concatenate(sims)[first] if sims else np.zeros(0, np.float32)
    else:
        if index.wide is not None:  # a second, tighter projection bound before the full vectors
            near = pair_sq_distances(index.wide, i, j) <= _bound(threshold, index.sq[i] + index.sq[j])
            i, j = i[near], j[near]
        s = pair_cosines(vectors, i, j)
        hit = s >= threshold
        i, j, s = i[hit], j[hit], s[hit]
    return i, j, s.astype(np.float32), index.info


def join_precision(precision: str = "auto") -> str:
    """The IVF join's GEMM number format: ``bf16`` where the CPU multiplies bfloat16 natively,
    with AMX tiles (Intel Sapphire Rapids and later) or AVX-512 BF16 dot products (AMD Zen 4
    and later), else ``fp32`` (emulated bf16 is no faster than float32). Measured on a
    2-core AMD EPYC (Zen 4, no AMX), 200k static pair vectors, one process each, interleaved:
    fp32 3.58 / 3.71 / 3.95 s, bf16 2.86 / 3.25 / 3.28 s, the same 10,592 edges; at 20k rows
    a wash (0.27-0.37 s either way: oneDNN's first bf16 kernels cost ~0.05 s to build).
    ``precision``, or else the ``PREFCURATE_JOIN_PRECISION`` environment variable, forces one
    (``fp32`` / ``bf16``); both find the same edges."""
    if precision == "auto":
        precision = os.environ.get("PREFCURATE_JOIN_PRECISION", "").strip().lower() or "auto"
    if precision not in ("auto", "fp32", "bf16"):
        raise InputError(f"join precision must be auto, fp32 or bf16, not {precision!r} (PREFCURATE_JOIN_PRECISION)")
    if precision != "auto":
        return precision
    return "bf16" if {"amx_bf16", "avx512_bf16"} & (_cpu_flags() or set()) else "fp32"


def pair_sq_distances(points: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``|points[i] - points[j]|^2`` row by row, in bounded chunks."""
    out = np.empty(len(i), np.float32)
    for start, stop in _chunks(len(i), _PAIR_CHUNK):
        diff = points[i[start:stop]] - points[j[start:stop]]
        out[start:stop] = np.einsum("ij,ij->i", diff, diff)
    return out


def pair_cosines(vectors: np.ndarray, i: np.ndarray, j: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``scale^2 vectors[i] . vectors[j]`` row by row (in float32), gathering a bounded
    number of rows at a time. torch's gathers and float16 casts are vectorized where numpy's
    are not (97k pairs of 768-d float16 rows: 0.36 -> 0.15 s); the result does not depend
    on the order or chunking of the pairs."""
    import torch

    out = torch.empty(len(i), dtype=torch.float32)
    table = _as_tensor(vectors)
    i_t, j_t = torch.from_numpy(np.asarray(i, np.int64)), torch.from_numpy(np.asarray(j, np.int64))
    for start, stop in _chunks(len(i), _PAIR_CHUNK):
        a = table.index_select(0, i_t[start:stop]).float()
        b = table.index_select(0, j_t[start:stop]).float()
        out[start:stop] = torch.linalg.vecdot(a, b, dim=1)  # 3x einsum's speed at 768-d
    if scale != 1.0:
        out *= scale * scale
    return out.numpy()


def _f32(vectors: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``scale x vectors`` as a C-contiguous float32 array (no copy when already that and scale is 1)."""
    if scale == 1.0:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    return np.multiply(vectors, np.float32(scale), dtype=np.float32)


def nearest(
    base: np.ndarray, queries: np.ndarray, device: str = "auto", kind: str = "auto", k: int = 4, threshold: float = 0.0
) -> tuple[np.ndarray, np.ndarray, IndexInfo]:
    """For each query, its most similar base row at or above ``threshold``: (exact cosine,
    base id), or (-inf, -1) when there is none."""
    base = np.ascontiguousarray(base, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    index = NeighborIndex(base, device, kind)
    best_s = np.full(len(queries), -np.inf, np.float32)
    best_i = np.full(len(queries), -1, np.int64)
    for start, stop in _chunks(len(queries), _RESCORE_CHUNK):
        _, ids = index.candidates(queries[start:stop], 1 if index.exact else k, threshold)
        sims = _exact_scores(queries[start:stop], base, ids)
        pick = np.argmax(sims, axis=1)
        rows = np.arange(len(pick))
        best_s[start:stop] = sims[rows, pick]
        best_i[start:stop] = np.where(np.isfinite(sims[rows, pick]), ids[rows, pick], -1)
    return best_s, best_i, index.info


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label per node of the undirected graph with edges (i, j): the smallest node
    of its component.

    Vectorized union-find (hook every root onto the smaller root across an edge, then jump
    pointers to the roots; repeat until no edge joins two trees): a few passes over the edges,
    each pass at least halving the trees of every component that is not yet whole. numpy
    only, so no scipy import (0.1 s) on the path of every dedupe."""
    parent = np.arange(n)
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    while len(i):
        ri, rj = parent[i], parent[j]
        apart = ri != rj
        if not apart.any():
            break
        ri, rj, i, j = ri[apart], rj[apart], i[apart], j[apart]
        np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))
        while True:  # pointer jumping: every node to its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent
