"""Judge throughput against a local OpenAI-compatible server with a fixed latency.

The server (tests/fake_openai.py) runs in its own process on 127.0.0.1, answers every
request after ``--latency`` seconds and serves hundreds of connections at once, so the
figures measure the judge stage (client, limiter, cache, Parquet), not the server. For each
concurrency it runs the whole stage on real HH-RLHF pairs (prompts tagged with a copy
number so every request is distinct) and prints requests/second and the ratio to the ideal
concurrency / latency. Then it reruns the last setting (``--fresh``, same cache) and prints
how many requests the rerun sent: the target is 0.

    .venv/bin/python benchmarks/bench_judge.py [--latency 0.1] [--seconds 4]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prefcurate.stages.judge import JudgeConfig, JudgeStage  # noqa: E402
from tests.conftest import make_stage_dir  # noqa: E402

HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def start_server(latency: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fake_openai.py"), "--delay", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    return proc, f"http://127.0.0.1:{line[1]}/v1"


def server_count(base_url: str) -> int:
    with urllib.request.urlopen(f"{base_url}/stats") as response:
        return json.load(response)["requests"]


def hh_pairs(n: int) -> list[dict[str, str]]:
    """``n`` pairs from HH-RLHF: the last Assistant turn is the response, the rest the prompt."""
    base = []
    with gzip.open(HH, "rt") as f:
        for line in f:
            row = json.loads(line)
            head, _, chosen = row["chosen"].rpartition("\n\nAssistant:")
            _, _, rejected = row["rejected"].rpartition("\n\nAssistant:")
            base.append((head.strip(), chosen.strip(), rejected.strip()))
    return [
        {"prompt": f"{p} (copy {i // len(base)})", "chosen": c, "rejected": r}
        for i, (p, c, r) in ((i, base[i % len(base)]) for i in range(n))
    ]


def run(directory: Path, base_url: str, concurrency: int, fresh: bool = False) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, requests the server saw) for one stage run."""
    config = JudgeConfig(model="fake-judge", base_url=base_url, concurrency=concurrency, max_tokens=16)
    before = server_count(base_url)
    started, cpu = time.perf_counter(), time.process_time()
    JudgeStage(config).run(directory / "in", directory / "out", workdir=directory, fresh=fresh)
    return time.perf_counter() - started, time.process_time() - cpu, server_count(base_url) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--seconds", type=float, default=4.0, help="ideal duration of each run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 64, 256])
    args = parser.parse_args()
    proc, base_url = start_server(args.latency)
    try:
        print(f"server {base_url}, latency {args.latency * 1000:.0f} ms, swap on (2 requests per pair)")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print("cpu ms/req: this process's CPU time per request (stage, client, cache, Parquet)")
        head = ("concurrency", "requests", "seconds", "req/s", "ideal", "ratio", "cpu ms/req")
        print(" ".join(f"{h:>11}" for h in head))
        JudgeStage(JudgeConfig(model="warm-up", base_url=base_url))  # imports outside the timings
        last = None
        for c in args.concurrency:
            ideal = c / args.latency
            n_pairs = max(c, int(ideal * args.seconds / 2))
            directory = Path(tempfile.mkdtemp(prefix=f"bench-judge-{c}-"))
            make_stage_dir(directory / "in", hh_pairs(n_pairs))
            seconds, cpu, requests = run(directory, base_url, c)
            rate = requests / seconds
            row = (c, requests, f"{seconds:.2f}", f"{rate:.1f}", f"{ideal:.1f}", f"{rate / ideal:.2f}")
            print(" ".join(f"{v:>11}" for v in (*row, f"{cpu / requests * 1000:.2f}")))
            last = (directory, c)
        if last is not None:
            seconds, _, requests = run(last[0], base_url, last[1], fresh=True)
            print(f"rerun (--fresh, same cache) at concurrency {last[1]}: {requests} requests in {seconds:.2f} s")
        print(f"load average {os.getloadavg()[0]:.1f}")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
