"""Compile for accelerators this host does not have: XLA:GPU or XLA:TPU, run on the CPU.

GPU: JAX's CUDA plugin compiles without a GPU: `jax.experimental.topologies.get_topology_desc(
platform="cuda", target_config=SPEC, topology="1x1xN")` gives N compile-only devices described by a
`GpuTargetConfigProto` text (openxla's `h100_sxm.txtpb`, shipped in `jaxrm/assets/targets/`), and
`jit(...).lower(...).compile()` for a mesh of them runs XLA:GPU's whole pipeline (fusion, Triton
and cuBLAS GEMMs, cuDNN custom calls, buffer assignment) and ptxas. No autotuning runs and no
kernel is launched, so memory and program structure are the target's but speed is not measured.

TPU: libtpu compiles without a TPU too: `get_topology_desc(platform="tpu",
topology_name="v5e:4x4")` gives the slice's compile-only devices (libtpu warns that it found no
TPU accelerator type or worker hostnames; compiling needs neither).

The plugins live BESIDE the virtual environment, in `.cuda-plugin/` and `.tpu-plugin/` (made by
`scripts/deviceless_plugin.sh cuda|tpu`; `JAXRM_CUDA_PLUGIN` / `JAXRM_TPU_PLUGIN` name other
folders), never in it: the CPU .venv stays the CPU build. `use_plugin()` must run before JAX is
imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxrm.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TARGETS_DIR = Path(__file__).resolve().parent / "assets" / "targets"


@dataclasses.dataclass(frozen=True)
class Plugin:
    variable: str  # the environment variable naming another folder
    folder: str  # default folder, in the repository
    marker: str  # what the folder's site/ holds once installed
    wheels: str  # for the error message


PLUGINS = {
    "cuda": Plugin("JAXRM_CUDA_PLUGIN", ".cuda-plugin", "jax_plugins",
                   "jax-cuda12-plugin, jax-cuda12-pjrt and nvidia-cuda-nvcc-cu12, ~570 MB"),
    "tpu": Plugin("JAXRM_TPU_PLUGIN", ".tpu-plugin", "libtpu", "libtpu, ~213 MB"),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Target:
    plugin: str  # PLUGINS key
    backend: str  # the backends-table row planned for it
    analysis: str  # what the reports call the analysis
    spec: str = ""  # GPU: the target spec file in TARGETS_DIR
    topology_dims: int = 0  # TPU: dimensions of the slice's topology (v5e: 4x4, v5p: 2x2x4)
    device_kind: str = ""  # GPU: what the card reports (Pallas' Triton lowering reads it)
    cores: int = 0  # GPU: its streaming multiprocessors


TARGETS = {
    "h100": Target(
        "cuda",
        "gpu",
        "XLA:GPU (H100 target, deviceless)",
        spec="h100_sxm.txtpb",
        device_kind="NVIDIA H100 80GB HBM3",
        cores=132,
    ),
    "v5e": Target("tpu", "tpu", "XLA:TPU (v5e target, deviceless)", topology_dims=2),
    "v5p": Target("tpu", "tpu", "XLA:TPU (v5p target, deviceless)", topology_dims=3),
    "v6e": Target("tpu", "tpu", "XLA:TPU (v6e target, deviceless)", topology_dims=2),
}
# openxla's spec says cuDNN 8.9.4 in `dnn_version_info`, older than the cuDNN 9 that JAX's CUDA
# wheels install (scripts/constraints.txt); XLA reads it to choose cuDNN fusions. Planned as 9.8.
DNN_VERSION = (9, 8, 0)
# Fields of the spec that the 0.10.2 plugin's proto lacks (its parse fails on them): dropped.
NEWER_FIELDS = ("collective_memory_granularity",)


def target_named(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {name!r}")
    return TARGETS[name]


def plugin_site(plugin: str) -> Path:
    spec = PLUGINS[plugin]
    return Path(os.environ.get(spec.variable, REPO / spec.folder)) / "site"


def plugin_installed(plugin: str) -> bool:
    return (plugin_site(plugin) / PLUGINS[plugin].marker).exists()


def use_plugin(target: str) -> None:
    """Puts the target's plugin (and nvcc, for CUDA) on this process's paths; before JAX loads."""
    if "jax" in sys.modules:
        raise RuntimeError("use_plugin() must run before JAX is imported")
    plugin = target_named(target).plugin
    site = plugin_site(plugin)
    if not plugin_installed(plugin):
        raise UserError(
            f"no {plugin} plugin in {site.parent}: run scripts/deviceless_plugin.sh {plugin} "
            f"first (it installs {PLUGINS[plugin].wheels} there)"
        )
    sys.path.insert(0, str(site))
    os.environ["JAX_PLATFORMS"] = "cpu"  # the host's backend; the targets' devices compile only
    if plugin == "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata server to ask
        # libtpu's lockfile guards a TPU chip; compiles only: let two processes load it
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        return
    nvcc = site / "nvidia" / "cuda_nvcc"
    os.environ["PATH"] = f"{nvcc / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    set_xla_flag("--xla_gpu_cuda_data_dir", str(nvcc))
    if plugin_version(site) >= (0, 12):
        # One host of N compile-only GPUs: from 0.12 XLA:GPU then plans one-shot Triton kernels for
        # all-reduces over all N (at N = 64 the int32 one's LLVM compile aborts the process); a
        # cluster's N GPUs are hosts of 8, and their all-reduces NCCL's, as this filter makes them.
        set_xla_flag("--xla_gpu_experimental_use_collective_kernels", "")
    # the plugin's wheel pins of the CUDA libraries: none are installed (nothing runs on a GPU)
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"


def set_xla_flag(flag: str, value: str) -> None:
    """`flag=value` in XLA_FLAGS, in place of any value it had."""
    others = re.sub(rf"{flag}=\S*", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{others} {flag}={value}".strip()


def plugin_version(site: Path) -> tuple[int, ...]:
    """The CUDA plugin's version (major, minor, ...) from its installed metadata in `site`."""
    for info in site.glob("jax_cuda*_plugin-*.dist-info"):
        version = info.name.split("-")[1].removesuffix(".dist-info")
        return tuple(int(x) for x in version.split(".") if x.isdigit())
    return ()


def target_config(target: str) -> str:
    """A GPU target's `GpuTargetConfigProto` text, with jaxrm's cuDNN version and without
    `NEWER_FIELDS`."""
    text = (TARGETS_DIR / target_named(target).spec).read_text()
    major, minor, patch = DNN_VERSION
    text = re.sub(
        r"dnn_version_info \{[^}]*\}",
        f"dnn_version_info {{\n  major: {major}\n  minor: {minor}\n  patch: {patch}\n}}",
        text,
    )
    for field in NEWER_FIELDS:
        text = re.sub(rf"^\s*{field}:.*\n", "", text, flags=re.MULTILINE)
    return text


def tpu_topology(count: int, dims: int) -> str:
    """A slice's topology for `count` chips (a power of two, at least 4), in libtpu's shapes: one
    host's 2x2 first, then doubling the sides in turn (2D: 2x4, 4x4, 4x8, ...; 3D: 2x2x2, 2x2x4,
    2x4x4, 4x4x4, 4x4x8, ...)."""
    if count < 4 or count & (count - 1):
        raise UserError(f"--devices must be a power of two >= 4 for a TPU target, got {count}")
    sides = [2, 2] + [1] * (dims - 2)
    turns = [1, 0] * 16 if dims == 2 else [2, 2, 1, 0] + [2, 1, 0] * 10  # which side doubles
    for i in range(count.bit_length() - 3):
        sides[turns[i]] *= 2
    return "x".join(map(str, sides))


def target_devices(target: str, count: int) -> list[Any]:
    """`count` compile-only devices of `target` (after `use_plugin(target)`)."""
    import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention
    from jax.experimental import topologies

    if count < 1:
        raise UserError(f"--devices must be >= 1, got {count}")
    spec = target_named(target)
    if spec.plugin == "tpu":
        shape = tpu_topology(count, spec.topology_dims)
        topology = topologies.get_topology_desc(platform="tpu", topology_name=f"{target}:{shape}")
        return list(topology.devices)
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


@contextlib.contextmanager
def traced_for(target: str) -> Iterator[None]:
    """While tracing for `target`, `jax.default_backend()` answers the target's backend (gpu,
    tpu), not the host's cpu: code that picks a kernel by backend (Pallas' interpret mode off a
    GPU) picks what the target runs. A GPU target is also the abstract device of the tracing
    context: from JAX 0.12 Pallas' Triton lowering asks the device its compute capability, and
    off a GPU (or outside a mesh of the target's devices) only an abstract device can answer. Not
    a target (the host's `cpu`): nothing changes."""
    import jax

    if target not in TARGETS:
        yield
        return
    spec = TARGETS[target]
    host = jax.default_backend
    jax.default_backend = lambda: spec.backend
    try:
        with abstract_gpu(spec):
            yield
    finally:
        jax.default_backend = host


def abstract_gpu(spec: Target) -> contextlib.AbstractContextManager[Any]:
    """A context whose abstract mesh names the GPU target's device (empty for other targets, or
    when a mesh is already in context: its devices name themselves)."""
    import jax

    if not spec.device_kind or not jax.sharding.get_abstract_mesh().empty:
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(spec.device_kind, spec.cores, spec.backend)
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))
