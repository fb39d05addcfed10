"""Inputs shared by the attention scripts (bench_attention.py, attention_check.py,
attention_compile.py): chat-like packed rows, the mask of each kind over them, the implementations
the attention table holds for a backend, and the live (allowed) query-key pairs.

Rows of `length` tokens are filled in order with pairs as training packs them: log-normal prompt
(median ~70 tokens) and responses (median ~130 each, sigma 0.8; the Tulu-like mix of
scripts/bench.py; scaled down for rows shorter than 1024 tokens). With prefix sharing (`tree`) a
pair is one group [prompt][chosen][rejected] whose rests restart their positions after the prompt;
without it (`segments`) a pair is two sequences, prompt + chosen and prompt + rejected. A row is
closed after 16 pairs in a row that do not fit in what is left; the rest is padding. `causal` rows
are right-padded single sequences of the same lengths (prompt + chosen), one per row.

JAX is imported only when a function needs it (scripts/attention_compile.py sets up the CUDA
plugin first).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jaxrm.models.attention import Features, Mask

MASK_KINDS = ("causal", "segments", "tree")
MAX_MISSES = 16  # pairs drawn that do not fit before a row is closed


def implementations(
    kind: str, backend: str, dtype: str, head_dim: int, features: Features | None = None
) -> list[str]:
    """What the attention table runs for `kind` masks on `backend` at this dtype and head_dim
    (and these model features: soft-cap, window)."""
    from jaxrm.models.attention import IMPLEMENTATIONS, Features

    features = features or Features()
    return [
        name
        for name, implementation in IMPLEMENTATIONS.items()
        if implementation.misfit(kind, features, backend=backend, dtype=dtype, head_dim=head_dim)
        is None
    ]


def pair_lengths(rng: np.random.Generator, scale: float) -> tuple[int, int, int]:
    medians = np.log(np.array([70, 130, 130]) * scale)
    prompt, chosen, rejected = np.exp(rng.normal(medians, 0.8)).astype(int) + 1
    return int(prompt), int(chosen), int(rejected)


def length_scale(length: int) -> float:
    """The Tulu-like mix for rows of 1024 tokens and more; shorter rows (tests, dry runs) get
    proportionally shorter pairs, so that they hold some."""
    return min(1.0, length / 1024)


def chat_rows(kind: str, rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """[rows, length] int32 `segment_ids`, `branch_ids` and `positions` of one mask kind (see the
    module's docstring); `causal` has `lengths` [rows] instead."""
    rng, scale = np.random.default_rng(seed), length_scale(length)
    if kind == "causal":
        lengths = [min(length, sum(pair_lengths(rng, scale)[:2])) for _ in range(rows)]
        return {"lengths": np.array(lengths, np.int32)}
    seg, branch, pos = (np.zeros((rows, length), np.int32) for _ in range(3))
    for row in range(rows):
        start, segment, misses = 0, 1, 0
        while misses < MAX_MISSES:
            prompt, chosen, rejected = pair_lengths(rng, scale)
            if kind == "tree":
                pieces = [(prompt + chosen + rejected, [(0, prompt, 0), (prompt, chosen, 1),
                                                         (prompt, rejected, 2)])]  # fmt: skip
            else:
                pieces = [(prompt + chosen, [(0, prompt + chosen, 0)]),
                          (prompt + rejected, [(0, prompt + rejected, 0)])]  # fmt: skip
            if start + sum(size for size, _ in pieces) > length:
                misses += 1  # a shorter pair may still fit, as first-fit packing finds them
                continue
            for size, parts in pieces:
                at = start
                for first_position, n, b in parts:
                    seg[row, at : at + n] = segment
                    branch[row, at : at + n] = b
                    pos[row, at : at + n] = np.arange(first_position, first_position + n)
                    at += n
                start, segment = start + size, segment + 1
    return {"segment_ids": seg, "branch_ids": branch, "positions": pos}


def make_mask(kind: str, ids: dict[str, np.ndarray], window: int | None = None) -> Mask:
    """The `Mask` of `kind` over `chat_rows(kind, ...)`."""
    import jax.numpy as jnp

    from jaxrm.models.attention import Mask

    if kind == "causal":
        return Mask(window=window)
    return Mask(
        jnp.asarray(ids["segment_ids"]),
        jnp.asarray(ids["branch_ids"]) if kind == "tree" else None,
        jnp.asarray(ids["positions"]),
        window,
    )


def live_pairs(kind: str, ids: dict[str, np.ndarray], length: int) -> int:
    """Allowed (query, key) pairs of real queries, over all rows (no window)."""
    if kind == "causal":
        n = ids["lengths"].astype(np.int64)
        return int(np.sum(n * (n + 1) // 2))
    total = 0
    for seg, branch in zip(ids["segment_ids"], ids["branch_ids"], strict=True):
        for segment in np.unique(seg[seg > 0]):
            b = branch[seg == segment]
            prompt = int(np.sum(b == 0))
            total += prompt * (prompt + 1) // 2
            for rest in np.unique(b[b > 0]):
                n = int(np.sum(b == rest))
                total += n * prompt + n * (n + 1) // 2
    return total


def add_shape_arguments(
    parser: argparse.ArgumentParser, rows: int, length: int, heads: int, kv_heads: int, dim: int
) -> None:
    """--rows, --length, --heads, --kv_heads, --head_dim, --seed, with these defaults."""
    parser.add_argument("--rows", type=int, default=rows)
    parser.add_argument("--length", type=int, default=length)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--kv_heads", type=int, default=kv_heads)
    parser.add_argument("--head_dim", type=int, default=dim)
    parser.add_argument("--seed", type=int, default=0)


def random_inputs(args: argparse.Namespace, dtype: Any) -> tuple[Any, Any, Any, Any]:
    """Normal q, k, v in `dtype` and a float32 cotangent of the output, of the shapes in `args`."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(args.seed), 4)
    q_shape = (args.rows, args.length, args.heads, args.head_dim)
    kv_shape = (args.rows, args.length, args.kv_heads, args.head_dim)
    return (
        jax.random.normal(keys[0], q_shape, dtype),
        jax.random.normal(keys[1], kv_shape, dtype),
        jax.random.normal(keys[2], kv_shape, dtype),
        jax.random.normal(keys[3], q_shape, jnp.float32),
    )
