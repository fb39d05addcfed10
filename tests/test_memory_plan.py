"""scripts/memory_plan.py: XLA's per-device memory of the real train step, compiled for a mesh of
fake CPU devices from abstract weights (the tiny config here; configs/tulu8b.py in
benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import pytest

from jaxrm.config import get_config
from jaxrm.errors import UserError
from jaxrm.memory_plan import largest_fitting, plan
from tests.hf_reference import tiny_llama_config
from tests.test_sharding import ODD_HIDDEN, ODD_HIDDEN_REFUSAL

KEYS = {"per_device_bytes", "compile_seconds", "pieces", "devices", "mesh", "parameter_bytes"}
PIECE_KEYS = {"arguments", "outputs", "temporaries", "aliased", "total", "resident", "peak"}
# the tiny Llama: 136,576 float32 parameters, 320 of them norm weights (no sharding rule)
TINY_PARAMETER_BYTES = 136_576 * 4
TINY_NORM_BYTES = 320 * 4


def plan_for(*overrides: str, devices: int = 8) -> dict:
    return plan(get_config(["--config", "configs/tiny.py", *overrides]), jax.devices()[:devices])


def test_fsdp_divides_parameters_and_optimizer_state():
    sharded = plan_for("--config.mesh.fsdp=8")
    replicated = plan_for("--config.mesh.data=8", "--config.mesh.fsdp=1")
    for result in (sharded, replicated):
        assert KEYS <= set(result) and result["analysis"] == "XLA:CPU"
        assert result["per_device_bytes"] > 0 and result["compile_seconds"] > 0
        assert set(result["pieces"]) == {"accumulate", "apply"}  # the packed default
        for piece in result["pieces"].values():
            assert PIECE_KEYS <= set(piece)
        json.dumps(result)  # the CLI prints it as its last line
    assert sharded["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert replicated["parameter_bytes"] == TINY_PARAMETER_BYTES
    sharded_bytes = (TINY_PARAMETER_BYTES - TINY_NORM_BYTES) // 8
    assert sharded["parameter_bytes"] == TINY_NORM_BYTES + sharded_bytes
    assert sharded["per_device_bytes"] < replicated["per_device_bytes"]
    for result in (sharded, replicated):
        apply, accumulate = result["pieces"]["apply"], result["pieces"]["accumulate"]
        params = result["parameter_bytes"]
        # apply reads parameters, gradients and Adam's two moments, plus a few scalars (< 64 B)
        assert 0 <= apply["arguments"] - 4 * params < 64
        # while micro-batches accumulate, Adam's moments (and its int32 count) wait on the device
        assert accumulate["resident"] == 2 * params + 4
        # the donated buffers are reused: parameters + Adam state (apply), gradients (accumulate)
        assert 3 * params <= apply["aliased"] < 3 * params + 64
        assert params <= accumulate["aliased"] < params + 64
        # the divergence guard applies AdamW under a condition, in place: no new copy of the
        # parameters and Adam state beside the old one (a select after the update held 3.2x)
        assert apply["temporaries"] < params
        for p in result["pieces"].values():
            assert p["total"] == p["arguments"] + p["outputs"] + p["temporaries"] - p["aliased"]
            assert p["peak"] == p["total"] + p["resident"]
        assert result["per_device_bytes"] == max(p["peak"] for p in result["pieces"].values())


def test_a_mesh_that_replicates_the_model_is_refused(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(tiny_llama_config("gqa", **ODD_HIDDEN).to_json_string())
    cfg = get_config(["--config", "configs/tiny.py"])
    with pytest.raises(UserError) as refused:
        plan(cfg, jax.devices(), model_config=str(config))
    for fragment in ODD_HIDDEN_REFUSAL:
        assert fragment in str(refused.value)


def test_cli_padded_layout_on_its_own_fake_devices():
    """As users run it: the script makes its own 4 fake CPU devices; the last line is JSON."""
    result = subprocess.run(
        [
            sys.executable, "scripts/memory_plan.py", "--config", "configs/tiny.py",
            "--devices", "4", "--batch_layout", "padded", "--per_device_train_batch_size", "2",
            "--remat_policy", "full",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    planned = json.loads(lines[-1])
    assert planned["devices"] == 4 and planned["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert planned["batch_layout"] == "padded" and set(planned["pieces"]) == {"step"}
    assert planned["per_device_train_batch_size"] == 2 and planned["remat_policy"] == "full"
    assert planned["per_device_bytes"] == planned["pieces"]["step"]["total"] > 0
    assert lines[0].startswith("memory plan: configs/tiny.py on 4 devices")
    assert any("XLA:CPU keeps more in float32" in line for line in lines)


@pytest.mark.parametrize(
    "start, budget, expected",
    [
        (1, 72, 8),
        (4, 72, 8),
        (16, 72, 8),
        (3, 16, 1),
        (1, 15, None),
        (1, 10**6, 1024),
        (5, 200, 24),
    ],
)
def test_largest_fitting_search(start, budget, expected):
    """Peaks of 8 + 8 n (like GiB per packed row): the largest n within the budget, each size
    planned once, in a few plans."""
    tried: list[int] = []

    def peak_of(n: int) -> int:
        tried.append(n)
        return 8 + 8 * n

    found = largest_fitting(peak_of, budget, start=start)
    assert found == (None if expected is None else (expected, 8 + 8 * expected))
    assert len(tried) == len(set(tried)) <= 12


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_a_plan_reads_any_familys_config_json(tmp_path, family):
    """A Qwen3 or Gemma 2 config.json plans the family's model: its parameters are those of
    transformers' classifier (tied embeddings, q/k norms, four norms per layer)."""
    from transformers import AutoModelForSequenceClassification

    from tests.hf_reference import tiny_config

    config = tiny_config(family)
    (tmp_path / "config.json").write_text(config.to_json_string())
    reference = AutoModelForSequenceClassification.from_config(config)
    cfg = get_config(
        ["--config", "configs/tiny.py", "--config.mesh.data=8", "--config.mesh.fsdp=1"]
    )
    result = plan(cfg, jax.devices(), model_config=str(tmp_path / "config.json"))
    assert result["parameter_bytes"] == 4 * sum(p.numel() for p in reference.parameters())
    assert result["per_device_bytes"] > 0
