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
- **ivf on CPU: an IVF join** (``_ivf_join``). Cells come from FAISS k-means on a 64-d
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

import numpy as np

from prefcurate.errors import InputError, MissingDependency
from prefcurate.stages.base import ProgressTask

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
_JOIN_BLOCK = 1 << 20  # at most this many distances per GEMM block in the IVF join
_JOIN_ROWS = 1024  # rows per block (bf16 on AMX: 1024 x 64k members ran fastest, 2048 slower)
_BF16_PAD = 64  # a cell's members padded to a multiple of this in bf16 (one kernel per shape)
_OPERAND_ROWS = 1 << 16  # member rows turned into right operands at once (``_cell_operands``)
# In bf16, a row with more than k candidates in a cell keeps this many times k by the filter's
# value, then the k nearest of those by exact cosine (bf16 cannot order close neighbours, and
# exact cosines for every candidate of a giant cell cost 5x more: 6,000 identical rows 19 s,
# 3.6 s with the cut, 1.9 s in float32, which ranks by its own filter values)
_BF16_RANK = 4
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

    def describe(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self.nlist else ""
        if self.join:
            cells = f"FAISS k-means cells, {self.dim}-d {self.gemm} filter"
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, IndexInfo]:
    """All-vs-all: edges (i, j, cosine) with i < j and cosine >= ``threshold``, each edge once.

    ``vectors`` (float32 or float16) times ``scale`` are the unit vectors compared: dedupe
    hands its float16 matrix of unit parts and 1/sqrt(#parts), and the CPU join turns it
    into float32 a block at a time (no float32 copy of the whole matrix).

    Approximate indexes give candidates only; each distinct candidate pair is re-scored once
    with the full vectors (a pair is usually found from both of its ends)."""
    where = resolve_index_device(device)
    if choose_kind(len(vectors), where, kind) == "ivf" and where == "cpu" and vectors.shape[1] > REDUCED_DIM:
        return _ivf_join(vectors, threshold, k, progress, scale=scale, precision=precision)
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


def _ivf_join(
    vectors: np.ndarray,
    threshold: float,
    k: int,
    progress: ProgressTask | None,
    nprobe: int = IVF_NPROBE,
    scale: float = 1.0,
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, IndexInfo]:
    """All-vs-all near pairs on CPU as an IVF *join*: the same cells and probes as a FAISS IVF
    search, but each cell is compared with every row that probes it in one matrix product,
    instead of one query at a time.

    1. Centered PCA to ``FILTER_DIM`` components; k-means (FAISS) on the top ``REDUCED_DIM``
       gives ``nlist`` cells; each row lives in its nearest cell and probes its ``nprobe``
       nearest.
    2. Per cell, one product gives ``-|q - m|^2 / 2`` on the ``FILTER_DIM`` components for
       every (row probing it, member) pair (``_join_operands``: no pass over the block to
       turn dot products into distances). A pair is a candidate when that is within the bound
       of the threshold (lossless: a projection never lengthens a difference), keeping each
       row's ``k`` nearest per cell, so one giant cluster cannot flood memory.
    3. Each distinct candidate pair is re-scored once with the full vectors.

    The product runs in torch, whose CPU GEMM and row gathers (``index_select``) beat numpy's
    here; where the CPU has native bf16 (``join_precision``) it runs in bfloat16 with float32
    accumulation. bf16 keeps 8 significant bits, so each pair's bound is widened by the
    worst-case rounding error, which rides in the product itself (``_join_operands``): still
    lossless, at the price of more candidates for the exact re-score. oneDNN builds a kernel
    per matrix shape, so in bf16 every block has ``_JOIN_ROWS`` rows and a cell's members are
    padded to a multiple of ``_BF16_PAD`` (padding scores -1e4: never a candidate); with a
    shape per cell, building kernels took longer than the arithmetic.

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
    51.1 s vs 50.0 s).
    """
    import torch

    faiss = _faiss()
    n, dim = vectors.shape
    nlist = _nlist(n)
    nprobe = min(nprobe, nlist)
    bf16 = join_precision(precision) == "bf16"
    info = IndexInfo("ivf", "cpu", n, min(dim, FILTER_DIM), nlist, nprobe, join=True, gemm="bf16" if bf16 else "fp32")
    proj, offset = pca(_f32(_sample(vectors, _PCA_SAMPLE), scale), FILTER_DIM)
    floor = -0.5 * _bound(threshold)  # a candidate has -|q - m|^2/2 >= floor
    ops, coarse = _join_operands(vectors, proj, offset, scale, bf16)
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
            if bf16 and len(idx) < block:  # the fixed shape: repeat the last row, ignore its results
                idx = torch.cat([idx, idx[-1:].expand(block - len(idx))])
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


def _join_operands(vectors: np.ndarray, proj: np.ndarray, offset: np.ndarray, scale: float, bf16: bool) -> tuple:
    """The join's row operands as a torch (n, FILTER_DIM + 8) tensor (bf16 or float32), and the
    top ``REDUCED_DIM`` components for the cells (numpy float32). ``p = (x - mean) P`` is
    computed a chunk at a time in float32 (``x`` being ``scale`` times a row of ``vectors``);
    with ``h = |p|^2 / 2 - (|x|^2 - 1) / 2`` a row is::

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

    n, width = len(vectors), proj.shape[1]
    ops = torch.empty((n, width + 8), dtype=torch.bfloat16 if bf16 else torch.float32)
    ops[:, width + 3 :] = 0
    coarse = np.empty((n, REDUCED_DIM), np.float32)
    proj_t, offset_t = torch.from_numpy(proj * np.float32(scale)), torch.from_numpy(offset)
    chunk = torch.empty((min(n, _SEARCH_CHUNK), width), dtype=torch.float32)
    for start, stop in _chunks(n, _SEARCH_CHUNK):
        p = chunk[: stop - start]
        x = _as_tensor(vectors[start:stop]).float()
        torch.matmul(x, proj_t, out=p)  # (scale x) P = x (scale P)
        p -= offset_t
        h = 0.5 * torch.linalg.vecdot(p, p, dim=1)
        excess = 0.5 * (scale * scale * torch.linalg.vector_norm(x, dim=1).square() - 1)  # 9x einsum's speed
        coarse[start:stop] = p[:, :REDUCED_DIM].numpy()
        rows = ops[start:stop]
        rows[:, :width] = p
        rows[:, width : width + 2] = 1
        rows[:, width + 2] = excess - h
        rows[:, width + 3] = (excess - h - rows[:, width + 2].float()) if bf16 else 0  # what bf16 dropped
        if bf16:
            rows[:, width + 4] = torch.sqrt(2 * h)
            rows[:, width + 5] = (h - excess).abs()
            rows[:, width + 6] = 1
    return ops, coarse


def _cell_operands(ops, members_t, member_start: np.ndarray, cell: int, floor: float, bf16: bool):
    """The members of cells ``cell, cell + 1, ...`` (up to ``_OPERAND_ROWS`` rows, at least
    one cell) as right sides of the product (see ``_join_operands``), stacked: cell
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
