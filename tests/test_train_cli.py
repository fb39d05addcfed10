"""`python -m jaxrm.train`: config handling, one-line errors, and a short end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxrm.config import apply_override, base_config
from jaxrm.errors import UserError
from jaxrm.train import main as train_main
from tests.test_score import assert_one_line_error

# A short in-process run of the tiny config: steps of 8 pairs, a record per step, no eval set
# and no export.
SHORT_RUN = [
    "--config",
    "configs/tiny.py",
    "--config.progress_bar=False",
    "--config.logging_steps=1",
    "--config.export_hf=False",
    "--config.dataset_mixer_eval_list=[]",
    "--config.total_train_batch_size=8",
]


def run_train(*overrides, timeout=600):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxrm.train",
            "--config",
            "configs/tiny.py",
            "--config.progress_bar=False",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_overrides_are_typed():
    config = base_config()
    config.lock()
    apply_override(config, "learning_rate", "1e-4")
    apply_override(config, "num_train_epochs", "2")
    apply_override(config, "mesh.tensor", "2")
    apply_override(config, "gradient_checkpointing", "true")
    apply_override(config, "dataset_mixer_list", "a.jsonl,1.0")
    assert config.learning_rate == 1e-4 and config.num_train_epochs == 2
    assert config.mesh.tensor == 2 and config.gradient_checkpointing is True
    assert config.dataset_mixer_list == ["a.jsonl", "1.0"]
    with pytest.raises(UserError, match="unknown config key 'learning_rat'"):
        apply_override(config, "learning_rat", "1")
    with pytest.raises(UserError, match="'num_train_epochs' expects int"):
        apply_override(config, "num_train_epochs", "many")
    with pytest.raises(UserError, match="unknown config key 'mesh.pipeline'"):
        apply_override(config, "mesh.pipeline", "2")


@pytest.mark.parametrize(
    "case",
    ["unknown_key", "wrong_type", "mesh", "batch", "model_path"],
)
def test_user_errors(tmp_path, case):
    out = f"--config.output_dir={tmp_path / 'run'}"
    overrides, expected = {
        "unknown_key": (["--config.learnig_rate=1e-3"], ("unknown config key 'learnig_rate'",)),
        "wrong_type": (
            ["--config.per_device_train_batch_size=big"],
            ("per_device_train_batch_size", "expects int"),
        ),
        "mesh": (["--config.mesh.tensor=3"], ("mesh", "tensor=3", "does not divide the 8 devices")),
        "batch": (
            ["--config.total_train_batch_size=30", "--config.gradient_accumulation_steps=4"],
            ("total_train_batch_size 30", "not divisible"),
        ),
        "model_path": (
            [f"--config.model_name_or_path={tmp_path / 'missing'}"],
            ("missing", "does not exist"),
        ),
    }[case]
    result = run_train(out, *overrides)
    assert_one_line_error(result, *expected)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_offline_default_reaches_the_accuracy_bar(tmp_path):
    """The README's main job, as users run it (one CPU device): eval accuracy >= 0.85, and every
    output (metrics, curves, checkpoint, HF export) in place."""
    output = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxrm.train",
            "--config",
            "configs/tiny.py",
            f"--config.output_dir={output}",
            "--config.progress_bar=False",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/rm/loss" in r]
    assert train_steps == list(range(10, 1001, 10))
    evals = [r for r in records if "eval/rm/accuracy" in r]
    assert [r["step"] for r in evals] == list(range(125, 1001, 125))
    assert records[-1] is evals[-1]  # the last eval follows the last checkpoint, in its own record
    last = records[-2]
    for key in ("accuracy", "loss", "chosen_rewards", "rejected_rewards", "reward_margin", "lr"):
        assert f"train/rm/{key}" in last
    assert last["episode"] == 1000 * 32 and last["epoch"] == pytest.approx(8.0)
    assert evals[-1]["eval/rm/accuracy"] >= 0.85, evals
    assert evals[-1]["eval/rm/loss"] < evals[0]["eval/rm/loss"]
    assert (output / "metrics.png").stat().st_size > 10_000
    assert (output / "checkpoints" / "1000").is_dir()
    config = json.loads((output / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["std"] > 0
    assert "eval accuracy" in result.stdout


def test_resume_continues_exactly(tmp_path):
    """A run that dies after its step-6 checkpoint, resumed, logs the losses of a straight run
    (optimizer state, schedule position and data order all restored)."""
    import shutil

    common = [*SHORT_RUN, "--config.max_train_steps=10"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_main([*common, f"--config.output_dir={straight}"])
    train_main([*common, "--config.checkpointing_steps=6", f"--config.output_dir={resumed}"])
    # Simulate a crash right after step 6's checkpoint.
    shutil.rmtree(resumed / "checkpoints" / "10")
    metrics = resumed / "metrics.jsonl"
    kept = [x for x in metrics.read_text().splitlines() if json.loads(x)["step"] <= 6]
    metrics.write_text("".join(x + "\n" for x in kept))
    summary = train_main([*common, f"--config.output_dir={resumed}"])
    assert summary["step"] == 10
    losses = {}
    for name, path in (("straight", straight), ("resumed", resumed)):
        records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["train/rm/loss"] for r in records if "train/rm/loss" in r]
    assert len(losses["resumed"]) == 10
    np.testing.assert_allclose(losses["resumed"], losses["straight"], rtol=1e-5)


def test_tulu8b_config_mirrors_the_reference():
    from jaxrm.config import load_config_file

    c = load_config_file("configs/tulu8b.py")
    assert c.model_name_or_path == "allenai/Llama-3.1-Tulu-3-8B-SFT"
    assert c.dataset_mixer_list == ["allenai/llama-3.1-tulu-3-8b-preference-mixture", "1.0"]
    assert c.dataset_mixer_eval_list_splits == ["test_prefs"]
    assert (c.learning_rate, c.lr_scheduler_type, c.warmup_ratio) == (3e-6, "linear", 0.0)
    assert (c.num_train_epochs, c.total_train_batch_size, c.seed) == (1, 256, 8)
    assert (c.max_token_length, c.max_prompt_token_length) == (4096, 2048)
    assert (c.dtype, c.param_dtype, c.gradient_checkpointing) == ("bfloat16", "float32", True)
    assert (c.weight_decay, c.adam_epsilon, c.max_grad_norm) == (0.01, 1e-5, 1.0)
