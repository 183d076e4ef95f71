"""Step generators: work written as a generator that yields between its pieces.

A function that yields (None) after each piece of work, a few milliseconds apiece, and
returns its result lets a helper thread stop between pieces (dedupe's read-ahead pauses
while the encoder's threads hold every core), while ``run_steps`` runs it in one go."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

T = TypeVar("T")
Steps = Generator[None, None, T]


def run_steps(steps: Steps[T], pause: Callable[[], object] | None = None) -> T:
    """Run a step generator to the end; its return value. ``pause``, when given, is called
    before each step (dedupe's helper waits at its gate there)."""
    while True:
        if pause is not None:
            pause()
        try:
            next(steps)
        except StopIteration as done:
            return done.value


__all__ = ["Steps", "run_steps"]
