"""Compiled for an H100 on this CPU (jaxrm/deviceless.py, JAX's CUDA plugin in the side folder
scripts/deviceless_plugin.sh makes): every GPU attention implementation of the table compiles, only
`flash` loops over blocks in XLA, and the memory plan runs by the GPU compiler's analysis.

Also libtpu's compile for a TPU slice. The compiles run where the side folders exist
(`JAXRM_DEVICELESS=1 scripts/test.sh` makes them: ~436 MB of wheels, ~800 MB installed); they are
skipped elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxrm.deviceless import (
    plugin_installed,
    plugin_version,
    target_config,
    tpu_topology,
)

needs_cuda = pytest.mark.skipif(
    not plugin_installed("cuda"), reason="no CUDA plugin (scripts/deviceless_plugin.sh cuda)"
)
needs_tpu = pytest.mark.skipif(
    not plugin_installed("tpu"), reason="no libtpu (scripts/deviceless_plugin.sh tpu)"
)
# implementations that loop over attention blocks in XLA, by design (the plain-JAX blocked kernel)
LOOPING = {"flash"}


def run_script(*argv: str) -> dict:
    result = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_cuda
def test_every_gpu_attention_compiles_for_an_h100_and_only_flash_loops():
    compiled = run_script("scripts/attention_compile.py", "--length", "1024")
    assert compiled["device"] == "NVIDIA H100 80GB HBM3"
    programs = {(p["kind"], p["implementation"]): p for p in compiled["programs"]}
    assert ("causal", "cudnn") in programs  # cuDNN compiled (a custom call), without a GPU
    for (kind, implementation), program in programs.items():
        # the fused kernels are one call each: cuDNN's, or Pallas' Triton kernel (not interpreted)
        call = {"cudnn": "__cudnn$", "pallas": "__gpu$xla.gpu.triton"}.get(implementation)
        if call:
            assert any(c.startswith(call) for c in program["custom_calls"]), (kind, implementation)
    for kind in ("segments", "tree"):
        assert programs[kind, "flash"]["while_loops"] >= 1  # so the check below can fail
    for (kind, implementation), program in programs.items():
        if implementation not in LOOPING:
            assert program["while_loops"] == 0, (kind, implementation)
        assert program["temp_bytes"] > 0 and program["argument_bytes"] > 0


@pytest.mark.slow
@needs_cuda
def test_memory_plan_for_h100s():
    planned = run_script(
        "scripts/memory_plan.py", "--config", "configs/tiny.py", "--devices", "2",
        "--target", "h100",
    )  # fmt: skip
    assert planned["analysis"] == "XLA:GPU (H100 target, deviceless)"
    assert planned["devices"] == 2 and planned["dtype"] == "bfloat16"
    assert planned["per_device_bytes"] > planned["parameter_bytes"] > 0
    # the update runs in place in the donated parameters and Adam moments (a `lax.cond` guard
    # made XLA:GPU hold their new values apart: temporaries of 3x the parameters)
    assert planned["pieces"]["apply"]["temporaries"] < planned["parameter_bytes"] / 8


def test_the_target_spec_is_openxlas_with_jaxrms_cudnn_version():
    text = target_config("h100")
    assert 'name: "NVIDIA H100 80GB HBM3"' in text and "core_count: 132" in text
    assert "dnn_version_info {\n  major: 9\n  minor: 8" in text
    assert "collective_memory_granularity" not in text


@pytest.mark.slow
@needs_tpu
def test_attention_and_memory_plan_for_a_tpu_slice():
    compiled = run_script("scripts/attention_compile.py", "--target", "v5e", "--length", "1024",
                          "--kinds", "tree")  # fmt: skip
    assert compiled["device"] == "TPU v5 lite"
    programs = {p["implementation"]: p for p in compiled["programs"]}
    assert programs["flash"]["while_loops"] >= 1
    planned = run_script(
        "scripts/memory_plan.py", "--config", "configs/tiny.py", "--devices", "4",
        "--target", "v5e",
    )  # fmt: skip
    assert planned["analysis"] == "XLA:TPU (v5e target, deviceless)" and planned["devices"] == 4
    assert planned["per_device_bytes"] > planned["parameter_bytes"] > 0


def test_tpu_topologies():
    assert [tpu_topology(n, 2) for n in (4, 8, 16, 32, 64)] == ["2x2", "2x4", "4x4", "4x8", "8x8"]
    assert [tpu_topology(n, 3) for n in (4, 8, 16, 32, 64, 128)] == [
        "2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8"
    ]  # fmt: skip


def test_the_cuda_plugins_version_decides_its_collective_kernels_flag(tmp_path):
    """From plugin 0.12 a deviceless GPU compile turns XLA's Triton collective kernels off (at 64
    devices of one host XLA:GPU 0.12 aborts compiling one); older plugins do not know the flag."""
    assert plugin_version(tmp_path) == ()
    show_flags = "from jaxrm.deviceless import use_plugin; import os; use_plugin('h100'); "
    show_flags += "print(os.environ['XLA_FLAGS'])"
    for version, flagged in (("0.10.2", False), ("0.11.2", False), ("0.12.0.1", True)):
        site = tmp_path / version / "site"
        (site / f"jax_cuda12_plugin-{version}.dist-info").mkdir(parents=True)
        (site / "jax_plugins").mkdir()
        assert plugin_version(site) == tuple(int(x) for x in version.split("."))
        env = dict(os.environ, JAXRM_CUDA_PLUGIN=str(site.parent))
        env["XLA_FLAGS"] = "--xla_gpu_experimental_use_collective_kernels=ALL"
        flags = subprocess.run(
            [sys.executable, "-c", show_flags], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        assert f"--xla_gpu_cuda_data_dir={site / 'nvidia' / 'cuda_nvcc'}" in flags
        expected = "=" if flagged else "=ALL"
        assert f"--xla_gpu_experimental_use_collective_kernels{expected}" in flags
