"""SIGTERM and SIGINT (preemption, Ctrl-C): finish the step, save a checkpoint, exit.

During the training loop and the final checkpoint's write (`deferred`) the first signal only sets
a flag; the loop feeds it into the next train step as this process's stop vote (jaxrm/step.py),
and every process stops after the same step, saves a checkpoint, waits for it, and exits with
`EXIT_INTERRUPTED`. Elsewhere the first signal stops the program at once with a one-line message
saying what is kept (`kept`): before anything is saved (loading, tokenizing, compiling a fresh
run) it exits with 128 + the signal; once a checkpoint exists (a resumed run's start, the final
eval, the benchmarks, the export after the final checkpoint) it exits with `EXIT_INTERRUPTED`,
and a rerun resumes from that checkpoint. A second signal always exits immediately.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

from jaxrm.errors import EXIT_INTERRUPTED, RunStopped

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installed for the lifetime of a run (`with StopRequest() as stop:`)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.graceful = False  # True while a signal is only noted (see `deferred`)
        self.note = "nothing was saved yet"  # what an immediate stop leaves behind
        self.exit_code: int | None = None  # an immediate stop's exit code (None: 128 + signal)
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def kept(self, note: str) -> None:
        """From now on a checkpoint is on disk: an immediate stop says `note` and exits with
        `EXIT_INTERRUPTED` (rerun to resume)."""
        self.note, self.exit_code = note, EXIT_INTERRUPTED

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside, a first signal only sets `requested`; the caller acts on it."""
        self.graceful = True
        try:
            yield
        finally:
            self.graceful = False

    def stop_if_requested(self) -> None:
        """Raises the immediate stop if a signal came while it was deferred."""
        if self.signal is not None:
            raise self._stopped(self.signal)

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _stopped(self, signum: int) -> RunStopped:
        name = signal.Signals(signum).name
        code = self.exit_code if self.exit_code is not None else 128 + signum
        return RunStopped(f"{name} received; {self.note}", code)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            os._exit(128 + signum)  # second signal: no cleanup, at once
        self.signal = signum
        if not self.graceful:
            raise self._stopped(signum)
        name = signal.Signals(signum).name
        log.warning("%s received: stopping once this step's checkpoint is saved", name)
