"""Attention alone: every implementation the table holds for this backend, per mask kind, forward +
backward on chat-like rows, timed, with TFLOP/s over the live (allowed) query-key pairs only.

    .venv/bin/python scripts/bench_attention.py                    # 8 heads / 4 kv, dim 64, 2048
    .venv/bin/python scripts/bench_attention.py --length 4096 --rows 2
    python scripts/bench_attention.py --length 8192 --heads 32 --kv_heads 8 --head_dim 128 \\
        --dtype bfloat16 --kinds tree,causal        # Llama-3.1-8B's heads on a GPU

Rows of `--length` tokens (scripts/attention_inputs.py): for `tree` and `segments`, filled in
order with the pairs of a Tulu-like length mix (log-normal prompt ~70, responses ~130 tokens), with
and without prefix sharing; for `causal`, one real sequence filling each row (dense causal: the
yardstick a packed kernel's live-pair rate is compared with). Every implementation of
`--implementations` (default: all that `KERNELS[kind]` holds and the backends table lets run here)
gets the same q, k, v and mask. Timed: forward + backward of `sum(out * cotangent)` with respect to
q, k, v, after a warm-up call, median of `--repeats`. FLOPs counted: 12 * live pairs * heads *
head_dim (forward q.k and p.v, backward dq, dk, dv and dp: 6 matmuls of 2 FLOPs per multiply-add;
no recomputation counted), where live pairs are the (real query, allowed key) pairs of the mask:
the work any kernel must do, whatever it skips or wastes. Also printed: XLA's temporary bytes of
each compiled program. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from attention_inputs import (
    MASK_KINDS,
    add_shape_arguments,
    chat_rows,
    implementations,
    live_pairs,
    make_mask,
    random_inputs,
)

from jaxrm.data import packing
from jaxrm.models.attention import Logits, attend
from jaxrm.models.attention.pallas_gpu import BlockSizes, pallas_attention

FLOPS_PER_PAIR_HEAD_DIM = 12


def time_fwd_bwd(
    implementation: str, inputs, mask, repeats: int, tiles: BlockSizes | None = None
) -> tuple[float, int]:
    """Median seconds of forward + backward, and XLA's temporary bytes. `tiles`: run `pallas`
    with these tile sizes instead of its defaults (the tile sweep)."""
    q, k, v, cotangent = inputs
    logits = Logits(q.shape[-1] ** -0.5)

    def attention(q, k, v, mask):
        if tiles is None:
            return attend(q, k, v, mask, implementation, logits)
        rows, length = q.shape[:2]
        segments = mask.segment_ids
        segments = jnp.ones((rows, length), jnp.int32) if segments is None else segments
        branches = jnp.zeros_like(segments) if mask.branch_ids is None else mask.branch_ids
        positions = mask.token_positions((rows, length))
        return pallas_attention(
            q,
            k,
            v,
            segments,
            branches,
            positions,
            mask.window_size(),
            logits=logits,
            blocks=tiles,
        )

    def loss(q, k, v, cotangent, mask):
        out = attention(q, k, v, mask)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v, cotangent, mask).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(q, k, v, cotangent, mask))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, cotangent, mask))
        times.append(time.perf_counter() - start)
    return statistics.median(times), int(temporaries)


def parse_tiles(text: str) -> list[BlockSizes]:
    """`--pallas_tiles`: each ';'-separated set of six sizes as pallas' `BlockSizes`."""
    out = []
    for entry in filter(None, text.split(";")):
        sizes = [int(x) for x in entry.split(",")]
        if len(sizes) != 6:
            raise SystemExit(f"--pallas_tiles: {entry!r} is not six sizes")
        out.append(BlockSizes(*sizes))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, rows=1, length=2048, heads=8, kv_heads=4, dim=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kinds", default="tree", help=f"comma-separated of {MASK_KINDS}")
    parser.add_argument("--implementations", default="", help="comma-separated; default: all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--pallas_tiles",
        default="",
        help="also time pallas with these tiles: ';'-separated sets of six sizes (forward q,k; "
        "dK/dV q,k; dQ q,k), e.g. '64,64,32,64,64,32;128,128,64,128,128,64'",
    )
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    if args.length % packing.ROW_MULTIPLE:
        parser.error(f"--length must be a multiple of {packing.ROW_MULTIPLE}")
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(MASK_KINDS):
        parser.error(f"--kinds: unknown {', '.join(sorted(unknown))}")

    backend = jax.default_backend()
    inputs = random_inputs(args, jnp.dtype(args.dtype))
    result = {"rows": args.rows, "length": args.length, "heads": args.heads,
              "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": args.dtype,
              "backend": backend, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "flops_per_pair_head_dim": FLOPS_PER_PAIR_HEAD_DIM, "runs": []}  # fmt: skip
    for kind in kinds:
        ids = chat_rows(kind, args.rows, args.length, args.seed)
        if kind == "causal":  # dense causal: real tokens fill every row
            ids["lengths"][:] = args.length
        mask = make_mask(kind, ids)
        pairs = live_pairs(kind, ids, args.length)
        causal_pairs = args.rows * args.length * (args.length + 1) // 2
        names = implementations(kind, backend, args.dtype, args.head_dim)
        if args.implementations:
            names = [n for n in args.implementations.split(",") if n in names]
        runs = [(name, None) for name in names]
        if "pallas" in names:
            runs += [("pallas", tiles) for tiles in parse_tiles(args.pallas_tiles)]
        for implementation, tiles in runs:
            seconds, temporaries = time_fwd_bwd(implementation, inputs, mask, args.repeats, tiles)
            if tiles is not None:
                implementation = f"pallas[{','.join(map(str, tiles[:6]))}]"
            flops = FLOPS_PER_PAIR_HEAD_DIM * pairs * args.heads * args.head_dim
            run = {
                "kind": kind,
                "implementation": implementation,
                "fwd_bwd_ms": round(seconds * 1e3, 3),
                "live_pairs": pairs,
                "live_pair_share_of_causal": round(pairs / causal_pairs, 4),
                "tflops_per_s": round(flops / seconds / 1e12, 4),
                "temp_bytes": temporaries,
            }
            result["runs"].append(run)
            share = pairs / causal_pairs
            print(f"{kind:9s}{implementation:8s} fwd+bwd {seconds * 1e3:9.2f} ms "
                  f"{run['tflops_per_s']:8.3f} TFLOP/s (live pairs: {share:.0%} of causal), "
                  f"temporaries {temporaries / 2**20:8.1f} MiB", flush=True)  # fmt: skip
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
