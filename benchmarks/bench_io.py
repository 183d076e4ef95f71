"""I/O benchmark: ingest, stats and export of a synthetic TRL JSONL dataset at growing sizes.

Each measurement runs in a fresh subprocess (the real CLI), so its peak RSS is its own:
``os.wait4`` returns the child's resource usage. Run at two sizes to see whether memory grows
with the number of rows (it should not: every step streams bounded batches).

    python benchmarks/bench_io.py                      # 1M and 2M rows
    python benchmarks/bench_io.py --rows 200000        # a quick look

Prints wall seconds, rows/second, CPU seconds (all threads of the child) and peak RSS per step
and size; on a shared machine compare CPU seconds, which load disturbs less than wall time.
The generated rows are ~470 bytes of JSON (prompt ~90 characters, responses ~150-200 each,
with newlines and quotes to escape), all distinct.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_WORDS = (
    "the of and to in is it you that he was for on are with as they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him "
    "two has look more day could go come did number sound no most people my over know water than call"
).split()


def _sentences(n: int, rng: np.random.Generator) -> list[str]:
    out = []
    for _ in range(n):
        words = rng.choice(_WORDS, size=int(rng.integers(8, 20)))
        out.append(" ".join(words).capitalize() + ".")
    return out


def generate(path: Path, rows: int, seed: int = 0) -> int:
    """Write ``rows`` TRL rows (prompt/chosen/rejected strings); returns the file size."""
    rng = np.random.default_rng(seed)
    pool = _sentences(4096, rng)
    idx = rng.integers(0, len(pool), size=(rows, 5))
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            a, b, c, d, e = (pool[k] for k in idx[i])
            row = {
                "prompt": f'Question {i}: {a} What is "{b[:-1]}"?',
                "chosen": f"{c}\n{d}\n- answer {i}",
                "rejected": f"{e} {c}\n- other {i}",
            }
            f.write(dumps(row) + "\n")
    return path.stat().st_size


def measure(cmd: list[str]) -> dict[str, object]:
    """Run ``cmd``; wall seconds, peak RSS (MiB) of that child, exit code and last stderr line."""
    env = {**os.environ, "PREFCURATE_QUIET": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return {
        "seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # all threads: less noisy than wall on a busy box
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "rc": proc.returncode,
        "error": lines[-1] if proc.returncode and lines else None,
    }


def run_size(rows: int, work: Path) -> list[dict[str, object]]:
    src = work / f"trl-{rows}.jsonl"
    size = generate(src, rows)
    print(f"\n{rows:,} rows, {size / 2**20:,.0f} MiB of JSONL", flush=True)
    cli = [sys.executable, "-m", "prefcurate"]
    steps = [
        ("ingest", [*cli, "ingest", str(src), "-o", str(work / "ingested"), "--fresh", "--quiet"]),
        ("stats", [*cli, "stats", str(work / "ingested"), "--json"]),
        (
            "export",
            [
                *cli,
                "export",
                str(work / "ingested"),
                "-o",
                str(work / "exported"),
                "--format",
                "trl",
                "--to",
                "jsonl",
                "--fresh",
                "--quiet",
            ],
        ),
    ]
    results = []
    for name, cmd in steps:
        r = measure(cmd)
        r.update(step=name, rows=rows)
        results.append(r)
        if r["rc"]:
            print(f"  {name:<7} unavailable (exit {r['rc']}: {r['error']})", flush=True)
        else:
            rate = rows / float(r["seconds"])  # type: ignore[arg-type]
            print(
                f"  {name:<7} {r['seconds']:7.2f} s  {rate:10,.0f} rows/s  cpu {r['cpu_seconds']:7.2f} s"
                f"  peak RSS {r['peak_rss_mib']:6,.0f} MiB",
                flush=True,
            )
    src.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 2_000_000], help="dataset sizes")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="also print all figures as JSON")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="prefcurate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"bench_io: {os.cpu_count()} CPUs{load}, python {sys.version.split()[0]}, workdir {work}")
    results = []
    try:
        for rows in args.rows:
            results.extend(run_size(rows, work))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
