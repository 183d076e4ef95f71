"""filter: named rules that flip, drop or rank pairs by preference strength and pair properties.

Rules, applied in this order (a removed row names the first rule that removed it):

- ``flip``: the ensemble strongly and consistently prefers the rejected response
  (``margin_mean < flip_below`` and ``margin_agree < flip_max_agree``): chosen and rejected
  swap, with their ratings and rewards, margins change sign, ``flipped`` is true. Flipped
  rows stay in ``data/``. Ties are never flipped.
- ``drop_ties`` (reason ``tie``), ``drop_judge_inconsistent`` (``judge-inconsistent``: the
  judge disagreed with itself when the order was swapped), ``min/max_length_ratio``
  (``length-ratio``: chosen/rejected whitespace-token ratio outside the bounds, counts
  floored at 1), ``drop_ambiguous`` (``ambiguous``: ``|margin_mean|`` small or ``margin_std``
  large), ``keep_top_fraction`` / ``keep_top_count`` (``below-top``: the strongest pairs by
  ``margin_mean`` among the rows the other rules kept).

Every rule after ``flip`` sees the pair as it will be written, flipped: on a flipped row
``chosen`` is the former ``rejected`` (so its length ratio is the inverse) and its strength is
``-margin_mean``. Ties, judge consistency, ``|margin_mean|`` and ``margin_std`` do not change
under a flip.

Thresholds are strings with one convention: a number (``"-1.5"``) is absolute; ``"qF"``
(``"q0.1"``) is the F-quantile, over the whole input, of the quantity the rule compares
(``margin_mean`` for flip, ``|margin_mean|`` and ``margin_std`` for ambiguity). Every
decision is made in a first pass over only the columns the chosen rules need, so quantiles
and the top-k cut are global; the second pass streams whole batches and applies them. The
two passes are ``plan`` and ``apply_batch`` (by row offset), so under ``--engine ray`` the
first runs on the driver and the second on Ray workers; ``process`` composes them locally.
Rows whose strength is null (no member scored them) are never flipped or dropped as
ambiguous, and rank last for ``keep_top``.

``adaptive_margin`` (written when the input has ``margin_mean``) is
``adaptive_margin_scale * max(0, margin_mean)`` after flipping: a nonnegative margin on
the standardized scale, for losses that take one (a margin ranking loss, or IPO/DPO
variants with a per-pair offset).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from prefcurate.errors import InputError
from prefcurate.schema import render_text
from prefcurate.shards import Manifest
from prefcurate.stages.base import (
    BatchResult,
    NullProgress,
    Progress,
    StageConfig,
    StageContext,
    StageInput,
    TwoPhaseStage,
    as_table,
    split,
)
from prefcurate.stages.filter_flip import adaptive_margin, as_float, flip_rows, set_column

_THRESHOLD = re.compile(r"^\s*(q)?\s*([-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?)\s*$", re.IGNORECASE)
# Reasons by rule, in the order rules are applied; index 0 means kept.
_REASONS = ("", "tie", "judge-inconsistent", "length-ratio", "ambiguous", "below-top")
_TIE, _JUDGE, _LENGTH, _AMBIGUOUS, _TOP = 1, 2, 3, 4, 5


def parse_threshold(text: str) -> tuple[str, float]:
    """``"-1.5"`` -> ("abs", -1.5); ``"q0.1"`` -> ("quantile", 0.1)."""
    m = _THRESHOLD.match(str(text))
    if not m:
        raise ValueError(f"{text!r}: expected a number (absolute) or qF with 0 <= F <= 1 (quantile)")
    value = float(m.group(2))
    if m.group(1):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{text!r}: a quantile is between q0 and q1")
        return "quantile", value
    return "abs", value


def resolve_threshold(text: str, values: np.ndarray) -> float:
    """The absolute value of a threshold, computing a quantile over ``values`` (nulls ignored)."""
    kind, value = parse_threshold(text)
    if kind == "abs":
        return value
    finite = values[np.isfinite(values)]
    return float(np.quantile(finite, value)) if finite.size else float("nan")


class FilterConfig(StageConfig):
    """Flip, drop or rank pairs by named rules (margins come from `score`)."""

    flip: bool = Field(
        False, description="Swap chosen/rejected where the ensemble strongly and consistently prefers rejected."
    )
    flip_below: str = Field(
        "-1.0", description="Flip when margin_mean is below this: a number or a quantile such as q0.05."
    )
    flip_max_agree: float = Field(
        0.5, ge=0.0, le=1.0, description="...and the share of members preferring chosen (margin_agree) is below this."
    )
    drop_ambiguous: bool = Field(
        False, description="Drop pairs with a weak or uncertain preference (reason: ambiguous)."
    )
    ambiguous_below: str = Field(
        "q0.1", description="Ambiguous when |margin_mean| is below this: a number or a quantile of |margin_mean|."
    )
    ambiguous_std_above: str | None = Field(
        None, description="Also ambiguous when margin_std is above this: a number or a quantile of margin_std."
    )
    drop_judge_inconsistent: bool = Field(
        False,
        description="Drop pairs the judge ranked differently when the order was swapped (needs judge_consistent).",
    )
    drop_ties: bool = Field(False, description="Drop pairs marked as ties (reason: tie).")
    min_length_ratio: float | None = Field(
        None, gt=0, description="Drop pairs whose chosen/rejected length ratio (whitespace tokens) is below this."
    )
    max_length_ratio: float | None = Field(
        None, gt=0, description="Drop pairs whose chosen/rejected length ratio (whitespace tokens) is above this."
    )
    keep_top_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Keep only this fraction of the remaining pairs, strongest by margin_mean (reason: below-top).",
    )
    keep_top_count: int | None = Field(
        None,
        ge=0,
        description="Keep only this many of the remaining pairs, strongest by margin_mean (reason: below-top).",
    )
    adaptive_margin_scale: float = Field(
        1.0, ge=0.0, description="adaptive_margin = scale * max(0, margin_mean), written when margin_mean is present."
    )
    report: bool = Field(False, description="Print per-rule counts and the strength distribution before and after.")

    @field_validator("flip_below", "ambiguous_below", "ambiguous_std_above", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> Any:
        if value is None:
            return None
        text = str(value) if isinstance(value, int | float) else value
        parse_threshold(text)
        return text

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.min_length_ratio and self.max_length_ratio and self.min_length_ratio > self.max_length_ratio:
            raise ValueError("min_length_ratio is above max_length_ratio")
        if self.keep_top_fraction is not None and self.keep_top_count is not None:
            raise ValueError("give keep_top_fraction or keep_top_count, not both")
        return self

    @property
    def keep_top(self) -> bool:
        return self.keep_top_fraction is not None or self.keep_top_count is not None

    @property
    def length_ratio(self) -> bool:
        return self.min_length_ratio is not None or self.max_length_ratio is not None

    def requires(self) -> set[str]:
        cols = super().requires()
        if self.flip or self.drop_ambiguous or self.keep_top:
            cols.add("margin_mean")
        if self.flip:
            cols.add("margin_agree")
        if self.drop_ambiguous and self.ambiguous_std_above is not None:
            cols.add("margin_std")
        if self.drop_judge_inconsistent:
            cols.add("judge_consistent")
        if self.drop_ties:
            cols.add("tie")
        return cols

    def produces(self) -> set[str]:
        return {"flipped", "adaptive_margin"}

    def fingerprint_params(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"report"})


class FilterStage(TwoPhaseStage):
    """Flip mislabeled pairs and drop ties, judge-inconsistent, length-biased, ambiguous or weak pairs."""

    name = "filter"
    config_cls = FilterConfig

    def run(self, input_dir: str | Path | None, output_dir: str | Path, **kwargs: Any) -> tuple[Manifest, bool]:
        """``Stage.run``; a run skipped as unchanged still prints ``--report``, from the figures
        the existing output's manifest holds (``report`` is not in the fingerprint)."""
        manifest, skipped = super().run(input_dir, output_dir, **kwargs)
        if skipped and self.config.report:  # type: ignore[attr-defined]
            extra = manifest.extra
            _print_report(
                kwargs.get("progress") or NullProgress(),
                extra.get("rules", {}),
                extra.get("thresholds", {}),
                extra.get("strength_before"),
                extra.get("strength_after"),
                header=f"filter report (unchanged, from {Path(output_dir) / 'manifest.json'}):",
            )
        return manifest, skipped

    # -- pass 1: every decision, from only the columns the rules need ---------------------
    def _read_columns(self, source: StageInput) -> dict[str, np.ndarray]:
        """The per-row values the chosen rules compare (float64; ``length_ratio`` computed from
        the texts), each filled in place batch by batch: ~8 bytes a row per column, only for
        the columns the rules use, plus ``margin_mean`` when present (the strength figures)."""
        cfg: FilterConfig = self.config  # type: ignore[assignment]
        needed = {"margin_mean"} | cfg.requires()
        if cfg.flip:
            needed.add("tie")  # a tie is never flipped
        numeric = [
            c
            for c in ("margin_mean", "margin_agree", "margin_std", "tie", "judge_consistent")
            if c in needed and c in source.columns
        ]
        texts = ["chosen", "rejected"] if cfg.length_ratio else []
        n = source.num_rows
        out = {name: np.empty(n, np.float64) for name in numeric}
        if cfg.length_ratio:
            out["length_ratio"] = np.empty(n, np.float64)
        at = 0
        for batch in source.batches(columns=[*numeric, *texts] or ["id"]):
            stop = at + batch.num_rows
            for name in numeric:
                out[name][at:stop] = as_float(batch.column(name))
            if cfg.length_ratio:
                out["length_ratio"][at:stop] = _length_ratio(batch)
            at = stop
        return out

    def plan(self, source: StageInput, ctx: StageContext) -> dict[str, np.ndarray]:
        """Pass 1 (on the driver under any engine): per-row flip and removal decisions, from only
        the columns the rules need, so quantiles and the top-k cut are global. Two bytes a row."""
        cfg: FilterConfig = self.config  # type: ignore[assignment]
        missing = sorted(cfg.requires() - set(source.columns))
        if missing:
            raise InputError(
                f"{source.dir}: filter needs column(s) {', '.join(missing)} for the rules chosen",
                "run `prefcurate score` (margins) or `prefcurate judge` (judge_consistent) first",
            )
        n = source.num_rows
        cols = self._read_columns(source)
        strength = cols.get("margin_mean", np.full(n, np.nan))
        tie = np.nan_to_num(cols.get("tie", np.zeros(n))) > 0
        thresholds: dict[str, float] = {}
        flip = np.zeros(n, dtype=bool)
        if cfg.flip:
            thresholds["flip_below"] = resolve_threshold(cfg.flip_below, strength)
            agree = cols["margin_agree"]
            flip = (strength < thresholds["flip_below"]) & (agree < cfg.flip_max_agree) & ~tie
        # The rules below see the pairs as written: flipped where ``flip``.
        after = np.where(flip, -strength, strength)
        reason = np.zeros(n, dtype=np.int8)

        def mark(rule: int, hit: np.ndarray) -> None:
            reason[(reason == 0) & hit] = rule

        if cfg.drop_ties:
            mark(_TIE, tie)
        if cfg.drop_judge_inconsistent:
            consistent = cols["judge_consistent"]
            # Null (not judged) is not evidence of inconsistency.
            mark(_JUDGE, consistent == 0)
        if cfg.length_ratio:
            # Counts are floored at 1, so a flipped pair's ratio is exactly the inverse.
            ratio = np.where(flip, 1.0 / cols["length_ratio"], cols["length_ratio"])
            mark(_LENGTH, (ratio < (cfg.min_length_ratio or 0.0)) | (ratio > (cfg.max_length_ratio or np.inf)))
        if cfg.drop_ambiguous:
            mark(_AMBIGUOUS, self._ambiguous(after, cols.get("margin_std"), thresholds))
        if cfg.keep_top:
            mark(_TOP, self._below_top(after, reason == 0, thresholds))
        rules = _rule_counts(cfg, flip, reason)
        ctx.extra["rules"] = rules
        ctx.extra["thresholds"] = {k: round(v, 6) for k, v in thresholds.items() if np.isfinite(v)}
        if "margin_mean" in cols:
            ctx.extra["strength_before"] = _summary(strength)
            ctx.extra["strength_after"] = _summary(after[reason == 0])
        if cfg.report:
            _print_report(
                ctx.progress, rules, thresholds, ctx.extra.get("strength_before"), ctx.extra.get("strength_after")
            )
        return {"flip": flip, "reason": reason}

    def _ambiguous(self, strength: np.ndarray, std: np.ndarray | None, thresholds: dict[str, float]) -> np.ndarray:
        cfg: FilterConfig = self.config  # type: ignore[assignment]
        weak = np.abs(strength)
        thresholds["ambiguous_below"] = resolve_threshold(cfg.ambiguous_below, weak)
        hit = weak < thresholds["ambiguous_below"]
        if cfg.ambiguous_std_above is not None and std is not None:
            thresholds["ambiguous_std_above"] = resolve_threshold(cfg.ambiguous_std_above, std)
            hit |= std > thresholds["ambiguous_std_above"]
        return hit

    def _below_top(self, strength: np.ndarray, alive: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
        cfg: FilterConfig = self.config  # type: ignore[assignment]
        idx = np.flatnonzero(alive)
        if cfg.keep_top_count is not None:
            k = min(cfg.keep_top_count, idx.size)
        else:
            k = int(round(cfg.keep_top_fraction * idx.size))  # type: ignore[operator]
        # Strongest first; nulls rank last; ties in strength broken by row order (stable).
        key = np.where(np.isfinite(strength[idx]), -strength[idx], np.inf)
        order = idx[np.argsort(key, kind="stable")]
        below = np.zeros(strength.shape[0], dtype=bool)
        below[order[k:]] = True
        if k:
            thresholds["keep_top_cut"] = float(strength[order[k - 1]])
        return below

    # -- pass 2: apply the plan to whole batches -----------------------------------------
    def apply_batch(
        self, batch: pa.RecordBatch | pa.Table, plan: dict[str, np.ndarray], offset: int, ctx: StageContext
    ) -> BatchResult:
        """Flip and split one batch whose first row is input row ``offset`` (any worker can)."""
        table = as_table(batch)
        n = table.num_rows
        flip = plan["flip"][offset : offset + n]
        reason = plan["reason"][offset : offset + n]
        table = flip_rows(table, flip)
        if "margin_mean" in table.column_names:
            table = set_column(table, "adaptive_margin", adaptive_margin(table, self.config.adaptive_margin_scale))  # type: ignore[attr-defined]
        reasons = np.array(_REASONS, dtype=object)[reason]
        return split(table, reason == 0, reasons)


def _rule_counts(cfg: FilterConfig, flip: np.ndarray, reason: np.ndarray) -> dict[str, int]:
    """Rows each enabled rule touched (flipped, or removed: a row counts for the first rule that removed it)."""
    rules = {"flip": int(flip.sum())} if cfg.flip else {}
    enabled = (cfg.drop_ties, cfg.drop_judge_inconsistent, cfg.length_ratio, cfg.drop_ambiguous, cfg.keep_top)
    for rule, on in zip((_TIE, _JUDGE, _LENGTH, _AMBIGUOUS, _TOP), enabled, strict=True):
        if on:
            rules[_REASONS[rule]] = int((reason == rule).sum())
    return rules


def _length_ratio(batch: pa.RecordBatch) -> np.ndarray:
    chosen = batch.column("chosen").to_pylist()
    rejected = batch.column("rejected").to_pylist()
    c = np.array([max(len(render_text(m).split()), 1) for m in chosen], dtype=np.float64)
    r = np.array([max(len(render_text(m).split()), 1) for m in rejected], dtype=np.float64)
    return c / r


def _summary(values: np.ndarray) -> dict[str, float | int]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"n": 0}
    q = np.quantile(finite, [0.0, 0.1, 0.5, 0.9, 1.0])
    out: dict[str, float | int] = {"n": int(finite.size), "mean": round(float(finite.mean()), 4)}
    out.update({k: round(float(v), 4) for k, v in zip(("min", "q10", "median", "q90", "max"), q, strict=True)})
    out["share_negative"] = round(float((finite < 0).mean()), 4)
    return out


def _print_report(
    progress: Progress,
    rules: dict[str, int],
    thresholds: dict[str, float],
    before: Any,
    after: Any,
    header: str = "filter report:",
) -> None:
    """Per-rule counts and the strength distribution, through the progress display when shown,
    else straight to stderr (``--report`` is an explicit request, so ``--quiet`` does not hide it)."""
    lines = [header]
    lines += [f"  {rule:<20} {count:>10,} rows" for rule, count in rules.items()]
    lines += [f"  threshold {k} = {v:.4g}" for k, v in thresholds.items()]
    if before is not None:
        lines.append(f"  strength before: {_fmt(before)}")
        lines.append(f"  strength after:  {_fmt(after)}")
    text = "\n".join(lines)
    if isinstance(progress, NullProgress):
        sys.stderr.write(text + "\n")
    else:
        progress.note(text)


def _fmt(summary: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in summary.items())
