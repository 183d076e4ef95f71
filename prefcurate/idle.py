"""Work ahead on the cores a stage leaves idle, without slowing the stage.

A dedupe on a CPU is bound by its embedding model, which does not keep both cores busy all
the time: the tokenizer runs on every core, but the pooling after each call (Python lists
of token ids, the sparse product) runs on one, ~12% of the model's time. ``IdleHelper`` is
one background thread at the lowest CPU priority the OS grants (Linux: ``SCHED_IDLE``, else
nice 19), so work handed to it runs in those gaps and not instead of the model: hashing the
next batch while this one is embedded cost the model no measurable time (20k rows, 3
interleaved runs each), where a helper at normal priority slowed it by ~45% of the work it
did.

A job is speculative: ``Job.result`` returns the helper's value if it is done, and else
computes it in the caller's thread (at normal priority, with every core) and lets the
helper's copy go. So a helper starved by other processes on a busy machine costs only the
work it wasted, never a wait. Jobs must be pure (the caller and the helper may both run
one) and should spend their time in code that releases the GIL (Arrow kernels), since a
low-priority thread holding the GIL can delay the caller.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any


def _lower_priority() -> str:
    """Lower the calling thread's CPU priority as far as allowed; which one it got."""
    if not sys.platform.startswith("linux"):  # per-thread priorities below are Linux's
        return "normal"
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
        return "idle"
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return "nice"
    except (AttributeError, OSError):
        return "normal"


class Job:
    """One function call the helper may run ahead; ``result`` in the caller's thread."""

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._lock = threading.Lock()
        self._state = "pending"  # -> running -> done, or taken (the caller runs it itself)
        self._value: Any = None
        self._error: BaseException | None = None
        self.ran_ahead = False

    def _run(self) -> None:
        with self._lock:
            if self._state != "pending":
                return
            self._state = "running"
        value, error = None, None
        try:
            value = self._fn(*self._args, **self._kwargs)
        except BaseException as exc:  # re-raised by result(), in the caller's thread
            error = exc
        with self._lock:
            if self._state == "running":
                self._value, self._error, self._state = value, error, "done"

    def result(self) -> Any:
        """The helper's value if it finished, else the call made here and now."""
        with self._lock:
            done = self._state == "done"
            if not done:
                self._state = "taken"
        if not done:
            return self._fn(*self._args, **self._kwargs)
        self.ran_ahead = True
        if self._error is not None:
            raise self._error
        return self._value


class IdleHelper:
    """A daemon thread at idle CPU priority running submitted ``Job``s in order."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.priority = "starting"
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="prefcurate-idle", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        self.priority = _lower_priority()
        while (job := self._jobs.get()) is not None and not self._closed:
            job._run()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Job:
        job = Job(fn, args, kwargs)
        self._jobs.put(job)
        return job

    def close(self) -> None:
        """Stop after the job at hand; jobs still queued are left to their callers."""
        self._closed = True
        self._jobs.put(None)
