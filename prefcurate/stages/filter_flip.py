"""Flipping pairs in place: swap chosen/rejected and everything that refers to them.

Used by ``filter --flip``. Kept apart from the rules so the column bookkeeping (which
columns swap, which change sign, which are recomputed) is in one place.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def flip_rows(table: pa.Table, flip: np.ndarray) -> pa.Table:
    """Swap chosen/rejected (and ratings, rewards, judge preference) where ``flip``; negate margins.

    Aggregates are recomputed from the per-member ``margin__*`` columns so ``margin_worst``
    and ``margin_agree`` stay exact; ``flipped`` records the swap (xor an earlier one).
    """
    mask = pa.array(np.asarray(flip, dtype=bool))
    previous = (
        table.column("flipped") if "flipped" in table.column_names else pa.array(np.zeros(table.num_rows, dtype=bool))
    )
    flipped = pc.xor(pc.fill_null(previous, False), mask)
    if not flip.any():
        return set_column(table, "flipped", flipped)
    names = table.column_names
    swaps = [
        ("chosen", "rejected"),
        ("chosen_rating", "rejected_rating"),
        ("judge_chosen_score", "judge_rejected_score"),
    ]
    swaps += [
        (c, "reward_rejected__" + c.removeprefix("reward_chosen__")) for c in names if c.startswith("reward_chosen__")
    ]
    for a, b in swaps:
        if a in names and b in names:
            col_a, col_b = table.column(a), table.column(b)
            table = set_column(table, a, pc.if_else(mask, col_b, col_a))
            table = set_column(table, b, pc.if_else(mask, col_a, col_b))
    members = [c for c in names if c.startswith("margin__")]
    for c in [*members, "margin_mean"]:
        if c in names:
            col = table.column(c)
            table = set_column(table, c, pc.if_else(mask, pc.negate(col), col))
    if "judge_pref" in names:
        col = table.column("judge_pref")
        table = set_column(table, "judge_pref", pc.if_else(mask, pc.subtract(pa.scalar(1.0, col.type), col), col))
    table = _flip_aggregates(table, mask, members)
    return set_column(table, "flipped", flipped)


def _flip_aggregates(table: pa.Table, mask: pa.Array, members: list[str]) -> pa.Table:
    names = table.column_names
    if members:
        m = np.column_stack([as_float(table.column(c)) for c in members])
        known = np.isfinite(m).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            agree = np.where(known > 0, (m > 0).sum(axis=1) / np.maximum(known, 1), np.nan)
        worst = np.where(known > 0, np.nanmin(np.where(np.isfinite(m), m, np.inf), axis=1), np.nan)
    else:
        # No per-member columns: agreement mirrors; the worst member is unknown.
        agree = 1.0 - as_float(table.column("margin_agree")) if "margin_agree" in names else None
        worst = np.full(table.num_rows, np.nan)
    for name, values in (("margin_agree", agree), ("margin_worst", worst)):
        if name in names and values is not None:
            new = pa.array(values, pa.float64(), from_pandas=True)
            old = table.column(name).cast(pa.float64())
            table = set_column(table, name, pc.if_else(mask, new, old))
    return table


def adaptive_margin(table: pa.Table, scale: float) -> pa.Array:
    """``scale * max(0, margin_mean)``, null where margin_mean is null."""
    strength = as_float(table.column("margin_mean"))
    return pa.array(scale * np.maximum(strength, 0.0), pa.float64(), from_pandas=True)


def set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def as_float(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric or boolean column as float64 with NaN for null."""
    if pa.types.is_boolean(col.type):
        col = col.cast(pa.float64())
    return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
