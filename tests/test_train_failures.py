"""`python -m jaxrm.train` when things go wrong: nothing lost, nothing silent.

Each test is a row of the failure table of a long run: a rerun into a used directory, divergence,
two live launches, preemption (SIGTERM / SIGINT), resume with changed settings, a corrupted newest
checkpoint, pad == eos, a read-only or full disk, bad config values. Each checks the exit code,
the one line, and that nothing already written (checkpoints, export, metrics) was lost or replaced
by another run's data. The runs use the tiny config on one CPU device.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxrm.assets import TINY_EVAL_FILE, TINY_MODEL_DIR
from jaxrm.checkpoint import read_meta, restore_params
from jaxrm.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from jaxrm.hf_export import abstract_params
from jaxrm.models.llama_hf import llama_config_from_hf
from jaxrm.rundir import LOCK_FILE
from jaxrm.sharding import make_mesh
from jaxrm.tracking import keep_metrics_until, read_metrics
from tests.test_score import assert_one_line_error

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device: fast and simple
STEPS = 60
COMMON = [
    "--config",
    "configs/tiny.py",
    "--config.progress_bar=False",
    "--config.dataset_mixer_eval_list=[]",
    "--config.logging_steps=1",
    f"--config.max_train_steps={STEPS}",
    "--config.checkpointing_steps=20",
    "--config.export_dtype=float32",
]


def command(output: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "jaxrm.train", *COMMON, f"--config.output_dir={output}"] + [
        *overrides
    ]


def train(output: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(output, *overrides), capture_output=True, text=True, timeout=timeout, env=ENV
    )


def start(output: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        command(output, *overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def metrics(output: Path) -> list[dict]:
    """metrics.jsonl as strict JSON (a bare NaN or Infinity fails the test)."""
    path = output / "metrics.jsonl"
    if not path.exists():
        return []

    def no_nan(token):
        raise AssertionError(f"metrics.jsonl holds a bare {token}")

    return [json.loads(line, parse_constant=no_nan) for line in path.read_text().splitlines()]


def snapshot(output: Path) -> dict[str, bytes]:
    """Every file of a run's outputs (checkpoints, export, metrics), by path."""
    return {
        str(p.relative_to(output)): p.read_bytes()
        for p in sorted(output.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def exported_weights(output: Path) -> dict[str, np.ndarray]:
    return load_file(output / "hf" / "model.safetensors")


def wait_for_step(process: subprocess.Popen, output: Path, step: int, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.stderr.read()[-2000:]}")
        records = metrics(output) if (output / "metrics.jsonl").exists() else []
        if records and records[-1]["step"] >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def assert_stopped(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.startswith("stopped:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted run: checkpoints at 20, 40, 60, a float32 export, one record per step."""
    output = tmp_path_factory.mktemp("straight") / "run"
    result = train(output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics(output)] == list(range(1, STEPS + 1))
    for line in ("jaxrm: mesh", "4000 train pairs", "dropped", "checkpoint step 20 saved"):
        assert line in result.stderr, line  # jaxrm's INFO lines reach the user
    return output


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_rerun_with_resume_false_is_refused_then_overwrite_starts_over(straight, tmp_path):
    output = copy_run(straight, tmp_path)
    (output / LOCK_FILE).unlink()
    before = snapshot(output)
    refused = train(output, "--config.resume=false", "--config.learning_rate=3e-4")
    assert_one_line_error(refused, str(output), "resume=false", "overwrite_output_dir=true")
    assert refused.returncode == EXIT_USER_ERROR
    assert snapshot(output) == before  # the old run's checkpoints, export and metrics are intact
    assert not (output / LOCK_FILE).exists()  # nor a lock file left behind

    again = train(
        output,
        "--config.resume=false",
        "--config.overwrite_output_dir=true",
        "--config.learning_rate=3e-4",
        "--config.max_train_steps=10",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    records = metrics(output)
    assert [r["step"] for r in records] == list(range(1, 11))  # only the new run's records
    assert records[0]["train/rm/lr"] == pytest.approx(3e-4)
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["10"]
    new, old = exported_weights(output), exported_weights(straight)
    assert not np.array_equal(new["score.weight"], old["score.weight"])  # the new run's model


def test_divergence_skips_steps_then_stops_keeping_good_checkpoints(tmp_path):
    output = tmp_path / "run"
    result = train(output, "--config.learning_rate=1e10", "--config.checkpointing_steps=1")
    assert_stopped(result, EXIT_DIVERGED, "diverged", "10 consecutive steps", "learning_rate")
    assert not (output / "hf").exists()  # nothing exported
    records = metrics(output)
    last = records[-1]
    assert last["train/skipped_steps"] >= 10 and last["step"] < STEPS
    assert last["train/rm/loss"] is None  # a window of only skipped steps: null, not NaN
    _, meta = read_meta(output)
    abstract = abstract_params(llama_config_from_hf(meta["hf_config"]), make_mesh(1, -1, 1))
    steps = sorted(int(p.name) for p in (output / "checkpoints").iterdir())
    assert steps  # checkpoints were written before and during the skipped steps
    for step in steps:
        _, params = restore_params(output, step, abstract)
        for leaf in jax.tree.leaves(params):
            assert np.isfinite(np.asarray(leaf)).all(), step


def test_second_live_launch_is_refused_and_writes_nothing(tmp_path):
    output = tmp_path / "run"
    first = start(output, f"--config.max_train_steps={10 * STEPS}")
    try:
        wait_for_step(first, output, 2)
        second = train(output)
        assert_one_line_error(second, str(output), "in use by another live run", f"pid {first.pid}")
        assert first.poll() is None  # the first run goes on
        wait_for_step(first, output, 4)
    finally:
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    steps = [r["step"] for r in metrics(output)]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, in order


def test_sigterm_at_a_random_step_then_rerun_equals_an_uninterrupted_run(straight, tmp_path):
    output = tmp_path / "run"
    at = random.Random().randint(3, STEPS - 10)
    run = start(output)
    wait_for_step(run, output, at)
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=300)
    result = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
    assert_stopped(result, EXIT_INTERRUPTED, "interrupted at step", "rerun the same command")
    saved = sorted(int(p.name) for p in (output / "checkpoints").iterdir())
    stopped_at = saved[-1]
    assert at <= stopped_at < STEPS, (at, saved)
    assert [r["step"] for r in metrics(output)] == list(range(1, stopped_at + 1))
    assert not (output / "hf").exists()

    rerun = train(output)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in rerun.stderr
    assert [r["step"] for r in metrics(output)] == list(range(1, STEPS + 1))
    got, want = exported_weights(output), exported_weights(straight)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} (SIGTERM at {at})")


def test_sigint_is_graceful(tmp_path):
    output = tmp_path / "run"
    run = start(output, f"--config.max_train_steps={10 * STEPS}")
    wait_for_step(run, output, 2)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=300)
    assert_stopped(
        subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr),
        EXIT_INTERRUPTED,
        "interrupted at step",
    )
    assert "KeyboardInterrupt" not in stderr


SIGNAL_IN = """
import os, signal, sys
import jaxrm.hf_export
from jaxrm import train
from jaxrm.errors import run_cli

owner, name = {"eval": (train.Loop, "run_eval"), "export": (jaxrm.hf_export, "export_checkpoint")}[
    sys.argv.pop(1)
]
real = getattr(owner, name)

def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at once, inside this phase
    return real(*args, **kwargs)

setattr(owner, name, signalled)
run_cli(lambda: train.main(sys.argv[1:]))
"""


def train_signalled_in(phase: str, output: Path, *overrides: str) -> subprocess.CompletedProcess:
    """A run that gets SIGTERM as its final eval (`eval`) or its HF export (`export`) starts."""
    argv = command(output, *overrides)[3:]  # the flags after `python -m jaxrm.train`
    return subprocess.run(
        [sys.executable, "-c", SIGNAL_IN, phase, *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )


def test_sigterm_after_the_last_step_keeps_its_checkpoint_then_rerun_finishes(straight, tmp_path):
    output = tmp_path / "run"
    with_eval = f"--config.dataset_mixer_eval_list=['{TINY_EVAL_FILE}',1.0]"
    in_eval = train_signalled_in("eval", output, with_eval)
    assert_stopped(
        in_eval,
        EXIT_INTERRUPTED,
        f"SIGTERM received; stopped after the last step ({STEPS} of {STEPS}), whose checkpoint is "
        f"saved in {output / 'checkpoints'}; rerun the same command to finish the final eval and "
        "the HF export",
    )
    assert read_meta(output)[0] == STEPS  # the last step's checkpoint is complete
    assert "final_eval" not in read_meta(output)[1]
    assert [r["step"] for r in metrics(output)] == list(range(1, STEPS + 1))  # no eval record
    assert not (output / "hf").exists()

    in_export = train_signalled_in("export", output, with_eval)
    assert_stopped(in_export, EXIT_INTERRUPTED, f"last step ({STEPS} of", "to finish the HF export")
    assert f"resumed from step {STEPS}" in in_export.stderr
    records = metrics(output)
    assert [r["step"] for r in records] == [*range(1, STEPS + 1), STEPS]  # trained once
    assert records[-1]["eval/rm/accuracy"] > 0.4
    stats = read_meta(output)[1]["reward_stats"]
    assert stats["count"] == 800  # the final eval (400 pairs) is recorded with the checkpoint

    done = train(output, with_eval)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from step {STEPS}" in done.stderr
    assert metrics(output) == records  # neither trained nor evaluated again
    config = json.loads((output / "hf" / "config.json").read_text())
    assert (config["mean"], config["std"]) == (stats["mean"], stats["std"])
    got, want = exported_weights(output), exported_weights(straight)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


SIGNAL_TWICE = """
import os, signal, sys, time
from jaxrm.preemption import StopRequest
with StopRequest() as stop:
    stop.graceful = True
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    print("first:", stop.requested, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("still running", flush=True)
"""


def test_a_second_signal_exits_at_once():
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_TWICE], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 128 + signal.SIGTERM
    assert result.stdout.splitlines() == ["first: True"]
    assert time.time() - started < 5


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--config.learning_rate=1e-4"], "learning_rate: 0.001 -> 0.0001"),
        (["--config.seed=9"], "seed: 8 -> 9"),
        (["--config.total_train_batch_size=16"], "derived.pairs_per_step: 32 -> 16"),
        (
            [f"--config.dataset_mixer_list=['{TINY_EVAL_FILE}',1.0]"],
            "dataset_mixer_list",
        ),
    ],
)
def test_resume_with_changed_settings_is_refused(straight, tmp_path, overrides, expected):
    output = copy_run(straight, tmp_path)
    before = snapshot(output)
    result = train(output, *overrides)
    assert_one_line_error(result, "cannot resume", expected, "overwrite_output_dir")
    assert snapshot(output) == before


def test_resume_with_a_model_of_other_shapes_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "model"
    shutil.copytree(TINY_MODEL_DIR, model_dir)
    output = tmp_path / "run"
    first = train(output, f"--config.model_name_or_path={model_dir}", "--config.max_train_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    config = LlamaConfig.from_pretrained(model_dir)
    config.hidden_size, config.head_dim = 32, 8
    LlamaForCausalLM(config).save_pretrained(model_dir)  # same path, other shapes
    result = train(output, f"--config.model_name_or_path={model_dir}", "--config.max_train_steps=2")
    assert_one_line_error(result, "cannot resume", "model hidden_size: 64 -> 32")


def test_corrupted_newest_checkpoint_falls_back_for_export_and_resume(straight, tmp_path):
    output = copy_run(straight, tmp_path)
    (output / "hf").rename(tmp_path / "straight-hf")
    for data_file in (output / "checkpoints" / "60" / "state").rglob("d/*"):
        with open(data_file, "r+b") as f:
            f.truncate(16)
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxrm.export",
            "--checkpoint",
            str(output),
            "--output",
            str(tmp_path / "hf40"),
            "--dtype",
            "float32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "step 40" in exported.stdout and "Traceback" not in exported.stderr
    assert "checkpoint step 60 cannot be read" in exported.stderr

    resumed = train(output)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 40" in resumed.stderr and "Traceback" not in resumed.stderr
    assert [r["step"] for r in metrics(output)] == list(range(1, STEPS + 1))
    assert (output / "checkpoints.corrupt").is_dir()
    got = exported_weights(output)
    want = load_file(tmp_path / "straight-hf" / "model.safetensors")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_pad_token_equal_to_eos_is_refused(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path / "tok")
    result = train(tmp_path / "new" / "run", f"--config.tokenizer_name={tmp_path / 'tok'}")
    assert_one_line_error(result, "pad token", "is the eos token", "add_special_tokens")
    assert not (tmp_path / "new").exists()  # the refused run removed what it created
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    result = train(tmp_path / "mine", f"--config.tokenizer_name={tmp_path / 'tok'}")
    assert_one_line_error(result, "pad token", "is the eos token")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # no lock file left


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.max_checkpoints_to_keep=0", "'max_checkpoints_to_keep' must be >= 1"),
        ("--config.attention=blocked", "'attention' must be one of"),
    ],
)
def test_bad_values_fail_before_any_work(tmp_path, override, expected):
    result = train(tmp_path / "run", override)
    assert_one_line_error(result, expected)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts a small tmpfs (needs root / CAP_SYS_ADMIN, which CI has here); skips otherwise."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_read_only_or_full_disk_is_refused_before_loading(tmpfs):
    read_only = train(tmpfs("1m", read_only=True) / "run")
    assert_one_line_error(read_only, "not writable", "Read-only file system")
    full = train(tmpfs("1m") / "run")
    assert_one_line_error(full, "free", "a checkpoint and the HF export need about")
    for result in (read_only, full):
        assert "train pairs" not in result.stderr and "parameters" not in result.stderr


def test_disk_full_at_a_later_save_keeps_the_last_checkpoint(tmpfs):
    output = tmpfs("3m") / "run"
    result = train(output, "--config.checkpointing_steps=10", "--config.max_checkpoints_to_keep=5")
    # The checkpoint or the metrics.jsonl append meets the full disk first, as timing has it.
    assert_one_line_error(
        result, "could not write ", "no space left on device", "the last complete checkpoint is "
    )
    message = [x for x in result.stderr.splitlines() if x.startswith("error:")][0]
    kept = int(message.rsplit("step ", 1)[1])
    assert str(kept) in {p.name for p in (output / "checkpoints").iterdir()}
    assert read_meta(output)[0] == kept  # complete and readable


def test_a_metrics_file_that_cannot_be_written_is_one_line(tmp_path):
    output = tmp_path / "run"
    (output / "metrics.jsonl").mkdir(parents=True)  # opening it for appending fails
    result = train(output, "--config.checkpointing_steps=0")
    metrics_file = output / "metrics.jsonl"
    assert_one_line_error(
        result, f"could not write {metrics_file}", "the last complete checkpoint is none"
    )


def test_a_torn_last_metrics_line_is_left_out(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 0.5}\n{"step": 2, "a": 0.25}\n{"step": 3, "a": 0.1')
    assert read_metrics(path) == [{"step": 1, "a": 0.5}, {"step": 2, "a": 0.25}]
    assert "cut short" in caplog.text
    keep_metrics_until(path, 2)  # a resume rewrites the file without it
    assert path.read_text() == '{"step": 1, "a": 0.5}\n{"step": 2, "a": 0.25}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2 is not JSON"):
        read_metrics(path)
