"""Export and stats benchmark on a synthetic stage directory (no ingest needed).

Builds a canonical stage directory of ``--rows`` distinct pairs (~560 bytes of text each, as
in ``bench_io.py``), then runs each step in a fresh subprocess so its peak RSS is its own:
``export`` to JSON Lines and Parquet in the chosen layouts, and ``stats``. Run two sizes to
see that memory does not grow with rows.

    python benchmarks/bench_export.py                       # 2M rows
    python benchmarks/bench_export.py --rows 200000 2000000 --formats trl kto

Prints wall seconds, rows/s (input pairs per second), CPU seconds and peak RSS per step.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

_WORDS = (
    "the of and to in is it you that he was for on are with as they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him"
).split()


def build(path: Path, rows: int, batch: int = 50_000, seed: int = 0) -> None:
    """A finished stage directory of ``rows`` pairs, written batch by batch."""
    from prefcurate.schema import SCHEMA
    from prefcurate.shards import write_stage_dir

    rng = np.random.default_rng(seed)
    pool = np.array(
        [" ".join(rng.choice(_WORDS, size=int(rng.integers(8, 20)))).capitalize() + "." for _ in range(4096)]
    )

    def batches():
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            idx = rng.integers(0, len(pool), size=(n, 5))
            ids = np.char.add("pair-", np.arange(start, start + n).astype(str))
            a, b, c, d, e = (pool[idx[:, k]] for k in range(5))
            prompt = np.char.add(np.char.add("Question: ", a), np.char.add(" What is ", b))
            chosen, rejected = np.char.add(np.char.add(c, "\n"), d), np.char.add(np.char.add(e, " "), c)

            def msgs(texts: np.ndarray, role: str, n: int = n) -> pa.Array:
                values = pa.StructArray.from_arrays(
                    [pa.array([role] * n), pa.array(texts.tolist())], names=["role", "content"]
                )
                return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), values)

            table = pa.table(
                {
                    "id": pa.array(ids.tolist()),
                    "prompt": msgs(prompt, "user"),
                    "chosen": msgs(chosen, "assistant"),
                    "rejected": msgs(rejected, "assistant"),
                    "source": pa.array(["bench"] * n),
                    "tie": pa.array(rng.random(n) < 0.01),
                    "chosen_rating": pa.nulls(n, pa.float64()),
                    "rejected_rating": pa.nulls(n, pa.float64()),
                    "margin_mean": pa.array(rng.normal(size=n)),
                }
            ).cast(pa.schema([*SCHEMA, pa.field("margin_mean", pa.float64())]))
            yield table

    write_stage_dir(path, batches(), stage="bench", key=[rows, seed])


def step(kind: str, src: str, dst: str, fmt: str, to: str) -> None:
    """One measured step, in this (child) process: prints its seconds and peak RSS (MiB).

    Peak RSS is read from ``VmHWM`` (per address space, so unlike ``ru_maxrss`` it does not
    inherit the parent's peak across fork + exec)."""
    start = time.perf_counter()
    _run(kind, src, dst, fmt, to)
    seconds = time.perf_counter() - start
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{seconds} {int(hwm.split()[1]) / 1024} {usage.ru_utime + usage.ru_stime}")


def _run(kind: str, src: str, dst: str, fmt: str, to: str) -> None:
    if kind == "export":
        from prefcurate.stages.export import ExportConfig, ExportStage

        ExportStage(ExportConfig(format=fmt, to=to)).run(src, dst, fresh=True)
    else:
        from prefcurate.stats import compute_stats

        compute_stats(dst if kind == "stats-export" else src)


def measure(args: list[str]) -> tuple[float, float, float, int]:
    """(wall seconds of the step, peak RSS MiB, CPU seconds of the whole child, exit code).

    CPU seconds (user + system, imports included) say what the step costs when the
    machine is shared: wall time on a loaded machine mostly measures the other load."""
    proc = subprocess.run([sys.executable, __file__, "--step", *args], capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
        return float("nan"), float("nan"), float("nan"), proc.returncode
    seconds, rss, cpu = proc.stdout.split()[-3:]
    return float(seconds), float(rss), float(cpu), 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000])
    parser.add_argument("--formats", nargs="+", default=["trl", "trl-chat", "kto"])
    parser.add_argument("--to", nargs="+", default=["jsonl", "parquet"])
    parser.add_argument("--step", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        step(*args.step)
        return
    work = Path(tempfile.mkdtemp(prefix="prefcurate-bench-export-"))
    print(f"bench_export: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    try:
        for rows in args.rows:
            src, dst = work / f"src-{rows}", work / f"out-{rows}"
            build(src, rows)
            size = sum(p.stat().st_size for p in (src / "data").iterdir())
            print(f"\n{rows:,} pairs ({size / 2**20:,.0f} MiB of Parquet input)", flush=True)
            plan = [("export", f, t) for f in args.formats for t in args.to] + [("stats", "-", "-")]
            for kind, fmt, to in plan:
                seconds, rss, cpu, rc = measure([kind, str(src), str(dst), fmt, to])
                label = f"{kind} {fmt} {to}" if kind == "export" else "stats (words)"
                out_mib = (
                    sum(p.stat().st_size for p in (dst / "data").iterdir()) / 2**20
                    if kind == "export" and rc == 0
                    else 0
                )
                extra = f"  {out_mib:7,.0f} MiB out" if out_mib else ""
                print(
                    f"  {label:<24} {seconds:7.2f} s {rows / seconds:11,.0f} rows/s  "
                    f"CPU {cpu:6.1f} s  peak RSS {rss:6,.0f} MiB{extra}" + (f"  (exit {rc})" if rc else ""),
                    flush=True,
                )
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
