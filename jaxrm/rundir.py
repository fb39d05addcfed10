"""A training run's output directory: one live run at a time, fresh or resumed, room to save.

    OUTPUT/
      .jaxrm.lock          the live run's lock: host, pid, start time (flock-held while it runs)
      checkpoints/         orbax steps (jaxrm/checkpoint.py); checkpoints.corrupt/ set-aside steps
      hf/                  the HF export
      tokenizer/  metrics.jsonl  metrics.png  tensorboard/

The lock is an exclusive `flock` on `.jaxrm.lock`, held by process 0 for the whole run. The kernel
drops it when the process dies (even by SIGKILL), so the lock of a dead run is taken over at once
and two live launches into one directory can never both run. On a file system without `flock`
the file's host and pid decide: a lock whose process is gone from this host is taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from jaxrm.errors import UserError, first_line, write_failure

log = logging.getLogger(__name__)

LOCK_FILE = ".jaxrm.lock"
# What a fresh start (overwrite_output_dir) removes: everything a run writes, and nothing else.
RUN_OUTPUTS = (
    "checkpoints",
    "checkpoints.corrupt",
    "hf",
    "tokenizer",
    "tensorboard",
    "metrics.jsonl",
    "metrics.png",
)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive `flock` on the file `path`, which records the holder's host and pid, held
    until `release` (or process exit). A live holder is a one-line error (`busy(holder)`).

    After taking the flock the file is checked to be still the one at `path` (a holder that
    released with `remove=True` meanwhile deleted it), so two holders can never both hold it. On a
    file system without `flock` the holder's host and pid decide."""

    def __init__(self, path: Path, busy: Callable[[dict[str, Any]], str]):
        self.path = path
        self.busy = busy
        self.created = False  # whether `acquire` created the lock file
        self._file: Any = None

    def acquire(self) -> Self:
        while True:
            created = not self.path.exists()
            f = self._lock_file()
            if _is_file_at(f, self.path):
                break
            f.close()  # removed by its holder (`release(remove=True)`) before we locked it
        f.seek(0)
        f.truncate()
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        f.write(json.dumps(info))
        f.flush()
        self._file, self.created = f, created
        return self

    def _lock_file(self) -> Any:
        """The lock file, opened and locked, or a one-line error naming its live holder."""
        f = open(self.path, "a+")  # noqa: SIM115 - held open while the lock is held
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(self.path)
            f.close()
            raise UserError(self.busy(holder)) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                f.close()
                raise
            holder = _read_holder(self.path)
            if holder and not _holder_gone(holder):
                f.close()
                raise UserError(self.busy(holder)) from None
        return f

    def release(self, remove: bool = False) -> None:
        """Drops the lock; `remove`: deletes the lock file too (while still holding it)."""
        if self._file is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        self._file.seek(0)
        self._file.truncate()
        self._file.close()  # closing drops the flock
        self._file = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLock(FileLock):
    """The lock on an output directory: `.jaxrm.lock` in it, kept (emptied) on release."""

    def __init__(self, output_dir: Path):
        output_dir = Path(output_dir)
        super().__init__(output_dir / LOCK_FILE, lambda holder: _busy_message(output_dir, holder))


def _is_file_at(f: Any, path: Path) -> bool:
    """Whether the open file `f` is still the file at `path`."""
    try:
        at = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(f.fileno())
    return (held.st_dev, held.st_ino) == (at.st_dev, at.st_ino)


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_gone(holder: dict[str, Any]) -> bool:
    same_host = holder.get("host") == socket.gethostname()
    return same_host and not process_alive(int(holder.get("pid", -1)))


def _busy_message(output_dir: Path, holder: dict[str, Any]) -> str:
    return (
        f"output_dir {output_dir} is in use by another live run ({_describe_holder(holder)}); "
        "wait for it to finish or pick another output_dir"
    )


def _describe_holder(holder: dict[str, Any]) -> str:
    """`host pid N, running since DATE` of a lock file's holder."""
    who = f"{holder.get('host', '?')} pid {holder.get('pid', '?')}"
    if isinstance(holder.get("started"), int | float):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder["started"]))
        who += f", running since {started}"
    return who


def check_writable(output_dir: Path) -> None:
    """Creates `output_dir` and writes a probe file there, or a one-line error."""
    probe = output_dir / f".jaxrm-write-probe-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {output_dir} is not writable ({first_line(e)})") from None


def check_output_file(path: Path, what: str = "--output") -> None:
    """A one-line error, before any work, when the file `path` cannot be written: a directory, a
    file in the way of its folder, or a folder (the nearest that exists: the rest is created at
    the end) that refuses a new file. Creates nothing."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a file name")
    folder = path.absolute().parent
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{what} {path}: {folder} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".jaxrm-write-probe-"):
            pass
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write in {folder} ({write_failure(e)})") from None


def check_free_space(output_dir: Path, needed: int, what: str) -> None:
    """A one-line error when the file system of `output_dir` has less than `needed` bytes free."""
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UserError(
            f"output_dir {output_dir} has {_gb(free)} free, but {what} need about {_gb(needed)}; "
            "free some space or pick another output_dir"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def has_checkpoint_steps(output_dir: Path) -> bool:
    """Whether `output_dir/checkpoints/` holds a checkpoint step (a directory named by a number);
    False when it cannot be listed."""
    try:
        return any(p.name.isdigit() for p in (output_dir / "checkpoints").iterdir())
    except OSError:  # missing, not a directory, or not readable
        return False


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a training run's output directory: it holds the run lock's file, a
    checkpoint step or set-aside steps (not just any `checkpoints/`, which other tools write)."""
    return path.is_dir() and (
        (path / LOCK_FILE).exists()
        or has_checkpoint_steps(path)
        or (path / "checkpoints.corrupt").is_dir()
    )


def enclosing_run_dir(path: Path) -> Path | None:
    """The training run directory that `path` is or lies inside (symlinks resolved), or None."""
    resolved = Path(os.path.realpath(path))
    return next((p for p in (resolved, *resolved.parents) if is_run_dir(p)), None)


def previous_outputs(output_dir: Path) -> list[str]:
    """Which outputs of an earlier run `output_dir` holds (checkpoints, an export)."""
    found = []
    if has_checkpoint_steps(output_dir):
        found.append("checkpoints")
    if (output_dir / "hf").exists():
        found.append("an HF export (hf/)")
    return found


def clear_run_outputs(output_dir: Path) -> None:
    """Removes everything a previous run wrote in `output_dir` (and only that)."""
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    log.info("cleared the previous run's outputs in %s (overwrite_output_dir)", output_dir)


def remove_stale_temporaries(target: Path, kinds: tuple[str, ...]) -> None:
    """Removes `.NAME.<kind>-<host>-<pid>` siblings of `target` left by dead processes of this
    host (an export killed before it could clean up after itself)."""
    host = socket.gethostname()
    for kind in kinds:
        prefix = f".{target.name}.{kind}-"
        for path in target.parent.glob(prefix + "*"):
            owner_host, _, pid = path.name[len(prefix) :].rpartition("-")
            if owner_host != host or not pid.isdigit() or process_alive(int(pid)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            log.info("removed %s, left behind by a dead process", path)


def temporary_sibling(target: Path, kind: str) -> Path:
    """`.NAME.<kind>-<host>-<pid>` next to `target`: a name `remove_stale_temporaries` knows."""
    return target.with_name(f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


class TargetLock(FileLock):
    """An exclusive lock on writing `target` (e.g. an export): the sibling file
    `.NAME.jaxrm-<what>.lock`, which holds the writer's host and pid and is removed on release."""

    def __init__(self, target: Path, what: str):
        self.target = target
        super().__init__(
            target.with_name(f".{target.name}.jaxrm-{what}.lock"),
            lambda holder: (
                f"{target} is being written by another {what} ({_describe_holder(holder)}); "
                "wait for it to finish or pick another target"
            ),
        )

    def acquire(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return super().acquire()

    def release(self, remove: bool = True) -> None:
        super().release(remove)
