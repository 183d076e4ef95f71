"""The error tree. Every message says what went wrong and what to do next.

The CLI's single error boundary (``prefcurate.cli.app.main``) maps these to one line on
stderr and an exit code: 2 for bad input or configuration (the user must change something),
1 for a runtime failure (something outside the user's input broke).
"""

from __future__ import annotations


class PrefcurateError(Exception):
    """Base of every error prefcurate raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputError(PrefcurateError):
    """Bad input data or arguments: the user has to change something."""

    exit_code = 2


class ConfigError(InputError):
    """A recipe or stage configuration that does not validate."""


class DataError(InputError):
    """A problem located in an input file: names the file, and the row and field when known."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        where = ", ".join(
            part
            for part in (
                file,
                f"row {row}" if row is not None else None,
                f"field {field!r}" if field else None,
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message, hint)
        self.file, self.row, self.field = file, row, field


class MissingDependency(PrefcurateError):
    """An optional extra is not installed."""

    exit_code = 2

    def __init__(self, package: str, extra: str | None = None, purpose: str = "") -> None:
        target = f"prefcurate[{extra}]" if extra else package
        what = f" for {purpose}" if purpose else ""
        super().__init__(f"{package} is not installed{what}", f"pip install '{target}'")


class StageFailed(PrefcurateError):
    """A stage failed at run time for a reason outside the input (network, model, disk)."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none): what a
    one-line error quotes of a library's failure."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
