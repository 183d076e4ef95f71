"""The embedding half of dedupe: near-duplicate clusters and near-contamination.

Only rows still kept after the exact pass are embedded (``dedupe_vectors``: as that pass
streams the input). A row's vector is the concatenation
of its parts' unit vectors divided by sqrt(#parts), so a dot product between two rows is the
mean of the per-part cosines: ``--on pair`` needs the prompts and both responses to be close
on average (so two different answer pairs to one prompt stay apart), and every part must
also pass ``part_threshold`` on its own (so the same generic answers to two different
prompts are not merged).
"""

from __future__ import annotations

import time

import numpy as np

from prefcurate.stages.base import StageContext, StageInput
from prefcurate.stages.dedupe_groups import KEEP, NEAR, Decisions, cluster_decisions, size_histogram
from prefcurate.stages.dedupe_keys import EvalSet
from prefcurate.stages.dedupe_vectors import RowVectors

PARTS = {"pair": ("prompt", "chosen", "rejected"), "prompt": ("prompt",), "response": ("chosen", "rejected")}


def default_thresholds(embedder_name: str) -> tuple[float, float]:
    """(row threshold, per-part threshold) calibrated for the model (bench_dedupe.py --calibrate)."""
    from prefcurate.backends.embed import MINILM_NAME
    from prefcurate.stages.dedupe import DEFAULT_PART_THRESHOLDS, DEFAULT_THRESHOLDS, FALLBACK_THRESHOLD

    if embedder_name.startswith("static-"):
        return DEFAULT_THRESHOLDS["static"], DEFAULT_PART_THRESHOLDS["static"]
    if embedder_name == MINILM_NAME:
        return DEFAULT_THRESHOLDS["minilm"], DEFAULT_PART_THRESHOLDS["minilm"]
    return FALLBACK_THRESHOLD, 0.0


def semantic_pass(
    source: StageInput,
    cfg,
    ctx: StageContext,
    decisions: Decisions,
    labels: np.ndarray,
    prio: np.ndarray,
    evals: EvalSet,
    row_vectors: RowVectors,
) -> None:
    """Finish the surviving rows' vectors; mark near-contaminated and near-duplicate rows in ``decisions``."""
    from prefcurate.stages.dedupe import mark_contaminated

    cand = np.flatnonzero(decisions.reason == KEEP)
    vectors, prompt_vecs, operands = row_vectors.finish(cand, source, cfg.batch_size)
    embedder = row_vectors.embedder
    threshold, part_threshold = default_thresholds(embedder.name)
    threshold = cfg.threshold or threshold
    part_threshold = part_threshold if cfg.part_threshold is None else cfg.part_threshold
    ctx.extra.update(model=embedder.name, embed_device=embedder.device, threshold=threshold)
    if evals.texts:
        hit, sims, match = _contamination(cfg, ctx, embedder, prompt_vecs, evals, threshold, source, cand)
        rows = np.zeros(len(decisions.reason), bool)
        rows[cand[hit]] = True
        ref = np.full(len(rows), -1, np.int64)
        ref[cand[hit]] = match[hit]
        sim = np.ones(len(rows), np.float32)
        sim[cand[hit]] = np.minimum(sims[hit], 1.0)
        mark_contaminated(decisions, labels, rows, ref, sim)
        cand = cand[~hit]
        vectors = vectors[~hit] if vectors is not None else None
        operands = operands.take(~hit) if operands is not None and hit.any() else operands
    if cfg.semantic:
        _near_duplicates(cfg, ctx, decisions, prio, cand, vectors, threshold, part_threshold, operands)
    ctx.extra["encode_seconds"] = round(embedder.stats.encode_seconds, 3)
    ctx.extra["model_seconds"] = round(embedder.stats.model_seconds, 3)
    ctx.extra["texts"] = {
        "requested": embedder.stats.requested,
        "distinct": embedder.stats.distinct,
        "cache_hits": embedder.stats.cache_hits,
        "encoded": embedder.stats.encoded,
    }
    embedder.close()


def _contamination(
    cfg, ctx, embedder, prompt_vecs: np.ndarray, evals: EvalSet, threshold: float, source: StageInput, cand: np.ndarray
):
    """Per candidate row: (hit, cosine, eval prompt) of its prompt's nearest evaluation
    prompt, the whole prompt or any of its user turns (as the exact check counts them)."""
    from prefcurate.backends.index import nearest

    cthreshold = cfg.contamination_threshold or threshold
    eval_vecs = embedder.encode(evals.texts)
    sims, match, info = nearest(eval_vecs, prompt_vecs, cfg.device, "auto", threshold=cthreshold)
    turns = 0
    for at, texts in _user_turns(source, cand, cfg.batch_size):
        turns += len(texts)
        turn_sims, turn_match, _ = nearest(eval_vecs, embedder.encode(texts), cfg.device, "auto", threshold=cthreshold)
        better = turn_sims > sims[at]
        if better.any():  # a row's best over its turns: fancy assignment keeps the last, so sort
            order = np.argsort(turn_sims[better], kind="stable")
            rows = at[better][order]
            sims[rows], match[rows] = turn_sims[better][order], turn_match[better][order]
    hit = (sims >= cthreshold) & (match >= 0)
    ctx.extra["contamination"] = {
        "eval_prompts": len(evals.texts),
        "threshold": cthreshold,
        "user_turns_checked": turns,
        "index": info.describe(),
    }
    return hit, sims, match


def _user_turns(source: StageInput, cand: np.ndarray, batch_rows: int):
    """(positions in ``cand``, texts) of the user turns of the candidates whose prompt has more
    than one message, a batch of the input at a time (a one-message prompt is its own turn)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = np.zeros(source.num_rows, bool)
    wanted[cand] = True
    start = 0
    for batch in source.batches(["prompt"], batch_rows):
        prompts = batch.column("prompt")
        if isinstance(prompts, pa.ChunkedArray):
            prompts = prompts.combine_chunks()
        parent = pc.list_parent_indices(prompts).to_numpy()
        flat = pc.list_flatten(prompts)
        content = flat.field("content")
        several = pc.list_value_length(prompts).fill_null(0).to_numpy(zero_copy_only=False) > 1
        keep = (
            wanted[start + parent]
            & several[parent]
            & pc.equal(flat.field("role"), "user").fill_null(False).to_numpy(zero_copy_only=False)
            & pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(content)), 0)
            .fill_null(False)
            .to_numpy(zero_copy_only=False)
        )
        if keep.any():
            texts = content.filter(pa.array(keep)).to_pylist()
            yield np.searchsorted(cand, start + parent[keep]), texts
        start += batch.num_rows


def _parts_agree(parts: np.ndarray, i: np.ndarray, j: np.ndarray, n_parts: int, floor: float):
    """Keep the edges whose every part (prompt, chosen, rejected) reaches ``floor`` on its
    own (``parts``: the unit part vectors side by side)."""
    from prefcurate.backends.index import pair_cosines

    dim = parts.shape[1] // n_parts
    ok = np.ones(len(i), bool)
    for k in range(n_parts):
        ok &= pair_cosines(parts[:, k * dim : (k + 1) * dim], i, j) >= floor
    return i[ok], j[ok]


def _near_duplicates(
    cfg,
    ctx,
    decisions: Decisions,
    prio,
    cand: np.ndarray,
    vectors: np.ndarray,
    threshold: float,
    part_threshold: float,
    operands=None,
):
    """``vectors``: each candidate's unit part vectors side by side (``RowVectors.finish``);
    ``operands``: their CPU join operands, built during the exact pass, or None."""
    from prefcurate.backends.index import connected_components, pair_cosines, similar_pairs

    task = ctx.progress.task("dedupe: neighbours", total=len(cand))
    started = time.perf_counter()
    n_parts = len(PARTS[cfg.on])
    i, j, _, info = similar_pairs(
        vectors, threshold, cfg.neighbors, cfg.device, cfg.index, task, scale=n_parts**-0.5, operands=operands
    )
    if n_parts > 1 and part_threshold > 0:
        i, j = _parts_agree(vectors, i, j, n_parts, part_threshold)
        ctx.extra["part_threshold"] = part_threshold
    ctx.progress.note(f"dedupe: {info.describe()}")
    comp = connected_components(len(cand), i, j)
    keep, leader = cluster_decisions(comp, prio[cand], cfg.per_prompt if cfg.on == "prompt" else 1)
    gone = np.flatnonzero(~keep)
    rows, leaders = cand[gone], cand[leader[gone]]
    decisions.reason[rows] = NEAR
    decisions.dup_of[rows] = leaders
    # the mean part cosine; float16 unit vectors can put identical texts a hair above 1
    decisions.similarity[rows] = np.minimum(pair_cosines(vectors, gone, leader[gone], n_parts**-0.5), 1.0)
    ctx.extra.update(
        index=info.kind,
        index_device=info.device,
        index_detail=info.describe(),
        search_seconds=round(time.perf_counter() - started, 3),
        near_cluster_sizes=size_histogram(comp),
        near_edges=int(len(i)),
    )
