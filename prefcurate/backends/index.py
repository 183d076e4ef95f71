"""Nearest-neighbour search over embeddings with FAISS: GPU when there is one, exact or
approximate by size.

Inner product on L2-normalized vectors is cosine similarity. Near-duplicate edges come from
a k-nearest-neighbour search of every vector against all the others, keeping neighbours at
or above a threshold. k-NN rather than a range search because FAISS's GPU indexes and HNSW
have no range search; connectivity does not suffer: a cluster bigger than k still becomes one
connected component because every member links to k others inside it, and a row similar to
only one member finds that member from its own search.

Approximate search = candidates, then an exact check. An IVF index scanning 768-d float
vectors was *slower* than exact BLAS search here (FAISS scans inverted lists one vector at a
time, BLAS multiplies blocks), so the approximate path projects the vectors to
``REDUCED_DIM`` dimensions (centered PCA), searches an IVF (or HNSW) L2 index there, keeps
neighbours within the distance that cosine >= threshold allows (a projection never
lengthens a difference, so this bound loses no true pair), and re-scores them with the full
vectors. Measured on 50k real pair vectors: 99.7% of the exact edges found; the misses come
from IVF cells and k, and are extra edges inside clusters connected anyway. Two easier
designs lost more: thresholding projected cosines (centered: 96%, uncentered: 99.8% but 100x
the candidates and lopsided IVF lists, since the raw vectors share one dominant direction).
The ``similarity`` reported for an edge is always the exact cosine of the full vectors.

Index choice (``kind="auto"``): exact ``IndexFlatIP`` up to ``CPU_EXACT_MAX_ROWS`` rows on
CPU (``GPU_EXACT_MAX_ROWS`` on a GPU, where brute force is what the device does best),
PCA + IVF past that.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from prefcurate.errors import InputError, MissingDependency
from prefcurate.stages.base import ProgressTask

# Crossover measured on this 2-core CPU (shared, loaded machine) with 768-d static pair
# vectors, k=16, all-vs-all, build included (benchmarks/bench_dedupe.py --index-sweep):
# 5k rows flat 0.17 s vs PCA+IVF 0.39 s; 10k 0.64 s vs 0.48 s; 20k 3.2 s vs 1.4 s;
# 50k 37 s vs 4.1 s. Exact search stops paying at ~10k rows.
CPU_EXACT_MAX_ROWS = 10_000
# A GPU brute-forces 1M x 1M x 768 in about a minute; IVF only past that.
GPU_EXACT_MAX_ROWS = 1_000_000
REDUCED_DIM = 64
IVF_NPROBE = 8
_PCA_SAMPLE = 8192
_SEARCH_CHUNK = 8192
_RESCORE_CHUNK = 2048  # queries per exact re-score: 2048 x k x 768 floats gathered (~100 MB)


@dataclass
class IndexInfo:
    kind: str
    device: str
    rows: int
    dim: int
    nlist: int | None = None
    nprobe: int | None = None

    def describe(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self.nlist else ""
        return f"FAISS {self.kind} on {self.device} ({self.rows} rows, {self.dim}-d{extra})"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependency("faiss-cpu", purpose="near-duplicate search") from None
    return faiss


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
        if not self.exact and dim > REDUCED_DIM and n > REDUCED_DIM:
            self._fit_projection(_sample(vectors, _PCA_SAMPLE))
        base = self._reduce(vectors) if not self.exact else np.ascontiguousarray(vectors, dtype=np.float32)
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
        """Centered PCA by an eigendecomposition of the sample covariance (dim x dim: cheap)."""
        sample = sample.astype(np.float64)
        mean = sample.mean(axis=0)
        centered = sample - mean
        _, vecs = np.linalg.eigh(centered.T @ centered)
        self._proj = np.ascontiguousarray(vecs[:, ::-1][:, :REDUCED_DIM], dtype=np.float32)
        self._offset = (mean @ self._proj).astype(np.float32)

    def _reduce(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if self._proj is None:
            return np.ascontiguousarray(vectors)
        return np.ascontiguousarray(vectors @ self._proj - self._offset)  # (x - mean) P without a copy of x

    def _make(self, faiss, kind: str, dim: int, n: int, nprobe: int):
        self.info.dim = dim
        if kind == "flat":
            return faiss.IndexFlatIP(dim)
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, 16, faiss.METRIC_L2)
            index.hnsw.efConstruction, index.hnsw.efSearch = 40, 64
            return index
        nlist = max(1, min(int(2 * math.sqrt(n)), n // 39 or 1))  # FAISS wants >= 39 training points per list
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
        d, ids = self.index.search(self._reduce(queries), k)
        ok = d >= threshold if self.exact else d <= 2 * (1 - threshold) + 1e-4
        return d, np.where(ok, ids, -1)


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, IndexInfo]:
    """All-vs-all: edges (i, j, cosine) with i < j and cosine >= ``threshold``, each edge once."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = NeighborIndex(vectors, device, kind)
    chunk = _SEARCH_CHUNK if index.exact else _RESCORE_CHUNK
    rows_i, rows_j, sims = [], [], []
    for start, stop in _chunks(len(vectors), chunk):
        d, ids = index.candidates(vectors[start:stop], k + 1, threshold)  # +1: a vector finds itself
        src = np.arange(start, stop)[:, None]
        ids = np.where(ids == src, -1, ids)
        scores = d if index.exact else _exact_scores(vectors[start:stop], vectors, ids)
        hit = (ids >= 0) & (scores >= threshold)
        a, b = np.broadcast_to(src, ids.shape)[hit], ids[hit]
        rows_i.append(np.minimum(a, b))
        rows_j.append(np.maximum(a, b))
        sims.append(scores[hit])
        if progress is not None:
            progress.advance(stop - start)
    i = np.concatenate(rows_i) if rows_i else np.zeros(0, np.int64)
    j = np.concatenate(rows_j) if rows_j else np.zeros(0, np.int64)
    s = np.concatenate(sims) if sims else np.zeros(0, np.float32)
    # An edge found from both ends appears twice; keep one (np.unique on the packed pair).
    _, first = np.unique(i.astype(np.int64) * max(1, len(vectors)) + j, return_index=True)
    return i[first], j[first], s[first], index.info


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
    """Component label per node of the undirected graph with edges (i, j): union-find's
    answer, computed by scipy in linear time."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as _cc

    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = _cc(graph, directed=False)
    return labels
