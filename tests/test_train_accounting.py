"""The training loop's logging windows: tokens/s and s/step count the work of the same steps.

The real `Loop.train` runs on a fake device with a fake clock: each step takes STEP_SECONDS of
device time, dispatched asynchronously (as on a GPU) or run inside the dispatch (as XLA:CPU may
run small programs), and an eval takes EVAL_SECONDS. Every window must then report exactly
TOKENS / STEP_SECONDS, the short last one included (issue 18: it reported 6.0M tokens/s on a
2-core CPU, the tokens of one step over the time of none).
"""

from __future__ import annotations

import itertools

import ml_collections
import numpy as np
import pytest

from jaxrm import train as train_module
from jaxrm.objective import METRIC_SUM_KEYS
from jaxrm.preemption import StopRequest
from jaxrm.train import Loop, StepAccounting

STEP_SECONDS, EVAL_SECONDS, TOKENS = 2.0, 100.0, 1000


class FakeDevice:
    """Runs steps one after another on a fake clock; `sync`: the dispatch waits for the step."""

    def __init__(self, sync: bool):
        self.sync, self.now, self.busy_until = sync, 0.0, 0.0

    def clock(self) -> float:
        return self.now

    def step(self, state, batch, votes):
        done = max(self.now, self.busy_until) + STEP_SECONDS
        self.busy_until = done
        if self.sync:
            self.now = done
        outputs = {"stop": 0.0, "skipped": 0.0, "grad_norm": 1.0}
        outputs.update(dict.fromkeys(METRIC_SUM_KEYS, 1.0))
        return state, {k: Pending(self, done, v) for k, v in outputs.items()}


class Pending:
    """A step output: reading it waits (on the fake clock) until its step is done."""

    def __init__(self, device: FakeDevice, done: float, value: float):
        self.device, self.done, self.value = device, done, value

    def __array__(self, dtype=None, copy=None):
        self.device.now = max(self.device.now, self.done)
        return np.asarray(self.value, dtype)


class Records:
    def __init__(self):
        self.records: list[dict] = []
        self.path = None

    def write(self, record: dict) -> None:
        self.records.append(record)


def run_loop(device: FakeDevice, total: int, logging: int, eval_every: int) -> list[dict]:
    cfg = ml_collections.ConfigDict(
        {
            "logging_steps": logging,
            "eval_steps": eval_every,
            "checkpointing_steps": 0,
            "progress_bar": False,
            "max_consecutive_skipped_steps": 10,
        }
    )
    accounting = StepAccounting(cfg, lambda step: 1e-3, total, clock=device.clock)
    writer = Records()
    loop = Loop(
        cfg=cfg,
        mesh=None,
        stop=StopRequest(),
        total_steps=total,
        per_epoch=total,
        step_pairs=1,
        graphdef=None,
        train_step=device.step,
        eval_step=None,
        benchmarks=None,
        state=None,
        train_iter=itertools.repeat({"tokens": TOKENS}),
        eval_batches=[] if eval_every else None,
        checkpointer=None,
        writer=writer,
        accounting=accounting,
        meta={},
    )
    loop.train()
    return writer.records


def patch_loop(monkeypatch, device: FakeDevice) -> None:
    """No mesh: votes and batches pass through; an eval takes EVAL_SECONDS."""
    monkeypatch.setattr(train_module, "stop_votes", lambda mesh, requested: None)
    monkeypatch.setattr(train_module.data, "to_global", lambda batch, mesh: batch)

    def eval_record(self):
        device.now += EVAL_SECONDS
        return {"eval/rm/accuracy": 0.5}

    monkeypatch.setattr(Loop, "eval_record", eval_record)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize(
    "total, logging, eval_every",
    [(11, 10, 0), (25, 10, 5), (7, 1, 3), (30, 10, 10)],
)
def test_every_window_counts_the_tokens_and_time_of_the_same_steps(
    monkeypatch, sync, total, logging, eval_every
):
    device = FakeDevice(sync)
    patch_loop(monkeypatch, device)
    records = run_loop(device, total, logging, eval_every)
    logged = [r for r in records if "train/tokens_per_second" in r]
    want = [s for s in range(1, total + 1) if s % logging == 0 or s == total]
    assert [r["step"] for r in logged] == want
    for r in logged:
        assert r["train/tokens_per_second"] == pytest.approx(TOKENS / STEP_SECONDS), r["step"]
        assert r["train/seconds_per_step"] == pytest.approx(STEP_SECONDS), r["step"]
    evals = [r["step"] for r in records if "eval/rm/accuracy" in r]
    assert evals == [s for s in range(1, total) if eval_every and s % eval_every == 0]
