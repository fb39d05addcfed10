"""Every attention implementation the table holds for an accelerator, compiled for it on this CPU
(no GPU or TPU): does it compile, does the program loop over attention blocks in XLA, its memory.

    .venv/bin/python scripts/attention_compile.py [--target h100|v5e|v5p|v6e] [--length 8192
        --heads 32 --kv_heads 8 --head_dim 128] [--kinds causal,segments,tree] [--output FILE]

Needs the target's plugin beside .venv (scripts/deviceless_plugin.sh cuda|tpu;
jaxrm/deviceless.py). For each mask kind and each implementation `KERNELS[kind]` holds that the
backends table lets run on the target's backend (gpu, tpu) in bfloat16 at this head_dim, the
forward + backward of `sum(out * cotangent)` (q, k, v, the mask's ids as arguments) is lowered
and compiled by XLA:GPU (XLA:TPU) for one device of the target. Reported per program: the HLO
`while` loops of the compiled module (a kernel that loops over blocks in XLA, as `flash` does,
has them: each iteration is a round of kernel launches, and on a GPU a trip count the device
computes makes XLA:GPU read the loop predicate back to the host; a fused kernel has none), the
custom calls (cuDNN, Triton), XLA's memory analysis and the compile time. Last line: one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from attention_inputs import add_shape_arguments

WHILE = re.compile(r"\swhile\(")
CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def compile_all(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    from attention_inputs import MASK_KINDS, implementations
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxrm.deviceless import target_devices, target_named, traced_for
    from jaxrm.models.attention import Logits, Mask, attend

    target = target_named(args.target)
    devices = target_devices(args.target, 1 if target.plugin == "cuda" else 4)[:1]
    sharding = NamedSharding(Mesh(devices, ("x",)), PartitionSpec())

    def struct(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    b, t = args.rows, args.length
    q = struct((b, t, args.heads, args.head_dim), jnp.bfloat16)
    kv = struct((b, t, args.kv_heads, args.head_dim), jnp.bfloat16)
    cotangent = struct(q.shape, jnp.float32)
    ids = struct((b, t), jnp.int32)
    masks = {"causal": Mask(), "segments": Mask(ids, None, ids), "tree": Mask(ids, ids, ids)}
    logits = Logits(args.head_dim**-0.5)
    result = {
        "target": args.target,
        "analysis": target.analysis,
        "device": devices[0].device_kind,
        "jax": jax.__version__,
        "shape": {
            "rows": b,
            "length": t,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "dtype": "bfloat16",
        },  # fmt: skip
        "programs": [],
    }
    for kind in args.kinds.split(","):
        if kind not in MASK_KINDS:
            raise SystemExit(f"error: --kinds: unknown mask kind {kind!r}")
        for implementation in implementations(kind, target.backend, "bfloat16", args.head_dim):

            def loss(q, k, v, cotangent, mask, implementation=implementation):
                out = attend(q, k, v, mask, implementation, logits)
                return jnp.sum(out.astype(jnp.float32) * cotangent)

            started = time.perf_counter()
            step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            with traced_for(args.target):
                lowered = step.lower(q, kv, kv, cotangent, masks[kind])
            compiled = lowered.compile()
            seconds = time.perf_counter() - started
            text = compiled.as_text()
            memory = compiled.memory_analysis()
            program = {
                "kind": kind,
                "implementation": implementation,
                "while_loops": len(WHILE.findall(text)),
                "custom_calls": sorted(set(CUSTOM_CALL.findall(text))),
                "argument_bytes": int(memory.argument_size_in_bytes),
                "output_bytes": int(memory.output_size_in_bytes),
                "temp_bytes": int(memory.temp_size_in_bytes),
                "compile_seconds": round(seconds, 2),
            }
            result["programs"].append(program)
            print(f"{kind:9s}{implementation:8s} while loops {program['while_loops']:2d}, "
                  f"temporaries {program['temp_bytes'] / 2**20:9.1f} MiB, compiled in "
                  f"{seconds:5.1f}s; custom calls: {', '.join(program['custom_calls']) or '-'}",
                  flush=True)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="h100")
    add_shape_arguments(parser, rows=1, length=8192, heads=32, kv_heads=8, dim=128)
    parser.add_argument("--kinds", default="causal,segments,tree")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from jaxrm.deviceless import use_plugin
    from jaxrm.errors import exit_on_user_error, run_cli

    @exit_on_user_error
    def run() -> None:
        use_plugin(args.target)
        result = compile_all(args)
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))

    run_cli(run)


if __name__ == "__main__":
    main()
