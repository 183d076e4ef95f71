"""score: preference strength from an ensemble of reward members.

A global stage. Pass 1: each member reads only the columns it needs and returns one
margin per row (positive = chosen preferred), held in memory as float arrays (8 bytes a
row a column). The margins are standardized and combined (``backends.reward``). Pass 2
(``apply_batch``, by row offset: on Ray workers under ``--engine ray``) streams whole
batches and appends, per member, ``margin__<member>`` (standardized: unit
RMS, sign kept) and ``reward_chosen__<member>`` / ``reward_rejected__<member>`` (raw, for
members that score responses), then ``margin_mean``, ``margin_std``, ``margin_agree``
and ``margin_worst``. Each member's raw scale, and what it did, go to the manifest.

Rescoring (an input that an earlier ``score`` or ``filter`` wrote) replaces the whole strength
picture: every column derived from the earlier scores (``DERIVED``, and any earlier member's
``margin__*`` / ``reward_*__*``) is dropped before the new ones are added, so nothing on the
old scale survives next to the new margins. ``adaptive_margin`` (filter: a scaled
``max(0, margin_mean)``) is dropped, not recomputed: its scale is a filter option, and a
filter after this score writes it again. ``flipped`` stays: it records the pair's orientation,
which the new scores are computed on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from prefcurate.backends.reward import MemberOptions, combine_margins, member_name, parse_members
from prefcurate.stages.base import BatchResult, StageConfig, StageContext, StageInput, TwoPhaseStage, as_table

AGGREGATES = ("margin_mean", "margin_std", "margin_agree", "margin_worst")
# Columns later stages compute from the aggregates: stale once the margins are replaced.
DERIVED = ("adaptive_margin",)


class ScoreConfig(StageConfig):
    """Score each pair's preference strength with an ensemble of reward members."""

    member: list[str] = Field(
        default_factory=lambda: ["embedding-bt"],
        description="Reward member (repeatable): embedding-bt (offline, cross-fitted on the data), "
        "hf:NAME_OR_PATH (a sequence-classification reward model), or judge (the judge stage's judge_pref).",
        json_schema_extra={"cli": {"flags": ["-m"]}},
    )
    folds: int = Field(
        5, ge=2, description="embedding-bt: cross-fitting folds (a pair is scored by models that never saw it)."
    )
    seeds: int = Field(3, ge=1, description="embedding-bt: fold splits; folds x seeds models form the ensemble.")
    embed_model: str = Field(
        "auto", description="embedding-bt: embedding model: auto, static, minilm, or a sentence-transformers name/path."
    )
    max_train_rows: int = Field(
        100_000, ge=10, description="embedding-bt: pairs sampled for training (all rows are scored)."
    )
    device: str = Field("auto", description="auto, cpu or cuda (embeddings and hf: models).")
    max_length: int = Field(
        1024, ge=8, description="hf: max tokens per conversation; longer ones lose their start (counted)."
    )
    batch_size: int = Field(16, ge=1, description="hf: conversations per forward pass.")

    def requires(self) -> set[str]:
        cols = super().requires()
        if "judge" in self.member:
            cols.add("judge_pref")
        return cols

    def produces(self) -> set[str]:
        cols = set(AGGREGATES)
        for spec in self.member:
            name = member_name(spec)
            cols.add(f"margin__{name}")
            if spec != "judge":
                cols |= {f"reward_chosen__{name}", f"reward_rejected__{name}"}
        return cols

    def fingerprint_params(self) -> dict[str, Any]:
        # Batch size and device change speed, not what is computed (up to float rounding).
        return self.model_dump(mode="json", exclude={"batch_size", "device"})

    def member_options(self) -> MemberOptions:
        return MemberOptions(
            folds=self.folds,
            seeds=self.seeds,
            embed_model=self.embed_model,
            device=self.device,
            max_length=self.max_length,
            batch_size=self.batch_size,
            max_train_rows=self.max_train_rows,
        )


class ScoreStage(TwoPhaseStage):
    """Score preference strength (margins) with reward members: embedding-bt, hf:MODEL, judge."""

    name = "score"
    config_cls = ScoreConfig
    apply_label = "score: writing"

    def plan(self, source: StageInput, ctx: StageContext) -> dict[str, np.ndarray]:
        """Pass 1, on the driver under any engine (cross-fitting and standardization are global;
        an ``hf:`` member sends its forward passes to the engine): the new columns, by row."""
        cfg: ScoreConfig = self.config  # type: ignore[assignment]
        members = parse_members(cfg.member, cfg.member_options())
        raw: dict[str, np.ndarray] = {}
        rewards: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        info: dict[str, Any] = {}
        for member in members:
            scores = member.score(source, ctx)
            raw[member.name] = scores.margin
            if scores.reward_chosen is not None and scores.reward_rejected is not None:
                rewards[member.name] = (scores.reward_chosen, scores.reward_rejected)
            info[member.name] = {"spec": member.spec, **scores.info}
        standardized, aggregates, scales = combine_margins(raw)
        for name, scale in scales.items():
            info[name]["scale"] = round(scale, 6)
        ctx.extra["members"] = info
        ctx.extra["strength"] = _strength_summary(aggregates)
        columns: dict[str, np.ndarray] = {}
        for name in raw:
            columns[f"margin__{name}"] = standardized[name]
            if name in rewards:
                columns[f"reward_chosen__{name}"], columns[f"reward_rejected__{name}"] = rewards[name]
        columns.update(aggregates)
        return columns

    def apply_batch(
        self, batch: pa.RecordBatch | pa.Table, plan: dict[str, np.ndarray], offset: int, ctx: StageContext
    ) -> BatchResult:
        """Pass 2 on one batch whose first row is input row ``offset``: the new columns appended
        (replacing same-named ones from a rerun, and dropping columns derived from old scores)."""
        table = as_table(batch)
        n = table.num_rows
        table = table.drop_columns([c for c in table.column_names if _stale(c, plan)])
        for name, values in plan.items():
            table = table.append_column(name, pa.array(values[offset : offset + n], pa.float64(), from_pandas=True))
        return BatchResult(table)


def _stale(column: str, new: dict[str, np.ndarray]) -> bool:
    """A column of an earlier score run, or one derived from it (filter's ``adaptive_margin``):
    rescoring replaces the whole strength picture."""
    return (
        column in new
        or column.startswith(("margin__", "reward_chosen__", "reward_rejected__"))
        or column in AGGREGATES
        or column in DERIVED
    )


def _strength_summary(aggregates: dict[str, np.ndarray]) -> dict[str, float]:
    mean = aggregates["margin_mean"]
    finite = mean[np.isfinite(mean)]
    if not finite.size:
        return {}
    agree = aggregates["margin_agree"][np.isfinite(mean)]
    return {
        "share_prefers_chosen": round(float((finite > 0).mean()), 4),
        "median": round(float(np.median(finite)), 4),
        "q10": round(float(np.quantile(finite, 0.1)), 4),
        "q90": round(float(np.quantile(finite, 0.9)), 4),
        "share_unanimous": round(float(((agree == 0) | (agree == 1)).mean()), 4),
    }
