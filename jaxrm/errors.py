"""User-facing errors and early stops: one line, no traceback, a non-zero exit code each."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_USER_ERROR = 2  # a mistake in the input: fix it and run again
EXIT_DIVERGED = 3  # training stopped on non-finite steps; the last good checkpoint is kept
EXIT_INTERRUPTED = 75  # stopped by a signal after a checkpoint (EX_TEMPFAIL): rerun to resume


class UserError(Exception):
    """A mistake in the user's input (path, file, row, key, value): reported as one line."""


class RunStopped(Exception):
    """A run that stopped early on purpose (preemption, divergence): a message and an exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message` (at most `limit` characters) of a library's exception,
    to quote in a one-line error."""
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def write_failure(e: BaseException) -> str:
    """Why a write failed, in words when the file system said so (orbax wraps OS errors)."""
    text = str(e)
    for marker, reason in (
        ("No space left on device", "no space left on device"),
        ("Read-only file system", "read-only file system"),
        ("Permission denied", "permission denied"),
    ):
        if marker in text:
            return reason
    return first_line(e)


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a CLI entry point: a UserError prints `error: <message>` and exits with status 2; a
    RunStopped prints `stopped: <message>` and exits with its own code."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except RunStopped as e:
            print(f"stopped: {e}", file=sys.stderr)
            sys.exit(e.exit_code)

    return wrapper


def run_cli(main: Callable[[], Any]) -> None:
    """Runs a CLI's main (`if __name__ == "__main__": run_cli(main)`). After a non-zero exit
    (already reported as one line) the process leaves at once, so that libraries' background
    threads (e.g. orbax's unfinished writes after a full disk) print no tracebacks after it."""
    try:
        main()
    except SystemExit as e:
        if e.code in (0, None):
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
