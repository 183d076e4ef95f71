"""FAISS backend: similar pairs above a threshold, index choice by size, approximate recall,
connected components (transitive clusters), and device selection."""

from __future__ import annotations

import numpy as np
import pytest

from prefcurate.backends.index import (
    CPU_EXACT_MAX_ROWS,
    NeighborIndex,
    choose_kind,
    connected_components,
    gpu_available,
    nearest,
    resolve_index_device,
    similar_pairs,
)
from prefcurate.backends.ivf_join import ivf_join as _ivf_join
from prefcurate.errors import InputError, MissingDependency


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _planted(n: int, dups: int, dim: int = 128, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Random unit vectors (near-orthogonal) plus ``dups`` noisy copies (cosine ~0.98) of earlier rows."""
    rng = np.random.default_rng(seed)
    base = _unit(rng.normal(size=(n, dim)))
    src = rng.choice(n, dups, replace=False)
    copies = _unit(base[src] + 0.1 * _unit(rng.normal(size=(dups, dim))))
    vecs = np.concatenate([base, copies])
    return vecs, {(int(s), n + k) for k, s in enumerate(src)}


def test_flat_finds_exactly_the_planted_pairs():
    vecs, truth = _planted(500, 40)
    i, j, s, info = similar_pairs(vecs, 0.9, k=8, device="cpu", kind="flat")
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == truth
    assert (s >= 0.9).all() and (i < j).all() and info.kind == "flat" and info.device == "cpu"


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_recall_planted_pairs(kind):
    vecs, truth = _planted(2000, 150)
    i, j, _, info = similar_pairs(vecs, 0.9, k=8, device="cpu", kind=kind)
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    assert info.kind == kind
    assert len(found & truth) / len(truth) >= 0.95
    assert found <= truth  # nothing below the threshold sneaks in


def test_auto_index_is_exact_when_small_and_ivf_when_large():
    assert choose_kind(CPU_EXACT_MAX_ROWS, "cpu") == "flat"
    assert choose_kind(CPU_EXACT_MAX_ROWS + 1, "cpu") == "ivf"
    assert choose_kind(10, "cpu", "hnsw") == "hnsw"
    vecs, _ = _planted(200, 0)
    assert NeighborIndex(vecs, "cpu").info.kind == "flat"


def test_clusters_are_transitive():
    # A~B and B~C above 0.9, A~C below: all three must end in one cluster.
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([np.cos(0.4), np.sin(0.4), 0.0])
    c = np.array([np.cos(0.8), np.sin(0.8), 0.0])
    far = np.array([0.0, 0.0, 1.0])
    vecs = _unit(np.stack([a, b, c, far]))
    assert vecs[0] @ vecs[1] > 0.9 and vecs[1] @ vecs[2] > 0.9 and vecs[0] @ vecs[2] < 0.9
    i, j, _, _ = similar_pairs(vecs, 0.9, k=3, device="cpu", kind="flat")
    labels = connected_components(4, i, j)
    assert labels[0] == labels[1] == labels[2] != labels[3]


def test_a_cluster_larger_than_k_stays_one_component():
    rng = np.random.default_rng(1)
    center = _unit(rng.normal(size=32))
    members = _unit(center + 0.05 * rng.normal(size=(60, 32)))
    others = _unit(rng.normal(size=(100, 32)))
    i, j, _, _ = similar_pairs(np.concatenate([members, others]), 0.9, k=4, device="cpu", kind="flat")
    labels = connected_components(160, i, j)
    assert len(set(labels[:60].tolist())) == 1 and len(set(labels[60:].tolist())) == 100


def test_ivf_join_keeps_each_rows_nearest_when_a_cell_holds_more_than_k():
    """40 rows at graded distances from one centre, among 9,000 unrelated ones: each row has
    more than k candidates in its cell, and the join must keep its k *nearest*, i.e. every
    link the exact search (also capped at k per row) finds."""
    rng = np.random.default_rng(3)
    center = _unit(rng.normal(size=128))
    graded = np.linspace(0.05, 0.3, 40)[:, None]
    members = _unit(center + graded * _unit(rng.normal(size=(40, 128))))
    vecs = np.concatenate([_unit(rng.normal(size=(9_000, 128))), members])
    exact = similar_pairs(vecs, 0.9, k=4, device="cpu", kind="flat")
    joined = similar_pairs(vecs, 0.9, k=4, device="cpu", kind="ivf")
    assert joined[3].join  # the IVF join, not a FAISS search
    exact_edges = set(zip(exact[0].tolist(), exact[1].tolist(), strict=True))
    assert exact_edges and exact_edges <= set(zip(joined[0].tolist(), joined[1].tolist(), strict=True))


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_giant_cell_of_identical_rows_is_one_capped_component_in_the_join(precision):
    """5,200 copies of one vector: k-means puts them all in one cell, every pair is a
    candidate, and each row must still keep at most k links per cell while the copies
    stay one cluster, without the edges growing with the square of the rows."""
    rng = np.random.default_rng(5)
    rows = np.tile(_unit(rng.normal(size=(1, 128))), (5_200, 1)).astype(np.float16)
    i, j, s, info = _ivf_join(rows, 0.9, 8, None, precision=precision)
    assert info.join and len(i) <= 8 * len(rows)
    assert len(set(connected_components(len(rows), i, j).tolist())) == 1
    assert (s >= 0.9).all() and (i < j).all()


def test_join_precision_is_bf16_only_with_native_bf16(monkeypatch):
    import prefcurate.backends.index as index

    monkeypatch.setattr(index, "_cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16"})
    assert index.join_precision() == "bf16"
    monkeypatch.setattr(index, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # AMD Zen 4
    assert index.join_precision() == "bf16"
    monkeypatch.setattr(index, "_cpu_flags", lambda: {"avx512f", "avx2", "fma"})
    assert index.join_precision() == "fp32"
    monkeypatch.setattr(index, "_cpu_flags", lambda: None)
    assert index.join_precision() == "fp32" and index.join_precision("bf16") == "bf16"
    monkeypatch.setenv("PREFCURATE_JOIN_PRECISION", "bf16")
    assert index.join_precision() == "bf16" and index.join_precision("fp32") == "fp32"
    monkeypatch.setenv("PREFCURATE_JOIN_PRECISION", "int8")
    with pytest.raises(InputError):
        index.join_precision()


def test_nearest_returns_best_base_row_per_query():
    vecs, truth = _planted(300, 10)
    pairs = sorted(truth)
    base = vecs[[s for s, _ in pairs]]
    sims, idx, _ = nearest(base, vecs[[c for _, c in pairs]], device="cpu")
    assert idx.tolist() == list(range(10)) and (sims > 0.9).all()


def test_empty_input_gives_no_pairs():
    i, j, s, _ = similar_pairs(np.zeros((0, 8), np.float32), 0.9, device="cpu")
    assert len(i) == len(j) == len(s) == 0


def test_cuda_without_gpu_faiss_is_a_missing_dependency():
    if gpu_available():
        pytest.skip("GPU FAISS present")
    assert resolve_index_device("auto") == "cpu"
    with pytest.raises(MissingDependency):
        resolve_index_device("cuda")


@pytest.mark.gpu
def test_gpu_search_matches_cpu():
    if not gpu_available():
        pytest.skip("no GPU FAISS / CUDA device")
    vecs, truth = _planted(5000, 100)
    i, j, _, info = similar_pairs(vecs, 0.9, k=8, device="cuda")
    assert info.device == "cuda"
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == truth


def _components_by_bfs(n: int, edges: list[tuple[int, int]]) -> list[int]:
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        nbrs[a].append(b)
        nbrs[b].append(a)
    label = [-1] * n
    for start in range(n):  # ascending: the first node reached is the component's smallest
        if label[start] >= 0:
            continue
        label[start], todo = start, [start]
        while todo:
            for m in nbrs[todo.pop()]:
                if label[m] < 0:
                    label[m] = start
                    todo.append(m)
    return label


def test_connected_components_match_a_graph_search_on_random_and_adversarial_graphs():
    rng = np.random.default_rng(7)
    n = 3000
    perm = rng.permutation(n)
    chain = [(int(perm[k]), int(perm[k + 1])) for k in range(800)]  # a long path in random order
    star = [(5, int(m)) for m in rng.choice(n, 50, replace=False)]
    random_edges = [tuple(int(x) for x in rng.choice(n, 2, replace=False)) for _ in range(1200)]
    edges = chain + star + random_edges
    order = rng.permutation(len(edges))
    i = np.array([edges[k][0] for k in order])
    j = np.array([edges[k][1] for k in order])
    assert connected_components(n, i, j).tolist() == _components_by_bfs(n, edges)
    assert connected_components(4, np.zeros(0, np.int64), np.zeros(0, np.int64)).tolist() == [0, 1, 2, 3]


def test_openblas_kernels_follow_the_cpu_flags(monkeypatch):
    from prefcurate.backends.index import openblas_coretype

    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    avx512 = {"sse2", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    assert openblas_coretype(avx512) == "SkylakeX"
    assert openblas_coretype({"sse2", "avx2", "fma", "avx512f"}) == "Haswell"  # AVX-512 foundation alone is not enough
    assert openblas_coretype({"sse2", "avx"}) is None
    assert openblas_coretype(None) is None  # not x86-64 Linux: OpenBLAS chooses
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Zen")
    assert openblas_coretype(avx512) is None  # the user's choice stands


def test_faiss_loads_with_the_chosen_openblas_kernels():
    """In a fresh process (faiss loads once): faiss's own OpenBLAS runs the kernels chosen
    from the CPU flags, and the variable is gone afterwards, so no other library sees it."""
    import os
    import subprocess
    import sys

    pytest.importorskip("threadpoolctl")
    code = (
        "import os, threadpoolctl\n"
        "from prefcurate.backends.index import _cpu_flags, _faiss, openblas_coretype\n"
        "want = openblas_coretype(_cpu_flags())\n"
        "_faiss()\n"
        "assert 'OPENBLAS_CORETYPE' not in os.environ\n"
        "blas = [d for d in threadpoolctl.threadpool_info() if d['internal_api'] == 'openblas']\n"
        "faiss_blas = [d for d in blas if 'scipy' not in d['filepath']]\n"
        "print(want, [d.get('architecture') for d in faiss_blas])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    out = run.stdout.split(" ", 1)
    if out[0] == "None":
        pytest.skip("no x86-64 Linux CPU flags here: OpenBLAS picks its own kernels")
    assert out[1].strip() != "[]", "faiss's bundled OpenBLAS not found"
    assert f"'{out[0]}'" in out[1]
