"""Test isolation: HOME, HF_HOME and prefcurate's env vars point into tmp dirs; the model
cache (embeddings, distilled static models) is shared for the session so a model is built
once per worker, not once per test."""

from __future__ import annotations

import gzip
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_DATA = REPO / "sample_data"


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefcurate-cache")


@pytest.fixture(autouse=True)
def isolate(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, model_cache_dir: Path
) -> None:
    for key in list(os.environ):
        if key.startswith("PREFCURATE_") or key in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "HF_TOKEN", "RAY_ADDRESS"):
            monkeypatch.delenv(key, raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("PREFCURATE_CACHE_DIR", str(model_cache_dir))
    monkeypatch.setenv("PREFCURATE_QUIET", "1")
    monkeypatch.chdir(tmp_path)


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def hh_rows(n: int | None = None) -> list[dict]:
    """Real HH-RLHF harmless-base test rows: {'chosen': transcript, 'rejected': transcript}."""
    rows = []
    with gzip.open(shared("hh-rlhf-harmless-base-test.jsonl.gz"), "rt") as f:
        for line in f:
            rows.append(json.loads(line))
            if n is not None and len(rows) >= n:
                break
    return rows


def llmbar_rows(subset: str = "natural") -> list[dict]:
    return json.loads(shared("llmbar", f"{subset}.json").read_text())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli():
    """Run the real entry point (with its error boundary) as a user would; capture output."""
    from prefcurate.cli.app import main

    def run(*args: str | Path) -> CliResult:
        runner = CliRunner()
        with runner.isolation() as (out, err, *_):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # --debug lets errors through, as Python would print them
                traceback.print_exc(file=sys.stderr)
                sys.stderr.flush()
                code = 1
            return CliResult(code, out.getvalue().decode(), err.getvalue().decode())

    return run


def make_stage_dir(path: Path, pairs: list[dict], stage: str = "fixture") -> Path:
    """Write canonical rows as a finished stage directory (for unit tests of later stages).

    ``pairs``: dicts with ``prompt``/``chosen``/``rejected`` as strings or message lists, and
    optional ``id``, ``source``, ``tie``, ratings and any extra columns.
    """
    import pyarrow as pa

    from prefcurate.schema import SCHEMA, assistant, pair_id, user
    from prefcurate.shards import write_stage_dir

    def msgs(value, role):
        if isinstance(value, str):
            return user(value) if role == "user" else assistant(value)
        return value

    rows = []
    for p in pairs:
        prompt, chosen, rejected = msgs(p["prompt"], "user"), msgs(p["chosen"], "a"), msgs(p["rejected"], "a")
        row = {
            "id": p.get("id") or pair_id(prompt, chosen, rejected),
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "source": p.get("source", "fixture"),
            "tie": bool(p.get("tie", False)),
            "chosen_rating": p.get("chosen_rating"),
            "rejected_rating": p.get("rejected_rating"),
        }
        row.update({k: v for k, v in p.items() if k not in row and k not in ("prompt", "chosen", "rejected")})
        rows.append(row)
    extra = [k for k in (rows[0] if rows else {}) if k not in SCHEMA.names]
    table = pa.Table.from_pylist(
        rows, schema=pa.schema([*SCHEMA, *(pa.field(k, pa.array([r[k] for r in rows]).type) for k in extra)])
    )
    write_stage_dir(path, [table], stage=stage, key=[r["id"] for r in rows])
    return path


# The transformer size of the tiny random reward models the tests build (tests/test_score.py, test_reward.py)
TINY_LAYERS = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
