"""The CPU IVF join with its row operands built ahead (``JoinOperands``), as dedupe builds them
while its encoder runs: a basis fitted on the first rows, ranges of rows filled one at a time."""

from __future__ import annotations

import numpy as np
import pytest

from prefcurate.backends.index import similar_pairs
from prefcurate.backends.ivf_join import JoinOperands, fit_projection, ivf_join
from tests.test_index import _planted, _unit


def _at_cosine(base: np.ndarray, cos: np.ndarray, rng) -> np.ndarray:
    """For each row of ``base``, a unit vector at exactly cosine ``cos`` from it."""
    noise = rng.normal(size=base.shape)
    noise -= (noise * base).sum(1, keepdims=True) * base  # orthogonal to base
    noise = _unit(noise)
    return _unit(cos[:, None] * base + np.sqrt(1 - cos[:, None] ** 2) * noise)


def _ahead(vectors: np.ndarray, bf16: bool, fit_rows: int = 1000, ranges=(0, 700, 2048, 3000)) -> JoinOperands:
    """Operands as dedupe fills them: the basis from the first ``fit_rows`` rows, then range by range."""
    ops = JoinOperands(len(vectors), min(vectors.shape[1], 256), bf16)
    ops.projection = fit_projection(vectors[:fit_rows], 1.0, hold_out=fit_rows // 4)
    bounds = [*(b for b in ranges if b < len(vectors)), len(vectors)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        for _ in ops.fill_steps(vectors[lo:hi], lo, chunk=512):
            pass
    return ops


def _edges(result) -> set[tuple[int, int]]:
    return set(zip(result[0].tolist(), result[1].tolist(), strict=True))


def test_operands_built_ahead_find_the_planted_pairs_of_a_fresh_join():
    vecs, truth = _planted(6_000, 300, dim=384)
    vecs = vecs.astype(np.float16)
    for precision in ("bf16", "fp32"):
        fresh = ivf_join(vecs, 0.9, 8, None, precision=precision)
        ahead = ivf_join(vecs, 0.9, 8, None, precision=precision, operands=_ahead(vecs, precision == "bf16"))
        assert ahead[3].ahead and not fresh[3].ahead
        assert "operands built ahead" in ahead[3].describe()
        assert len(_edges(ahead) & truth) / len(truth) >= 0.97
        assert _edges(ahead) <= truth and (ahead[2] >= 0.9).all()  # nothing below the threshold


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_ivf_join_filter_is_lossless_at_the_threshold(precision, ahead):
    """Pairs planted within 1.5e-4 above and below the threshold: the join must keep every pair
    at or above it and none below, in both GEMM formats. This fails when the filter takes the
    float16 unit vectors for exactly unit, and in bf16 (8 significant bits, rounding larger
    than these margins) when its bound is not widened by the rounding error. With operands
    built ahead from a basis fitted on the first 500 rows only, too: any orthonormal basis
    keeps the bound a lower bound on the distance."""
    rng = np.random.default_rng(7)
    # rows on a few axes each: their dot products are sums of a few large terms, whose bf16
    # rounding errors do not average out as they do over 128 small ones
    base = rng.normal(size=(6_000, 128)) * (rng.random((6_000, 128)) < 0.03)
    base = _unit(base + 1e-3 * rng.normal(size=base.shape))
    src = rng.choice(len(base), 2_000, replace=False)
    copies = _at_cosine(base[src], 0.9 + rng.uniform(-1.5e-4, 1.5e-4, len(src)), rng)
    vecs = np.concatenate([base, copies]).astype(np.float16)
    wide = vecs.astype(np.float64)
    cos = (wide[src] * wide[len(base) :]).sum(1)  # the cosines of the float16 vectors compared
    clear = np.abs(cos - 0.9) > 1e-5  # not within float32 noise of the threshold
    # every row probes every cell, so the filter is the only thing that can lose a pair
    ops = _ahead(vecs, precision == "bf16", fit_rows=500) if ahead else None
    i, j, s, info = ivf_join(vecs, 0.9, 8, None, nprobe=len(vecs), precision=precision, operands=ops)
    assert info.join and info.gemm == precision and info.nprobe == info.nlist and info.ahead == ahead
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    planted = [(int(a), len(base) + t) for t, a in enumerate(src)]
    above = {p for p, c, ok in zip(planted, cos, clear, strict=True) if ok and c > 0.9}
    below = {p for p, c, ok in zip(planted, cos, clear, strict=True) if ok and c < 0.9}
    assert len(above) > 600 and len(below) > 600
    assert above <= found and not below & found
    assert (s >= 0.9).all()


def test_a_basis_fitted_on_unlike_first_rows_is_refitted():
    """The first rows live in one half of the 512 dimensions and the rest in the other
    (another source appended): the 256-d early basis misses the rest's variance, so the
    join fits a fresh one, and still finds the pairs."""
    rng = np.random.default_rng(4)
    first = np.zeros((5_000, 512))
    first[:, :256] = rng.normal(size=(5_000, 256))
    rest = np.zeros((5_000, 512))
    rest[:, 256:] = rng.normal(size=(5_000, 256))
    base = _unit(np.concatenate([first, rest]))
    src = rng.choice(np.arange(5_000, 10_000), 200, replace=False)
    copies = _unit(base[src] + 0.1 * _unit(rng.normal(size=(200, 512))))
    vecs = np.concatenate([base, copies]).astype(np.float16)
    truth = {(int(s), 10_000 + k) for k, s in enumerate(src)}
    ops = _ahead(vecs, bf16=False, fit_rows=4096, ranges=(0,))
    assert not ops.fits(vecs, 1.0, bf16=False)
    assert _ahead(vecs[5_000:], bf16=False, fit_rows=4096, ranges=(0,)).fits(vecs[5_000:], 1.0, bf16=False)
    result = ivf_join(vecs, 0.9, 8, None, precision="fp32", operands=ops)
    assert not result[3].ahead
    assert len(_edges(result) & truth) / len(truth) >= 0.97


def test_operands_of_other_rows_or_format_are_not_used():
    vecs, _ = _planted(6_000, 100, dim=384)
    ops = _ahead(vecs, bf16=True)
    assert ops.fits(vecs, 1.0, bf16=True)
    assert not ops.fits(vecs, 1.0, bf16=False)  # the join's number format changed
    assert not ops.fits(vecs[:-1], 1.0, bf16=True)  # rows removed without ``take``
    assert not ops.fits(vecs, 0.5, bf16=True)  # another scale
    kept = np.ones(len(vecs), bool)
    kept[::7] = False
    taken = ops.take(kept)
    assert taken.fits(vecs[kept], 1.0, bf16=True)
    assert np.array_equal(taken.table.float().numpy(), ops.table.float().numpy()[kept])
    assert similar_pairs(vecs[kept], 0.9, 8, "cpu", "ivf", operands=taken)[3].ahead
