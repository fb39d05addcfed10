"""`python -m jaxrm.train`: config handling, one-line errors, and a short end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jaxrm.config import apply_override, base_config
from jaxrm.errors import UserError
from jaxrm.train import main as train_main


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


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


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
def test_short_tiny_run_end_to_end(tmp_path):
    """A shortened offline default: trains, logs, evaluates, checkpoints, exports, plots."""
    output = tmp_path / "run"
    summary = train_main(
        [
            "--config",
            "configs/tiny.py",
            f"--config.output_dir={output}",
            "--config.max_train_steps=30",
            "--config.eval_steps=15",
            "--config.logging_steps=5",
            "--config.progress_bar=False",
        ]
    )
    assert summary["step"] == 30
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/rm/loss" in r] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in records if "eval/rm/accuracy" in r] == [15, 30]
    last = records[-1]
    for key in ("accuracy", "loss", "chosen_rewards", "rejected_rewards", "reward_margin"):
        assert f"train/rm/{key}" in last and f"eval/rm/{key}" in last
    assert last["episode"] == 30 * 32 and last["epoch"] == pytest.approx(30 / 125)
    assert (output / "metrics.png").stat().st_size > 10_000
    assert (output / "hf" / "config.json").is_file()
    assert 0.0 <= summary["rm/accuracy"] <= 1.0


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
