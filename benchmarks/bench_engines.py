"""Local vs Ray engine on a synthetic stage directory (default 1M rows): rows/s and peak memory.

    python benchmarks/bench_engines.py [--rows 1000000] [--engines local,ray] [--cpus N]

Builds a stage directory with the canonical schema directly with pyarrow (random word
texts, 100k-row shards as ``ShardWriter`` writes them), then runs, once per engine, each in
a fresh subprocess so peaks do not mix:

- ``length-ratio``: a row-wise stage (chosen/rejected whitespace-token ratio above 1.5 is
  rejected, the rule ``filter --max-length-ratio`` applies): Ray maps it over the shards;
- ``filter``: the real filter stage with ``--max-length-ratio 1.5`` (a global stage: its
  first pass runs on the driver under both engines);
- ``export``: the real export stage (trl-chat, parquet), on the driver under both engines.

Peak memory: the driver's peak RSS, and for Ray the peak of the summed RSS of every Ray
process (raylet, GCS, workers; the object store's shared memory counts where it is touched),
sampled every 0.2 s. Figures depend on the machine; say how loaded it was when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = np.array(
    "the a of to and in is it you that he was for on are with as his they be at one have this from".split()
)


def _texts(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[str]:
    lengths = rng.integers(lo, hi, n)
    flat = WORDS[rng.integers(0, WORDS.size, int(lengths.sum()))]
    ends = np.cumsum(lengths)
    return [" ".join(flat[e - k : e]) for e, k in zip(ends, lengths, strict=True)]


def _messages(role: str, texts: list[str]) -> pa.Array:
    n = len(texts)
    structs = pa.StructArray.from_arrays([pa.array([role] * n), pa.array(texts)], names=["role", "content"])
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), structs)


def make_input(path: Path, rows: int, shard_rows: int = 100_000) -> Path:
    from prefcurate.schema import SCHEMA
    from prefcurate.shards import write_stage_dir

    if (path / "manifest.json").exists():
        return path
    rng = np.random.default_rng(0)

    def shards():
        for start in range(0, rows, shard_rows):
            n = min(shard_rows, rows - start)
            yield pa.table(
                {
                    "id": pa.array([f"{start + j:012d}" for j in range(n)]),
                    "prompt": _messages("user", _texts(rng, n, 5, 40)),
                    "chosen": _messages("assistant", _texts(rng, n, 10, 120)),
                    "rejected": _messages("assistant", _texts(rng, n, 10, 120)),
                    "source": pa.array(["bench"] * n),
                    "tie": pa.array(np.zeros(n, bool)),
                    "chosen_rating": pa.nulls(n, pa.float64()),
                    "rejected_rating": pa.nulls(n, pa.float64()),
                },
                schema=SCHEMA,
            )

    write_stage_dir(path, shards(), stage="bench", key=rows, rows_per_shard=shard_rows)
    return path


def _length_stage() -> tuple[type, type]:
    """A row-wise length-ratio rule (the one ``filter --max-length-ratio`` applies), defined
    in this script so Ray ships it to workers by value."""
    from pydantic import Field

    from prefcurate.stages.base import Stage, StageConfig, split
    from prefcurate.stages.filter import _length_ratio

    class LengthRatioConfig(StageConfig):
        """Reject pairs whose chosen/rejected whitespace-token ratio is above max_ratio."""

        max_ratio: float = Field(1.5, description="Largest ratio kept.")

    class LengthRatioStage(Stage):
        name = "length-ratio"
        config_cls = LengthRatioConfig

        def process_batch(self, batch, ctx):  # type: ignore[no-untyped-def]
            return split(batch, _length_ratio(batch) <= self.config.max_ratio, "length-ratio")

    return LengthRatioConfig, LengthRatioStage


def _ray_rss() -> int:
    import psutil

    total = 0
    for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.pid == os.getpid() or "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "ray/_private" in cmd:
            total += proc.info["memory_info"].rss if proc.info["memory_info"] else 0
    return total


def child(engine: str, src: Path, work: Path, cpus: int) -> dict:
    """Run the three stages with one engine; return figures as a dict."""
    from prefcurate.engines import get_engine
    from prefcurate.stages.export import ExportConfig, ExportStage
    from prefcurate.stages.filter import FilterConfig, FilterStage

    LengthRatioConfig, LengthRatioStage = _length_stage()
    peak = {"ray": 0}
    stop = threading.Event()
    if engine == "ray":
        import ray

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)

        def sample() -> None:
            while not stop.is_set():
                peak["ray"] = max(peak["ray"], _ray_rss())
                time.sleep(0.2)

        threading.Thread(target=sample, daemon=True).start()
    runner = get_engine(engine)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (src / "data").glob("*.parquet"))
    figures: dict = {"engine": engine, "rows": rows, "stages": {}}
    for name, stage in (
        ("length-ratio (row-wise)", LengthRatioStage(LengthRatioConfig(max_ratio=1.5))),
        ("filter --max-length-ratio (global)", FilterStage(FilterConfig(max_length_ratio=1.5))),
        ("export trl-chat parquet", ExportStage(ExportConfig())),
    ):
        out = work / f"{engine}-{name.split()[0]}"
        t = time.perf_counter()
        manifest, _ = stage.run(src, out, fresh=True, engine=runner)
        dt = time.perf_counter() - t
        figures["stages"][name] = {
            "seconds": round(dt, 2),
            "rows_per_s": round(rows / dt),
            "rows_out": manifest.rows_out,
        }
    stop.set()
    figures["driver_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if engine == "ray":
        figures["ray_processes_peak_rss_mib"] = round(peak["ray"] / 2**20)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prefcurate-bench-engines"))
    parser.add_argument("--repeat", type=int, default=1, help="Rounds; engines alternate within each.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    src = args.work / f"input-{args.rows}"
    if args.child:
        print(json.dumps(child(args.child, src, args.work, args.cpus)))
        return
    t = time.perf_counter()
    make_input(src, args.rows)
    print(f"input: {args.rows:,} rows in {src} ({time.perf_counter() - t:.1f}s to build or reuse); {args.cpus} CPUs")
    # Engines alternate (local, ray, local, ray, ...) so that load from other work on the
    # machine falls on both alike; compare the rounds, not one run.
    for round_no in range(1, args.repeat + 1):
        for engine in args.engines.split(","):
            _run_child(args, engine, round_no)


def _run_child(args: argparse.Namespace, engine: str, round_no: int) -> None:
    cmd = [sys.executable, __file__, "--rows", str(args.rows), "--cpus", str(args.cpus)]
    cmd += ["--work", str(args.work), "--child", engine]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"{engine}: failed\n{done.stderr[-3000:]}")
        return
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    ray_peak = figures.get("ray_processes_peak_rss_mib")
    print(
        f"\nround {round_no}, engine {engine}: driver peak RSS {figures['driver_peak_rss_mib']} MiB"
        + (f", all Ray processes peak RSS {ray_peak} MiB" if ray_peak is not None else ""),
        flush=True,
    )
    for name, f in figures["stages"].items():
        print(
            f"  {name:<38} {f['seconds']:>8.2f} s  {f['rows_per_s']:>10,} rows/s  ({f['rows_out']:,} kept)", flush=True
        )


if __name__ == "__main__":
    main()
