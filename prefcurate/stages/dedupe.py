"""dedupe: exact, swapped, conflicting and semantic near-duplicates, and decontamination.

A global stage in two passes over the input, each reading only what it needs:

1. keys (id, prompt, chosen, rejected, tie[, margin_mean]): normalized hashes decide exact,
   swapped and conflicting duplicates and exact contamination; nothing else is kept in
   memory but a 16-byte key and a few numbers per row (and, up to a fixed budget, the
   first rows' batches, which spare the second pass reading those columns again:
   ``dedupe_retained``). As the batches go by, the rows that
   survive so far are embedded (``dedupe_vectors``): each part (prompt, chosen, rejected)
   on its own, the parts' unit vectors concatenated and scaled, so the inner product of two
   rows is the *mean* of their per-part cosines. Embedding the parts apart (instead of one
   concatenated text) keeps a long prompt from drowning the responses (MiniLM truncates at
   256 tokens), and a prompt shared by many pairs is embedded once. FAISS then finds
   neighbours >= threshold; connected components of that graph are clusters. Each unit of
   rows is read and hashed on a helper thread in the gaps the CPU encoder leaves while the
   unit before it is embedded (``dedupe_ahead``), and in the gaps left after that, the same
   helper builds the search's operands of the rows embedded so far (``dedupe_vectors``).
2. the whole rows, streamed and split into data/ and rejects/ by the decisions.

Why one pass for keys and texts instead of a pass each: the texts are what dominates the
reading, and on an input larger than the page cache a second read is a second trip to disk.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from prefcurate.backends.embed import serial_torch
from prefcurate.errors import ConfigError
from prefcurate.shards import files_fingerprint
from prefcurate.stages.base import BatchResult, Stage, StageConfig, StageContext, StageInput, split
from prefcurate.stages.dedupe_ahead import ReadAhead
from prefcurate.stages.dedupe_groups import (
    CONTAM,
    KEEP,
    NEAR,
    REASONS,
    Decisions,
    exact_decisions,
    priorities,
    size_histogram,
)
from prefcurate.stages.dedupe_keys import (
    digest,
    load_eval_set,
    normalizer,
    row_lengths,
)
from prefcurate.stages.dedupe_retained import Retained
from prefcurate.stages.dedupe_semantic import PARTS, semantic_pass
from prefcurate.stages.dedupe_vectors import RowVectors

Normalization = Literal["case", "whitespace", "nfkc", "punctuation", "none"]
# Cosine thresholds per model, from benchmarks/bench_dedupe.py (planted paraphrases found,
# distinct pairs sharing a prompt kept apart). A static model's cosines run higher than a
# transformer's for unrelated text, so one number does not fit both.
DEFAULT_THRESHOLDS = {"static": 0.92, "minilm": 0.86}
FALLBACK_THRESHOLD = 0.90
# Every part must also reach this cosine (--on pair/response). The static model rates any two
# HH-RLHF prompts ~0.85 alike, so two different prompts with the same generic answers passed
# the mean alone: at 200k rows this floor cut such false merges by 83% for 2% of true ones.
DEFAULT_PART_THRESHOLDS = {"static": 0.88, "minilm": 0.70}


class DedupeConfig(StageConfig):
    """Remove exact, swapped and near-duplicate pairs, and pairs whose prompt is in an evaluation set."""

    exact: bool = Field(True, description="Remove exact duplicates (same normalized prompt, chosen and rejected).")
    swapped: bool = Field(
        True, description="Remove swapped duplicates: same prompt, responses exchanged (a label conflict)."
    )
    normalize: list[Normalization] = Field(
        default_factory=lambda: ["case", "whitespace", "nfkc"],
        description="Normalizations before exact hashing (repeatable; 'none' for raw text).",
    )
    drop_conflicts: bool = Field(
        False, description="Also remove the kept row of a swapped or conflicting group: neither label is trusted."
    )
    semantic: bool = Field(True, description="Remove near-duplicates by embedding similarity.")
    on: Literal["pair", "prompt", "response"] = Field(
        "pair", description="What near-duplicates compare: the whole pair, the prompt only, or the two responses."
    )
    per_prompt: int = Field(1, ge=1, description="With --on prompt: pairs kept per cluster of near-identical prompts.")
    threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Cosine similarity at or above which rows are near-duplicates (default: per model).",
    )
    keep: Literal["first", "longest", "highest-margin", "random"] = Field(
        "first", description="Which row of a duplicate group or cluster to keep."
    )
    seed: int = Field(0, description="Seed for --keep random.")
    model: str = Field(
        "auto", description="Embedding model: auto, static, minilm, or a sentence-transformers name/path."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to embed and search.")
    index: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="FAISS index: exact flat search, or approximate IVF/HNSW (auto picks by size)."
    )
    neighbors: int = Field(16, ge=1, le=1024, description="Nearest neighbours searched per row.")
    against: list[Path] = Field(
        default_factory=list,
        description="Evaluation set(s) to decontaminate against: stage dir, .txt (a prompt a line), JSON(L), Parquet.",
    )
    part_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="With --on pair/response: cosine each part must reach too (default: per model; 0 turns it off).",
    )
    contamination_threshold: float | None = Field(
        None, gt=0, le=1, description="Prompt cosine for contamination (default: --threshold)."
    )
    batch_size: int = Field(16_384, ge=1, description="Rows per batch read from the input.")
    vector_memory: float | None = Field(
        None,
        ge=0,
        description="GiB of RAM for the row vectors and the search's operands; past it they live in a "
        "temporary file beside the output (default: half the memory available at the start).",
    )

    @model_validator(mode="after")
    def _check(self) -> DedupeConfig:
        if "none" in self.normalize and len(self.normalize) > 1:
            raise ConfigError("--normalize none cannot be combined with other normalizations")
        return self

    def requires(self) -> set[str]:
        needed = {"id", "prompt", "chosen", "rejected", "tie"}
        return needed | ({"margin_mean"} if self.keep == "highest-margin" else set())

    def fingerprint_params(self) -> dict:
        params = self.model_dump(mode="json")
        params.pop("batch_size")
        params.pop("vector_memory")  # where the vectors live, not what is decided
        params["against_files"] = files_fingerprint(self.against) if self.against else None
        return params


class DedupeStage(Stage):
    """Remove exact, swapped, conflicting and near-duplicate pairs, and evaluation-set contamination."""

    name = "dedupe"
    config_cls = DedupeConfig
    reject_extras = {"duplicate_of": pa.string(), "similarity": pa.float64()}

    def input_paths(self) -> list[Path]:
        return list(self.config.against)  # type: ignore[attr-defined]

    def process(self, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]:
        assert source is not None
        cfg: DedupeConfig = self.config  # type: ignore[assignment]
        started = time.perf_counter()
        norm = normalizer(cfg.normalize)
        evals = load_eval_set(cfg.against)
        eval_hashes: dict[bytes, int] = {}
        for i, text in enumerate(evals.texts):
            eval_hashes.setdefault(digest(norm(text)), i)
        if cfg.keep == "highest-margin" and "margin_mean" not in source.columns:
            raise ConfigError(
                "--keep highest-margin needs a margin_mean column",
                "run `prefcurate score` first, or pick another --keep",
            )
        vectors = None
        if cfg.semantic or evals.texts:
            parts = PARTS[cfg.on] if cfg.semantic else ()
            vectors = RowVectors(cfg, ctx, source.num_rows, parts, need_prompt=bool(evals.texts))
        retained = Retained()
        try:
            state = _first_pass(source, cfg, ctx, eval_hashes, vectors, retained)
        except BaseException:
            if vectors is not None:
                vectors.settle()
            raise
        decisions, labels = exact_decisions(
            state.groups,
            state.orientation,
            state.tie,
            state.prio,
            exact=cfg.exact,
            swapped=cfg.swapped,
            drop_conflicts=cfg.drop_conflicts,
        )
        ctx.extra["exact_group_sizes"] = size_histogram(labels)
        mark_contaminated(decisions, labels, state.contaminated, state.contaminated_ref)
        if vectors is not None:
            semantic_pass(source, cfg, ctx, decisions, labels, state.prio, evals, vectors)
        _follow_chains(decisions)
        ctx.extra["counts"] = decisions.counts()
        ctx.extra["total_seconds"] = round(time.perf_counter() - started, 3)
        ctx.extra["rows_kept_for_writing"] = retained.rows
        yield from _write_pass(source, cfg, ctx, decisions, state.ids, evals.refs, retained)
        ctx.extra["total_seconds"] = round(time.perf_counter() - started, 3)


class _Keys:
    def __init__(self) -> None:
        self.ids: list[pa.Array] = []
        self.groups: list[np.ndarray] = []
        self.orientation: list[np.ndarray] = []
        self.tie: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.margins: list[np.ndarray] = []
        self.contaminated: list[np.ndarray] = []
        self.contaminated_ref: list[np.ndarray] = []


class _State:
    def __init__(self, keys: _Keys, cfg: DedupeConfig) -> None:
        self.ids = pa.chunked_array(keys.ids, pa.string()).combine_chunks() if keys.ids else pa.array([], pa.string())
        self.groups = np.concatenate(keys.groups) if keys.groups else np.zeros(0, "S16")
        self.orientation = _cat(keys.orientation, bool)
        self.tie = _cat(keys.tie, bool)
        self.contaminated = _cat(keys.contaminated, bool)
        self.contaminated_ref = _cat(keys.contaminated_ref, np.int64)
        n = len(self.groups)
        self.prio = priorities(
            cfg.keep,
            n,
            lengths=_cat(keys.lengths, np.int64) if cfg.keep == "longest" else None,
            margins=_cat(keys.margins, np.float64) if cfg.keep == "highest-margin" else None,
            ids=self.ids.to_pylist() if cfg.keep == "random" else None,
            seed=cfg.seed,
        )


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _first_pass(
    source: StageInput,
    cfg: DedupeConfig,
    ctx: StageContext,
    eval_index: dict[bytes, int],
    vectors: RowVectors | None,
    retained: Retained,
) -> _State:
    """Hash every row, and hand the rows to embed to ``vectors`` as they go by; the first
    rows' columns stay in ``retained`` for the write pass."""
    columns = ["id", "prompt", "chosen", "rejected", "tie"]
    if cfg.keep == "highest-margin":  # the column's presence is checked before the model loads
        columns.append("margin_mean")
    keys = _Keys()
    task = ctx.progress.task("dedupe: hashing", total=source.num_rows)
    first_only = cfg.exact  # other --keep policies: their later leaders are re-read (RowVectors.finish)
    # each unit is read, hashed and its texts prepared on a helper thread while the unit
    # before it is embedded
    if vectors is not None:
        units = _units(source.batches(columns, min(cfg.batch_size, _READ_ROWS)), cfg.batch_size)
        ahead = ReadAhead(
            units, cfg.normalize, cfg.swapped, bool(eval_index), vectors.gate, prepare=vectors.prepare_steps
        )
    else:  # nothing to embed, no gaps to fit in: whole batches, hashed by both threads in halves
        units = source.batches(columns, cfg.batch_size)
        ahead = ReadAhead(units, cfg.normalize, cfg.swapped, bool(eval_index), slice_rows=-(-cfg.batch_size // 2))
    # A static model on CPU runs no torch: the pass's torch work (copies, casts, the join's
    # operands) runs on one thread, so that it neither fights the tokenizer's threads for the
    # cores nor gives other bits depending on which thread did it (``serial_torch``).
    serial = serial_torch() if vectors is not None and vectors.static_cpu else contextlib.nullcontext()
    try:
        with serial:
            start = 0
            for batch, pk, prepared in ahead:
                retained.add(batch)
                keys.ids.append(batch.column("id").cast(pa.string()))
                keys.groups.append(pk.group)
                keys.orientation.append(pk.orientation)
                keys.tie.append(batch.column("tie").fill_null(False).to_numpy(zero_copy_only=False))
                if cfg.keep == "longest":
                    keys.lengths.append(row_lengths(batch))
                if cfg.keep == "highest-margin":
                    keys.margins.append(batch.column("margin_mean").cast(pa.float64()).fill_null(np.nan).to_numpy())
                hits = [next((eval_index[h] for h in hs if h in eval_index), -1) for hs in pk.prompt_hashes]
                keys.contaminated_ref.append(np.array(hits or np.full(batch.num_rows, -1), np.int64))
                keys.contaminated.append(keys.contaminated_ref[-1] >= 0)
                if vectors is not None:
                    vectors.feed(batch, start, pk.group, keys.contaminated[-1], first_only, prepared)
                    ahead.submit(*vectors.take_tasks())  # the join's operands of the rows just embedded
                start += batch.num_rows
                task.advance(batch.num_rows)
            if vectors is not None:
                vectors.end_pass()
                ahead.submit(*vectors.take_tasks())
                ahead.drain()
    finally:
        ahead.close()
    ctx.extra["read_ahead"] = {
        "units_read": {"helper": ahead.helper_reads, "stage": ahead.caller_reads},
        "tasks": {"helper": ahead.helper_tasks, "stage": ahead.caller_tasks},
        "join_tasks": {"helper": ahead.helper_side, "stage": ahead.caller_side},
    }
    return _State(keys, cfg)


_FIRST_UNIT = 1024  # rows in the exact pass's first unit of work
# The exact pass reads this many rows at a time: nothing hides the first read (16k rows took
# 0.17 s beside the model's load, 4k rows 0.13 s), and the helper's reads, which cannot stop
# halfway, run less far past a gate that shuts meanwhile.
_READ_ROWS = 4096


def _units(batches: Iterator[pa.RecordBatch], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The input's batches, the first one cut into growing units (1k rows, then 4x larger,
    the rest of the batch once a unit would reach ``batch_rows``). Nothing hides the first
    unit's hashing, so it is small; after that each unit is hashed while the one before it
    is embedded, and a unit's embedding leaves gaps enough to hash ~3x its rows
    (``dedupe_ahead``): the stage helps with what the helper has not finished."""
    size = _FIRST_UNIT
    for batch in batches:
        lo = 0
        while lo < batch.num_rows:
            n = batch.num_rows - lo if size >= batch_rows else min(size, batch.num_rows - lo)
            yield batch.slice(lo, n)
            lo += n
            size *= 4


def mark_contaminated(
    decisions: Decisions, labels: np.ndarray, rows: np.ndarray, ref: np.ndarray, similarity: np.ndarray | float = 1.0
) -> None:
    """Contamination outranks duplication: a contaminated row's whole exact group goes, as contaminated.

    ``rows``: boolean mask over all rows; ``ref``/``similarity``: per row (used where ``rows``)."""
    if not rows.any():
        return
    hit_groups = np.zeros(labels.max() + 1, bool)
    hit_groups[labels[rows]] = True
    group_ref = np.full(labels.max() + 1, -1, np.int64)
    group_ref[labels[rows]] = ref[rows]
    members = hit_groups[labels]
    decisions.reason[members] = CONTAM
    decisions.dup_of[members] = -1
    decisions.eval_match[members] = group_ref[labels[members]]
    group_sim = np.ones(labels.max() + 1, np.float32)
    group_sim[labels[rows]] = np.broadcast_to(np.asarray(similarity, np.float32), rows.shape)[rows]
    decisions.similarity[members] = group_sim[labels[members]]


def _follow_chains(decisions: Decisions) -> None:
    """An exact duplicate whose kept row was later removed as a near-duplicate points at the
    row that cluster kept instead (one hop: a cluster's kept row is never removed)."""
    target = decisions.dup_of
    has = target >= 0
    hop = np.zeros(len(target), bool)
    hop[has] = decisions.reason[target[has]] == NEAR
    decisions.dup_of = np.where(hop, decisions.dup_of[np.where(hop, target, 0)], target)


def _write_pass(
    source: StageInput,
    cfg: DedupeConfig,
    ctx: StageContext,
    d: Decisions,
    ids: pa.Array,
    eval_refs: list[str],
    retained: Retained,
) -> Iterator[BatchResult]:
    task = ctx.progress.task("dedupe: writing", total=source.num_rows)
    names = np.array([None, *REASONS.values()], dtype=object)
    refs = np.array(eval_refs, dtype=object)
    start = 0
    for batch in retained.rows_again(source, cfg.batch_size):
        stop = start + batch.num_rows
        reason = d.reason[start:stop]
        dup = d.dup_of[start:stop]
        # the kept rows' ids in Arrow (no Python string per row), null where nothing is duplicated
        dup_ids = ids.take(pa.array(np.where(dup >= 0, dup, 0)))
        dup_ids = pc.if_else(pa.array(dup >= 0), dup_ids, pa.scalar(None, pa.string()))
        contam = (reason == CONTAM) & (d.eval_match[start:stop] >= 0)
        if contam.any():
            hits = pa.array(refs[d.eval_match[start:stop][contam]].tolist(), pa.string())
            dup_ids = pc.replace_with_mask(dup_ids, pa.array(contam), hits)
        sim = d.similarity[start:stop].astype(np.float64)
        extra = {
            "duplicate_of": dup_ids,
            "similarity": pa.array(sim, pa.float64(), mask=np.isnan(sim)),
        }
        yield split(batch, reason == KEEP, names[reason], extra=extra)
        task.advance(batch.num_rows)
        start = stop


__all__ = ["DEFAULT_THRESHOLDS", "FALLBACK_THRESHOLD", "NEAR", "DedupeConfig", "DedupeStage"]
