"""Stage directories: shard rotation, schema conformance, atomic commit."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from prefcurate.errors import InputError
from prefcurate.shards import (
    Manifest,
    ShardWriter,
    StageOutput,
    count_rows,
    iter_batches,
    read_table,
    require_stage_dir,
    shard_paths,
)


def _table(start: int, n: int, note=None) -> pa.Table:
    return pa.table(
        {
            "id": [str(i) for i in range(start, start + n)],
            "note": pa.array([note] * n, pa.string() if note else pa.null()),
        }
    )


def test_writer_rotates_shards_and_keeps_order(tmp_path):
    writer = ShardWriter(tmp_path / "data", rows_per_shard=250)
    for start in range(0, 1000, 90):
        writer.write(_table(start, min(90, 1000 - start), "x"))
    writer.close()
    paths = shard_paths(tmp_path)
    assert [p.name for p in paths] == [f"part-0000{i}.parquet" for i in range(4)]
    ids = [r for b in iter_batches(tmp_path) for r in b.column("id").to_pylist()]
    assert ids == [str(i) for i in range(1000)]
    assert count_rows(tmp_path) == 1000


def test_a_large_last_shard_is_written_as_two_halves(tmp_path):
    """What is left at close, from twice ``_SPLIT_ROWS`` rows, goes out as two shards (one per
    writer thread); rows keep their order, and full shards before it are unchanged."""
    from prefcurate.shards import _SPLIT_ROWS

    n = 2 * _SPLIT_ROWS + 1
    writer = ShardWriter(tmp_path / "data", rows_per_shard=100_000)
    for start in range(0, n, 5000):
        writer.write(_table(start, min(5000, n - start), "x"))
    writer.close()
    sizes = [count_rows_of(p) for p in shard_paths(tmp_path)]
    assert sizes == [_SPLIT_ROWS + 1, _SPLIT_ROWS]
    ids = [r for b in iter_batches(tmp_path) for r in b.column("id").to_pylist()]
    assert ids == [str(i) for i in range(n)]

    small = ShardWriter(tmp_path / "small" / "data", rows_per_shard=100_000)
    small.write(_table(0, 2 * _SPLIT_ROWS - 1, "x"))
    small.close()
    assert [count_rows_of(p) for p in shard_paths(tmp_path / "small")] == [2 * _SPLIT_ROWS - 1]


def count_rows_of(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def test_iter_batches_from_a_start_row(tmp_path):
    """Rows ``[start, stop)``, whichever shard and row group each falls in, in order: shards of
    one row group (as prefcurate writes them) and of several (as other writers do)."""
    import pyarrow.parquet as pq

    writer = ShardWriter(tmp_path / "one" / "data", rows_per_shard=250)
    writer.write(_table(0, 1000, "x"))
    writer.close()
    (tmp_path / "many" / "data").mkdir(parents=True)
    for k, (lo, hi) in enumerate([(0, 430), (430, 1000)]):
        pq.write_table(
            _table(lo, hi - lo, "x"), tmp_path / "many" / "data" / f"part-{k:05d}.parquet", row_group_size=64
        )
    assert pq.ParquetFile(tmp_path / "many" / "data" / "part-00000.parquet").metadata.num_row_groups == 7
    for layout in ("one", "many"):
        for start in (0, 1, 63, 64, 65, 249, 250, 251, 429, 430, 431, 777, 999, 1000, 1500):
            for batch_rows in (7, 100, 16_384):
                got = [
                    r
                    for b in iter_batches(tmp_path / layout, ["id"], batch_rows, start=start)
                    for r in b.column("id").to_pylist()
                ]
                assert got == [str(i) for i in range(start, 1000)], (layout, start, batch_rows)
                for stop in (start, start + 1, start + 63, start + 250, 1000, 1200):
                    got = [
                        r
                        for b in iter_batches(tmp_path / layout, ["id"], batch_rows, start=start, stop=stop)
                        for r in b.column("id").to_pylist()
                    ]
                    assert got == [str(i) for i in range(start, min(stop, 1000))], (layout, start, stop, batch_rows)


def test_writer_widens_a_column_first_seen_as_null(tmp_path):
    writer = ShardWriter(tmp_path / "data", rows_per_shard=10_000)
    writer.write(_table(0, 5))
    writer.write(_table(5, 5, "later"))
    writer.close()
    notes = read_table(tmp_path).column("note").to_pylist()
    assert notes == [None] * 5 + ["later"] * 5


def test_writer_refuses_a_changed_column_set(tmp_path):
    writer = ShardWriter(tmp_path / "data")
    writer.write(_table(0, 3, "a"))
    with pytest.raises(ValueError, match="schema changed"):
        writer.write(pa.table({"id": ["9"]}))


def test_empty_output_keeps_its_schema(tmp_path):
    writer = ShardWriter(tmp_path / "data")
    writer.write(_table(0, 0, "a").cast(pa.schema([("id", pa.string()), ("note", pa.string())])))
    writer.close()
    assert read_table(tmp_path).schema.names == ["id", "note"]
    assert count_rows(tmp_path) == 0


def _manifest(**kw) -> Manifest:
    return Manifest(stage="t", version="0", params={}, input=None, input_fingerprint="i", fingerprint="f", **kw)


def test_commit_is_atomic_and_replaces_the_old_directory(tmp_path):
    out = StageOutput(tmp_path / "stage")
    out.data.write(_table(0, 3, "a"))
    assert not (tmp_path / "stage").exists()  # nothing visible before commit
    out.commit(_manifest(rows_in=3, rows_out=3))
    again = StageOutput(tmp_path / "stage")
    again.data.write(_table(0, 1, "b"))
    again.commit(_manifest(rows_in=1, rows_out=1))
    assert count_rows(tmp_path / "stage") == 1
    assert json.loads((tmp_path / "stage" / "manifest.json").read_text())["lineage"][-1]["rows_out"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]  # no temp or trash left


def test_abort_leaves_the_previous_output(tmp_path):
    out = StageOutput(tmp_path / "stage")
    out.data.write(_table(0, 2, "a"))
    out.commit(_manifest(rows_in=2, rows_out=2))
    failed = StageOutput(tmp_path / "stage")
    failed.data.write(_table(0, 5, "b"))
    failed.abort()
    assert count_rows(tmp_path / "stage") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_reading_missing_columns_or_non_stage_dirs_is_an_input_error(tmp_path):
    out = StageOutput(tmp_path / "stage")
    out.data.write(_table(0, 2, "a"))
    out.commit(_manifest())
    with pytest.raises(InputError, match="margin_mean"):
        list(iter_batches(tmp_path / "stage", columns=["id", "margin_mean"]))
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a prefcurate stage directory"):
        require_stage_dir(tmp_path / "plain")
    with pytest.raises(InputError, match="no such directory"):
        require_stage_dir(tmp_path / "nope")
