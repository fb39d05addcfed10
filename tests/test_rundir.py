"""The output directory: the run lock, stale locks, clearing a run's outputs, stale temporaries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxrm.errors import UserError
from jaxrm.rundir import (
    LOCK_FILE,
    RunLock,
    clear_run_outputs,
    previous_outputs,
    remove_stale_temporaries,
    temporary_sibling,
)

HOLD_LOCK = """
import sys, time
from pathlib import Path
from jaxrm.rundir import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_lock_refuses_a_second_run_with_one_line(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as error:
            RunLock(tmp_path).acquire()
        message = str(error.value)
        assert "in use by another live run" in message and f"pid {holder.pid}" in message
        assert socket.gethostname() in message and "\n" not in message
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL: no clean-up at all): its lock is taken over at once
    with RunLock(tmp_path) as lock:
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()


def test_lock_is_exclusive_within_a_process_and_released(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(UserError, match="in use"):
        RunLock(tmp_path).acquire()
    first.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""
    RunLock(tmp_path).acquire().release()


def test_a_removed_lock_file_is_never_held_by_two_runs(tmp_path, monkeypatch):
    first = RunLock(tmp_path).acquire()
    assert first.created
    opened_before = open(first.path, "a+")  # a second run opened the file, then waited
    first.release(remove=True)
    assert not first.path.exists()
    third = RunLock(tmp_path).acquire()  # a third run creates a new lock file and holds it
    assert third.created
    second = RunLock(tmp_path)
    real = second._lock_file
    handles = iter([opened_before])
    monkeypatch.setattr(second, "_lock_file", lambda: next(handles, None) or real())
    with pytest.raises(UserError, match="in use"):  # it locked the removed file: tries again
        second.acquire()
    third.release()
    assert not RunLock(tmp_path).acquire().created


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    stale = {"host": socket.gethostname(), "pid": dead_pid(), "started": time.time() - 3600}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_clear_removes_only_what_a_run_writes(tmp_path):
    for name in ("checkpoints/10/state", "hf", "tokenizer", "tensorboard", "checkpoints.corrupt/3"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "metrics.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert previous_outputs(tmp_path) == ["checkpoints", "an HF export (hf/)"]
    clear_run_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert previous_outputs(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "hf"
    host = socket.gethostname()
    dead = tmp_path / f".hf.export-tmp-{host}-{dead_pid()}"
    alive = temporary_sibling(target, "export-tmp")  # this process: alive
    elsewhere = tmp_path / f".hf.export-tmp-otherhost-{dead_pid()}"  # cannot tell: kept
    old = tmp_path / f".hf.old-{host}-{dead_pid()}"
    for path in (dead, alive, elsewhere, old):
        (path / "sub").mkdir(parents=True)
    remove_stale_temporaries(target, ("export-tmp", "old"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name])
