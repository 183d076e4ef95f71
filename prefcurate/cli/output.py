"""Terminal output: progress bars, stage summaries. Everything human goes to stderr so that
stdout stays clean for machine output (``stats --json``)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

err_console = Console(stderr=True)
out_console = Console()


class RateColumn(ProgressColumn):
    """Items per second, with the task's unit."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "rows")
        if speed is None:
            return Text(f"- {unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {unit}/s", style="progress.data.speed")


class _RichTask:
    def __init__(self, progress: Progress, task_id: int) -> None:
        self._p, self._id = progress, task_id

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._id, n)

    def set_total(self, total: int | None) -> None:
        self._p.update(self._id, total=total)

    def describe(self, text: str) -> None:
        self._p.update(self._id, description=text)


class RichProgress:
    """The ``Progress`` protocol of ``stages.base`` on a rich live display."""

    def __init__(self, progress: Progress) -> None:
        self._p = progress

    def task(self, description: str, total: int | None = None, unit: str = "rows") -> _RichTask:
        return _RichTask(self._p, self._p.add_task(description, total=total, unit=unit))

    def note(self, text: str) -> None:
        self._p.console.print(text)


@contextmanager
def progress_display(quiet: bool = False) -> Iterator[RichProgress | None]:
    if quiet or os.environ.get("PREFCURATE_QUIET"):
        yield None
        return
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err_console, transient=False) as progress:
        yield RichProgress(progress)


def stage_table(rows: Sequence[tuple[str, str, object, bool]], title: str = "summary") -> Table:
    """rows: (stage, directory, manifest, skipped)."""
    table = Table(title=title, title_justify="left")
    for col, justify in (
        ("stage", "left"),
        ("rows in", "right"),
        ("out", "right"),
        ("rejected", "right"),
        ("top reasons", "left"),
        ("seconds", "right"),
        ("", "left"),
        ("directory", "left"),
    ):
        table.add_column(col, justify=justify)
    for name, directory, m, skipped in rows:
        reasons = sorted(m.reject_reasons.items(), key=lambda kv: -kv[1])[:3]
        table.add_row(
            name,
            f"{m.rows_in:,}",
            f"{m.rows_out:,}",
            f"{m.rows_rejected:,}",
            ", ".join(f"{k} {v:,}" for k, v in reasons),
            f"{m.wall_seconds:.1f}",
            "[dim]skipped (unchanged)[/]" if skipped else "",
            Path(directory).name,
        )
    return table
