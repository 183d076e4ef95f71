"""The exact pass's next unit of rows, read, hashed and its texts prepared in the gaps the
CPU encoder leaves.

Where the gaps are: a static model's call is the tokenizer's thread pool, which keeps both
cores of this 2-core VM busy (1.95 cores over a call), then its pooling, one thread
(~12% of the model's time). During the pooling, and in the stage's own glue between model
calls, one core idles. Reading a unit, normalizing and hashing its three texts
(``pair_key_steps``) and preparing them for the encoder (``RowVectors.prepare_steps``:
distinct texts, cache keys) are mostly Arrow kernels that release the GIL, and fit in
those gaps: hashing is ~11 core-microseconds a row against ~35 of idle core time a row.

How it stays in the gaps: the encoder enters ``Embedder.parallel_section`` around its
multi-threaded part, which shuts an ``IdleGate``. A helper thread works one step at a time
(an Arrow kernel on a 1k-row slice: a few ms) and waits at the gate between steps, so it
competes with the tokenizer's threads for at most one step each time the gate shuts.

Why a gate and not just a thread: the tokenizer splits each call over its threads, so a
third runnable thread makes one of them a straggler that the whole call waits for. Hashing
the next batch on a plain worker thread saved nothing (the tried-and-dropped notes in
``dedupe_vectors``), and at the lowest OS priority it starved while holding up the GIL.
Here the helper runs at normal priority and only while a core is free.

Nothing waits for the helper when it falls behind (no gaps: a busy machine, or a
transformer on CPU whose forward pass is one long section): when the stage gets to a unit
it runs the tasks the helper has not started itself, alongside it, so the work is done
on two threads as before. Without an encoder (exact-only dedupe) there is no gate, and
the two threads simply share each batch.

Side tasks (``submit``) are work for after the pass that can be done as the rows go by: the
near-duplicate join's operands (``ivf_join.JoinOperands``), a unit's rows at a time once they
are embedded. The helper takes them when it has no unit to read or hash, still only while
the gate is open; ``drain`` at the end of the pass runs the rest on both threads.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from prefcurate.stages.dedupe_keys import PairKeys, pair_key_steps
from prefcurate.steps import Steps, run_steps

Prepare = Callable[[pa.RecordBatch, int], Steps]  # a unit's extra work (unit, its first row), as steps

SLICE_ROWS = 1024  # rows per key slice: the helper and the stage each take whole slices


class IdleGate:
    """Open unless the caller is inside ``busy()``; ``wait`` blocks while it is shut."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def wait(self) -> None:
        self._open.wait()

    def open(self) -> None:
        """Open it until the next ``busy()``: the caller is about to wait for the helper,
        so the helper must be able to finish what it holds."""
        self._open.set()


class _Job:
    """One unit and its tasks: the key slices, then (optionally) ``prepare``."""

    def __init__(
        self, batch: pa.RecordBatch, start: int, slice_rows: int, args: tuple, prepare: Prepare | None
    ) -> None:
        self.batch = batch
        bounds = [(lo, min(lo + slice_rows, batch.num_rows)) for lo in range(0, batch.num_rows, slice_rows)] or [(0, 0)]
        self.tasks: list[Callable[[], Steps]] = [
            functools.partial(pair_key_steps, batch.slice(lo, hi - lo), *args) for lo, hi in bounds
        ]
        self.slices = len(self.tasks)
        if prepare is not None:
            self.tasks.append(functools.partial(prepare, batch, start))
        self.results: list[Any] = [None] * len(self.tasks)
        self.pending = len(self.tasks)
        self.error: BaseException | None = None


class ReadAhead:
    """The units of ``units`` with their ``pair_keys`` (and ``prepare(unit, first row)``, when given), in
    order (``__iter__``), read and computed ahead on a helper thread that works while
    ``gate`` is open.

    The helper works through the tasks of the units read so far (key slices, then the
    ``prepare`` steps), oldest first, and reads the next unit when fewer than ``depth`` are
    waiting. The caller, when it gets to a unit, reads it itself if the helper has not, and
    runs the tasks the helper has not started. The helper's errors (a bad shard, a bad
    value) are raised in the caller, at that unit."""

    def __init__(
        self,
        units: Iterator[pa.RecordBatch],
        options: Sequence[str],
        unordered: bool,
        with_prompts: bool,
        gate: IdleGate | None = None,
        slice_rows: int = SLICE_ROWS,
        depth: int = 1,
        prepare: Prepare | None = None,
    ) -> None:
        self._units = units
        self._args = (tuple(options), unordered, with_prompts)
        self._gate = gate
        self._slice_rows = slice_rows
        self._depth = depth
        self._prepare = prepare
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()  # read, not yet handed out
        self._todo: deque[tuple[_Job, int]] = deque()  # tasks no one has started
        self._side: deque[Steps] = deque()  # side tasks no thread is running a step of now
        self._side_running = 0
        self._side_error: BaseException | None = None
        self._reading = self._exhausted = self._closed = False
        self._read_error: BaseException | None = None
        self._rows_read = 0
        self.helper_tasks = self.caller_tasks = self.helper_reads = self.caller_reads = 0
        self.helper_side = self.caller_side = 0
        self._thread = threading.Thread(target=self._run, name="prefcurate-read-ahead", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[pa.RecordBatch, PairKeys, Any]]:
        """(unit, its keys, ``prepare(unit, first row)`` or None) for each unit, in order."""
        while (job := self._next_job()) is not None:
            self._finish(job)
            keys = PairKeys.concat(job.results[: job.slices])
            yield job.batch, keys, (job.results[-1] if self._prepare is not None else None)

    def submit(self, *tasks: Callable[[], Steps]) -> None:
        """Run each task's steps on the helper when it has no unit work (in the order
        submitted); ``drain`` runs what is left."""
        with self._cond:
            self._side.extend(task() for task in tasks)
            self._cond.notify_all()

    def drain(self) -> None:
        """Run the side tasks the helper has not finished, on this thread, while the helper
        takes others; wait for the steps it is running; raise the first side task's error."""
        while True:
            with self._cond:
                if self._side:
                    steps = self._side.popleft()
                    self._side_running += 1
                elif self._side_running:
                    self._wait()
                    continue
                else:
                    break
            if self._run_side(steps, one_step=False):
                self.caller_side += 1
        if self._side_error is not None:
            raise self._side_error

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._todo.clear()
            self._side.clear()
            self._cond.notify_all()
        if self._gate is not None:
            self._gate.open()  # a helper waiting at the gate sees that it is closed
        self._thread.join()

    # -- the caller's side -----------------------------------------------------------------
    def _next_job(self) -> _Job | None:
        while True:
            with self._cond:
                while self._reading:  # the helper is reading the next unit: let it finish
                    self._wait()
                if self._jobs:
                    self._cond.notify_all()  # room to read the next one
                    return self._jobs.popleft()
                if self._read_error is not None:
                    raise self._read_error
                if self._exhausted:
                    return None
                self._reading = True
            try:
                self.caller_reads += self._read() is not None
            finally:
                with self._cond:
                    self._reading = False
                    self._cond.notify_all()

    def _finish(self, job: _Job) -> None:
        """Run the job's tasks the helper has not started; wait for the ones it has."""
        while True:
            with self._cond:
                mine = next((i for i, (j, _) in enumerate(self._todo) if j is job), None)
                if mine is not None:
                    _, k = self._todo[mine]
                    del self._todo[mine]
                elif job.pending:
                    self._wait()  # the helper's task of this unit is in flight
                    continue
                else:
                    break
            self._run_task(job, k, gated=False)
            self.caller_tasks += 1
        if job.error is not None:
            raise job.error

    def _wait(self) -> None:
        """Wait for the helper (``_cond`` held), with the gate open so that it can go on."""
        if self._gate is not None:
            self._gate.open()
        self._cond.wait()

    # -- the helper's side -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if self._gate is not None:
                self._gate.wait()  # before taking anything: a shut gate holds nothing up
            with self._cond:
                while not self._closed and not self._todo and not self._may_read() and not self._side:
                    self._cond.wait()
                if self._closed:
                    return
                side = None
                if self._todo:
                    job, k = self._todo.popleft()
                elif self._may_read():
                    self._reading, job = True, None
                else:  # nothing to read or hash for now: work for after the pass
                    side, job = self._side.popleft(), None
                    self._side_running += 1
            if side is not None:  # one step, then back to the queue: unit work comes first
                if self._gate is not None:
                    self._gate.wait()  # it may have shut while this thread waited for work
                if self._run_side(side, one_step=True):
                    self.helper_side += 1
                continue
            if job is not None:
                self._run_task(job, k, gated=True)
                self.helper_tasks += 1
                continue
            try:
                if self._gate is not None:
                    self._gate.wait()  # (the caller opens it if it comes to wait for this read)
                self.helper_reads += self._read() is not None
            except BaseException as exc:  # raised by the caller when it gets to this unit
                with self._cond:
                    self._read_error = exc
            finally:
                with self._cond:
                    self._reading = False
                    self._cond.notify_all()

    def _may_read(self) -> bool:
        return not self._reading and not self._exhausted and self._read_error is None and len(self._jobs) < self._depth

    # -- shared ----------------------------------------------------------------------------
    def _read(self) -> _Job | None:
        """Read the next unit and queue its tasks (called with ``_reading`` set)."""
        batch = next(self._units, None)
        with self._cond:
            if batch is None:
                self._exhausted = True
                return None
            job = _Job(batch, self._rows_read, self._slice_rows, self._args, self._prepare)
            self._rows_read += batch.num_rows
            self._jobs.append(job)
            self._todo.extend((job, k) for k in range(len(job.tasks)))
            self._cond.notify_all()
        return job

    def _run_side(self, steps: Steps, one_step: bool) -> bool:
        """Run a side task's next step (``one_step``) or all its steps; True when it ended.
        A task with steps left goes back to the front of the queue."""
        ended = True
        try:
            if one_step:
                next(steps)
                ended = False
            else:
                run_steps(steps)
        except StopIteration:
            pass
        except BaseException as exc:  # re-raised by drain(), in the stage's thread
            with self._cond:
                self._side_error = self._side_error or exc
        with self._cond:
            if not ended:
                self._side.appendleft(steps)
            self._side_running -= 1
            self._cond.notify_all()
        return ended

    def _run_task(self, job: _Job, k: int, gated: bool) -> None:
        result, error = None, None
        try:
            result = run_steps(job.tasks[k](), self._gate.wait if gated and self._gate is not None else None)
        except BaseException as exc:  # re-raised by _finish(), in the stage's thread
            error = exc
        with self._cond:
            job.results[k] = result
            if error is not None and job.error is None:
                job.error = error
            job.pending -= 1
            self._cond.notify_all()
