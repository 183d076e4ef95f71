"""The idle-priority helper: speculative jobs, and dedupe's keys hashed ahead on it."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from prefcurate.idle import IdleHelper
from prefcurate.shards import iter_batches
from prefcurate.stages import dedupe
from prefcurate.stages.dedupe_keys import PairKeys, pair_keys
from tests.conftest import hh_rows, make_stage_dir


def _wait_done(job, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while job._state != "done" and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_finished_job_returns_the_helpers_value_without_running_again():
    helper = IdleHelper()
    calls = []

    def work(x):
        calls.append(threading.get_ident())
        return x * 2

    job = helper.submit(work, 21)
    _wait_done(job)
    assert job.result() == 42 and job.ran_ahead
    assert calls == [helper._thread.ident]  # once, on the helper
    helper.close()


def test_a_job_the_helper_has_not_reached_runs_in_the_caller_and_only_there():
    helper = IdleHelper()
    release = threading.Event()
    blocker = helper.submit(release.wait, 10)
    calls = []
    job = helper.submit(lambda: calls.append(threading.get_ident()) or "mine")
    assert job.result() == "mine" and not job.ran_ahead
    release.set()
    _wait_done(blocker)
    helper.close()
    helper._thread.join(5)
    assert calls == [threading.get_ident()]  # the helper skipped the job the caller took


def test_a_helper_error_is_raised_in_the_caller():
    helper = IdleHelper()

    def boom():
        raise ValueError("bad row 7")

    job = helper.submit(boom)
    _wait_done(job)
    with pytest.raises(ValueError, match="bad row 7"):
        job.result()
    helper.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_the_helper_runs_at_idle_priority_on_linux():
    helper = IdleHelper()

    def where():
        tid = threading.get_native_id()
        return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)

    job = helper.submit(where)
    _wait_done(job)
    policy, nice = job.result()
    assert helper.priority in ("idle", "nice")
    assert policy == os.SCHED_IDLE if helper.priority == "idle" else nice == 19
    assert os.sched_getscheduler(threading.get_native_id()) != os.SCHED_IDLE  # the caller is untouched
    helper.close()


def _batch(tmp_path, n=60) -> pa.RecordBatch:
    rows = []
    for k, r in enumerate(hh_rows(n)):  # real transcripts: the prompt, then each last answer
        prompt, _, chosen = r["chosen"].rpartition("\n\nAssistant:")
        rejected = r["rejected"].rpartition("\n\nAssistant:")[2]
        rows.append({"id": f"r{k}", "prompt": prompt.strip(), "chosen": chosen.strip(), "rejected": rejected.strip()})
    rows += [{**rows[3], "id": "swap", "chosen": rows[3]["rejected"], "rejected": rows[3]["chosen"]}]
    src = make_stage_dir(tmp_path / "in", rows)
    return next(iter_batches(src, ["id", "prompt", "chosen", "rejected", "tie"], 10_000))


def test_keys_of_slices_concatenated_are_the_batchs_keys(tmp_path):
    batch = _batch(tmp_path)
    opts = ["case", "whitespace", "nfkc"]
    whole = pair_keys(batch, opts, unordered=True, with_prompts=True, prompt_text=True)
    parts = [
        pair_keys(batch.slice(lo, 7), opts, unordered=True, with_prompts=True, serial=True, prompt_text=True)
        for lo in range(0, batch.num_rows, 7)
    ]
    joined = PairKeys.concat(parts)
    assert (joined.group == whole.group).all() and (joined.orientation == whole.orientation).all()
    assert joined.prompt_hashes == whole.prompt_hashes
    assert set(joined.rendered) == {"chosen", "rejected", "prompt"}
    for name, values in whole.rendered.items():
        assert joined.rendered[name].equals(values)
    assert len(set(whole.group.tolist())) == batch.num_rows - 1  # the swap shares its original's key


def test_batches_hashed_ahead_get_the_same_keys_as_hashed_in_place(tmp_path, monkeypatch):
    batch = _batch(tmp_path)
    monkeypatch.setattr(dedupe, "_STEP_ROWS", 16)  # several steps, each in several jobs
    monkeypatch.setattr(dedupe, "_AHEAD_ROWS", 5)
    opts = dict(unordered=True, with_prompts=False, prompt_text=True)
    helper, ahead = IdleHelper(), {"slices": 0, "ahead": 0}
    got = list(dedupe._keyed(iter([batch]), ["case", "whitespace"], opts, helper, ahead))
    helper.close()
    want = pair_keys(batch, ["case", "whitespace"], **opts)
    assert [b.num_rows for b, _ in got] == [16, 16, 16, 13]
    assert ahead["slices"] == 4 + 4 + 3  # every step after the first
    assert np.concatenate([pk.group for _, pk in got]).tolist() == want.group.tolist()
    prompts = pa.concat_arrays([pk.rendered["prompt"] for _, pk in got])
    assert prompts.equals(want.rendered["prompt"])
