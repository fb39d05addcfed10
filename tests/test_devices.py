"""`python -m jaxrm.devices` on the 8 fake CPU devices: the report, the mesh and the pairs per
device for a config, and one-line errors when a config does not fit."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from types import SimpleNamespace

import jax
import pytest

from jaxrm import devices
from tests.test_score import assert_one_line_error


def report_lines(capsys, *argv: str) -> list[str]:
    returned = devices.main(list(argv))
    printed = capsys.readouterr().out.splitlines()
    assert printed == returned
    return printed


def line_starting(lines: list[str], prefix: str) -> str:
    found = [line for line in lines if line.startswith(prefix)]
    assert len(found) == 1, lines
    return found[0]


def test_report_without_config(capsys):
    lines = report_lines(capsys)
    assert line_starting(lines, "backend:") == "backend: cpu, 8 devices in all"
    assert line_starting(lines, "devices:") == "devices: process 0: 8 x cpu"
    versions = line_starting(lines, "versions:")
    assert f"jax {jax.__version__}," in versions
    for name in devices.RUNTIME_DISTRIBUTIONS:  # CPU CI has none of the plugins; a GPU venv does
        try:
            assert f"{name} {importlib.metadata.version(name)}" in versions
        except importlib.metadata.PackageNotFoundError:
            assert f"{name} " not in versions
    assert line_starting(lines, "cuDNN flash attention:").endswith("not applicable (cpu backend)")
    total = float(line_starting(lines, "host memory:").split()[2])
    assert total > 0.5  # GiB
    assert "not reported by the cpu backend" in line_starting(lines, "device memory:")
    assert line_starting(lines, "auto:") == (
        "auto: float32 compute, flash attention (what auto means on cpu)"
    )


@pytest.mark.parametrize(
    "argv, mesh, train, execution",
    [
        (
            ["--config", "configs/tiny.py"],
            "data 1 x fsdp 8 x tensor 1 over 8 devices (8 data-parallel)",
            "32 pairs per optimizer step, packed, prompts shared: micro-batches of 4 row(s) of "
            "256 tokens per device, as many as the step's pairs fill",
            "float32 compute, flash attention (dtype auto on cpu, attention auto on cpu)",
        ),
        (
            ["--config", "configs/tiny.py", "--config.batch_layout=padded"],
            "data 1 x fsdp 8 x tensor 1 over 8 devices (8 data-parallel)",
            "32 pairs per optimizer step = 1 micro-batch(es) of 32; 4 pairs (8 sequences of up "
            "to 128 tokens) per device per micro-batch",
            "float32 compute, flash attention (dtype auto on cpu, attention auto on cpu)",
        ),
        (
            [
                "--config",
                "configs/tiny.py",
                "--config.batch_layout=padded",
                "--config.mesh.data=2",
                "--config.mesh.tensor=2",
            ],
            "data 2 x fsdp 2 x tensor 2 over 8 devices (4 data-parallel)",
            "32 pairs per optimizer step = 1 micro-batch(es) of 32; 8 pairs",
            "float32 compute",
        ),
        (
            [
                "--config",
                "configs/tiny.py",
                "--config.total_train_batch_size=0",
                "--config.pack_length=512",
                "--config.prefix_sharing=false",
            ],
            "data 1 x fsdp 8 x tensor 1",
            "8 pairs per optimizer step, packed: micro-batches of 2 row(s) of 512 tokens",
            "float32 compute",
        ),
        (
            ["--config", "configs/tulu8b.py"],
            "data 1 x fsdp 8 x tensor 1 over 8 devices (8 data-parallel)",
            "256 pairs per optimizer step, packed, prompts shared: micro-batches of 1 row(s) of "
            "8192 tokens per device",
            "bfloat16 compute, flash attention (dtype set, attention auto on cpu)",
        ),
        (
            ["--config", "configs/tiny.py", "--config.model_name_or_path=no-such-org/no-model"],
            "data 1 x fsdp 8 x tensor 1",
            "32 pairs per optimizer step, packed",
            "float32 compute, flash attention (dtype auto on cpu, attention auto on cpu; head_dim "
            "not checked: the model's config.json is unreachable)",
        ),
    ],
)
def test_report_with_config(capsys, argv, mesh, train, execution):
    lines = report_lines(capsys, *argv)
    assert line_starting(lines, "config: mesh:").startswith(f"config: mesh: {mesh}")
    assert line_starting(lines, "config: train:").startswith(f"config: train: {train}")
    assert line_starting(lines, "config: eval:").startswith("config: eval:")
    assert any(line.startswith(f"config: {execution}") for line in lines), lines
    assert not any(line.startswith("auto:") for line in lines)


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["--config.mesh.data=3"], ("mesh (data=3, fsdp=-1, tensor=1) does not divide the 8",)),
        (["--config.mesh.data=16", "--config.mesh.fsdp=1"], ("needs 16 devices", "there are 8")),
        (
            ["--config.total_train_batch_size=36"],
            ("total_train_batch_size 36 is not divisible by the data-parallel size 8",),
        ),
        (["--config.attention=cudnn"], ("'attention': cudnn attention needs a gpu backend",)),
        (["--config.dtype=fp8"], ("config key 'dtype' must be one of auto",)),
        (["--config.mesh.pipeline=2"], ("unknown config key 'mesh.pipeline'",)),
    ],
)
def test_config_that_does_not_fit_is_one_line(capsys, overrides, fragments):
    with pytest.raises(SystemExit) as exit_info:
        devices.main(["--config", "configs/tiny.py", *overrides])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in errors[0]
    parsed = not any(key in overrides[0] for key in ("pipeline", "dtype"))  # refused at parse
    if parsed:  # a config that loads: the device report came first
        assert "backend: cpu, 8 devices in all" in captured.out


def test_cli_reports_then_fails_in_one_line():
    """As users run it: tulu8b's 256 pairs per step, in 3 micro-batches, do not divide over 8
    devices; the device report is printed first, then the reason, and the exit status is 2."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxrm.devices",
            "--config",
            "configs/tulu8b.py",
            "--config.gradient_accumulation_steps=3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "backend: cpu, 8 devices in all" in result.stdout
    assert_one_line_error(
        result,
        "total_train_batch_size 256 is not divisible by the data-parallel size 8 x "
        "gradient_accumulation_steps 3",
    )


def test_devices_per_process_groups_identical_hosts():
    def device(process: int, kind: str):
        return SimpleNamespace(process_index=process, device_kind=kind)

    pod = [device(p, "NVIDIA H100 80GB HBM3") for p in range(16) for _ in range(8)]
    assert devices.devices_per_process(pod) == ["processes 0-15: 8 x NVIDIA H100 80GB HBM3 each"]
    mixed = [device(0, "TPU v5p")] * 4 + [device(1, "TPU v5p")] * 2 + [device(2, "TPU v5p")] * 4
    assert devices.devices_per_process(mixed) == [
        "processes 0, 2: 4 x TPU v5p each",
        "process 1: 2 x TPU v5p",
    ]
    assert devices._ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_device_memory_where_the_backend_reports_it():
    gpu = SimpleNamespace(
        platform="gpu",
        id=3,
        memory_stats=lambda: {"bytes_limit": 60 * 1024**3, "bytes_in_use": 1536 * 1024**2},
    )
    assert devices.device_memory([gpu]) == ["gpu 3: 60.0 GiB for JAX, 1.5 GiB in use"]


def test_attention_probe_compares_with_xla(monkeypatch):
    """The probe's verdicts, checked with kernels that run on CPU."""
    usable = devices.attention_probe("flash")
    assert usable.startswith("usable (output and gradients agree with XLA to ")
    assert float(usable.split(" to ")[1].split()[0]) <= devices.PROBE_TOLERANCE
    failing = devices.attention_probe("cudnn")  # no cuDNN on a CPU host
    assert failing.startswith("not usable (") and "--config.attention=xla" in failing
    original = devices.attend

    def off_by_ten_percent(q, k, v, implementation):
        out = original(q, k, v, "xla")
        return out * 1.1 if implementation == "flash" else out

    monkeypatch.setattr(devices, "attend", off_by_ten_percent)
    assert devices.attention_probe("flash").startswith("runs but differs from XLA by 0.1")


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_report_reads_any_familys_config_json(capsys, tmp_path, family):
    from tests.hf_reference import tiny_config

    (tmp_path / "config.json").write_text(tiny_config(family).to_json_string())
    lines = report_lines(
        capsys,
        "--config",
        "configs/tiny.py",
        f"--config.model_name_or_path={tmp_path}",
        "--config.mesh.tensor=2",
    )
    sharding = line_starting(lines, "config: sharding:")
    assert sharding.endswith(f"(architecture: {tmp_path / 'config.json'})")
    assert line_starting(lines, "config: float32 compute, flash attention")
