"""A resume does each thing once: it restores into the run plan's abstract state without reading
the HF weights, and checks the settings of the very step it restores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jaxrm.assets import TINY_MODEL_DIR
from jaxrm.errors import EXIT_USER_ERROR
from jaxrm.train import main as train_main
from tests.test_train_cli import SHORT_RUN


def common(model_dir: Path, output: Path) -> list[str]:
    return [
        *SHORT_RUN,
        "--config.max_train_steps=4",
        "--config.checkpointing_steps=2",
        f"--config.model_name_or_path={model_dir}",
        f"--config.output_dir={output}",
    ]


def crash_after_step_2(output: Path) -> None:
    """The run as if it died right after its step-2 checkpoint."""
    shutil.rmtree(output / "checkpoints" / "4")
    metrics = output / "metrics.jsonl"
    kept = [x for x in metrics.read_text().splitlines() if json.loads(x)["step"] <= 2]
    metrics.write_text("".join(x + "\n" for x in kept))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(TINY_MODEL_DIR, copy)
    return copy


def test_resume_reads_nothing_of_the_hf_model_but_its_config(model_dir, tmp_path, capfd):
    output = tmp_path / "run"
    train_main(common(model_dir, output))
    crash_after_step_2(output)
    assert list(model_dir.glob("*.safetensors"))
    for path in model_dir.iterdir():
        if path.name != "config.json":
            path.unlink()  # weights and tokenizer: a resume that read them would fail here
    capfd.readouterr()
    summary = train_main(common(model_dir, output))
    assert summary["step"] == 4
    assert "resumed from step 2 of 4" in capfd.readouterr().err
    records = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_drift_check_reads_the_step_that_is_restored(model_dir, tmp_path, capfd):
    """Step 4's arrays are damaged (its metadata is not), so the resume falls back to step 2;
    step 2 was written with another learning rate: the resume is refused, naming step 2."""
    output = tmp_path / "run"
    train_main(common(model_dir, output))
    for data_file in (output / "checkpoints" / "4" / "state").rglob("d/*"):
        with open(data_file, "r+b") as f:
            f.truncate(16)
    meta_file = output / "checkpoints" / "2" / "meta" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["learning_rate"] = 0.5
    meta_file.write_text(json.dumps(meta))
    capfd.readouterr()
    with pytest.raises(SystemExit) as stopped:
        train_main(common(model_dir, output))
    assert stopped.value.code == EXIT_USER_ERROR
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot resume")
    assert "(step 2)" in err and "learning_rate: 0.5 ->" in err
