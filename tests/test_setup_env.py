"""Set-up per accelerator: `scripts/detect_accelerator.py` with the host probes faked, and
`scripts/setup_env.sh` with a fake Python whose venv records the pip commands."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_score import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]
DETECT = REPO / "scripts" / "detect_accelerator.py"
DRIVER_VERSION = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
NVIDIA_SMI_LIST = (
    "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0f1e2d3c-0000-0000-0000-000000000000)\n"
    "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-0f1e2d3c-0000-0000-0000-000000000001)\n"
)


def write(path: Path, text: str, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def fake_host(root: Path, *parts: str) -> dict[str, str]:
    """A host under `root` with the named parts; returns the environment that probes it."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    pci = root / "sys" / "bus" / "pci" / "devices"
    for part in parts:
        if part == "driver":
            write(root / "proc" / "driver" / "nvidia" / "version", DRIVER_VERSION)
        elif part == "nvidia-smi":
            echoes = "".join(f"echo '{line}'\n" for line in NVIDIA_SMI_LIST.splitlines())
            write(bin_dir / "nvidia-smi", f"#!/bin/sh\n{echoes}", True)
        elif part == "nvidia-smi-no-driver":
            message = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"
            write(bin_dir / "nvidia-smi", f"#!/bin/sh\necho '{message}'\nexit 9\n", True)
        elif part == "tpu-v5e-pci":
            for i in range(4):
                write(pci / f"0000:00:0{4 + i}.0" / "vendor", "0x1ae0\n")
                write(pci / f"0000:00:0{4 + i}.0" / "device", "0x0063\n")
        elif part == "google-nic":  # gVNIC: Google's vendor id on any GCE VM, not a TPU
            write(pci / "0000:00:03.0" / "vendor", "0x1ae0\n")
            write(pci / "0000:00:03.0" / "device", "0x0042\n")
        elif part == "dev-accel":
            for i in range(4):
                write(root / "dev" / f"accel{i}", "")
        else:
            raise ValueError(part)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAXRM_ACCELERATOR", "TPU_ACCELERATOR_TYPE", "JAXRM_PROBE_ROOT")
    }
    env.update(JAXRM_PROBE_ROOT=str(root), PATH=str(bin_dir))
    return env


def detect(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DETECT)], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    "parts, extra_env, expected",
    [
        ((), {}, "cpu no NVIDIA driver and no TPU found"),
        (("google-nic",), {}, "cpu no NVIDIA driver and no TPU found"),
        (("nvidia-smi-no-driver",), {}, "cpu no NVIDIA driver and no TPU found"),
        (
            ("driver",),
            {},
            "cuda NVIDIA driver 550.54.15 is loaded (/proc/driver/nvidia/version)",
        ),
        (("nvidia-smi",), {}, "cuda nvidia-smi lists 2 GPU(s): GPU 0: NVIDIA H100 80GB HBM3"),
        (
            ("tpu-v5e-pci", "google-nic"),
            {},
            "tpu 4 TPU v5e chip(s) on the PCI bus (/sys/bus/pci/devices)",
        ),
        (("dev-accel",), {}, "tpu 4 TPU device file(s) (/dev/accel*)"),
        ((), {"TPU_ACCELERATOR_TYPE": "v5p-16"}, "tpu TPU_ACCELERATOR_TYPE=v5p-16 (a GKE TPU"),
        (("driver", "tpu-v5e-pci"), {}, "cuda NVIDIA driver 550.54.15"),
        (("driver",), {"JAXRM_ACCELERATOR": "tpu"}, "tpu JAXRM_ACCELERATOR=tpu"),
        (("tpu-v5e-pci",), {"JAXRM_ACCELERATOR": "cpu"}, "cpu JAXRM_ACCELERATOR=cpu"),
    ],
)
def test_detection_with_faked_probes(tmp_path, parts, extra_env, expected):
    env = fake_host(tmp_path / "host", *parts)
    env.update(extra_env)
    result = detect(env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout.startswith(expected), result.stdout


def test_unknown_accelerator_is_a_one_line_error(tmp_path):
    env = fake_host(tmp_path / "host", "driver")
    env["JAXRM_ACCELERATOR"] = "gpu"
    result = detect(env)
    assert result.returncode == 2 and result.stdout == ""
    assert_one_line_error(result, "JAXRM_ACCELERATOR must be one of cpu, cuda, tpu", "'gpu'")


# ---- scripts/setup_env.sh with a fake Python

FAKE_PYTHON = """#!/usr/bin/env bash
# `-m venv DIR` makes a venv whose python only logs its arguments; anything else is real Python.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  log="$(cd "$3" && pwd)/pip.log"
  printf '#!/usr/bin/env bash\\necho "$*" >> %s\\n' "$log" > "$3/bin/python"
  chmod +x "$3/bin/python"
  exit 0
fi
exec {real} "$@"
"""


@pytest.fixture
def checkout(tmp_path):
    """A copy of the set-up scripts and project files, a fake Python and an empty fake host."""
    repo = tmp_path / "repo"
    for name in ("scripts/setup_env.sh", "scripts/detect_accelerator.py", "pyproject.toml"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    (repo / "scripts" / "constraints.txt").write_text("jax==0.10.2\n")
    python = tmp_path / "fake-python"
    write(python, FAKE_PYTHON.format(real=sys.executable), executable=True)
    # The system's tools are on PATH too: a failing nvidia-smi comes first, hiding a real one.
    env = fake_host(tmp_path / "host", "nvidia-smi-no-driver")
    env.update(PYTHON=str(python), PATH=f"{env['PATH']}:/usr/bin:/bin")
    return repo, env


def setup(repo: Path, env: dict[str, str], *args: str, **extra_env: str):
    return subprocess.run(
        ["bash", str(repo / "scripts" / "setup_env.sh"), *args],
        capture_output=True,
        text=True,
        env={**env, **extra_env},
        timeout=60,
    )


def installs(repo: Path) -> list[str]:
    """The `pip install ... -e SPEC` lines the venv's python was called with."""
    log = repo / ".venv" / "pip.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.rsplit(" ", 1)[1] for line in lines if " -e " in line]


def test_setup_installs_the_accelerator_extra_and_rebuilds_on_a_change(checkout):
    repo, env = checkout
    first = setup(repo, env, "test", JAXRM_ACCELERATOR="cuda")
    assert first.returncode == 0, first.stderr
    assert "jaxrm setup: accelerator cuda (JAXRM_ACCELERATOR=cuda)" in first.stderr
    assert installs(repo) == [".[test,cuda12]"]
    assert (repo / ".venv" / ".jaxrm-accelerator").read_text().strip() == "cuda12"
    stamps = [p.name for p in (repo / ".venv").glob(".jaxrm-installed-*")]
    assert len(stamps) == 1 and stamps[0].startswith(".jaxrm-installed-cuda12-test-")
    assert "-c scripts/constraints.txt" in (repo / ".venv" / "pip.log").read_text()

    again = setup(repo, env, "test", JAXRM_ACCELERATOR="cuda")
    assert again.returncode == 0 and installs(repo) == [".[test,cuda12]"]  # nothing to do

    cuda13 = setup(repo, env, "test", JAXRM_ACCELERATOR="cuda", JAXRM_CUDA="13")
    assert cuda13.returncode == 0, cuda13.stderr
    assert ".venv was built for cuda12; rebuilding it for cuda13" in cuda13.stderr
    assert installs(repo) == [".[test,cuda13]"]

    switched = setup(repo, env, "test")  # the fake host has no accelerator: cpu
    assert switched.returncode == 0, switched.stderr
    assert "accelerator cpu (no NVIDIA driver and no TPU found)" in switched.stderr
    assert ".venv was built for cuda13; rebuilding it for cpu" in switched.stderr
    assert installs(repo) == [".[test]"]  # a fresh venv: nothing of the cuda install is left
    assert (repo / ".venv" / ".jaxrm-accelerator").read_text().strip() == "cpu"

    main_only = setup(repo, env)
    assert main_only.returncode == 0 and installs(repo) == [".[test]", "."]


def test_setup_treats_an_unmarked_venv_as_cpu(checkout):
    repo, env = checkout
    assert setup(repo, env, JAXRM_ACCELERATOR="cpu").returncode == 0
    (repo / ".venv" / ".jaxrm-accelerator").unlink()  # as set up before accelerators existed
    kept = setup(repo, env, JAXRM_ACCELERATOR="cpu")
    assert kept.returncode == 0 and "rebuilding" not in kept.stderr
    tpu = setup(repo, env, JAXRM_ACCELERATOR="tpu")
    assert ".venv was built for cpu; rebuilding it for tpu" in tpu.stderr
    assert installs(repo) == [".[tpu]"]


def test_setup_rejects_an_unknown_accelerator_and_keeps_the_venv(checkout):
    repo, env = checkout
    assert setup(repo, env, JAXRM_ACCELERATOR="cuda").returncode == 0
    result = setup(repo, env, JAXRM_ACCELERATOR="rocm")
    assert_one_line_error(result, "JAXRM_ACCELERATOR must be one of cpu, cuda, tpu", "'rocm'")
    result = setup(repo, env, JAXRM_ACCELERATOR="cuda", JAXRM_CUDA="11")
    assert_one_line_error(result, "JAXRM_CUDA must be 12 or 13", "'11'")
    assert installs(repo) == [".[cuda12]"]


def test_setup_keeps_a_venv_marked_cuda_from_before_cuda13(checkout):
    repo, env = checkout
    assert setup(repo, env, JAXRM_ACCELERATOR="cuda").returncode == 0
    (repo / ".venv" / ".jaxrm-accelerator").write_text("cuda\n")  # as marked before CUDA 13
    kept = setup(repo, env, JAXRM_ACCELERATOR="cuda")
    assert kept.returncode == 0 and "rebuilding" not in kept.stderr
