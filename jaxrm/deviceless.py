"""Compile for a GPU this host does not have: XLA:GPU, run on the CPU, for an H100 target.

JAX's CUDA plugin can compile without a GPU: `jax.experimental.topologies.get_topology_desc(
platform="cuda", target_config=SPEC, topology="1x1xN")` gives N compile-only devices described by a
`GpuTargetConfigProto` text (openxla's `h100_sxm.txtpb`, shipped in `jaxrm/assets/targets/`), and
`jit(...).lower(...).compile()` for a mesh of them runs XLA:GPU's whole pipeline (fusion, Triton
and cuBLAS GEMMs, cuDNN custom calls, buffer assignment) and ptxas. No autotuning runs and no
kernel is launched, so memory and program structure are the target's but speed is not measured.

The plugin and nvcc wheels live BESIDE the virtual environment, in `.cuda-plugin/` (made by
`scripts/cuda_plugin.sh`; `JAXRM_CUDA_PLUGIN` names another folder), never in it: the CPU .venv
stays the CPU build. `use_cuda_plugin()` must run before JAX is imported.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from jaxrm.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PLUGIN_DIR = REPO / ".cuda-plugin"
TARGETS_DIR = Path(__file__).resolve().parent / "assets" / "targets"
# target name -> (spec file, what the reports call the analysis)
TARGETS = {"h100": ("h100_sxm.txtpb", "XLA:GPU (H100 target, deviceless)")}
# openxla's spec says cuDNN 8.9.4 in `dnn_version_info`, older than the cuDNN 9 that JAX's CUDA
# wheels install (scripts/constraints.txt); XLA reads it to choose cuDNN fusions. Planned as 9.8.
DNN_VERSION = (9, 8, 0)
# Fields of the spec that the 0.10.2 plugin's proto lacks (its parse fails on them): dropped.
NEWER_FIELDS = ("collective_memory_granularity",)


def plugin_dir() -> Path:
    return Path(os.environ.get("JAXRM_CUDA_PLUGIN", DEFAULT_PLUGIN_DIR))


def plugin_site(folder: Path | None = None) -> Path:
    return (folder or plugin_dir()) / "site"


def cuda_plugin_installed(folder: Path | None = None) -> bool:
    return (plugin_site(folder) / "jax_plugins").is_dir()


def use_cuda_plugin(folder: Path | None = None) -> None:
    """Puts the side folder's CUDA plugin and nvcc on this process's paths; before JAX loads."""
    if "jax" in sys.modules:
        raise RuntimeError("use_cuda_plugin() must run before JAX is imported")
    site = plugin_site(folder)
    if not cuda_plugin_installed(folder):
        raise UserError(
            f"no CUDA plugin in {site.parent}: run scripts/cuda_plugin.sh first (it installs "
            "jax-cuda12-plugin, jax-cuda12-pjrt and nvidia-cuda-nvcc-cu12 there, ~570 MB)"
        )
    sys.path.insert(0, str(site))
    nvcc = site / "nvidia" / "cuda_nvcc"
    os.environ["PATH"] = f"{nvcc / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    flag = "--xla_gpu_cuda_data_dir"
    others = re.sub(rf"{flag}=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{others} {flag}={nvcc}".strip()
    # the plugin's wheel pins of the CUDA libraries: none are installed (nothing runs on a GPU)
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    os.environ["JAX_PLATFORMS"] = "cpu"  # the host's backend; the GPU devices are compile-only


def target_config(target: str) -> str:
    """The target's `GpuTargetConfigProto` text, with jaxrm's cuDNN version and without
    `NEWER_FIELDS`."""
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    text = (TARGETS_DIR / TARGETS[target][0]).read_text()
    major, minor, patch = DNN_VERSION
    text = re.sub(
        r"dnn_version_info \{[^}]*\}",
        f"dnn_version_info {{\n  major: {major}\n  minor: {minor}\n  patch: {patch}\n}}",
        text,
    )
    for field in NEWER_FIELDS:
        text = re.sub(rf"^\s*{field}:.*\n", "", text, flags=re.MULTILINE)
    return text


def analysis_name(target: str) -> str:
    return TARGETS[target][1]


def target_devices(target: str, count: int) -> list[Any]:
    """`count` compile-only devices of `target` (after `use_cuda_plugin()`)."""
    import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention
    from jax.experimental import topologies

    if count < 1:
        raise UserError(f"--devices must be >= 1, got {count}")
    # JAX asks the installed cuDNN library its version before it emits a cuDNN attention call;
    # none is installed here, so it answers with the target's.
    major, minor, patch = DNN_VERSION
    cudnn_attention.check_cudnn_version = lambda: major * 10000 + minor * 100 + patch
    topology = topologies.get_topology_desc(
        platform="cuda",
        topology_name=target,
        target_config=target_config(target),
        topology=f"1x1x{count}",
    )
    return list(topology.devices)
