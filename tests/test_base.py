"""The stage contract: counting, rejects, manifests, skip-unchanged, crash safety."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import Field

from prefcurate.errors import InputError, StageFailed
from prefcurate.shards import Manifest, count_rows, read_table
from prefcurate.stages.base import BatchResult, Stage, StageConfig, split
from tests.conftest import hh_rows, make_stage_dir


class ShortFilterConfig(StageConfig):
    max_chars: int = Field(200, description="Drop pairs whose chosen text is longer.")


class ShortFilter(Stage):
    """A row-wise test stage: drops long chosen responses, noting the length."""

    name = "short"
    config_cls = ShortFilterConfig
    reject_extras = {"length": pa.int64()}
    calls = 0

    def process_batch(self, batch, ctx):
        type(self).calls += 1
        lengths = np.array([len(m[-1]["content"]) for m in batch.column("chosen").to_pylist()])
        return split(batch, lengths <= self.config.max_chars, "too-long", {"length": lengths})


class LosesRows(Stage):
    name = "lossy"
    config_cls = ShortFilterConfig

    def process_batch(self, batch, ctx):
        return BatchResult(pa.Table.from_batches([batch]).slice(1), consumed=batch.num_rows)


class Crashes(Stage):
    name = "crash"
    config_cls = ShortFilterConfig

    def process_batch(self, batch, ctx):
        raise RuntimeError("boom")


@pytest.fixture
def pairs_dir(tmp_path):
    rows = [
        {"prompt": r["chosen"][:80], "chosen": r["chosen"][-300:], "rejected": r["rejected"][-300:]}
        for r in hh_rows(200)
    ]
    return make_stage_dir(tmp_path / "in", rows)


def test_rows_in_equal_rows_out_plus_rejects_with_reasons(pairs_dir, tmp_path):
    manifest, skipped = ShortFilter(ShortFilterConfig(max_chars=250)).run(pairs_dir, tmp_path / "out")
    assert not skipped
    kept, rejected = count_rows(tmp_path / "out"), count_rows(tmp_path / "out", "rejects")
    assert manifest.rows_in == 200 == kept + rejected
    assert (manifest.rows_out, manifest.rows_rejected) == (kept, rejected)
    assert rejected > 0 and manifest.reject_reasons == {"too-long": rejected}
    rej = read_table(tmp_path / "out", subdir="rejects")
    assert rej.column_names[-3:] == ["length", "reject_stage", "reject_reason"]
    assert set(rej.column("reject_stage").to_pylist()) == {"short"}
    assert min(rej.column("length").to_pylist()) > 250
    # removed rows are kept whole: every input column survives in rejects
    assert set(pq.read_schema(next((pairs_dir / "data").glob("*.parquet"))).names) <= set(rej.column_names)
    ids = set(read_table(tmp_path / "out", ["id"]).column("id").to_pylist()) | set(rej.column("id").to_pylist())
    assert ids == set(read_table(pairs_dir, ["id"]).column("id").to_pylist())


def test_unchanged_rerun_is_skipped_and_an_option_change_reruns(pairs_dir, tmp_path):
    ShortFilter.calls = 0
    first, _ = ShortFilter(ShortFilterConfig(max_chars=250)).run(pairs_dir, tmp_path / "out")
    calls = ShortFilter.calls
    again, skipped = ShortFilter(ShortFilterConfig(max_chars=250)).run(pairs_dir, tmp_path / "out")
    assert skipped and ShortFilter.calls == calls and again.fingerprint == first.fingerprint
    changed, skipped = ShortFilter(ShortFilterConfig(max_chars=100)).run(pairs_dir, tmp_path / "out")
    assert not skipped and changed.fingerprint != first.fingerprint
    assert changed.rows_rejected > first.rows_rejected
    _, skipped = ShortFilter(ShortFilterConfig(max_chars=100)).run(pairs_dir, tmp_path / "out", fresh=True)
    assert not skipped


def test_manifest_records_lineage_and_params(pairs_dir, tmp_path):
    ShortFilter(ShortFilterConfig(max_chars=250)).run(pairs_dir, tmp_path / "a")
    ShortFilter(ShortFilterConfig(max_chars=150)).run(tmp_path / "a", tmp_path / "b")
    manifest = Manifest.load(tmp_path / "b")
    assert [s["stage"] for s in manifest.lineage] == ["fixture", "short", "short"]
    assert [s["params"].get("max_chars") for s in manifest.lineage[1:]] == [250, 150]
    assert manifest.lineage[-1]["rows_in"] == manifest.lineage[-2]["rows_out"]
    assert manifest.wall_seconds >= 0 and manifest.created_at


def test_a_stage_that_loses_rows_fails_and_writes_nothing(pairs_dir, tmp_path):
    with pytest.raises(StageFailed, match="rows in"):
        LosesRows(ShortFilterConfig()).run(pairs_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_crash_keeps_the_previous_output_and_leaves_no_temp(pairs_dir, tmp_path):
    ShortFilter(ShortFilterConfig(max_chars=250)).run(pairs_dir, tmp_path / "out")
    before = count_rows(tmp_path / "out")
    with pytest.raises(RuntimeError, match="boom"):
        Crashes(ShortFilterConfig()).run(pairs_dir, tmp_path / "out")
    assert count_rows(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_an_output_that_would_lose_data_is_refused(pairs_dir, tmp_path, monkeypatch):
    run = ShortFilter(ShortFilterConfig(max_chars=250)).run
    thesis = tmp_path / "notes" / "thesis.txt"
    thesis.parent.mkdir()
    thesis.write_text("years of work")
    (tmp_path / "file.txt").write_text("x")
    shutil.copytree(pairs_dir, tmp_path / "outer")  # an earlier stage output...
    nested = tmp_path / "outer" / "in"  # ...holding the input
    shutil.copytree(pairs_dir, nested)
    refused = {
        tmp_path / "notes": "not a prefcurate stage directory",  # a directory with other files
        tmp_path / "file.txt": "not a directory",
        pairs_dir: "output is the input",
        pairs_dir / "sub": "output is inside the input",
        tmp_path / "outer": "output contains the input",
    }
    for out, message in refused.items():
        with pytest.raises(InputError, match=message):
            run(nested if out == tmp_path / "outer" else pairs_dir, out)
    monkeypatch.chdir(tmp_path / "notes")
    for out in (".", "", ".."):
        with pytest.raises(InputError, match="replace the current directory"):
            run(pairs_dir, out)
    assert thesis.read_text() == "years of work" and (tmp_path / "file.txt").read_text() == "x"
    assert sorted(p.name for p in (pairs_dir).iterdir()) == ["data", "manifest.json"]
    # an empty directory and an earlier stage output are fine
    (tmp_path / "empty").mkdir()
    run(pairs_dir, tmp_path / "empty")
    assert count_rows(tmp_path / "empty") > 0
    _, skipped = ShortFilter(ShortFilterConfig(max_chars=100)).run(pairs_dir, tmp_path / "empty")
    assert not skipped


def test_a_stage_that_meets_no_row_still_writes_its_schema(tmp_path):
    empty = make_stage_dir(tmp_path / "in", [])
    manifest, _ = ShortFilter(ShortFilterConfig()).run(empty, tmp_path / "out")
    assert manifest.rows_in == manifest.rows_out == 0
    assert pq.read_schema(next((tmp_path / "out" / "data").glob("*.parquet"))).names == read_table(empty).column_names


def test_non_canonical_input_is_a_one_line_error_not_a_crash(tmp_path):
    from prefcurate.shards import write_stage_dir

    as_text = pa.table({"id": ["a"], "prompt": ["p"], "chosen": ["c"], "rejected": ["r"]})  # a TRL layout
    write_stage_dir(tmp_path / "trl", [as_text], stage="outside")
    with pytest.raises(InputError, match="column chosen is string, not the canonical list"):
        ShortFilter(ShortFilterConfig()).run(tmp_path / "trl", tmp_path / "out")
    write_stage_dir(tmp_path / "kto", [as_text.drop_columns(["chosen", "rejected"])], stage="outside")
    with pytest.raises(InputError, match="needs column"):
        ShortFilter(ShortFilterConfig()).run(tmp_path / "kto", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kto", "trl"]  # nothing written, no temp left


def test_the_output_guard_reads_manifests_follows_links_and_expands_home(pairs_dir, tmp_path, monkeypatch):
    run = ShortFilter(ShortFilterConfig(max_chars=250)).run
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "a web app"}')  # a manifest, but not prefcurate's
    (webapp / "index.html").write_text("keep")
    with pytest.raises(InputError, match="not a prefcurate stage directory"):
        run(pairs_dir, webapp)
    assert (webapp / "index.html").read_text() == "keep"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="afile is not a directory"):
        run(pairs_dir, tmp_path / "afile" / "sub")
    with pytest.raises(InputError, match="unusable as an output directory"):
        run(pairs_dir, tmp_path / ("x" * 300))
    with pytest.raises(InputError, match="request cache"):  # WORKDIR/cache holds the judge's cache
        run(pairs_dir, tmp_path / "cache")
    target = tmp_path / "big" / "target"
    target.mkdir(parents=True)
    (tmp_path / "link").symlink_to(target)
    run(pairs_dir, tmp_path / "link")  # written through the link, which stays a link
    assert (tmp_path / "link").is_symlink() and count_rows(target) > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run(pairs_dir, "~/out")
    assert count_rows(tmp_path / "home" / "out") > 0


def test_an_export_directory_is_not_a_stage_input(pairs_dir, tmp_path):
    from prefcurate.stages.export import ExportConfig, ExportStage

    ExportStage(ExportConfig(format="trl-chat")).run(pairs_dir, tmp_path / "export")
    with pytest.raises(InputError, match="an export"):
        ShortFilter(ShortFilterConfig()).run(tmp_path / "export", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_input_shard_is_one_line_naming_it(pairs_dir, tmp_path, cli):
    shard = next((pairs_dir / "data").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    third = len(data) // 3
    data[third : third + 4000] = bytes(min(4000, len(data) - third))  # zeros over a column chunk
    shard.write_bytes(bytes(data))
    result = cli("filter", pairs_dir, "-o", tmp_path / "out", "--min-length-ratio", "0.5")
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and shard.name in result.stderr
    assert "unreadable shard" in result.stderr and not (tmp_path / "out").exists()
