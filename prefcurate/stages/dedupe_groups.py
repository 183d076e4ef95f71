"""Keep-or-reject decisions for dedupe, as array operations over row indices.

Every decision is a sort: rows are ordered by (group, keep priority descending, row index)
and the first row(s) of each group are kept. The row index breaks ties, so ``--keep first``
keeps the earliest row and every other policy is deterministic. ``--keep random`` draws its
priority from a hash of (seed, row id), not from the row position, so the same rows are kept
whatever order they arrive in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

KEEP, EXACT, SWAPPED, CONFLICT, NEAR, CONTAM = range(6)
REASONS = {
    EXACT: "exact-duplicate",
    SWAPPED: "swapped-duplicate",
    CONFLICT: "conflicting-duplicate",
    NEAR: "near-duplicate",
    CONTAM: "contaminated",
}


@dataclass
class Decisions:
    """Per input row: reason code (KEEP = kept), the row it duplicates, the cosine to it, and
    for contaminated rows the index of the evaluation prompt it matches."""

    reason: np.ndarray
    dup_of: np.ndarray
    similarity: np.ndarray
    eval_match: np.ndarray

    @classmethod
    def empty(cls, n: int) -> Decisions:
        return cls(
            np.zeros(n, np.int8), np.full(n, -1, np.int64), np.full(n, np.nan, np.float32), np.full(n, -1, np.int64)
        )

    def counts(self) -> dict[str, int]:
        codes = np.bincount(self.reason, minlength=len(REASONS) + 1)
        return {name: int(codes[code]) for code, name in REASONS.items()}


def priorities(policy: str, n: int, lengths=None, margins=None, ids=None, seed: int = 0) -> np.ndarray:
    """Higher is kept first; equal priorities fall back to the earlier row."""
    if policy == "first":
        return np.zeros(n)
    if policy == "longest":
        return np.asarray(lengths, np.float64)
    if policy == "highest-margin":
        values = np.asarray(margins, np.float64)
        return np.where(np.isnan(values), -np.inf, values)
    if policy == "random":
        salt = str(seed).encode()
        return np.array(
            [int.from_bytes(hashlib.blake2b(salt + str(i).encode(), digest_size=6).digest(), "big") for i in ids],
            np.float64,
        )
    raise ValueError(f"unknown keep policy {policy!r}")


def ranked(labels: np.ndarray, prio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each row inside its group, index of each row's group leader)."""
    n = len(labels)
    order = np.lexsort((np.arange(n), -prio, labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]) if n else np.zeros(0, np.int64)
    start_of = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - start_of
    leader = np.empty(n, np.int64)
    leader[order] = order[start_of]
    return rank, leader


def exact_decisions(
    groups: np.ndarray,
    orientation: np.ndarray,
    tie: np.ndarray,
    prio: np.ndarray,
    *,
    exact: bool = True,
    swapped: bool = True,
    drop_conflicts: bool = False,
) -> tuple[Decisions, np.ndarray]:
    """Decide exact / swapped / conflicting duplicates; returns decisions and the group label per row.

    Within a group the leader is kept. Another row is a swapped duplicate when both rows are
    strict preferences in opposite orders, a conflicting duplicate when their tie flags
    differ, else an exact duplicate (a tie is symmetric, so a swapped tie is exact).
    """
    n = len(groups)
    decisions = Decisions.empty(n)
    if n == 0:
        return decisions, np.zeros(0, np.int64)
    _, labels = np.unique(groups, return_inverse=True)
    labels = labels.ravel()
    _, leader = ranked(labels, prio)
    follower = leader != np.arange(n)
    tie = np.asarray(tie, bool)
    flipped = orientation != orientation[leader]
    conflict = follower & (tie != tie[leader])
    swap = follower & ~conflict & ~tie & flipped
    same = follower & ~conflict & ~swap
    reason = np.where(conflict, CONFLICT, np.where(swap, SWAPPED, np.where(same, EXACT, KEEP))).astype(np.int8)
    enabled = np.where(flipped & ~tie & ~tie[leader], swapped, exact)
    reason[~enabled] = KEEP
    decisions.reason = reason
    decisions.dup_of = np.where(reason != KEEP, leader, -1)
    if drop_conflicts:
        _drop_conflicting_leaders(decisions, labels, leader)
    return decisions, labels


def _drop_conflicting_leaders(decisions: Decisions, labels: np.ndarray, leader: np.ndarray) -> None:
    """A label conflict trusts neither side: remove the leader of a conflicting group too,
    with the reason of (and pointing at) the group's first conflicting row."""
    rows = np.flatnonzero((decisions.reason == SWAPPED) | (decisions.reason == CONFLICT))
    _, first = np.unique(labels[rows], return_index=True)
    firsts = rows[first]
    leaders = leader[firsts]
    decisions.reason[leaders] = decisions.reason[firsts]
    decisions.dup_of[leaders] = firsts


def cluster_decisions(labels: np.ndarray, prio: np.ndarray, per_cluster: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Within clusters (component labels): keep the best ``per_cluster`` rows; returns
    (keep mask, the cluster's best row for each row)."""
    rank, leader = ranked(labels, prio)
    return rank < per_cluster, leader


def size_histogram(labels: np.ndarray) -> dict[str, int]:
    """{cluster size: number of clusters}, singletons included (JSON keys are strings)."""
    if len(labels) == 0:
        return {}
    sizes = np.bincount(labels)
    values, counts = np.unique(sizes[sizes > 0], return_counts=True)  # sorted; no Python int per cluster
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}
