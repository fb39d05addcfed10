"""Multi-host: two processes x 4 fake CPU devices on 127.0.0.1 train exactly like one process x 8,
and a 2-process run resumes a 1-process checkpoint (gloo collectives, jax.distributed), for pairs
and for K-wise groups (configs/tiny_kwise.py; batch sizes count prompts: 32 groups of 4 a step)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

COMMON = [
    "--config.progress_bar=False",
    "--config.dataset_mixer_eval_list=[]",
    "--config.export_hf=False",
    "--config.logging_steps=1",
    # 32 pairs (K-wise: prompts) per step in rows of 128 tokens, one per device: every step fills
    # the devices of both processes (in 256-token rows, 4 per device, 8 tiny pairs or groups all
    # fit device 0's first row, and process 1 would only ever hold padding)
    "--config.total_train_batch_size=32",
    "--config.pack_length=128",
    "--config.pack_rows_per_device=1",
    "--config.max_train_steps=6",
    "--config.checkpointing_steps=3",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(output: Path, processes: int, devices_per_process: int, config: str) -> None:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        JAX_PLATFORMS="cpu",
    )
    args = [sys.executable, "-m", "jaxrm.train", "--config", config, *COMMON]
    args.append(f"--config.output_dir={output}")
    if processes > 1:
        args += [
            f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
            f"--config.distributed.num_processes={processes}",
        ]
    children = [
        subprocess.Popen(
            args + ([f"--config.distributed.process_id={i}"] if processes > 1 else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(processes)
    ]
    for i, child in enumerate(children):
        out, _ = child.communicate(timeout=600)
        assert child.returncode == 0, f"process {i}:\n{out[-3000:]}"


def losses(output: Path, key: str = "train/rm/loss") -> dict[int, float]:
    records = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), steps  # one record per step
    return {r["step"]: r[key] for r in records}


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, keys",
    [
        ("configs/tiny.py", ["train/rm/loss"]),
        ("configs/tiny_kwise.py", ["train/rm/loss", "train/rm/top1_accuracy"]),
    ],
    ids=["pairs", "kwise"],
)
def test_two_processes_equal_one_and_resume_a_one_process_checkpoint(tmp_path, config, keys):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run(one, processes=1, devices_per_process=8, config=config)
    run(two, processes=2, devices_per_process=4, config=config)
    assert sorted(losses(one)) == [1, 2, 3, 4, 5, 6]
    for key in keys:
        reference = list(losses(one, key).values())
        np.testing.assert_allclose(list(losses(two, key).values()), reference, rtol=2e-5)

    shutil.copytree(one, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")  # the 1-process run "died" after step 3's save
    run(resumed, processes=2, devices_per_process=4, config=config)
    assert sorted(losses(resumed)) == [1, 2, 3, 4, 5, 6]
    for key in keys:
        reference = list(losses(one, key).values())
        np.testing.assert_allclose(list(losses(resumed, key).values()), reference, rtol=2e-5)
