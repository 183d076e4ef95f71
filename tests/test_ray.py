"""The Ray engine gives the same output as the local engine, on a local Ray instance.

Ray starts once for this module (2 CPUs, a small object store). Tests that need Ray skip when
it is not installed; the missing-dependency error is tested by hiding the module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pydantic import Field

from prefcurate.engines import get_engine, is_row_wise, is_two_phase, map_batches
from prefcurate.errors import MissingDependency
from prefcurate.schema import render_text
from prefcurate.shards import Manifest, read_table, shard_paths
from prefcurate.stages.base import BatchResult, Stage, StageConfig, StageContext, StageInput, split
from tests.conftest import hh_rows, make_stage_dir, write_jsonl

# Ray Data warns about its own deprecated settings when it copies its context to workers.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _lengths(batch: pa.RecordBatch | pa.Table, column: str) -> np.ndarray:
    return np.array([len(render_text(m)) for m in batch.column(column).to_pylist()], dtype=np.float64)


class RatioConfig(StageConfig):
    """Drop pairs whose chosen response is much longer than the rejected one."""

    max_ratio: float = Field(2.0, description="Largest chosen/rejected length ratio kept.")


class RatioStage(Stage):
    """Row-wise: Ray maps ``process_batch`` whole."""

    name = "ratio-test"
    config_cls = RatioConfig
    reject_extras = {"ratio": pa.float64()}

    def process_batch(self, batch: pa.RecordBatch, ctx: StageContext) -> BatchResult:
        ratio = _lengths(batch, "chosen") / np.maximum(_lengths(batch, "rejected"), 1.0)
        ctx.extra["batches"] = ctx.extra.get("batches", 0) + 1
        ctx.extra["pid"] = os.getpid()
        return split(batch, ratio <= self.config.max_ratio, "length-ratio", extra={"ratio": ratio})


class MedianConfig(StageConfig):
    """Keep pairs whose chosen response is at least the global median length."""


class MedianStage(Stage):
    """Two-phase: a global first pass (the median) on the driver, then row-wise by row offset."""

    name = "median-test"
    config_cls = MedianConfig

    def plan(self, source: StageInput, ctx: StageContext) -> dict[str, Any]:
        lengths = np.concatenate([_lengths(b, "chosen") for b in source.batches(columns=["chosen"])])
        ctx.extra["median"] = float(np.median(lengths))
        return {"median": float(np.median(lengths))}

    def apply_batch(self, batch: pa.RecordBatch, plan: dict[str, Any], offset: int, ctx: StageContext) -> BatchResult:
        table = pa.Table.from_batches([batch]).append_column(
            "row", pa.array(np.arange(offset, offset + batch.num_rows))
        )
        ctx.extra["pid"] = os.getpid()
        return split(table, _lengths(batch, "chosen") >= plan["median"], "short")

    def process(self, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]:
        assert source is not None
        plan, offset = self.plan(source, ctx), 0
        for batch in source.batches():
            yield self.apply_batch(batch, plan, offset, ctx)
            offset += batch.num_rows


class ChosenLengths:
    """Per-batch work a global step hands to ``engines.map_batches`` (built once per worker)."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def __call__(self, batch: pa.RecordBatch) -> tuple[int, np.ndarray]:
        return self.pid, _lengths(batch, "chosen")


class LengthColumnStage(Stage):
    """Global: scores every row through ``map_batches`` first, then appends the column."""

    name = "length-column-test"
    config_cls = MedianConfig

    def process(self, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]:
        assert source is not None
        parts = list(map_batches(ctx, ChosenLengths, source, columns=["chosen"], batch_rows=70, uses_gpu=True))
        ctx.extra["pids"] = sorted({pid for pid, _ in parts})
        lengths, offset = np.concatenate([values for _, values in parts]), 0
        for batch in source.batches():
            table = pa.Table.from_batches([batch])
            yield BatchResult(table.append_column("chosen_chars", pa.array(lengths[offset : offset + batch.num_rows])))
            offset += batch.num_rows


class DriverStage(Stage):
    """Global (overrides ``process`` only): any engine runs it in the driver process."""

    name = "driver-test"
    config_cls = MedianConfig

    def process(self, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]:
        assert source is not None
        ctx.extra["pid"] = os.getpid()
        for batch in source.batches():
            yield split(batch, _lengths(batch, "chosen") >= 100, "short")


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    # Workers import stages by reference; this module is not importable there, so ship it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("ray-home")))  # Ray writes ~/.ray at start
        if started:
            ray.init(num_cpus=2, object_store_memory=96 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def sharded_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 real HH-RLHF pairs in 4 shards (the unit of Ray's parallelism)."""
    from prefcurate.schema import assistant, user

    rows = []
    for r in hh_rows(600):
        head, sep, answer = r["chosen"].rpartition("\n\nAssistant:")
        rejected = r["rejected"].rpartition("\n\nAssistant:")[2]
        rows.append(
            {"prompt": user(head.strip()), "chosen": assistant(answer.strip()), "rejected": assistant(rejected.strip())}
        )
    base = tmp_path_factory.mktemp("ray-input")
    whole = make_stage_dir(base / "whole", rows)
    RatioStage(RatioConfig(max_ratio=1e9)).run(whole, base / "sharded", rows_per_shard=160)
    assert len(shard_paths(base / "sharded")) == 4
    return base / "sharded"


def _not_on_the_driver(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("ran in the driver process, not on a Ray worker")


def _run_both(
    stage: Stage,
    src: Path,
    tmp_path: Path,
    ray_engine: Any,
    *,
    rejects: bool = True,
    forbid: Any = None,
    model_columns: Sequence[str] = (),
) -> tuple[Manifest, Manifest]:
    """Local then Ray; ``forbid`` (a pytest MonkeyPatch and a list of (owner, attribute)) makes
    those fail in this process for the Ray run, so equal output proves workers did that work.
    ``model_columns``: float columns computed by a torch model, equal to float rounding only
    (a Ray actor runs torch on one thread, the driver on all cores, and a product summed in
    another order can differ in its last bit); every other column must be equal exactly."""
    local, _ = stage.run(src, tmp_path / "local")
    if forbid is not None:
        monkeypatch, targets = forbid
        for owner, attr in targets:
            monkeypatch.setattr(owner, attr, _not_on_the_driver)
    remote, skipped = stage.run(src, tmp_path / "ray", engine=ray_engine)
    assert not skipped
    for sub in ("data", "rejects") if rejects else ("data",):
        a, b = read_table(tmp_path / "local", subdir=sub), read_table(tmp_path / "ray", subdir=sub)
        assert a.num_rows > 0
        assert a.schema.equals(b.schema, check_metadata=False)
        close = [c for c in model_columns if c in a.column_names]
        for c in close:
            np.testing.assert_allclose(b[c].to_numpy(), a[c].to_numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{sub}.{c}")
        a, b = a.drop_columns(close), b.drop_columns(close)
        assert a.equals(b), f"{sub}: ray output differs from local"
    for m in (local, remote):
        assert m.rows_in == m.rows_out + m.rows_rejected
    assert (local.rows_in, local.rows_out, local.reject_reasons) == (
        remote.rows_in,
        remote.rows_out,
        remote.reject_reasons,
    )
    return local, remote


def test_row_wise_stage_runs_in_ray_workers_with_local_output(
    ray_local: Any, sharded_input: Path, tmp_path: Path
) -> None:
    from prefcurate.engines.ray_engine import RayEngine

    stage = RatioStage(RatioConfig(max_ratio=1.5))
    assert is_row_wise(stage) and not is_two_phase(stage)
    # Small batches: Ray's batch boundaries differ from the local engine's, rows must not.
    local, remote = _run_both(stage, sharded_input, tmp_path, RayEngine(batch_rows=64))
    assert local.extra["pid"] == os.getpid() != remote.extra["pid"]
    assert remote.extra["batches"] == sum(-(-n // 64) for n in (160, 160, 160, 120))  # summed across workers
    rejects = read_table(tmp_path / "ray", subdir="rejects")
    assert pc.min(rejects["ratio"]).as_py() > 1.5


def test_two_phase_stage_plans_on_driver_and_applies_by_offset(
    ray_local: Any, sharded_input: Path, tmp_path: Path
) -> None:
    from prefcurate.engines.ray_engine import RayEngine

    stage = MedianStage(MedianConfig())
    assert is_two_phase(stage)
    local, remote = _run_both(stage, sharded_input, tmp_path, RayEngine(batch_rows=50))
    assert remote.extra["median"] == local.extra["median"]
    assert remote.extra["pid"] != os.getpid()
    kept = read_table(tmp_path / "ray")["row"].to_pylist()
    rejected = read_table(tmp_path / "ray", subdir="rejects")["row"].to_pylist()
    assert sorted(kept + rejected) == list(range(600))  # every global offset exactly once


def test_map_batches_inside_a_global_step_uses_the_actor_pool(
    ray_local: Any, sharded_input: Path, tmp_path: Path
) -> None:
    from prefcurate.engines.ray_engine import RayEngine

    local, _ = LengthColumnStage(MedianConfig()).run(sharded_input, tmp_path / "local")
    remote, _ = LengthColumnStage(MedianConfig()).run(sharded_input, tmp_path / "ray", engine=RayEngine())
    assert local.extra["pids"] == [os.getpid()] and os.getpid() not in remote.extra["pids"]
    a, b = read_table(tmp_path / "local"), read_table(tmp_path / "ray")
    assert a.num_rows == 600 and a.equals(b)
    assert a["chosen_chars"].to_pylist() == _lengths(a, "chosen").tolist()  # aligned with its rows


def test_global_stage_runs_on_driver(ray_local: Any, sharded_input: Path, tmp_path: Path) -> None:
    from prefcurate.engines.ray_engine import RayEngine

    stage = DriverStage(MedianConfig())
    assert not is_row_wise(stage) and not is_two_phase(stage)
    local, remote = _run_both(stage, sharded_input, tmp_path, RayEngine())
    assert local.extra["pid"] == remote.extra["pid"] == os.getpid()


@pytest.fixture(scope="module")
def scored(ray_local: Any, sharded_input: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The real score stage (embedding-bt on the static model) under both engines, its
    second pass forbidden in this process for the Ray run: (local output, ray output)."""
    from prefcurate.engines.ray_engine import RayEngine
    from prefcurate.stages.score import ScoreConfig, ScoreStage

    base = tmp_path_factory.mktemp("ray-score")
    stage = ScoreStage(ScoreConfig(member=["embedding-bt"], embed_model="static", folds=2, seeds=1))
    assert is_two_phase(stage)
    with pytest.MonkeyPatch.context() as mp:
        local, remote = _run_both(
            stage,
            sharded_input,
            base,
            RayEngine(batch_rows=64),
            rejects=False,
            forbid=(mp, [(ScoreStage, "apply_batch")]),
        )
    # The plan (cross-fitting, standardization) ran on the driver: its figures are the same.
    assert remote.extra["strength"] == local.extra["strength"]
    assert remote.extra["members"]["embedding_bt"]["scale"] == local.extra["members"]["embedding_bt"]["scale"]
    data = read_table(base / "ray")
    assert data.num_rows == 600 and {"margin__embedding_bt", "margin_mean", "margin_agree"} <= set(data.column_names)
    return base / "local", base / "ray"


def test_real_score_stage_applies_on_ray_workers(scored: tuple[Path, Path]) -> None:
    local, remote = scored
    assert read_table(local).equals(read_table(remote))


def test_real_filter_stage_applies_on_ray_workers(
    scored: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefcurate.engines.ray_engine import RayEngine
    from prefcurate.stages.filter import FilterConfig, FilterStage

    cfg = FilterConfig(
        flip=True,
        flip_below="q0.1",
        drop_ambiguous=True,
        ambiguous_std_above="q0.9",
        max_length_ratio=3.0,
        keep_top_fraction=0.8,
    )
    stage = FilterStage(cfg)
    assert is_two_phase(stage) and not is_row_wise(stage)
    forbid = (monkeypatch, [(FilterStage, "apply_batch")])
    local, remote = _run_both(stage, scored[1], tmp_path, RayEngine(batch_rows=50), forbid=forbid)
    assert remote.extra == local.extra  # rules, thresholds, strength: decided once, on the driver
    assert local.extra["rules"]["flip"] > 0 and set(local.reject_reasons) == {"ambiguous", "below-top", "length-ratio"}
    flipped = [
        read_table(tmp_path / "ray", subdir=sub).filter(pc.field("flipped")).num_rows for sub in ("data", "rejects")
    ]
    assert sum(flipped) == local.extra["rules"]["flip"]


@pytest.fixture(scope="module")
def hf_rm(sharded_input: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random reward model whose vocabulary covers the input (built here, offline)."""
    from tests.test_score import _build_rm

    texts = read_table(sharded_input, columns=["chosen"])["chosen"].to_pylist()
    vocab = sorted({w for msgs in texts for w in render_text(msgs).split()})[:300] + ["user", "assistant", ":"]
    return _build_rm(tmp_path_factory.mktemp("ray-rm") / "rm", vocab, template=True)


def test_hf_reward_member_forward_passes_run_on_ray_actors(
    ray_local: Any, sharded_input: Path, hf_rm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefcurate.backends import reward_hf
    from prefcurate.engines.ray_engine import RayEngine
    from prefcurate.stages.score import ScoreConfig, ScoreStage

    stage = ScoreStage(ScoreConfig(member=[f"hf:{hf_rm}"], max_length=64, device="cpu"))
    # The model is loaded and run only in actors: the driver may neither build nor call it.
    forbid = (monkeypatch, [(reward_hf.WindowScorer, "__init__"), (reward_hf.WindowScorer, "__call__")])
    scores = ("reward_chosen__hf_rm", "reward_rejected__hf_rm", "margin__hf_rm", "margin_mean", "margin_worst")
    local, remote = _run_both(
        stage, sharded_input, tmp_path, RayEngine(), rejects=False, forbid=forbid, model_columns=scores
    )
    a, b = local.extra["members"]["hf_rm"], remote.extra["members"]["hf_rm"]
    assert a == b and a["device"] == "cpu" and a["truncated"] > 0  # counted in actors, summed on the driver


@pytest.mark.gpu
def test_hf_reward_member_gets_a_gpu_per_ray_actor(
    ray_local: Any, sharded_input: Path, hf_rm: Path, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not ray_local.cluster_resources().get("GPU"):
        pytest.skip("no CUDA device")
    from prefcurate.engines.ray_engine import RayEngine
    from prefcurate.stages.score import ScoreConfig, ScoreStage

    cpu, _ = ScoreStage(ScoreConfig(member=[f"hf:{hf_rm}"], device="cpu")).run(sharded_input, tmp_path / "cpu")
    # device=auto: an actor sees CUDA only when Ray gave it a GPU (num_gpus=1).
    gpu, _ = ScoreStage(ScoreConfig(member=[f"hf:{hf_rm}"])).run(sharded_input, tmp_path / "gpu", engine=RayEngine())
    info = gpu.extra["members"]["hf_rm"]
    assert info["device"] == "cuda" and info["dtype"] == "bfloat16"
    a, b = (read_table(tmp_path / d)["reward_chosen__hf_rm"].to_numpy() for d in ("cpu", "gpu"))
    np.testing.assert_allclose(b, a, atol=0.05)  # bf16 rounding only


def test_cli_engine_ray_matches_local(ray_local: Any, sharded_input: Path, tmp_path: Path, cli: Any) -> None:
    for engine in ("local", "ray"):
        result = cli(
            "filter", sharded_input, "-o", tmp_path / engine, "--max-length-ratio", "1.5", "--engine", engine, "-q"
        )
        assert result.exit_code == 0, result.stderr
    assert read_table(tmp_path / "local").equals(read_table(tmp_path / "ray"))


def test_pipeline_engine_ray_matches_local(ray_local: Any, tmp_path: Path, cli: Any) -> None:
    raw = write_jsonl(tmp_path / "hh.jsonl", hh_rows(200))
    for engine in ("local", "ray"):
        recipe = tmp_path / f"{engine}.yaml"
        recipe.write_text(
            f"name: {engine}\nworkdir: runs/{engine}\ninput:\n  sources: [{raw}]\n"
            "stages:\n  - filter: {max_length_ratio: 2.0}\n"
            f"output:\n  dir: out/{engine}\n  format: trl\n"
        )
        result = cli("pipeline", recipe, "--engine", engine, "-q")
        assert result.exit_code == 0, result.stderr
    local, remote = read_table(tmp_path / "out" / "local"), read_table(tmp_path / "out" / "ray")
    assert local.num_rows > 0 and local.equals(remote)


def test_engine_ray_without_ray_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cli: Any) -> None:
    src = make_stage_dir(tmp_path / "in", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    for name in ("ray", "ray.data"):
        monkeypatch.setitem(sys.modules, name, None)  # what Python does when the package is absent
    with pytest.raises(MissingDependency, match=r"prefcurate\[ray\]"):
        get_engine("ray")
    result = cli("filter", src, "-o", tmp_path / "out", "--engine", "ray")
    assert result.exit_code == 2
    assert "ray is not installed" in result.stderr and "pip install 'prefcurate[ray]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_engine_is_rejected(cli: Any, tmp_path: Path) -> None:
    src = make_stage_dir(tmp_path / "in", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    result = cli("filter", src, "-o", tmp_path / "out", "--engine", "spark")
    assert result.exit_code == 2
    assert "spark" in result.stderr


def test_an_unreachable_ray_address_is_one_line_at_once(tmp_path, cli, monkeypatch):
    import socket

    import ray

    if ray.is_initialized():  # an earlier test's local Ray: the address is checked when Ray starts
        ray.shutdown()

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    src = make_stage_dir(tmp_path / "in", [{"prompt": "p", "chosen": "a b", "rejected": "c"}])
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    result = cli("filter", src, "-o", tmp_path / "out", "--drop-ties", "--engine", "ray")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "out").exists()
