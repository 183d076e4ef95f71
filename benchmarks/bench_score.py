"""Finding flipped labels: prefcurate's score + filter --flip against a confident-learning baseline.

On the HH-RLHF harmless-base test split (2312 pairs), a seeded 20% of pairs have chosen and
rejected swapped. Printed:

- AUROC of ``-margin_mean`` for finding the flipped pairs, and precision / recall of the
  ``flip`` rule (default thresholds);
- the same for cleanlab's ``find_label_issues`` on out-of-fold probabilities of a logistic
  regression on the same embedding features, pairs presented in a random order (cleanlab is
  a benchmark-only dependency: ``pip install 'prefcurate[bench]'``);
- seconds per 10k pairs for scoring once the embeddings are cached.

    python benchmarks/bench_score.py [--embed-model static|minilm] [--seeds 3] [--folds 5]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(transcript: str) -> list[dict[str, str]]:
    parts = _TURN.split("\n\n" + transcript.lstrip("\n"))[1:]
    return [
        {"role": "user" if r == "Human" else "assistant", "content": c.strip()}
        for r, c in zip(parts[::2], parts[1::2], strict=False)
    ]


def load_pairs(flip_share: float, seed: int) -> tuple[list[dict], np.ndarray]:
    from prefcurate.schema import pair_id

    rows = [json.loads(line) for line in gzip.open(DATA, "rt")]
    flipped = np.random.default_rng(seed).random(len(rows)) < flip_share
    pairs = []
    for row, flip in zip(rows, flipped, strict=True):
        chosen, rejected = parse_hh(row["chosen"]), parse_hh(row["rejected"])
        prompt, c, r = chosen[:-1], chosen[-1:], rejected[-1:]
        if flip:
            c, r = r, c
        pairs.append(
            {
                "id": pair_id(prompt, c, r),
                "prompt": prompt,
                "chosen": c,
                "rejected": r,
                "source": "hh",
                "tie": False,
                "chosen_rating": None,
                "rejected_rating": None,
            }
        )
    return pairs, flipped


def write_stage(path: Path, pairs: list[dict]) -> Path:
    from prefcurate.schema import SCHEMA
    from prefcurate.shards import write_stage_dir

    write_stage_dir(path, [pa.Table.from_pylist(pairs, schema=SCHEMA)], stage="bench", key=[p["id"] for p in pairs])
    return path


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, score))


def precision_recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = float((found & truth).sum())
    return tp / max(found.sum(), 1), tp / max(truth.sum(), 1)


def baseline(stage_dir: Path, truth: np.ndarray, embed_model: str, seed: int) -> dict[str, float]:
    """cleanlab on OOF probabilities of a logistic regression on the same features."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from prefcurate.backends.embed import get_embedder
    from prefcurate.backends.reward_bt import block_from_batch, embed_block, pair_features
    from prefcurate.shards import read_table

    table = read_table(stage_dir, ["prompt", "chosen", "rejected", "tie"])
    embedder = get_embedder(embed_model)
    batch = table.combine_chunks().to_batches()[0]
    emb = embed_block(block_from_batch(batch, 0), embedder.encode)
    fc, fr = pair_features(emb)
    order = np.random.default_rng(seed + 1).random(len(fc)) < 0.5  # True: presented as (chosen, rejected)
    x = np.hstack([np.where(order[:, None], fc, fr), np.where(order[:, None], fr, fc)])
    labels = np.where(order, 0, 1)  # which side the data says is preferred
    probs = cross_val_predict(LogisticRegression(max_iter=2000), x, labels, cv=5, method="predict_proba")
    issues = find_label_issues(labels, probs)
    p, r = precision_recall(issues, truth)
    return {
        "auroc": auroc(1 - probs[np.arange(len(labels)), labels], truth),
        "precision": p,
        "recall": r,
        "flagged": int(issues.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embed-model", default="static")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--member", action="append", help="score members (default: the stage default, embedding-bt)")
    ap.add_argument("--flip-share", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("PREFCURATE_CACHE_DIR", str(Path(tempfile.gettempdir()) / "prefcurate-bench-cache"))

    from prefcurate.shards import read_table
    from prefcurate.stages.filter import FilterConfig, FilterStage
    from prefcurate.stages.score import ScoreConfig, ScoreStage

    pairs, truth = load_pairs(args.flip_share, args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    src = write_stage(work / "in", pairs)
    members = {"member": args.member} if args.member else {}
    cfg = ScoreConfig(embed_model=args.embed_model, folds=args.folds, seeds=args.seeds, **members)
    t0 = time.perf_counter()
    ScoreStage(cfg).run(src, work / "scored", fresh=True)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest, _ = ScoreStage(cfg).run(src, work / "scored", fresh=True)
    cached = time.perf_counter() - t0
    margin = read_table(work / "scored", ["margin_mean"]).column("margin_mean").to_numpy()
    FilterStage(FilterConfig(flip=True)).run(work / "scored", work / "filtered", fresh=True)
    flipped = read_table(work / "filtered", ["flipped"]).column("flipped").to_numpy(zero_copy_only=False).astype(bool)
    p, r = precision_recall(flipped, truth)
    n = len(pairs)
    print(f"data: {n} HH-RLHF harmless pairs, {int(truth.sum())} flipped ({args.flip_share:.0%}, seed {args.seed})")
    print(f"prefcurate {', '.join(cfg.member)} ({args.embed_model}, {args.folds} folds x {args.seeds} seeds):")
    print(f"  AUROC(-margin_mean) = {auroc(-margin, truth):.3f}")
    print(f"  flip rule (defaults): flipped {int(flipped.sum())}, precision {p:.3f}, recall {r:.3f}")
    for name, info in manifest.extra["members"].items():
        print(f"  {name}: C * n chosen {info.get('C')}, embeddings {info.get('embed_model')}")
    b = baseline(src, truth, args.embed_model, args.seed)
    print("cleanlab find_label_issues on OOF logistic regression (same features):")
    print(
        f"  AUROC = {b['auroc']:.3f}; flagged {b['flagged']}, precision {b['precision']:.3f}, recall {b['recall']:.3f}"
    )
    top = np.zeros(n, dtype=bool)
    top[np.argsort(margin)[: b["flagged"]]] = True
    tp, tr = precision_recall(top, truth)
    print(f"prefcurate at cleanlab's count ({b['flagged']} lowest margin_mean): precision {tp:.3f}, recall {tr:.3f}")
    print(
        f"scoring time: first run {first:.1f} s (embeds), cached embeddings {cached:.1f} s "
        f"= {cached / n * 10_000:.1f} s per 10k pairs"
    )


if __name__ == "__main__":
    main()
