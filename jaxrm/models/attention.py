"""Attention kernels: causal over right-padded rows, and over packed rows of segments.

The model makes one `Mask` (no segments: causal; segments: packed) and calls one entry point,
`attend`, whose table `KERNELS` says which implementation runs for that kind of mask.

Layouts. q: [B, T, H, Dh]; k, v: [B, T, K, Dh] with H a multiple of K (GQA).

- Right-padded rows (the reference layout): causal attention needs no mask beyond causality,
  since a real token only attends to earlier tokens, which are all real. `xla` (full T x T scores)
  or cuDNN flash attention on NVIDIA GPUs.
- Packed rows: `segment_ids` [B, T] (0 = padding, > 0 = one group of tokens per id, contiguous)
  and `branch_ids` [B, T] (0 = shared by the group, 1 / 2 = a branch: the chosen / rejected rest
  after a shared prompt). Query i may read key j when

      j <= i  and  seg[j] == seg[i] != 0  and  (branch[j] == 0 or branch[j] == branch[i])

  so a rest reads the shared prefix and itself, never the other rest. `xla` builds that mask as
  T x T (the tests' reference); `flash` never does.

`flash` is a blocked online-softmax attention (FlashAttention-2's recurrence) in plain JAX with its
own backward pass: the forward keeps only the output and the per-query log-sum-exp, and both passes
walk a list of the (row, query block, key block) triples that hold at least one allowed pair. The
list is computed on the device from the segment and branch ids (block-level ranges: segments are
contiguous, so a block pair is live when their segment ranges overlap, the key block is not after
the query block, and the pair is not one rest against the other), and a `while_loop` runs exactly
as many iterations as there are live blocks: masked blocks, padding and the chosen x rejected
rectangles cost nothing. Memory is linear in T. Under a mesh the kernel runs per device on its own
rows (`shard_map`), heads sharded over `tensor` when they are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

DEFAULT_BLOCK = 128
ATTENTION_IMPLEMENTATIONS = ("flash", "xla", "cudnn")


# ----------------------------------------------------------------------------------------------
# The one entry point: a mask, and the table of what runs for each kind of mask


class Mask(NamedTuple):
    """Which keys each query reads: causal within its row, and with `segment_ids` (and
    `branch_ids`, zeros when None) the packed rule of the module docstring."""

    segment_ids: jax.Array | None = None
    branch_ids: jax.Array | None = None

    @property
    def kind(self) -> str:
        return "causal" if self.segment_ids is None else "packed"

    def branches(self) -> jax.Array:
        return jnp.zeros_like(self.segment_ids) if self.branch_ids is None else self.branch_ids


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    implementation: str,
    block: int = DEFAULT_BLOCK,
    mesh: jax.sharding.Mesh | None = None,
    specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None = None,
) -> jax.Array:
    """Attention under `mask` by `implementation`, as `KERNELS` says; `block`, `mesh` and `specs`
    (q/k specs, row spec) are for `flash`, which runs per device under `mesh`."""
    kernels = KERNELS[mask.kind]
    if implementation not in kernels:
        raise ValueError(
            f"{mask.kind} rows need attention {' or '.join(map(repr, kernels))}, "
            f"not {implementation!r}"
        )
    return kernels[implementation](q, k, v, mask, block, mesh, specs)


# ----------------------------------------------------------------------------------------------
# Right-padded rows


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """Causal softmax attention over right-padded rows (see `KERNELS["causal"]`)."""
    return attend(q, k, v, Mask(), implementation)


def _causal(implementation: str | None) -> Callable[..., jax.Array]:
    def kernel(q: jax.Array, k: jax.Array, v: jax.Array, *_: object) -> jax.Array:
        scale = q.shape[-1] ** -0.5
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, scale=scale, implementation=implementation
        )

    return kernel


# ----------------------------------------------------------------------------------------------
# Packed rows


def segment_mask(segment_ids: jax.Array, branch_ids: jax.Array) -> jax.Array:
    """[B, T, T] bool: which keys (last axis) each query may read (see the module docstring)."""
    t = segment_ids.shape[-1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    br_q, br_k = branch_ids[:, :, None], branch_ids[:, None, :]
    return causal & (seg_q == seg_k) & (seg_k > 0) & ((br_k == 0) | (br_k == br_q))


def packed_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, branch_ids: jax.Array
) -> jax.Array:
    """The packed layout's attention through XLA with the full T x T mask (tests' reference)."""
    mask = segment_mask(segment_ids, branch_ids)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5)


def packed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    branch_ids: jax.Array,
    implementation: str,
    block: int = DEFAULT_BLOCK,
    mesh: jax.sharding.Mesh | None = None,
    specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None = None,
) -> jax.Array:
    """Attention over packed rows (see `KERNELS["packed"]`)."""
    return attend(q, k, v, Mask(segment_ids, branch_ids), implementation, block, mesh, specs)


def _packed_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, *_: object) -> jax.Array:
    return packed_attention_reference(q, k, v, mask.segment_ids, mask.branches())


def _packed_flash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    block: int,
    mesh: jax.sharding.Mesh | None,
    specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None,
) -> jax.Array:
    if q.shape[1] % block:
        raise ValueError(f"packed length {q.shape[1]} is not a multiple of the block {block}")
    kernel = functools.partial(flash_attention, block=block)
    segment_ids, branch_ids = mask.segment_ids, mask.branches()
    if mesh is None or specs is None:
        return kernel(q, k, v, segment_ids, branch_ids)
    q_spec, kv_spec, row_spec = specs
    return jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segment_ids, branch_ids)


def live_blocks(
    segment_ids: jax.Array, branch_ids: jax.Array, block: int
) -> tuple[jax.Array, jax.Array]:
    """(triples, count): the (row, query block, key block) triples holding an allowed pair, in
    row-major order, padded to every causal triple; `count` of them are live."""
    rows, length = segment_ids.shape
    n = length // block
    seg = segment_ids.reshape(rows, n, block)
    branch = branch_ids.reshape(rows, n, block)
    real = seg > 0
    big = jnp.iinfo(jnp.int32).max
    seg_lo = jnp.min(jnp.where(real, seg, big), axis=-1)
    seg_hi = jnp.max(jnp.where(real, seg, 0), axis=-1)
    br_lo = jnp.min(jnp.where(real, branch, big), axis=-1)
    br_hi = jnp.max(jnp.where(real, branch, -1), axis=-1)
    # a block of one segment and one branch (> 0): one rest only
    rest = jnp.where((seg_lo == seg_hi) & (br_lo == br_hi) & (br_lo > 0), br_lo, 0)
    q_lo, q_hi, q_rest = seg_lo[:, :, None], seg_hi[:, :, None], rest[:, :, None]
    k_lo, k_hi, k_rest = seg_lo[:, None, :], seg_hi[:, None, :], rest[:, None, :]
    causal = jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]
    overlap = (q_hi > 0) & (k_hi > 0) & (k_hi >= q_lo) & (k_lo <= q_hi)
    other_rest = (q_rest > 0) & (k_rest > 0) & (q_rest != k_rest) & (q_lo == k_lo)
    live = (causal & overlap & ~other_rest).reshape(-1)
    size = rows * n * (n + 1) // 2
    (flat,) = jnp.nonzero(live, size=size, fill_value=0)
    triples = jnp.stack([flat // (n * n), (flat // n) % n, flat % n], axis=-1).astype(jnp.int32)
    return triples, jnp.sum(live, dtype=jnp.int32)


def _block_mask(seg: jax.Array, branch: jax.Array, b, i, j, block: int) -> jax.Array:
    """[block_q, block_k] allowed pairs of query block i and key block j of row b."""
    seg_q = jax.lax.dynamic_slice(seg, (b, i * block), (1, block))[0]
    seg_k = jax.lax.dynamic_slice(seg, (b, j * block), (1, block))[0]
    br_q = jax.lax.dynamic_slice(branch, (b, i * block), (1, block))[0]
    br_k = jax.lax.dynamic_slice(branch, (b, j * block), (1, block))[0]
    pos_q = i * block + jnp.arange(block)
    pos_k = j * block + jnp.arange(block)
    return (
        (pos_q[:, None] >= pos_k[None, :])
        & (seg_q[:, None] == seg_k[None, :])
        & (seg_k[None, :] > 0)
        & ((br_k[None, :] == 0) | (br_k[None, :] == br_q[:, None]))
    )


# Inside the kernel arrays are head-major, so that a block is a contiguous batched matrix:
# queries [B, K, G, T, D] (G query heads per key/value head), keys and values [B, K, T, D].


def _slice(x: jax.Array, b, start, block: int) -> jax.Array:
    """Row b, positions start:start+block (the second-to-last axis) of a head-major array."""
    index = (b,) + (0,) * (x.ndim - 3) + (start, 0)
    sizes = (1, *x.shape[1:-2], block, x.shape[-1])
    return jax.lax.dynamic_slice(x, index, sizes)[0]


def _add(x: jax.Array, update: jax.Array, b, start) -> jax.Array:
    index = (b,) + (0,) * (x.ndim - 3) + (start, 0)
    current = jax.lax.dynamic_slice(x, index, (1, *update.shape))
    return jax.lax.dynamic_update_slice(x, current + update[None], index)


def _head_major(q: jax.Array, k: jax.Array, v: jax.Array):
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qh = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _token_major(x: jax.Array) -> jax.Array:
    """[B, K, G, T, D] -> [B, T, K * G, D]."""
    b, k, g, t, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    branch_ids: jax.Array,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:
    """Packed-row attention that never forms T x T (see the module docstring)."""
    return _flash_forward(q, k, v, segment_ids, branch_ids, block)[0]


def _flash_forward(q, k, v, segment_ids, branch_ids, block):
    scale = 1.0 / math.sqrt(q.shape[-1])
    qh, kh, vh = _head_major(q, k, v)
    rows, kv_heads, groups, length, dim = qh.shape
    triples, count = live_blocks(segment_ids, branch_ids, block)
    out = jnp.zeros(qh.shape, q.dtype)
    lse = jnp.full((rows, kv_heads, groups, length, 1), -jnp.inf, jnp.float32)
    stats = (
        jnp.full((kv_heads, groups, block, 1), -jnp.inf, jnp.float32),  # running max
        jnp.zeros((kv_heads, groups, block, 1), jnp.float32),  # running sum of exp
        jnp.zeros((kv_heads, groups, block, dim), jnp.float32),  # running output
    )

    def body(t, carry):
        out, lse, (m, denom, acc) = carry
        b, i, j = triples[t, 0], triples[t, 1], triples[t, 2]
        previous = triples[jnp.maximum(t - 1, 0)]
        first = (t == 0) | (previous[0] != b) | (previous[1] != i)
        m = jnp.where(first, -jnp.inf, m)
        denom = jnp.where(first, 0.0, denom)
        acc = jnp.where(first, 0.0, acc)
        q_blk = _slice(qh, b, i * block, block)
        k_blk = _slice(kh, b, j * block, block)
        v_blk = _slice(vh, b, j * block, block)
        s = jnp.einsum("kgqd,kcd->kgqc", q_blk, k_blk, preferred_element_type=jnp.float32)
        mask = _block_mask(segment_ids, branch_ids, b, i, j, block)
        s = jnp.where(mask, s * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe)
        correction = jnp.exp(m - m_safe)
        denom = denom * correction + jnp.sum(p, axis=-1, keepdims=True)
        acc = acc * correction + jnp.einsum(
            "kgqc,kcd->kgqd", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32
        )
        m = m_new
        # written every time a key block is added; the last write of a query block is its result
        norm = jnp.where(denom > 0, denom, 1.0)
        index = (b, 0, 0, i * block, 0)
        out = jax.lax.dynamic_update_slice(out, (acc / norm).astype(out.dtype)[None], index)
        block_lse = jnp.where(denom > 0, m_safe + jnp.log(norm), -jnp.inf)
        lse = jax.lax.dynamic_update_slice(lse, block_lse[None], index)
        return out, lse, (m, denom, acc)

    out, lse, _ = jax.lax.fori_loop(0, count, body, (out, lse, stats))
    residuals = (qh, kh, vh, segment_ids, branch_ids, out, lse, triples, count)
    return _token_major(out), residuals


def _flash_backward(block, residuals, d_out):
    qh, kh, vh, segment_ids, branch_ids, out, lse, triples, count = residuals
    scale = 1.0 / math.sqrt(qh.shape[-1])
    rows, kv_heads, groups, length, dim = qh.shape
    doh = d_out.reshape(rows, length, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
    delta = jnp.sum(doh.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    grads = (
        jnp.zeros(qh.shape, jnp.float32),
        jnp.zeros(kh.shape, jnp.float32),
        jnp.zeros(vh.shape, jnp.float32),
    )

    def body(t, grads):
        dq, dk, dv = grads
        b, i, j = triples[t, 0], triples[t, 1], triples[t, 2]
        q_blk = _slice(qh, b, i * block, block)
        k_blk = _slice(kh, b, j * block, block)
        v_blk = _slice(vh, b, j * block, block)
        do_blk = _slice(doh, b, i * block, block)
        lse_blk = _slice(lse_safe, b, i * block, block)
        delta_blk = _slice(delta, b, i * block, block)
        mask = _block_mask(segment_ids, branch_ids, b, i, j, block)
        s = jnp.einsum("kgqd,kcd->kgqc", q_blk, k_blk, preferred_element_type=jnp.float32)
        p = jnp.where(mask, jnp.exp(s * scale - lse_blk), 0.0)
        dv_blk = jnp.einsum(
            "kgqc,kgqd->kcd", p.astype(d_out.dtype), do_blk, preferred_element_type=jnp.float32
        )
        dp = jnp.einsum("kgqd,kcd->kgqc", do_blk, v_blk, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_blk) * scale).astype(qh.dtype)
        dq_blk = jnp.einsum("kgqc,kcd->kgqd", ds, k_blk, preferred_element_type=jnp.float32)
        dk_blk = jnp.einsum("kgqc,kgqd->kcd", ds, q_blk, preferred_element_type=jnp.float32)
        return (
            _add(dq, dq_blk, b, i * block),
            _add(dk, dk_blk, b, j * block),
            _add(dv, dv_blk, b, j * block),
        )

    dq, dk, dv = jax.lax.fori_loop(0, count, body, grads)
    dq = _token_major(dq).astype(qh.dtype)
    return (
        dq,
        dk.transpose(0, 2, 1, 3).astype(kh.dtype),
        dv.transpose(0, 2, 1, 3).astype(vh.dtype),
        None,
        None,
    )


flash_attention.defvjp(
    lambda q, k, v, seg, br, block: _flash_forward(q, k, v, seg, br, block), _flash_backward
)


# What runs for each kind of mask, by `attention` name. A right-padded row under `flash` without a
# mask runs `xla` (RewardModel gives flash a padding segment, so it never asks for this).
KERNELS: dict[str, dict[str, Callable[..., jax.Array]]] = {
    "causal": {"xla": _causal(None), "cudnn": _causal("cudnn"), "flash": _causal(None)},
    "packed": {"flash": _packed_flash, "xla": _packed_xla},
}
