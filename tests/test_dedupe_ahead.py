"""The exact pass's read-ahead: keys hashed on a helper thread in the encoder's gaps."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from prefcurate.errors import InputError
from prefcurate.shards import iter_batches
from prefcurate.stages.dedupe import _units
from prefcurate.stages.dedupe_ahead import IdleGate, ReadAhead
from prefcurate.stages.dedupe_keys import pair_keys
from tests.conftest import llmbar_rows, make_stage_dir

OPTIONS = ["case", "whitespace", "nfkc"]
COLUMNS = ["id", "prompt", "chosen", "rejected", "tie"]


def _batches(tmp_path, rows: int = 90, batch_rows: int = 25) -> list[pa.RecordBatch]:
    pairs = [
        {"id": f"r{k}", "prompt": r["input"], "chosen": r["output_1"], "rejected": r["output_2"]}
        for k, r in enumerate(llmbar_rows("natural")[:rows])
    ]
    pairs.append({**pairs[0], "id": "copy", "prompt": "  " + pairs[0]["prompt"].upper()})
    pairs.append({**pairs[1], "id": "swap", "chosen": pairs[1]["rejected"], "rejected": pairs[1]["chosen"]})
    make_stage_dir(tmp_path / "in", pairs)
    return list(iter_batches(tmp_path / "in", COLUMNS, batch_rows))


def _expected(batches):
    return [pair_keys(b, OPTIONS, unordered=True, with_prompts=True) for b in batches]


def _same(got, want):
    assert len(got) == len(want)
    for (batch, keys, _), ref in zip(got, want, strict=True):
        assert isinstance(batch, pa.RecordBatch)
        assert np.array_equal(keys.group, ref.group)
        assert np.array_equal(keys.orientation, ref.orientation)
        assert keys.prompt_hashes == ref.prompt_hashes


def test_the_caller_alone_gets_every_key_when_the_gate_stays_shut(tmp_path):
    batches = _batches(tmp_path)
    gate = IdleGate()
    with gate.busy():  # the encoder holds every core for the whole run: the helper never starts
        ahead = ReadAhead(iter(batches), OPTIONS, True, True, gate, slice_rows=7)
        try:
            got = list(ahead)
        finally:
            ahead.close()
    _same(got, _expected(batches))
    assert (ahead.helper_reads, ahead.helper_tasks) == (0, 0)
    assert ahead.caller_reads == len(batches)
    assert ahead.caller_tasks == sum(-(-b.num_rows // 7) for b in batches)
    # the keys hold real answers: the upper-cased copy shares row 0's key, the swap row 1's
    groups = np.concatenate([k.group for _, k, _ in got])
    orient = np.concatenate([k.orientation for _, k, _ in got])
    assert groups[-2] == groups[0] and groups[-1] == groups[1] and orient[-1] != orient[1]
    assert len(set(groups.tolist())) == len(groups) - 2


def test_the_helper_reads_and_hashes_ahead_while_the_gate_is_open(tmp_path):
    batches = _batches(tmp_path)
    tasks = [-(-b.num_rows // 7) for b in batches]
    ahead = ReadAhead(iter(batches), OPTIONS, True, True, IdleGate(), slice_rows=7)

    def settle(units: int) -> None:  # the caller "embeds" while the helper reads and hashes ahead
        deadline = time.monotonic() + 20
        while (ahead.helper_reads, ahead.helper_tasks) != (units, sum(tasks[:units])):
            assert time.monotonic() < deadline, (ahead.helper_reads, ahead.helper_tasks)
            time.sleep(0.005)

    try:
        got = []
        settle(1)
        for item in ahead:
            got.append(item)
            settle(min(len(got) + 1, len(batches)))  # depth 1: the next unit, no further
    finally:
        ahead.close()
    _same(got, _expected(batches))
    assert (ahead.helper_reads, ahead.caller_reads) == (len(batches), 0)
    assert (ahead.helper_tasks, ahead.caller_tasks) == (sum(tasks), 0)


def test_a_shut_gate_stops_the_helper_and_opening_it_lets_it_go_on(tmp_path):
    batches = _batches(tmp_path)
    pulled = []

    def units():
        for b in batches:
            pulled.append(b)
            yield b

    gate = IdleGate()
    with gate.busy():
        ahead = ReadAhead(units(), OPTIONS, True, True, gate, slice_rows=7)
        time.sleep(0.3)
        assert (pulled, ahead.helper_reads, ahead.helper_tasks) == ([], 0, 0)
    deadline = time.monotonic() + 10
    while ahead.helper_tasks < -(-batches[0].num_rows // 7) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(pulled) == 1 and ahead.helper_reads == 1  # depth 1: one unit read ahead, no more
    try:
        got = list(ahead)
    finally:
        ahead.close()
    _same(got, _expected(batches))


def test_errors_in_the_helper_are_raised_in_the_caller_at_their_unit(tmp_path):
    batches = _batches(tmp_path)

    def units():
        yield batches[0]
        raise InputError("bad.parquet: column(s) prompt not present")

    seen = []
    ahead = ReadAhead(units(), OPTIONS, True, False, IdleGate())
    try:
        with pytest.raises(InputError, match="bad.parquet"):
            for batch, _, _ in ahead:
                seen.append(batch.num_rows)
                time.sleep(0.1)  # time for the helper to hit the error itself
    finally:
        ahead.close()
    assert seen == [batches[0].num_rows]

    broken = pa.RecordBatch.from_pydict(
        {"prompt": ["not a message list"], "chosen": ["x"], "rejected": ["y"], "tie": [False]}
    )
    ahead = ReadAhead(iter([batches[0], broken]), OPTIONS, True, False, IdleGate())
    try:
        with pytest.raises(pa.ArrowException):
            list(ahead)
    finally:
        ahead.close()


def test_close_ends_a_helper_waiting_at_a_shut_gate(tmp_path):
    batches = _batches(tmp_path)
    gate = IdleGate()
    with gate.busy():
        ahead = ReadAhead(iter(batches), OPTIONS, True, False, gate)
        closer = threading.Thread(target=ahead.close)
        closer.start()
        closer.join(timeout=10)
        assert not closer.is_alive()


def test_units_start_small_then_cover_each_batch(tmp_path):
    batches = _batches(tmp_path, rows=90, batch_rows=40)
    sizes = [u.num_rows for u in _units(iter(batches), batch_rows=40)]
    assert sizes == [b.num_rows for b in batches]  # batches below the first unit: as they are
    big = pa.RecordBatch.from_pydict({"x": list(range(20000))})
    rest = pa.RecordBatch.from_pydict({"x": list(range(300))})
    units = list(_units(iter([big, rest]), batch_rows=20000))
    assert [u.num_rows for u in units] == [1024, 4096, 14880, 300]
    assert pa.concat_arrays([u.column(0) for u in units]).to_pylist() == list(range(20000)) + list(range(300))


def test_the_encoder_marks_its_multithreaded_calls(model_cache_dir):
    from prefcurate.backends.embed import get_embedder

    embedder = get_embedder("static", "cpu", model_cache_dir)
    entered = []

    class Section:
        def __enter__(self):
            entered.append(threading.get_ident())

        def __exit__(self, *exc):
            return False

    embedder.parallel_section = Section
    texts = [f"text number {k} about a subject" for k in range(50)]
    embedder.encode(texts, batch_size=16)
    embedder.close()
    assert len(entered) == 4  # one section per model call (50 texts, 16 a call)
    assert set(entered) == {threading.get_ident()}


def test_a_caller_that_waits_inside_a_busy_section_lets_the_helper_finish(tmp_path):
    batches = _batches(tmp_path, rows=90, batch_rows=46)
    gate = IdleGate()
    got = []
    pauses = iter([0.0005 * k for k in range(40)])

    def consume():
        ahead = ReadAhead(iter(batches), OPTIONS, True, True, gate, slice_rows=2)
        try:
            units = iter(ahead)
            while True:
                time.sleep(next(pauses, 0))  # gate open: the helper takes the next unit's slices
                with gate.busy():  # and may be paused at the gate inside one of them now
                    item = next(units, None)
                if item is None:
                    break
                got.append(item)
        finally:
            ahead.close()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=30)
    assert not consumer.is_alive(), "the caller waited for a helper held at the shut gate"
    _same(got, _expected(batches))


def _side_tasks(done: list, n: int, steps: int = 3):
    """``n`` side tasks of ``steps`` steps each; each records (task, thread) when it ends."""

    def task(k: int):
        for _ in range(steps):
            yield
        done.append((k, threading.get_ident()))

    return [lambda k=k: task(k) for k in range(n)]


def test_side_tasks_wait_for_the_units_and_run_on_the_helper_while_the_gate_is_open(tmp_path):
    batches = _batches(tmp_path)
    done: list = []
    ahead = ReadAhead(iter(batches), OPTIONS, True, True, IdleGate(), slice_rows=7)
    try:
        ahead.submit(*_side_tasks(done, 5))
        deadline = time.monotonic() + 20
        while len(done) < 5:  # the caller takes no unit: the helper reads one, hashes it, then side work
            assert time.monotonic() < deadline, done
            time.sleep(0.005)
        assert ahead.helper_reads == 1  # the unit came first, and no further than depth 1
        got = list(ahead)
        ahead.drain()
    finally:
        ahead.close()
    _same(got, _expected(batches))
    assert [k for k, _ in done] == list(range(5))  # in the order submitted
    assert {t for _, t in done} == {ahead._thread.ident}
    assert (ahead.helper_side, ahead.caller_side) == (5, 0)


def test_drain_runs_the_side_tasks_a_shut_gate_held_back(tmp_path):
    batches = _batches(tmp_path)
    done: list = []
    gate = IdleGate()
    with gate.busy():  # the encoder holds every core: the helper starts nothing
        ahead = ReadAhead(iter(batches), OPTIONS, True, True, gate, slice_rows=7)
        try:
            ahead.submit(*_side_tasks(done, 4))
            time.sleep(0.2)
            assert done == []
            list(ahead)
            ahead.drain()
        finally:
            ahead.close()
    assert sorted(k for k, _ in done) == list(range(4))
    assert ahead.caller_side + ahead.helper_side == 4 and ahead.caller_side >= 1


def test_a_side_task_error_is_raised_by_drain_and_close_drops_what_is_left(tmp_path):
    batches = _batches(tmp_path)

    def broken():
        yield
        raise ValueError("operands of rows 0-1024")

    ahead = ReadAhead(iter(batches), OPTIONS, True, True, IdleGate())
    try:
        list(ahead)
        ahead.submit(broken)
        with pytest.raises(ValueError, match="rows 0-1024"):
            ahead.drain()
    finally:
        ahead.close()

    done: list = []
    gate = IdleGate()
    with gate.busy():
        ahead = ReadAhead(iter(batches), OPTIONS, True, True, gate)
        ahead.submit(*_side_tasks(done, 3))
        ahead.close()  # ends the helper at the shut gate; the side work is dropped, not run
    assert done == []
