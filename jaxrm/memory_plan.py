"""The train step's memory per device on N devices, from XLA's compile, without any weights.

    python scripts/memory_plan.py --config configs/tulu8b.py --devices 16
        [--batch_layout packed|padded] [--pack_length 8192] [--pack_rows_per_device 1]
        [--per_device_train_batch_size 4] [--remat_policy full] [--model_config PATH]
        [--memory_gb 80] [--largest] [--target cpu|h100|v5e|v5p|v6e] [--config.key=value ...]

Everything is abstract: the architecture comes from the model's config.json alone
(`jaxrm.hf.model_architecture`: a local directory's, jaxrm's shipped copy for the hub ids it has
one for, or the hub's config.json; `--model_config` names a file instead); parameters, gradients
and the Adam state are `jax.ShapeDtypeStruct`s in the training layout (`jaxrm.sharding` rules, the
same replication check as training), and batches have the configured shapes. The real jitted train
step of `jaxrm.step` is lowered and compiled for a mesh of N devices, and XLA's memory analysis of
the compiled per-device program is reported: arguments, outputs, temporaries, and the arguments
whose buffers the outputs reuse (donation). A padded step is one program: its peak is arguments +
outputs + temporaries - aliased. A packed step is two: `accumulate` (one micro-batch's gradients,
run once per micro-batch) and `apply` (clipping + AdamW); its peak is the larger of `apply` and
`accumulate` plus the Adam state, which stays on the devices while `accumulate` runs.

On a host without N accelerators the devices are fake CPU devices (scripts/memory_plan.py sets
`--xla_force_host_platform_device_count`), so the analysis is XLA:CPU's, which keeps more of the
bf16 work in float32 than the GPU and TPU compilers: it over-estimates their temporaries
(benchmarks/RESULTS.md, "Memory plan": one 8B step came to 86 GiB by XLA:CPU and 69 GiB by the
GPU compiler). `dtype` auto plans the accelerators' bf16; the accelerators' attention kernels
(cuDNN, splash) cannot be compiled by XLA:CPU, so the mask kinds `auto` gives them are planned with
`flash`, which likewise never forms T x T.

`--target h100` compiles for N H100s instead, by XLA:GPU run on this CPU (`jaxrm.deviceless`: JAX's
CUDA plugin from the side folder `scripts/deviceless_plugin.sh cuda` makes, openxla's H100 target
spec): the GPU compiler's own memory analysis, with the attention the backends table picks on a
GPU. `--target v5e|v5p|v6e` likewise compiles for a TPU slice of N chips by libtpu
(`scripts/deviceless_plugin.sh tpu`).

`--largest` also finds the largest micro-batch per device (packed rows, or padded pairs) whose
peak fits in `--memory_gb` (GB = 10^9 bytes), planning each size it tries. The last line printed is
one JSON object (`per_device_bytes`, `compile_seconds`, the pieces, `largest_fitting`, ...).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from jaxrm.backends import AUTO, Execution, compiled_by
from jaxrm.config import get_config
from jaxrm.data.batch import FIELDS, PACKED_FIELDS, Field, batch_shardings, field_shapes
from jaxrm.deviceless import TARGETS, target_devices, target_named, traced_for
from jaxrm.errors import UserError, exit_on_user_error
from jaxrm.hf import model_architecture
from jaxrm.hf import read_config_file as read_model_config
from jaxrm.logs import setup_logging
from jaxrm.models.attention import IMPLEMENTATIONS
from jaxrm.objective import METRIC_SUM_KEYS, Objective
from jaxrm.plan import abstract_opt_state, make_plan, resolve
from jaxrm.sharding import (
    MESH_AXES,
)
from jaxrm.step import PackedTrainStep, make_train_step

GIB = 1024**3
ANALYSIS = "XLA:CPU"
HOST = "cpu"  # --target: fake CPU devices, XLA:CPU's analysis
# The backends-table row planned on fake CPU devices: an accelerator (bf16 for dtype auto); its
# attention kernels are planned with what XLA:CPU compiles (`compiled_by`). A deviceless target
# plans its own row.
PLANNED_BACKEND = "tpu"


@dataclasses.dataclass(frozen=True)
class Piece:
    """One compiled program's memory per device (bytes) and its compile time."""

    name: str
    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    compile_seconds: float

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased


def compile_piece(name: str, jitted, *args: Any, target: str = HOST) -> Piece:
    started = time.perf_counter()
    with traced_for(target):
        lowered = jitted.lower(*args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - started
    stats = compiled.memory_analysis()
    return Piece(
        name,
        int(stats.argument_size_in_bytes),
        int(stats.output_size_in_bytes),
        int(stats.temp_size_in_bytes),
        int(stats.alias_size_in_bytes),
        round(seconds, 2),
    )


def step_pieces(
    step: Any, state: Any, batch: Any, mesh: Any, target: str = HOST
) -> tuple[list[Piece], dict[str, int]]:
    """The compiled pieces of a train step (`jaxrm.step.make_train_step`) and, per piece, what
    stays resident on the devices beside its own buffers. Padded: the one jitted step. Packed
    (`batch` one micro-batch): `accumulate`, with the Adam state waiting beside it, and `apply`.
    `state` and `batch` may be arrays or sharded `ShapeDtypeStruct`s."""
    replicated = NamedSharding(mesh, PartitionSpec())
    scalar = struct((), jnp.float32, replicated)
    votes = struct((mesh.size,), jnp.int32, NamedSharding(mesh, PartitionSpec(MESH_AXES)))
    if not isinstance(step, PackedTrainStep):
        return [compile_piece("step", step, state, batch, votes, target=target)], {"step": 0}
    params, opt_state = state
    sums = dict.fromkeys(METRIC_SUM_KEYS, scalar)
    grads = params  # the same shapes and shardings
    pieces = [
        compile_piece(
            "accumulate", step.accumulate, params, grads, sums, batch, scalar, target=target
        ),
        compile_piece("apply", step.apply, state, grads, sums, votes, target=target),
    ]
    return pieces, {"accumulate": per_device_bytes(opt_state), "apply": 0}


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (its largest shard)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def struct(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def batch_structs(fields: dict[str, Field], shapes: dict[str, tuple[int, ...]], mesh) -> dict:
    shardings = batch_shardings(mesh, fields)
    return {k: struct(shapes[k], f.dtype, shardings[k]) for k, f in fields.items()}


def execution(
    cfg: ml_collections.ConfigDict, hf_config: dict[str, Any], target: str = HOST
) -> Execution:
    """The compute dtype and attention planned. On fake CPU devices: the run plan's resolution on
    an accelerator (`PLANNED_BACKEND`; an attention set for another accelerator is planned as
    `auto`), with each mask kind's kernel that XLA:CPU cannot compile planned with the CPU's (see
    above). For a deviceless target: the resolution on the target's backend, kernels as they are."""
    if target != HOST:
        return resolve(cfg, hf_config, target_named(target).backend)
    planned = cfg.copy_and_resolve_references()
    attention = IMPLEMENTATIONS.get(planned.attention)
    if attention is not None and attention.misfit("causal", backend=PLANNED_BACKEND):
        planned.attention = AUTO
    return compiled_by(resolve(planned, hf_config, PLANNED_BACKEND), "cpu")


def plan(
    cfg: ml_collections.ConfigDict,
    devices: Sequence[jax.Device],
    model_config: str | None = None,
    budget_bytes: int = 80 * 10**9,
    target: str = HOST,
) -> dict[str, Any]:
    """Compiles the train step of `cfg` for a mesh over `devices` (fake CPU devices, or the
    compile-only devices of a deviceless `target`) and returns its memory plan."""
    if model_config:
        hf_config, source = read_model_config(Path(model_config)), model_config
    else:
        hf_config, source = model_architecture(cfg.model_name_or_path, cfg.model_revision or None)
    planned = execution(cfg, hf_config, target)
    run = make_plan(cfg, devices, hf_config, execution=planned, report=True)
    mesh, params = run.mesh, run.params
    dp, micro_pairs = run.data_parallel, run.batch.micro_pairs
    # A constant learning rate, as planned so far: no schedule count in the Adam state (4 bytes).
    optimizer = run.optimizer_args.optimizer(cfg.learning_rate)
    opt_state = abstract_opt_state(optimizer, params, mesh)
    state = (params, opt_state)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    objective = Objective(1, cfg.use_margin, cfg.center_rewards_coefficient)
    step = make_train_step(
        run.graphdef,
        optimizer,
        mesh,
        shardings,
        objective,
        packed=run.pack is not None,
        shared_prefix=run.pack is not None and run.pack.share_prefix,
    )
    if run.pack is not None:
        length, rows = run.pack.length, run.pack.rows
        sizes = {"rows": run.pack.micro_rows, "length": length, "devices": dp}
        shapes = field_shapes(PACKED_FIELDS, {**sizes, "slots": run.pack.slots})
        step_batch = batch_structs(PACKED_FIELDS, shapes, mesh)
        batch = {"pack_length": length, "pack_rows_per_device": rows}
        tokens = rows * length
    else:
        k, t = cfg.gradient_accumulation_steps, cfg.max_token_length
        sizes = {"micro": k, "rows": 2 * micro_pairs, "pairs": micro_pairs, "length": t}
        step_batch = batch_structs(FIELDS, field_shapes(FIELDS, sizes), mesh)
        per_device = micro_pairs // dp
        batch = {"per_device_train_batch_size": per_device, "max_token_length": t}
        tokens = 2 * per_device * t
    pieces, resident = step_pieces(step, state, step_batch, mesh, target)
    peak = max(p.total + resident[p.name] for p in pieces)  # total: the program's own buffers
    parameters = sum(math.prod(v.shape) for v in jax.tree.leaves(params))
    return {
        "config": cfg.model_name_or_path,
        "architecture": source,
        "parameters": parameters,
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "analysis": ANALYSIS if target == HOST else target_named(target).analysis,
        "target": target,
        "dtype": run.execution.dtype,
        "param_dtype": cfg.param_dtype,
        "attention": run.execution.attention,
        "remat_policy": run.remat_policy,
        "batch_layout": cfg.batch_layout,
        **batch,
        "tokens_per_device_per_micro_batch": tokens,
        "replicated_parameters": sum(p.count for p in run.replicated),
        "parameter_bytes": per_device_bytes(params),
        "pieces": {
            p.name: {
                **dataclasses.asdict(p),
                "total": p.total,
                "resident": resident[p.name],
                "peak": p.total + resident[p.name],
            }
            for p in pieces
        },
        "per_device_bytes": peak,
        "compile_seconds": round(sum(p.compile_seconds for p in pieces), 2),
        "budget_bytes": budget_bytes,
        "fits": peak <= budget_bytes,
    }


def report_lines(result: dict[str, Any], config_file: str) -> list[str]:
    """The plan as a short human-readable report (the JSON follows it)."""
    mesh = " x ".join(f"{axis} {size}" for axis, size in result["mesh"].items())
    if result["batch_layout"] == "packed":
        batch = (
            f"packed, {result['pack_rows_per_device']} row(s) of {result['pack_length']} tokens "
            "per device per micro-batch"
        )
    else:
        batch = (
            f"padded, {result['per_device_train_batch_size']} pairs per device per micro-batch, "
            f"rows of {result['max_token_length']} tokens"
        )
    lines = [
        f"memory plan: {config_file} on {result['devices']} devices ({mesh}); "
        f"{result['analysis']}'s analysis, per device",
        f"architecture: {result['config']} from {result['architecture']}; "
        f"{result['parameters']:,} parameters, {result['replicated_parameters']:,} left replicated",
        f"execution: {result['dtype']} compute, {result['param_dtype']} parameters and Adam "
        f"state, {result['attention']} attention, remat {result['remat_policy']}",
        f"batch: {batch}",
        f"{'program':<12}{'arguments':>12}{'outputs':>12}{'temporaries':>13}{'aliased':>12}"
        f"{'resident':>12}{'peak':>12}{'compile':>10}",
    ]
    for name, p in result["pieces"].items():
        gib = [p[k] / GIB for k in ("arguments", "outputs", "temporaries", "aliased", "resident")]
        lines.append(
            f"{name:<12}{gib[0]:>8.2f} GiB{gib[1]:>8.2f} GiB{gib[2]:>9.2f} GiB{gib[3]:>8.2f} GiB"
            f"{gib[4]:>8.2f} GiB{p['peak'] / GIB:>8.2f} GiB{p['compile_seconds']:>9.1f}s"
        )
    verdict = "fits" if result["fits"] else "does NOT fit"
    if result.get("target", HOST) == HOST:
        note = (
            f"note: {result['analysis']} keeps more in float32 than the GPU/TPU compilers, so this "
            "over-estimates their temporaries"
        )
    else:
        note = (
            f"note: {result['analysis']}: compiled without autotuning (default kernel configs), "
            "so the memory is the target's but no speed is implied"
        )
    lines += [
        "(peak = arguments + outputs + temporaries - aliased + resident: the Adam state that "
        "waits on the devices while micro-batches accumulate)",
        f"per device: {result['per_device_bytes'] / GIB:.2f} GiB, {verdict} in "
        f"{result['budget_bytes'] / 1e9:g} GB; compiled in {result['compile_seconds']:.1f}s",
        f"{note}; JAX takes 75% of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says "
        "otherwise",
    ]
    return lines


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a configs/*.py file")
    parser.add_argument("--devices", type=int, default=16, help="devices of the mesh (N)")
    parser.add_argument("--batch_layout", choices=("packed", "padded"))
    parser.add_argument("--pack_length", type=int, help="tokens per packed row")
    parser.add_argument("--pack_rows_per_device", type=int, help="packed rows per micro-batch")
    parser.add_argument(
        "--per_device_train_batch_size",
        type=int,
        help="padded layout: pairs per device per micro-batch (the pairs per step follow)",
    )
    parser.add_argument("--remat_policy", help="none, full, dots, ... (jaxrm.models.remat)")
    parser.add_argument("--model_config", help="a config.json to plan instead of the model's")
    parser.add_argument("--memory_gb", type=float, default=80.0, help="memory per device, GB")
    parser.add_argument(
        "--target",
        choices=(HOST, *TARGETS),
        default=HOST,
        help="cpu: fake CPU devices (XLA:CPU); h100: XLA:GPU, v5e/v5p/v6e: XLA:TPU, without "
        "the accelerator (scripts/deviceless_plugin.sh cuda|tpu)",
    )
    parser.add_argument(
        "--largest",
        action="store_true",
        help="also search the largest micro-batch per device that fits (a plan per size tried)",
    )
    return parser.parse_known_args(list(argv))


def config_argv(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The flags as `jaxrm.config` overrides (any `--config.key=value` passes through)."""
    argv = ["--config", args.config]
    for key in ("batch_layout", "pack_length", "pack_rows_per_device"):
        if getattr(args, key) is not None:
            argv.append(f"--config.{key}={getattr(args, key)}")
    if args.per_device_train_batch_size is not None:
        argv += [
            f"--config.per_device_train_batch_size={args.per_device_train_batch_size}",
            "--config.total_train_batch_size=0",
        ]
    if args.remat_policy is not None:
        argv += [
            f"--config.remat_policy={args.remat_policy}",
            f"--config.gradient_checkpointing={args.remat_policy != 'none'}",
        ]
    return argv + overrides


def largest_fitting(
    peak_of: Callable[[int], int], budget: int, start: int = 1, limit: int = 1024
) -> tuple[int, int] | None:
    """The largest n in 1..limit with `peak_of(n) <= budget` (peaks grow with n): doubling (or
    halving) from `start` to bracket it, then bisection. (n, its peak), or None if 1 does not
    fit. Each n is evaluated at most once."""
    peaks: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in peaks:
            peaks[n] = peak_of(n)
        return peaks[n] <= budget

    lo, hi = 0, limit + 1  # lo fits (0: nothing yet), hi does not
    n = max(1, min(start, limit))
    if fits(n):
        lo = n
        while lo < limit:
            n = min(2 * lo, limit)
            if not fits(n):
                hi = n
                break
            lo = n
    else:
        hi = n
        while hi > 1:
            n = hi // 2
            if fits(n):
                lo = n
                break
            hi = n
    while hi - lo > 1 and lo < limit:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return (lo, peaks[lo]) if lo else None


def micro_batch_key(cfg: ml_collections.ConfigDict) -> str:
    """The config key that sizes a micro-batch per device in the layout."""
    return "pack_rows_per_device" if cfg.batch_layout == "packed" else "per_device_train_batch_size"


@exit_on_user_error
def main(argv: Sequence[str]) -> dict[str, Any]:
    args, overrides = parse_args(argv)
    setup_logging()
    cfg = get_config(config_argv(args, overrides))
    if args.devices < 1:
        raise UserError(f"--devices must be >= 1, got {args.devices}")
    if args.target == HOST:
        devices = jax.devices()
        if len(devices) < args.devices:
            raise UserError(
                f"--devices {args.devices}: this process has {len(devices)} devices; run "
                "scripts/memory_plan.py, which makes N fake CPU devices"
            )
        devices = devices[: args.devices]
    else:
        devices = target_devices(args.target, args.devices)
    budget = int(args.memory_gb * 1e9)
    result = plan(cfg, devices, args.model_config, budget, args.target)
    for line in report_lines(result, args.config):
        print(line, flush=True)
    if args.largest:
        key = micro_batch_key(cfg)

        def peak_of(n: int) -> int:
            if n == result[key]:
                return result["per_device_bytes"]
            sized = copy.deepcopy(cfg)
            sized[key] = n
            if key == "per_device_train_batch_size":
                sized.total_train_batch_size = 0  # pairs per step follow the micro-batch
            peak = plan(sized, devices, args.model_config, budget, args.target)
            peak = peak["per_device_bytes"]
            print(f"  {key}={n}: {peak / GIB:.2f} GiB", flush=True)
            return peak

        found = largest_fitting(peak_of, budget, start=result[key])
        result["largest_fitting"] = {key: found[0], "per_device_bytes": found[1]} if found else None
        verdict = f"{key}={found[0]} ({found[1] / GIB:.2f} GiB)" if found else "none"
        print(f"largest micro-batch within {args.memory_gb:g} GB per device: {verdict}")
    print(json.dumps(result))
    return result
