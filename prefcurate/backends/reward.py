"""Reward members: each turns a stage directory into one margin per pair (positive = chosen
preferred), and, where the member scores responses, a reward per response.

Members (``--member SPEC``):

- ``embedding-bt``: a cross-fitted Bradley-Terry model on sentence embeddings, trained on
  the data itself (``reward_bt.py``). Offline, the default. ``embedding-bt:MODEL`` picks the
  embedding model for that member (default ``--embed-model``), so members on different
  embeddings (``embedding-bt:static``, ``embedding-bt:minilm``) can form one ensemble.
- ``hf:NAME_OR_PATH``: a Hugging Face sequence-classification reward model (``reward_hf.py``).
- ``judge``: the judge stage's ``judge_pref`` (P(chosen better)) as ``logit(pref)``.

Combination (``combine_margins``): each member's margins are divided by their root mean
square over the dataset (a standard deviation taken about zero, not the mean: centering
would move pairs across zero and change which response a member prefers), so every
member has unit scale and none dominates by its units; then mean, spread, agreement and
the worst member are taken over the members that scored the row (nulls are skipped).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from prefcurate.errors import ConfigError, InputError
from prefcurate.stages.base import StageContext, StageInput

JUDGE_EPS = 1e-3  # logit(1 - 1e-3) ~ 6.9: a certain verdict stays finite


@dataclass
class MemberScores:
    """A member's output over the whole dataset, by row position."""

    margin: np.ndarray
    reward_chosen: np.ndarray | None = None
    reward_rejected: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


class RewardMember(Protocol):
    spec: str
    name: str

    def columns(self) -> list[str]:
        """Input columns the member reads."""
        ...

    def score(self, source: StageInput, ctx: StageContext) -> MemberScores: ...


@dataclass
class MemberOptions:
    """Score-stage options the members use."""

    folds: int = 5
    seeds: int = 3
    embed_model: str = "auto"
    device: str = "auto"
    max_length: int = 1024
    batch_size: int = 16
    max_train_rows: int = 100_000


def member_name(spec: str) -> str:
    """A column-safe name: ``embedding-bt`` -> ``embedding_bt``, ``hf:org/rm-v2`` -> ``hf_rm_v2``."""
    if spec.startswith("hf:"):
        base = spec[3:].rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        spec = f"hf_{base}"
    return re.sub(r"[^0-9a-z]+", "_", spec.lower()).strip("_")


def parse_member(spec: str, options: MemberOptions) -> RewardMember:
    spec = spec.strip()
    if spec == "embedding-bt" or (spec.startswith("embedding-bt:") and len(spec) > 13):
        return EmbeddingBTMember(spec, member_name(spec), options)
    if spec == "judge":
        return JudgeMember(spec, member_name(spec))
    if spec.startswith("hf:") and len(spec) > 3:
        from prefcurate.backends.reward_hf import HFRewardMember

        return HFRewardMember(spec, member_name(spec), options)
    raise ConfigError(
        f"member {spec!r}: unknown reward member",
        "use embedding-bt[:EMBED_MODEL], judge, or hf:NAME_OR_PATH (a sequence-classification reward model)",
    )


def parse_members(specs: list[str], options: MemberOptions) -> list[RewardMember]:
    if not specs:
        raise ConfigError("member: give at least one reward member", "e.g. --member embedding-bt")
    members = [parse_member(s, options) for s in specs]
    names = [m.name for m in members]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"member: two members share the column name {dupes[0]!r}", "list each member once")
    return members


class JudgeMember:
    """The judge's preference probability on the margin scale: ``logit(clip(pref))``."""

    def __init__(self, spec: str, name: str) -> None:
        self.spec, self.name = spec, name

    def columns(self) -> list[str]:
        return ["judge_pref"]

    def score(self, source: StageInput, ctx: StageContext) -> MemberScores:
        if "judge_pref" not in source.columns:
            raise InputError(
                f"{source.dir}: member judge needs column judge_pref", "run `prefcurate judge` before `score`"
            )
        parts = [
            np.asarray(b.column("judge_pref").cast("float64").to_numpy(zero_copy_only=False), dtype=np.float64)
            for b in source.batches(columns=["judge_pref"])
        ]
        pref = np.concatenate(parts) if parts else np.zeros(0)
        return MemberScores(judge_margin(pref), info={"missing": int(np.isnan(pref).sum())})


def judge_margin(pref: np.ndarray) -> np.ndarray:
    p = np.clip(pref, JUDGE_EPS, 1.0 - JUDGE_EPS)
    return np.log(p) - np.log1p(-p)


class EmbeddingBTMember:
    """The offline default: see ``reward_bt``."""

    def __init__(self, spec: str, name: str, options: MemberOptions) -> None:
        self.spec, self.name, self.options = spec, name, options
        self.embed_model = spec.partition(":")[2] or options.embed_model

    def columns(self) -> list[str]:
        return ["prompt", "chosen", "rejected", "tie"]

    def score(self, source: StageInput, ctx: StageContext) -> MemberScores:
        from prefcurate.backends.embed import get_embedder
        from prefcurate.backends.reward_bt import block_from_batch, score_embedding_bt

        opts = self.options
        embedder = get_embedder(self.embed_model, opts.device, ctx.cache_dir)
        cols = [c for c in self.columns() if c in source.columns]
        task = ctx.progress.task("embedding-bt: embedding", total=None, unit="texts")

        def blocks() -> Iterator[Any]:
            start = 0
            for batch in source.batches(columns=cols):
                yield block_from_batch(batch, start)
                start += batch.num_rows

        def encode(texts: list[str]) -> np.ndarray:
            return embedder.encode(texts, progress=task)

        fits = ctx.progress.task("embedding-bt: fitting", total=opts.folds * opts.seeds, unit="models")
        try:
            rc, rr, model = score_embedding_bt(
                blocks,
                source.num_rows,
                encode,
                embedder.dim,
                folds=opts.folds,
                seeds=opts.seeds,
                max_train_rows=opts.max_train_rows,
                on_model=lambda: fits.advance(1),
            )
        finally:
            embedder.close()
        stats = embedder.stats
        info = {
            "embed_model": embedder.name,
            "folds": opts.folds,
            "seeds": opts.seeds,
            "C": sorted(set(model.chosen_c())),
            "texts_encoded": stats.encoded,
            "embedding_cache_hits": stats.cache_hits,
        }
        return MemberScores(rc - rr, rc, rr, info)


def combine_margins(
    margins: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """Standardize each member's margins by their RMS; return (standardized, aggregates, scales).

    Aggregates: ``margin_mean``, ``margin_std`` (population, over members), ``margin_agree``
    (share of members with a positive margin), ``margin_worst`` (the minimum). NaN where no
    member scored the row.
    """
    scales: dict[str, float] = {}
    standardized: dict[str, np.ndarray] = {}
    for name, m in margins.items():
        finite = m[np.isfinite(m)]
        rms = float(np.sqrt(np.mean(finite**2))) if finite.size else 0.0
        scales[name] = rms
        standardized[name] = m / rms if rms > 0 else m.copy()
    stacked = np.column_stack(list(standardized.values())) if standardized else np.zeros((0, 0))
    known = np.isfinite(stacked)
    count = known.sum(axis=1)
    filled = np.where(known, stacked, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, filled.sum(axis=1) / np.maximum(count, 1), np.nan)
        var = np.where(known, (stacked - mean[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(count, 1)
        agree = np.where(count > 0, ((stacked > 0) & known).sum(axis=1) / np.maximum(count, 1), np.nan)
    worst = np.where(count > 0, np.where(known, stacked, np.inf).min(axis=1), np.nan)
    aggregates = {
        "margin_mean": mean,
        "margin_std": np.where(count > 0, np.sqrt(var), np.nan),
        "margin_agree": agree,
        "margin_worst": worst,
    }
    return standardized, aggregates, scales
