"""`python -m jaxrm.devices [--config FILE] [--config.key=value ...]`: what JAX sees on this host.

Run it first on a new pod or cluster, on every host as training would run (it joins
jax.distributed the same way): the backend, the devices per process, the versions of JAX and its
accelerator plugin, whether the accelerator's attention works (cuDNN on GPUs, splash on TPUs: a
tiny forward and backward checked against XLA), host and device memory. With a config: the mesh
training would build, the pairs per device and the parameters the mesh leaves replicated (from the
model's config.json), or the one-line reason it cannot (exit status 2), as training would refuse
it.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrm.config import base_config, get_config
from jaxrm.distributed import initialize_distributed
from jaxrm.errors import UserError, exit_on_user_error, first_line
from jaxrm.hf import model_architecture
from jaxrm.models.attention import Mask, padded_rows_as_segments
from jaxrm.models.attention import attend as attend_masked
from jaxrm.plan import make_plan, plan_batch, plan_pack, resolve
from jaxrm.sharding import MAX_REPLICATED_SHARE, data_parallel_size, make_mesh

# Distributions that decide what JAX can run on, reported when installed.
RUNTIME_DISTRIBUTIONS = (
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "nvidia-cudnn-cu12",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "nvidia-cudnn-cu13",
    "libtpu",
)
# The probe's shapes: [batch, length, heads, head_dim], bf16 (head_dim 128: splash needs it).
PROBE_SHAPE = (2, 256, 4, 128)
PROBE_TOLERANCE = 0.02  # largest difference relative to the largest value; bf16 eps is 0.008
GIB = 1024**3


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def installed_versions() -> str:
    found = []
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], ids[0]
    for prev, cur in zip(ids, [*ids[1:], None], strict=True):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


def devices_per_process(devices: Sequence[jax.Device]) -> list[str]:
    """One line per group of processes that hold the same devices: 'processes 0-3: 8 x kind'."""
    holdings: dict[int, dict[str, int]] = {}
    for d in devices:
        kinds = holdings.setdefault(d.process_index, {})
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    groups: dict[str, list[int]] = {}
    for process, kinds in sorted(holdings.items()):
        described = ", ".join(f"{n} x {kind}" for kind, n in sorted(kinds.items()))
        groups.setdefault(described, []).append(process)
    lines = []
    for described, processes in groups.items():
        label = "process" if len(processes) == 1 else "processes"
        each = "" if len(processes) == 1 else " each"
        lines.append(f"{label} {_ranges(processes)}: {described}{each}")
    return lines


def host_memory() -> str:
    """Total and available memory of this host (Linux /proc/meminfo, else sysconf)."""
    fields = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if "MemTotal" in fields:
        available = fields.get("MemAvailable")
        tail = f", {gib(available)} available" if available is not None else ""
        return f"{gib(fields['MemTotal'])} total{tail}"
    return f"{gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} total"


def device_memory(devices: Sequence[jax.Device]) -> list[str]:
    """Per local device: the memory JAX may use and what it uses now (where reported)."""
    lines = []
    for d in devices:
        stats = d.memory_stats()
        if not stats or "bytes_limit" not in stats:
            shared = " (CPU devices use the host memory)" if d.platform == "cpu" else ""
            return [f"not reported by the {d.platform} backend{shared}"]
        lines.append(
            f"{d.platform} {d.id}: {gib(stats['bytes_limit'])} for JAX, "
            f"{gib(stats.get('bytes_in_use', 0))} in use"
        )
    return lines


def cudnn_attention_probe(backend: str) -> str:
    """Whether jaxrm's cuDNN flash attention runs here and agrees with XLA."""
    return accelerator_probe(backend, "gpu", "cudnn")


def splash_attention_probe(backend: str) -> str:
    """Whether jaxrm's splash attention (TPU) runs here and agrees with XLA."""
    return accelerator_probe(backend, "tpu", "splash")


def accelerator_probe(backend: str, needs: str, implementation: str) -> str:
    if backend != needs:
        return f"not applicable ({backend} backend)"
    return attention_probe(implementation)


def attention_probe(implementation: str) -> str:
    """Whether jaxrm's `implementation` of attention runs here and agrees with XLA's, forward and
    backward, on small bf16 inputs."""
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cotangent = (jax.random.normal(key, PROBE_SHAPE, jnp.bfloat16) for key in keys)

    def run(name: str):
        def weighted(q, k, v):
            out = attend(q, k, v, name).astype(jnp.float32)
            return jnp.sum(out * cotangent.astype(jnp.float32)), out

        (_, out), grads = jax.jit(jax.value_and_grad(weighted, argnums=(0, 1, 2), has_aux=True))(
            q, k, v
        )
        return [np.asarray(x, np.float32) for x in jax.device_get((out, *grads))]

    try:
        candidate = run(implementation)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable", with its reason
        return f"not usable ({first_line(e)}): train with --config.attention=xla"
    worst = max(
        float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        for got, want in zip(candidate, run("xla"), strict=True)
    )
    if worst > PROBE_TOLERANCE:
        return f"runs but differs from XLA by {worst:.2g}: train with --config.attention=xla"
    return f"usable (output and gradients agree with XLA to {worst:.1g} relative)"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """Causal attention over whole rows with `implementation` (as one segment per row where it
    runs right-padded rows so, as training does)."""
    if padded_rows_as_segments(implementation):
        return attend_masked(q, k, v, Mask(jnp.ones(q.shape[:2], jnp.int32)), implementation)
    return attend_masked(q, k, v, Mask(), implementation)


Architecture = tuple[dict, str] | UserError  # (config.json, where from), or why it is unreachable


def read_architecture(cfg: ml_collections.ConfigDict) -> Architecture:
    """The model's config.json, read once for the whole report."""
    try:
        return model_architecture(cfg.model_name_or_path, cfg.model_revision)
    except UserError as e:
        return e


def execution_line(
    cfg: ml_collections.ConfigDict | None, backend: str, architecture: Architecture | None = None
) -> str:
    """The compute dtype and attention training would use on this backend (per mask kind when
    the kinds the run meets differ)."""
    if cfg is None:
        run = resolve(base_config(), None, backend)
        return f"{run.dtype} compute, {run.attention} attention (what auto means on {backend})"
    if isinstance(architecture, tuple):
        run, unchecked = resolve(cfg, architecture[0], backend), ""
    else:
        run = resolve(cfg, None, backend)
        unchecked = "; head_dim not checked: the model's config.json is unreachable"
    line = f"{run.dtype} compute, {run.attention} attention ({run.reason}{unchecked})"
    if len(set(run.kernels)) > 1:
        line += f"; per mask kind: {run.kernels.describe()}"
    return line


def plan_lines(
    cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device], architecture: Architecture
) -> Iterator[str]:
    """The mesh, per-device batch and sharding training would use (its run plan), line by
    line; UserError at the first that does not fit."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
    dp = data_parallel_size(mesh)
    batch = plan_batch(cfg, mesh)
    pack = plan_pack(cfg, batch, dp)
    per_device = batch.micro_pairs // dp
    shape = " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items())
    yield f"mesh: {shape} over {mesh.size} devices ({dp} data-parallel)"
    if pack is not None:
        shared = ", prompts shared" if cfg.prefix_sharing else ""
        unit = "prompts (K-wise)" if cfg.preference_format == "kwise" else "pairs"
        yield (
            f"train: {batch.step_pairs} {unit} per optimizer step, packed{shared}: micro-batches "
            f"of {pack.rows} row(s) of {pack.length} tokens per device, as many as the step's "
            f"{unit.split()[0]} fill"
        )
    else:
        yield (
            f"train: {batch.step_pairs} pairs per optimizer step = "
            f"{cfg.gradient_accumulation_steps} micro-batch(es) of {batch.micro_pairs}; "
            f"{per_device} pairs ({2 * per_device} sequences of up to {cfg.max_token_length} "
            "tokens) per device per micro-batch"
        )
    yield f"eval: {batch.eval_pairs} pairs per batch, {batch.eval_pairs // dp} per device"
    yield sharding_line(cfg, devices, architecture)


def sharding_line(
    cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device], architecture: Architecture
) -> str:
    """How the model's parameters shard in the run plan, from its config.json alone; the
    training run's one-line refusal (UserError) when too many would be left replicated."""
    if isinstance(architecture, UserError):
        return f"sharding: not checked ({architecture})"
    hf_config, source = architecture
    replicated = make_plan(cfg, devices, hf_config).replicated
    if not replicated:
        return (
            "sharding: no parameter left replicated by a mesh size that does not divide it "
            f"(architecture: {source})"
        )
    listed = ", ".join(f"{p.path} {list(p.shape)}" for p in replicated)
    return (
        f"sharding: {sum(p.count for p in replicated):,} parameters left replicated ({listed}), "
        f"within the {MAX_REPLICATED_SHARE:.0%} allowed (architecture: {source})"
    )


def device_report(backend: str) -> list[str]:
    devices = jax.devices()
    lines = [
        f"host: {socket.gethostname()}, process {jax.process_index()} of {jax.process_count()}",
        f"backend: {backend}, {len(devices)} device{'s' if len(devices) > 1 else ''} in all",
        *(f"devices: {line}" for line in devices_per_process(devices)),
        f"versions: {installed_versions()}",
        f"runtime: {devices[0].client.platform_version}",
        f"cuDNN flash attention: {cudnn_attention_probe(backend)}",
        f"splash attention: {splash_attention_probe(backend)}",
        f"host memory: {host_memory()}",
        *(f"device memory: {line}" for line in device_memory(jax.local_devices())),
    ]
    return lines


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> list[str]:
    """Prints the report line by line (a config that does not fit ends it with its error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = get_config(args) if args else None
    initialize_distributed(cfg or base_config())
    backend = jax.default_backend()
    printed: list[str] = []

    def say(lines: Sequence[str], prefix: str = "") -> None:
        for line in lines:
            printed.append(prefix + line)
            print(prefix + line, flush=True)

    say(device_report(backend))
    if cfg is None:
        say([execution_line(None, backend)], "auto: ")
    else:
        architecture = read_architecture(cfg)
        say(plan_lines(cfg, jax.devices(), architecture), "config: ")
        say([execution_line(cfg, backend, architecture)], "config: ")
    return printed


if __name__ == "__main__":
    main()
