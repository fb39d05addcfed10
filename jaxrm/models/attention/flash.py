"""`flash`: blocked online-softmax attention (FlashAttention-2's recurrence) in plain JAX with its
own backward pass, for packed rows (segments and trees).

The forward keeps only the output and the per-query log-sum-exp, and both passes walk a list of
the (row, query block, key block) triples that hold at least one allowed pair. The list is
computed on the device from the segment, branch and position ids (block-level ranges: segments are
contiguous, so a block pair is live when their segment ranges overlap, the key block is not after
the query block, the pair is not one rest against the other, and some pair is inside the window
by position), and a `while_loop` runs exactly as many iterations as there are live blocks: masked
blocks, padding, the chosen x rejected rectangles and blocks out of the window cost nothing.
Memory is linear in T. Under a mesh the kernel runs per device on its own rows (`shard_map`),
heads sharded over `tensor` when they are.

On the CPU it is ~5x XLA's T x T attention (benchmarks/RESULTS.md); on accelerators the loop's
data-dependent trip count costs a host sync per block, which is why they have kernels of their own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxrm.models.attention.mask import Logits, Mask, cap, cap_derivative


def flash_packed(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    logits: Logits,
    block: int,
    mesh: jax.sharding.Mesh | None,
    specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None,
) -> jax.Array:
    """The table's entry for packed rows (see the module docstring)."""
    if q.shape[1] % block:
        raise ValueError(f"packed length {q.shape[1]} is not a multiple of the block {block}")
    kernel = functools.partial(flash_attention, logits=logits, block=block)
    return per_device(kernel, q, k, v, mask, mesh, specs)


def per_device(
    kernel: Callable[..., jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    mesh: jax.sharding.Mesh | None,
    specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None,
) -> jax.Array:
    """`kernel(q, k, v, segment_ids, branch_ids, positions, window)` on the mask's arrays (no
    branches: zeros; no segments: one segment per row), per device on its own rows under a mesh
    (`shard_map` by the q/kv/row `specs`)."""
    rows = mask.segment_ids
    if rows is None:
        rows = jnp.ones(q.shape[:2], jnp.int32)
    branch_ids = jnp.zeros_like(rows) if mask.branch_ids is None else mask.branch_ids
    positions = mask.token_positions(rows.shape)
    window = mask.window_size()
    if mesh is None or specs is None:
        return kernel(q, k, v, rows, branch_ids, positions, window)
    q_spec, kv_spec, row_spec = specs
    return jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec, row_spec, PartitionSpec()),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, rows, branch_ids, positions, window)


def _block_ranges(ids: jax.Array, real: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per block, min and max of `ids` over real tokens (empty block: big, -1)."""
    rows, length = ids.shape
    ids = ids.reshape(rows, length // block, block)
    real = real.reshape(ids.shape)
    big = jnp.iinfo(jnp.int32).max
    return jnp.min(jnp.where(real, ids, big), axis=-1), jnp.max(jnp.where(real, ids, -1), axis=-1)


def live_blocks(
    segment_ids: jax.Array,
    branch_ids: jax.Array,
    block: int,
    positions: jax.Array | None = None,
    window: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(triples, count): the (row, query block, key block) triples holding an allowed pair, in
    row-major order, padded to every causal triple; `count` of them are live."""
    rows, length = segment_ids.shape
    n = length // block
    real = segment_ids > 0
    seg_lo, seg_hi = _block_ranges(segment_ids, real, block)
    seg_hi = jnp.maximum(seg_hi, 0)
    br_lo, br_hi = _block_ranges(branch_ids, real, block)
    # a block of one segment and one branch (> 0): one rest only
    rest = jnp.where((seg_lo == seg_hi) & (br_lo == br_hi) & (br_lo > 0), br_lo, 0)
    q_lo, q_hi, q_rest = seg_lo[:, :, None], seg_hi[:, :, None], rest[:, :, None]
    k_lo, k_hi, k_rest = seg_lo[:, None, :], seg_hi[:, None, :], rest[:, None, :]
    causal = jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]
    overlap = (q_hi > 0) & (k_hi > 0) & (k_hi >= q_lo) & (k_lo <= q_hi)
    other_rest = (q_rest > 0) & (k_rest > 0) & (q_rest != k_rest) & (q_lo == k_lo)
    live = causal & overlap & ~other_rest
    if positions is not None and window is not None:
        pos_lo, _ = _block_ranges(positions, real, block)
        _, pos_hi = _block_ranges(positions, real, block)
        # some pair of the two blocks is within the window
        live = live & (pos_lo[:, :, None] - pos_hi[:, None, :] < window)
    live = live.reshape(-1)
    size = rows * n * (n + 1) // 2
    (flat,) = jnp.nonzero(live, size=size, fill_value=0)
    triples = jnp.stack([flat // (n * n), (flat // n) % n, flat % n], axis=-1).astype(jnp.int32)
    return triples, jnp.sum(live, dtype=jnp.int32)


def _row_slice(x: jax.Array, b, start, block: int) -> jax.Array:
    return jax.lax.dynamic_slice(x, (b, start), (1, block))[0]


def _block_mask(seg, branch, pos, window, b, i, j, block: int) -> jax.Array:
    """[block_q, block_k] allowed pairs of query block i and key block j of row b."""
    seg_q, seg_k = _row_slice(seg, b, i * block, block), _row_slice(seg, b, j * block, block)
    br_q, br_k = _row_slice(branch, b, i * block, block), _row_slice(branch, b, j * block, block)
    pos_q, pos_k = _row_slice(pos, b, i * block, block), _row_slice(pos, b, j * block, block)
    index_q = i * block + jnp.arange(block)
    index_k = j * block + jnp.arange(block)
    return (
        (index_q[:, None] >= index_k[None, :])
        & (seg_q[:, None] == seg_k[None, :])
        & (seg_k[None, :] > 0)
        & ((br_k[None, :] == 0) | (br_k[None, :] == br_q[:, None]))
        & (pos_q[:, None] - pos_k[None, :] < window)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    branch_ids: jax.Array,
    positions: jax.Array,
    window: jax.Array,
    logits: Logits,
    block: int,
) -> jax.Array:
    """Packed-row attention that never forms T x T (see the module docstring)."""
    return _flash_forward(q, k, v, segment_ids, branch_ids, positions, window, logits, block)[0]


def _flash_forward(q, k, v, segment_ids, branch_ids, positions, window, logits, block):
    qh, kh, vh = _head_major(q, k, v)
    rows, kv_heads, groups, length, dim = qh.shape
    triples, count = live_blocks(segment_ids, branch_ids, block, positions, window)
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
        mask = _block_mask(segment_ids, branch_ids, positions, window, b, i, j, block)
        s = jnp.where(mask, cap(s, logits), -jnp.inf)
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
    residuals = (qh, kh, vh, segment_ids, branch_ids, positions, window, out, lse, triples, count)
    return _token_major(out), residuals


def _flash_backward(logits, block, residuals, d_out):
    qh, kh, vh, segment_ids, branch_ids, positions, window, out, lse, triples, count = residuals
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
        mask = _block_mask(segment_ids, branch_ids, positions, window, b, i, j, block)
        s = cap(
            jnp.einsum("kgqd,kcd->kgqc", q_blk, k_blk, preferred_element_type=jnp.float32),
            logits,
        )
        p = jnp.where(mask, jnp.exp(s - lse_blk), 0.0)
        dv_blk = jnp.einsum(
            "kgqc,kgqd->kcd", p.astype(d_out.dtype), do_blk, preferred_element_type=jnp.float32
        )
        dp = jnp.einsum("kgqd,kcd->kgqc", do_blk, v_blk, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_blk) * cap_derivative(s, logits)).astype(qh.dtype)
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
        None,
        None,
    )


flash_attention.defvjp(_flash_forward, _flash_backward)
