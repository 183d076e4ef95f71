"""Nearest-neighbour search over embeddings with FAISS: GPU when there is one, exact or
approximate by size.

Inner product on L2-normalized vectors is cosine similarity. Near-duplicate edges come from
a k-nearest-neighbour search of every vector against all the others, keeping neighbours at
or above a threshold. k-NN rather than a range search because FAISS's GPU indexes and HNSW
have no range search; connectivity does not suffer: a cluster bigger than k still becomes one
connected component because every member links to k others inside it (a random k-regular
graph is connected with overwhelming probability), and a row similar to only one member
finds that member from its own search.

Index choice (``kind="auto"``):

- CPU: exact ``IndexFlatIP`` below ``CPU_EXACT_MAX_ROWS``, else ``IndexIVFFlat`` with
  ~4·sqrt(n) lists probed ``IVF_NPROBE`` at a time. IVF beat HNSW here: building an HNSW
  graph over 200k vectors costs more than the whole IVF search, and near duplicates (cosine
  >= 0.9) land in the same or a neighbouring cell, so IVF's recall on them is ~1.0
  (measured by benchmarks/bench_dedupe.py --index-sweep).
- GPU (faiss-gpu): exact flat search up to ``GPU_EXACT_MAX_ROWS`` (brute force is what a GPU
  does best), IVF past that.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from prefcurate.errors import InputError, MissingDependency
from prefcurate.stages.base import ProgressTask

# Measured on this 2-core CPU (loaded machine), 768-d pair vectors, k=16, all-vs-all:
# flat 20k 1.9 s vs IVF 1.3 s (build included); flat 50k 11.6 s vs IVF 3.6 s; so IVF pays
# from ~15k rows on. Below that, exact search costs under a second and has no recall loss.
CPU_EXACT_MAX_ROWS = 15_000
# A GPU brute-forces 1M x 1M x 768 in well under a minute; IVF only past that.
GPU_EXACT_MAX_ROWS = 1_000_000
IVF_NPROBE = 8
_SEARCH_CHUNK = 8192


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
        return f"FAISS {self.kind} on {self.device} ({self.rows} x {self.dim}{extra})"


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
    """A FAISS inner-product index over ``vectors`` (float32, L2-normalized rows)."""

    def __init__(self, vectors: np.ndarray, device: str = "auto", kind: str = "auto", nprobe: int = IVF_NPROBE) -> None:
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        self.device = resolve_index_device(device)
        kind = choose_kind(n, self.device, kind)
        self.info = IndexInfo(kind, self.device, n, dim)
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 40
            index.hnsw.efSearch = 64
        else:
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))  # FAISS wants >= 39 points per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.nprobe = min(nprobe, nlist)
            self.info.nlist, self.info.nprobe = nlist, index.nprobe
        if self.device == "cuda":
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        if kind == "ivf":
            sample = vectors[np.random.default_rng(0).permutation(n)[: min(n, 256 * self.info.nlist)]]
            index.train(sample)
        if n:
            index.add(vectors)
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids) of the ``k`` nearest rows for each query; missing neighbours are id -1."""
        k = max(1, min(k, self.info.rows))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.info.rows == 0 or len(queries) == 0:
            return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
        return self.index.search(queries, k)


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, _SEARCH_CHUNK):
        yield start, min(n, start + _SEARCH_CHUNK)


def similar_pairs(
    vectors: np.ndarray,
    threshold: float,
    k: int = 16,
    device: str = "auto",
    kind: str = "auto",
    progress: ProgressTask | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, IndexInfo]:
    """All-vs-all: edges (i, j, cosine) with i < j and cosine >= ``threshold``, each edge once."""
    index = NeighborIndex(vectors, device, kind)
    rows_i, rows_j, sims = [], [], []
    for start, stop in _chunks(len(vectors)):
        d, ids = index.search(vectors[start:stop], k + 1)  # +1: a vector finds itself
        src = np.repeat(np.arange(start, stop), ids.shape[1]).reshape(ids.shape)
        hit = (d >= threshold) & (ids >= 0) & (ids != src)
        a, b = src[hit], ids[hit]
        rows_i.append(np.minimum(a, b))
        rows_j.append(np.maximum(a, b))
        sims.append(d[hit])
        if progress is not None:
            progress.advance(stop - start)
    if not rows_i:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32), index.info
    i, j, s = np.concatenate(rows_i), np.concatenate(rows_j), np.concatenate(sims)
    # An edge found from both ends appears twice; keep one (np.unique on the packed pair).
    packed = i.astype(np.int64) * max(1, len(vectors)) + j
    _, first = np.unique(packed, return_index=True)
    return i[first], j[first], s[first], index.info


def nearest(
    base: np.ndarray, queries: np.ndarray, device: str = "auto", kind: str = "auto"
) -> tuple[np.ndarray, np.ndarray, IndexInfo]:
    """For each query, its most similar base row: (cosine, base id or -1)."""
    index = NeighborIndex(base, device, kind)
    best_s = np.full(len(queries), -np.inf, np.float32)
    best_i = np.full(len(queries), -1, np.int64)
    for start, stop in _chunks(len(queries)):
        d, ids = index.search(queries[start:stop], 1)
        best_s[start:stop], best_i[start:stop] = d[:, 0], ids[:, 0]
    return best_s, best_i, index.info


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label per node of the undirected graph with edges (i, j): union-find's
    answer, computed by scipy in linear time."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as _cc

    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = _cc(graph, directed=False)
    return labels
