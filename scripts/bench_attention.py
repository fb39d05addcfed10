"""Packed-row attention alone: jaxrm's `flash` kernel against XLA with the full T x T mask.

    .venv/bin/python scripts/bench_attention.py                    # 8 heads / 4 kv, dim 64, 2048
    .venv/bin/python scripts/bench_attention.py --length 4096 --rows 2

Rows of `--length` tokens are filled in order with prompt-shared pair groups (prompt, chosen rest,
rejected rest, as training packs them) of log-normal lengths like those of `scripts/bench.py`;
both implementations get the same q, k, v and ids. Timed: forward + backward of
`sum(out * cotangent)` with respect to q, k, v, after a warm-up call, median of `--repeats`.
Also printed: XLA's temporary bytes of each compiled program and the share of causal (query
block, key block) pairs the kernel visits. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.data import packing
from jaxrm.models.attention import DEFAULT_BLOCK, Mask, attend
from jaxrm.models.attention.flash import live_blocks


def packed_ids(rows: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """segment_ids and branch_ids of `rows` rows filled with chat-like prefix-shared pairs."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((rows, length), np.int32)
    branch_ids = np.zeros((rows, length), np.int32)
    for row in range(rows):
        start, segment = 0, 1
        while True:
            prompt, chosen, rejected = np.exp(rng.normal(np.log([70, 130, 130]), 0.8)).astype(int)
            size = prompt + chosen + rejected + 4
            if start + size > length:
                break
            end = start + size
            segment_ids[row, start:end] = segment
            branch_ids[row, start + prompt : start + prompt + chosen + 2] = 1
            branch_ids[row, start + prompt + chosen + 2 : end] = 2
            start, segment = end, segment + 1
    return segment_ids, branch_ids


def time_fwd_bwd(implementation: str, inputs, repeats: int) -> tuple[float, int]:
    q, k, v, segment_ids, branch_ids, cotangent = inputs

    def loss(q, k, v):
        out = attend(q, k, v, Mask(segment_ids, branch_ids), implementation)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(step(q, k, v))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        times.append(time.perf_counter() - start)
    return statistics.median(times), int(temporaries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.length % packing.ROW_MULTIPLE:
        parser.error(f"--length must be a multiple of {packing.ROW_MULTIPLE}")

    segment_ids, branch_ids = packed_ids(args.rows, args.length, args.seed)
    keys = jax.random.split(jax.random.key(args.seed), 4)
    dtype = jnp.dtype(args.dtype)
    shape_q = (args.rows, args.length, args.heads, args.head_dim)
    shape_kv = (args.rows, args.length, args.kv_heads, args.head_dim)
    inputs = (
        jax.random.normal(keys[0], shape_q, dtype),
        jax.random.normal(keys[1], shape_kv, dtype),
        jax.random.normal(keys[2], shape_kv, dtype),
        jnp.asarray(segment_ids),
        jnp.asarray(branch_ids),
        jax.random.normal(keys[3], shape_q, jnp.float32),
    )
    _, live = live_blocks(jnp.asarray(segment_ids), jnp.asarray(branch_ids), DEFAULT_BLOCK)
    n = args.length // DEFAULT_BLOCK
    causal_blocks = args.rows * n * (n + 1) // 2
    real = float(np.mean(segment_ids > 0))

    result = {"rows": args.rows, "length": args.length, "heads": args.heads,
              "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": args.dtype,
              "device": jax.devices()[0].device_kind, "real_token_share": round(real, 3),
              "live_block_share": round(int(live) / causal_blocks, 3)}  # fmt: skip
    for implementation in ("flash", "xla"):
        seconds, temporaries = time_fwd_bwd(implementation, inputs, args.repeats)
        result[f"{implementation}_fwd_bwd_ms"] = round(seconds * 1e3, 1)
        result[f"{implementation}_temp_bytes"] = temporaries
        print(f"{implementation:6s} fwd+bwd {seconds * 1e3:8.1f} ms, temporaries "
              f"{temporaries / 2**20:8.1f} MiB")  # fmt: skip
    result["xla_vs_flash_time"] = round(result["xla_fwd_bwd_ms"] / result["flash_fwd_bwd_ms"], 2)
    print(f"live blocks: {result['live_block_share']:.0%} of the causal block pairs; "
          f"real tokens: {real:.0%}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
