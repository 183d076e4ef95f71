"""Benchmark the dedupe stage: speed, overhead over pure encoding, and recall/precision on
planted duplicates, with real text (HH-RLHF harmless-base test + LLMBar).

Data: distinct rows are real prompts recombined with real responses of other rows and
lightly perturbed (case/punctuation of a few words), so they are distinct pairs; then a
share of rows is planted as duplicates of a random earlier row: paraphrase-like copies
(word drops and swaps, case, punctuation on all three texts), exact copies under
normalization (case + whitespace) and swapped copies. The truth is known per row.

    python benchmarks/bench_dedupe.py                      # 20k + 200k static, MiniLM at 2k
    python benchmarks/bench_dedupe.py --sizes 20000 --minilm-rows 0 --repeat 5   # medians of 5 runs
    python benchmarks/bench_dedupe.py --sizes 20000 --minilm-rows 0
    python benchmarks/bench_dedupe.py --calibrate          # precision/recall per threshold per model
    python benchmarks/bench_dedupe.py --index-sweep        # flat vs IVF vs HNSW time and recall
    python benchmarks/bench_dedupe.py --gpu                # 1M rows on CUDA (needs a GPU)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from prefcurate.schema import SCHEMA, assistant, pair_id, user  # noqa: E402
from prefcurate.shards import write_stage_dir  # noqa: E402


def load_pool() -> tuple[list[str], list[str]]:
    """Real prompts and responses: HH-RLHF (prompt = transcript up to the last assistant turn) and LLMBar."""
    prompts, responses = [], []
    with gzip.open(DATA / "hh-rlhf-harmless-base-test.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            for key in ("chosen", "rejected"):
                head, _, answer = row[key].rpartition("\n\nAssistant:")
                if key == "chosen":
                    prompts.append(head.strip())
                responses.append(answer.strip())
    for name in ("natural", "adversarial-neighbor", "adversarial-gptinst"):
        for row in json.loads((DATA / "llmbar" / f"{name}.json").read_text()):
            prompts.append(row["input"])
            responses += [row["output_1"], row["output_2"]]
    return [p for p in prompts if p], [r for r in responses if r]


def perturb(text: str, rng: random.Random, drop: float, swap: float, case: float, punct: float) -> str:
    words = text.split(" ")
    out = [w for w in words if rng.random() >= drop or len(words) < 4]
    for i in range(len(out) - 1):
        if rng.random() < swap:
            out[i], out[i + 1] = out[i + 1], out[i]
    for i, w in enumerate(out):
        r = rng.random()
        if r < case:
            out[i] = w.upper() if rng.random() < 0.5 else w.lower()
        elif r < case + punct:
            out[i] = w.rstrip(".,!?") if w[-1:] in ".,!?" else w + rng.choice(",.!")
    return " ".join(out)


def make_rows(n: int, seed: int = 0, planted: float = 0.06) -> tuple[list[dict], np.ndarray, list[str]]:
    """Rows, the truth group of each row, and each row's kind (base / paraphrase / exact / swapped)."""
    rng = random.Random(seed)
    prompts, responses = load_pool()
    rows: list[dict] = []
    group = np.zeros(n, np.int64)
    kinds: list[str] = []
    for k in range(n):
        if k > 50 and rng.random() < planted:
            src = rng.randrange(k)
            while kinds[src] != "base":
                src = rng.randrange(k)
            base = rows[src]
            kind = rng.choices(["paraphrase", "exact", "swapped"], [0.7, 0.15, 0.15])[0]
            if kind == "paraphrase":
                row = {key: perturb(base[key], rng, 0.08, 0.04, 0.05, 0.05) for key in ("prompt", "chosen", "rejected")}
            elif kind == "exact":
                row = {key: "  " + base[key].upper() + " " for key in ("prompt", "chosen", "rejected")}
            else:
                row = {"prompt": base["prompt"], "chosen": base["rejected"], "rejected": base["chosen"]}
            group[k] = group[src]
        else:
            row = {
                "prompt": perturb(rng.choice(prompts), rng, 0.0, 0.0, 0.02, 0.02),
                "chosen": perturb(rng.choice(responses), rng, 0.0, 0.0, 0.02, 0.02),
                "rejected": perturb(rng.choice(responses), rng, 0.0, 0.0, 0.02, 0.02),
            }
            kind, group[k] = "base", k
        rows.append(row)
        kinds.append(kind)
    return rows, group, kinds


def write_stage(path: Path, rows: list[dict]) -> Path:
    records = []
    for i, r in enumerate(rows):
        p, c, j = user(r["prompt"]), assistant(r["chosen"]), assistant(r["rejected"])
        records.append(
            {
                "id": f"r{i}-{pair_id(p, c, j)[:8]}",
                "prompt": p,
                "chosen": c,
                "rejected": j,
                "source": "bench",
                "tie": False,
                "chosen_rating": None,
                "rejected_rating": None,
            }
        )
    shutil.rmtree(path, ignore_errors=True)
    tables = (
        pa.Table.from_pylist(records[start : start + 50_000], schema=SCHEMA) for start in range(0, len(records), 50_000)
    )
    write_stage_dir(path, tables, stage="bench", key=records[0]["id"] if records else "")
    return path


def score(out_dir: Path, group: np.ndarray, kinds: list[str]) -> dict[str, float]:
    """Recall of planted paraphrases (removed, pointing into their own group) and precision
    of near-duplicate removals."""
    rej = pq.read_table(out_dir / "rejects").select(["id", "duplicate_of", "reject_reason"]).to_pylist()
    index = {}
    for t in pq.read_table(out_dir / "data", columns=["id"]).column("id").to_pylist() + [r["id"] for r in rej]:
        index[t] = int(t[1:].split("-")[0])
    near = [r for r in rej if r["reject_reason"] == "near-duplicate"]
    right = sum(group[index[r["id"]]] == group[index[r["duplicate_of"]]] for r in near)
    planted = [k for k, kind in enumerate(kinds) if kind == "paraphrase"]
    removed = {index[r["id"]]: r for r in rej if r["duplicate_of"]}
    found = 0
    for k in planted:  # found when the copy or its original was removed as a duplicate of its group
        partner = [x for x in (k, int(group[k])) if x in removed]
        found += any(group[index[removed[x]["duplicate_of"]]] == group[k] for x in partner)
    return {
        "paraphrase_recall": found / max(1, len(planted)),
        "near_precision": right / max(1, len(near)),
        "near_removed": len(near),
        "exact_found": sum(r["reject_reason"] == "exact-duplicate" for r in rej),
        "exact_planted": kinds.count("exact"),
        "swapped_found": sum(r["reject_reason"] == "swapped-duplicate" for r in rej),
        "swapped_planted": kinds.count("swapped"),
    }


def cpu_seconds() -> float:
    """CPU seconds this process has used so far, all its threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_stage(stage_in: Path, out: Path, cache: Path, **options) -> tuple[float, dict]:
    """(wall seconds, the manifest's extra), with the run's CPU seconds in ``extra["cpu_s"]``."""
    from prefcurate.stages.base import StageContext  # noqa: F401  (imported for side effects of registry)
    from prefcurate.stages.dedupe import DedupeConfig, DedupeStage

    os.environ["PREFCURATE_CACHE_DIR"] = str(cache)
    cpu, started = cpu_seconds(), time.perf_counter()
    manifest, _ = DedupeStage(DedupeConfig(**options)).run(stage_in, out, fresh=True)
    wall = time.perf_counter() - started
    return wall, {**manifest.extra, "cpu_s": cpu_seconds() - cpu}


def encode_only(model: str, stage_in: Path, cache: Path, device: str = "auto", library: bool = False):
    """(seconds, texts, CPU seconds) to embed the same texts with the same model, nothing
    else (no cache, no I/O): through the embedder the stage uses, or with ``library`` through
    model2vec's own ``StaticModel.encode`` (the static model's reference implementation,
    which the embedder's pooling replaces)."""
    from prefcurate.backends.embed import get_embedder
    from prefcurate.schema import render_text

    table = pq.read_table(stage_in / "data", columns=["prompt", "chosen", "rejected"])
    texts = list(dict.fromkeys(render_text(m) for col in table.columns for m in col.to_pylist()))
    embedder = get_embedder(model, device, cache)
    texts.sort(key=len)
    bs = embedder.default_batch_size

    def encode(batch: list[str]) -> object:
        if library:
            return embedder.model.encode(batch, use_multiprocessing=False, batch_size=len(batch))
        return embedder._encode_batch(batch)

    cpu, started = cpu_seconds(), time.perf_counter()
    for i in range(0, len(texts), bs):
        encode(texts[i : i + bs])
    return time.perf_counter() - started, len(texts), cpu_seconds() - cpu


def bench_size(n: int, model: str, work: Path, device: str = "auto", repeat: int = 3) -> None:
    """The stage on a fresh embedding cache and the encode-only baseline, ``repeat`` times
    interleaved (this VM's encoding speed drifts by +-10% from run to run, as much as the
    overhead being measured): the ratio is of the medians. ``in_run_ratio`` divides each
    stage run by its own time inside the encoder (same texts, same moment, so no drift).

    CPU seconds (all threads) split the overhead in two: work that encoding alone does not do
    (``extra_cpu_s``: the stage's CPU seconds minus encoding's) and cores left idle
    (``idle_core_s``: cores x wall seconds minus CPU seconds, per side). When encoding keeps
    every core busy, only the first can shrink the ratio by being moved, the second by being
    filled."""
    rows, group, kinds = make_rows(n)
    stage_in = write_stage(work / f"in-{n}", rows)
    cache = work / f"cache-{model}-{n}"
    get_model_ready(model, work)
    warm_imports(model, device, work)
    totals, encodes, in_run, cpus, enc_cpus, idle, enc_idle = [], [], [], [], [], [], []
    cores = len(os.sched_getaffinity(0))
    for _ in range(repeat):
        shutil.rmtree(cache, ignore_errors=True)
        _share_models(work, cache)
        total, extra = run_stage(stage_in, work / f"out-{n}", cache, model=model, device=device)
        enc, n_texts, enc_cpu = encode_only(model, stage_in, cache, device)
        totals.append(total)
        encodes.append(enc)
        in_run.append(total / extra["model_seconds"])
        cpus.append(extra["cpu_s"])
        enc_cpus.append(enc_cpu)
        idle.append(cores * total - extra["cpu_s"])
        enc_idle.append(cores * enc - enc_cpu)
    library = encode_only(model, stage_in, cache, device, library=True)[0] if model in ("static", "auto") else None
    quality = score(work / f"out-{n}", group, kinds)
    rerun, extra2 = run_stage(stage_in, work / f"out-{n}-b", cache, model=model, device=device, threshold=0.97)
    total, enc = float(np.median(totals)), float(np.median(encodes))
    print(
        json.dumps(
            {
                "rows": n,
                "model": extra.get("model"),
                "device": extra.get("embed_device"),
                "index": extra.get("index_detail"),
                "runs": repeat,
                "texts_encoded": extra["texts"]["encoded"],
                "texts_per_s": round(extra["texts"]["encoded"] / extra["model_seconds"], 1),
                "dedupe_total_s": round(total, 2),
                "dedupe_total_runs_s": [round(t, 2) for t in totals],
                "encode_only_s": round(enc, 2),
                "encode_only_runs_s": [round(t, 2) for t in encodes],
                "encode_only_texts": n_texts,
                "ratio_total_to_encode": round(total / enc, 3),
                "in_run_ratio": round(float(np.median(in_run)), 3),
                "cores": cores,
                "stage_cpu_s": round(float(np.median(cpus)), 2),
                "encode_only_cpu_s": round(float(np.median(enc_cpus)), 2),
                "extra_cpu_s": round(float(np.median(np.subtract(cpus, enc_cpus))), 2),
                "stage_idle_core_s": round(float(np.median(idle)), 2),
                "encode_only_idle_core_s": round(float(np.median(enc_idle)), 2),
                "model2vec_encode_only_s": library and round(library, 2),
                "ratio_total_to_model2vec_encode": library and round(total / library, 3),
                "search_s": extra.get("search_seconds"),
                # the last stage run's phases: model time inside the first pass (hashing,
                # embedding glue, model load), the search, and the rest (decisions, writing)
                "last_run_model_s": extra.get("model_seconds"),
                "last_run_first_pass_s": extra.get("hash_and_embed_seconds"),
                # who read and hashed the exact pass's units: the helper (in the encoder's gaps) or the stage
                "last_run_read_ahead": extra.get("read_ahead"),
                "rerun_threshold_change_s": round(rerun, 2),
                "rerun_texts_encoded": extra2["texts"]["encoded"],
                **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in quality.items()},
            }
        ),
        flush=True,
    )


def _share_models(work: Path, cache: Path) -> None:
    """Reuse one distilled static model across the bench's fresh embedding caches."""
    models = work / "models"
    if models.exists() and not (cache / "models").exists():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "models").symlink_to(models, target_is_directory=True)


def warm_imports(model: str, device: str, work: Path) -> None:
    """Import what the stage and the baseline both load (torch, model2vec, faiss) before any
    timing: Python's one-time import cost (~2 s) belongs to neither side of the ratio. Loading
    the model from disk stays inside the stage's time. pyarrow imports pandas on its first
    conversion from Python objects (~0.2 s once per process, whatever the row count): warmed
    here too."""
    import torch  # noqa: F401  (the search runs its products in torch; --device auto imports it anyway)

    from prefcurate.backends.index import _faiss

    _faiss()  # as the stage imports it (it picks faiss's OpenBLAS kernels first)

    pa.array(["warm"])

    from prefcurate.backends.embed import get_embedder

    warm = work / "warm-cache"
    _share_models(work, warm)
    get_embedder(model, device, warm).close()


def get_model_ready(model: str, work: Path) -> None:
    if model in ("static", "auto"):
        from prefcurate.backends.embed import STATIC_NAME, static_model_path

        static_model_path(work / "models", STATIC_NAME)


def calibrate(n: int, work: Path) -> None:
    """Precision/recall of planted paraphrases per threshold, per model (pair mode, exact flat search)."""
    from prefcurate.backends.embed import get_embedder
    from prefcurate.backends.index import connected_components, similar_pairs
    from prefcurate.stages.dedupe_groups import cluster_decisions

    rows, group, kinds = make_rows(n)
    keep_rows = [k for k, kind in enumerate(kinds) if kind in ("base", "paraphrase")]
    get_model_ready("static", work)
    for model in ("static", "minilm"):
        emb = get_embedder(model, "cpu", work)
        parts = [emb.encode([rows[k][key] for k in keep_rows]) for key in ("prompt", "chosen", "rejected")]
        vecs = np.concatenate(parts, axis=1) / np.sqrt(3)
        i, j, s, _ = similar_pairs(vecs, 0.80, 16, "cpu", "flat")
        g = group[keep_rows]
        planted = sum(kinds[k] == "paraphrase" for k in keep_rows)
        for t in (0.85, 0.88, 0.90, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97):
            m = s >= t
            comp = connected_components(len(keep_rows), i[m], j[m])
            keep, leader = cluster_decisions(comp, np.zeros(len(keep_rows)))
            gone = np.flatnonzero(~keep)
            right = int((g[gone] == g[leader[gone]]).sum())
            print(
                json.dumps(
                    {
                        "model": emb.name,
                        "rows": len(keep_rows),
                        "threshold": t,
                        "recall": round(right / max(1, planted), 4),
                        "precision": round(right / max(1, len(gone)), 4),
                        "removed": len(gone),
                    }
                ),
                flush=True,
            )


def index_sweep(work: Path, sizes: list[int]) -> None:
    """Time of an all-vs-all k=16 search (build included) per index kind, and recall of IVF/HNSW edges vs exact."""
    from prefcurate.backends.embed import get_embedder
    from prefcurate.backends.index import similar_pairs

    rows, _, _ = make_rows(max(sizes))
    get_model_ready("static", work)
    emb = get_embedder("static", "cpu", work)
    parts = [emb.encode([r[key] for r in rows]) for key in ("prompt", "chosen", "rejected")]
    allv = np.concatenate(parts, axis=1) / np.sqrt(3)
    for n in sizes:
        vecs = allv[:n]
        edges = {}
        for kind in ("flat", "ivf", "hnsw"):
            if kind == "flat" and n > 60_000:
                continue
            t = time.perf_counter()
            i, j, _, info = similar_pairs(vecs, 0.92, 16, "cpu", kind)
            edges[kind] = set(zip(i.tolist(), j.tolist(), strict=True))
            rec = len(edges[kind] & edges["flat"]) / max(1, len(edges["flat"])) if "flat" in edges else None
            print(
                json.dumps(
                    {
                        "rows": n,
                        "dim": vecs.shape[1],
                        "index": kind,
                        "seconds": round(time.perf_counter() - t, 2),
                        "edges": len(edges[kind]),
                        "recall_vs_flat": rec and round(rec, 4),
                    }
                ),
                flush=True,
            )


def gpu_bench(n: int, work: Path) -> None:
    """Rows/s of the whole stage on CUDA (MiniLM fp16 + GPU FAISS)."""
    rows, _, _ = make_rows(n)
    stage_in = write_stage(work / f"in-gpu-{n}", rows)
    total, extra = run_stage(stage_in, work / "out-gpu", work / "cache-gpu", model="auto", device="cuda")
    print(json.dumps({"rows": n, "rows_per_s": round(n / total, 1), "total_s": round(total, 2), **extra}, default=str))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[20_000, 200_000])
    ap.add_argument("--minilm-rows", type=int, default=2_000, help="rows for the transformer run (0: skip)")
    ap.add_argument("--calibrate", type=int, nargs="?", const=4_000, default=0)
    ap.add_argument("--index-sweep", type=int, nargs="*", default=None)
    ap.add_argument("--gpu", type=int, nargs="?", const=1_000_000, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved stage / encode-only runs per size (medians)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-dedupe-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        return calibrate(args.calibrate, work)
    if args.index_sweep is not None:
        return index_sweep(work, args.index_sweep or [5_000, 10_000, 20_000, 50_000, 100_000])
    if args.gpu:
        return gpu_bench(args.gpu, work)
    for n in args.sizes:
        bench_size(n, "static", work, "cpu", args.repeat)
    if args.minilm_rows:
        bench_size(args.minilm_rows, "minilm", work, "cpu", 1)


if __name__ == "__main__":
    main()
