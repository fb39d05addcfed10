"""`pallas`: block-sparse flash attention written in Pallas for GPUs (Triton lowering), with its
own backward pass, for every mask kind (causal, segments, tree), windows by position, soft-cap
and scale.

Per call, plain JAX (no loop) summarizes every block of the row (segment, branch and position
ranges of its real tokens) and lists, for each query block, the key blocks that may hold an
allowed pair (and for each key block, the query blocks): segments are contiguous, so they lie
between the first block of the query block's earliest segment and the query block itself, minus
the rectangles of one rest against the other and the blocks out of the window by position
(`block_pairs`: a superset of the blocks with an allowed pair). Tiles whose every pair is allowed
(inside one segment, below the diagonal, inside the window) are listed first and computed without
a mask; the others are masked pair by pair. The kernels loop over their lists only
(FlashAttention-2):

- forward, one program per (query block, row, head): output and log-sum-exp (base 2: the
  kernels' softmax is exp2 of the scores times log2(e), as FlashAttention's);
- backward, dK/dV with one program per (key block, row, key/value head), looping over the query
  heads of its group and the listed query blocks, and dQ with one program per (query block, row,
  head); soft-cap's derivative included.

A query with no allowed key (padding) gets output 0, log-sum-exp -inf and zero gradients. The
compiled program holds no XLA loop over blocks: every loop runs inside a kernel. Off a GPU the
kernels run in Pallas' interpret mode (the tests' mode; slow).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec

from jaxrm.models.attention.flash import per_device
from jaxrm.models.attention.mask import Logits, Mask, cap, cap_derivative
from jaxrm.models.attention.table import MASK_KINDS, Implementation

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # a masked score (finite: no inf - inf)
_LOG2E = math.log2(math.e)  # the kernels' softmax is in base 2 (exp2 is one GPU instruction)
_FAR = 2**29  # bigger than any position, small enough that differences fit in int32


class BlockSizes(NamedTuple):
    """Tile sizes of the three kernels (query x key rows per tile; powers of two, >= 16)."""

    block_q: int = 128  # forward
    block_k: int = 64
    block_q_dkv: int = 32  # backward, dK/dV (programs over key blocks)
    block_k_dkv: int = 128
    block_q_dq: int = 128  # backward, dQ (programs over query blocks)
    block_k_dq: int = 32
    num_warps: int | None = None  # None: 4 up to head_dim 64, else 8
    num_stages: int = 2


def default_blocks(head_dim: int) -> BlockSizes:
    """Tiles for an H100 (untuned: Triton's FlashAttention-2 tutorial's, smaller for head_dim
    256 so that the tiles fit in shared memory)."""
    if head_dim <= 128:
        return BlockSizes()
    return BlockSizes(64, 32, 32, 64, 64, 32)


def pallas_packed(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    logits: Logits,
    block: int,
    mesh: jax.sharding.Mesh | None,
    specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None,
) -> jax.Array:
    """The table's entry for every mask kind (right-padded rows are one segment). `block` is
    `flash`'s; the tiles are `default_blocks`. Under a mesh it runs per device on its rows."""
    del block
    kernel = functools.partial(pallas_attention, logits=logits)
    return per_device(kernel, q, k, v, mask, mesh, specs)


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    branch_ids: jax.Array,
    positions: jax.Array,
    window: jax.Array | int,
    *,
    logits: Logits,
    blocks: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """q [B, T, H, Dh], k/v [B, T, K, Dh] (H a multiple of K), ids and positions [B, T] int32,
    window an int32 scalar (NO_WINDOW for none) -> [B, T, H, Dh] in q.dtype. The length is
    padded to a multiple of the tiles (padding tokens: segment 0) and the head dim to a power of
    two (zeros), in plain JAX outside the kernels. `interpret` None: off a GPU only."""
    rows, length, heads, dim = q.shape
    if heads % k.shape[2]:
        raise ValueError(f"{heads} query heads are not a multiple of {k.shape[2]} kv heads")
    blocks = blocks or default_blocks(dim)
    if any(size < 16 or size & (size - 1) for size in blocks[:6]):
        raise ValueError(f"tiles must be powers of two of at least 16, got {blocks}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    tile = max(blocks[:6])
    padded = -(-length // tile) * tile
    dim_padded = max(16, pl.next_power_of_2(dim))

    def pad(x: jax.Array) -> jax.Array:
        widths = [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2)
        if x.ndim == 4:
            widths[-1] = (0, dim_padded - dim)
        return jnp.pad(x, widths) if any(w != (0, 0) for w in widths) else x

    tokens = tuple(pad(x.astype(jnp.int32)) for x in (segment_ids, branch_ids, positions))
    window = jnp.asarray(window, jnp.int32).reshape(1)
    tables = block_tables(*tokens, window[0], blocks)
    out = _attention(
        pad(q), pad(k), pad(v), tokens, window, tables, logits, blocks, bool(interpret)
    )
    return out[:, :length, :, :dim]


class Tables(NamedTuple):
    """Per row, the tiles each program visits: [full, partial, index, index, ...]: the counts of
    full tiles (every pair allowed: no mask to compute) and of partial ones, then the full tiles'
    indices, then the partial ones' (each in increasing order), then padding."""

    forward: jax.Array  # [B, T/block_q, 2 + T/block_k]: key blocks per query block
    dkv: jax.Array  # [B, T/block_k_dkv, 2 + T/block_q_dkv]: query blocks per key block
    dq: jax.Array  # [B, T/block_q_dq, 2 + T/block_k_dq]: key blocks per query block


def block_tables(
    segment_ids: jax.Array,
    branch_ids: jax.Array,
    positions: jax.Array,
    window: jax.Array | int,
    blocks: BlockSizes,
) -> Tables:
    """The visit lists of the three kernels (plain JAX, once per call)."""
    pairs = functools.partial(block_pairs, segment_ids, branch_ids, positions, window)
    by_key = [jnp.swapaxes(x, 1, 2) for x in pairs(blocks.block_q_dkv, blocks.block_k_dkv)]
    return Tables(
        _listed(*pairs(blocks.block_q, blocks.block_k)),
        _listed(*by_key),
        _listed(*pairs(blocks.block_q_dq, blocks.block_k_dq)),
    )


def _listed(live: jax.Array, full: jax.Array) -> jax.Array:
    """[..., n] bools -> [..., 2 + n] int32: the counts of full and of partial (live, not full)
    entries, then the full entries' indices, then the partial ones'."""
    n = live.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    key = jnp.where(full, index, jnp.where(live, n + index, 2 * n))
    order = jnp.sort(key, axis=-1) % n
    counts = [jnp.sum(x, axis=-1, dtype=jnp.int32)[..., None] for x in (full, live & ~full)]
    return jnp.concatenate([*counts, order], axis=-1)


class _Summary(NamedTuple):
    """Per block, over its real tokens: segment, branch and position ranges, its rest (> 0 when
    all its tokens are one rest of one segment), whether all its tokens are real; `seg_hi` 0 for
    a block without real tokens."""

    seg_lo: jax.Array
    seg_hi: jax.Array
    br_lo: jax.Array
    br_hi: jax.Array
    rest: jax.Array
    pos_lo: jax.Array
    pos_hi: jax.Array
    all_real: jax.Array


def _summary(segment_ids, branch_ids, positions, block: int) -> _Summary:
    rows, length = segment_ids.shape
    shape = (rows, length // block, block)
    real = (segment_ids > 0).reshape(shape)

    def lo(x, empty):
        return jnp.min(jnp.where(real, x.reshape(shape), empty), axis=-1)

    def hi(x, empty):
        return jnp.max(jnp.where(real, x.reshape(shape), empty), axis=-1)

    seg_lo, seg_hi = lo(segment_ids, _FAR), hi(segment_ids, 0)
    br_lo, br_hi = lo(branch_ids, _FAR), hi(branch_ids, -1)
    rest = jnp.where((seg_lo == seg_hi) & (br_lo == br_hi) & (br_lo > 0), br_lo, 0)
    pos_lo, pos_hi = lo(positions, _FAR), hi(positions, -_FAR)
    return _Summary(seg_lo, seg_hi, br_lo, br_hi, rest, pos_lo, pos_hi, jnp.all(real, axis=-1))


def block_pairs(
    segment_ids: jax.Array,
    branch_ids: jax.Array,
    positions: jax.Array,
    window: jax.Array | int,
    block_q: int,
    block_k: int,
) -> tuple[jax.Array, jax.Array]:
    """(live, full), each [B, T/block_q, T/block_k] bool, from block-level ranges.

    live: the (query block, key block) pairs a kernel visits, every pair holding an allowed
    (query, key) and few others: the key block starts at or before the query block's last row,
    both blocks have real tokens and overlapping segment ranges, they are not one rest against
    another rest of the same segment, and the smallest query position minus the largest key
    position is inside the window.

    full: live pairs whose every (query, key) is allowed: all tokens real and of one segment, the
    key block ends at or before the query block's first row, the keys are all shared prompt or
    all the queries' own rest, and the largest query position minus the smallest key position is
    inside the window."""
    qs = _summary(segment_ids, branch_ids, positions, block_q)
    ks = _summary(segment_ids, branch_ids, positions, block_k)
    nq, nk = qs.seg_lo.shape[1], ks.seg_lo.shape[1]
    key_rows = jnp.arange(nk)[None, :] * block_k
    query_rows = jnp.arange(nq)[:, None] * block_q
    q_ = jax.tree.map(lambda x: x[:, :, None], qs)
    k_ = jax.tree.map(lambda x: x[:, None, :], ks)
    overlap = (
        (q_.seg_hi > 0) & (k_.seg_hi > 0) & (k_.seg_hi >= q_.seg_lo) & (k_.seg_lo <= q_.seg_hi)
    )
    other_rest = (q_.rest > 0) & (k_.rest > 0) & (q_.rest != k_.rest) & (q_.seg_lo == k_.seg_lo)
    live = (
        (key_rows <= query_rows + block_q - 1)
        & overlap
        & ~other_rest
        & (q_.pos_lo - k_.pos_hi < window)
    )
    one_segment = (
        q_.all_real & k_.all_real & (q_.seg_lo == q_.seg_hi) & (k_.seg_lo == k_.seg_hi)
    ) & (q_.seg_lo == k_.seg_lo)
    prompt_or_own = (k_.br_hi == 0) | ((k_.rest > 0) & (k_.rest == q_.rest))
    full = (
        live
        & one_segment
        & (key_rows + block_k - 1 <= query_rows)
        & prompt_or_own
        & (q_.pos_hi - k_.pos_lo < window)
    )
    return live, full


def _dot(a: jax.Array, b: jax.Array, trans_b: bool = False) -> jax.Array:
    """A tile product in float32; float32 tiles at full precision (Triton's default for them is
    TF32), so that float32 runs match the reference on a GPU too. (`pl.dot` did the same; JAX
    0.11 removed it.)"""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    contract = ((1,), (1 if trans_b else 0,))
    return jax.lax.dot_general(
        a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _base2(raw: jax.Array, logits: Logits) -> jax.Array:
    """Scaled (and soft-capped) scores times log2(e): 2 ** result is e ** score."""
    if logits.softcap is None:
        return raw * (logits.scale * _LOG2E)
    return cap(raw, logits) * _LOG2E


def _score_derivative(base2: jax.Array, logits: Logits) -> jax.Array:
    """d score / d raw q.k from the base-2 scores."""
    return cap_derivative(base2 * (1 / _LOG2E), logits)


def _pair_mask(window, queries, keys, keys_first: bool = False) -> jax.Array:
    """[block_q, block_k] allowed pairs of a tile ([block_k, block_q] with `keys_first`): the rule
    of mask.py. `queries` and `keys`: their row indices, segment, branch and position ids."""
    i_q, seg_q, br_q, pos_q = (x[None, :] if keys_first else x[:, None] for x in queries)
    i_k, seg_k, br_k, pos_k = (x[:, None] if keys_first else x[None, :] for x in keys)
    return (
        (i_q >= i_k)
        & (seg_q == seg_k)
        & (seg_k > 0)
        & ((br_k == 0) | (br_k == br_q))
        & (pos_q - pos_k < window)
    )


def _tile_tokens(seg_ref, br_ref, pos_ref, start, size: int):
    """Row indices, segment, branch and position ids of rows start:start+size."""
    rows = pl.ds(start, size)
    index = start + jnp.arange(size, dtype=jnp.int32)
    return index, seg_ref[rows], br_ref[rows], pos_ref[rows]


def _forward_kernel(window_ref, table_ref, *refs, logits: Logits, block_q: int, block_k: int):
    seg_ref, br_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    window = window_ref[0]
    tokens = (seg_ref, br_ref, pos_ref)
    queries = _tile_tokens(*tokens, pl.program_id(0) * block_q, block_q)
    q = q_ref[...]

    def visit(masked: bool):
        def body(t, carry):
            acc, top, total = carry
            start = table_ref[t + 2] * block_k
            rows = pl.ds(start, block_k)
            k, v = k_ref[rows, :], v_ref[rows, :]
            s = _base2(_dot(q, k, trans_b=True), logits)
            if masked:
                allowed = _pair_mask(window, queries, _tile_tokens(*tokens, start, block_k))
                s = jnp.where(allowed, s, _MASKED)
            new_top = jnp.maximum(top, jnp.max(s, axis=-1))
            p = jnp.exp2(s - new_top[:, None])
            if masked:
                p = jnp.where(allowed, p, 0.0)
            correction = jnp.exp2(top - new_top)
            total = total * correction + jnp.sum(p, axis=-1)
            acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
            return acc, new_top, total

        return body

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block_q,), _MASKED, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    full, partial = table_ref[0], table_ref[1]
    carry = jax.lax.fori_loop(0, full, visit(masked=False), init)
    acc, top, total = jax.lax.fori_loop(full, full + partial, visit(masked=True), carry)
    some = total > 0
    norm = jnp.where(some, total, 1.0)
    o_ref[...] = (acc / norm[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(some, top + jnp.log2(norm), -jnp.inf)


def _dkv_kernel(
    window_ref, table_ref, *refs, logits: Logits, block_q: int, block_k: int, groups: int
):
    seg_ref, br_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    window = window_ref[0]
    tokens = (seg_ref, br_ref, pos_ref)
    keys = _tile_tokens(*tokens, pl.program_id(0) * block_k, block_k)
    k, v = k_ref[...], v_ref[...]

    # FlashAttention-2's backward on transposed tiles ([keys, queries]), as Triton's tutorial
    # does: every product then takes its left operand untransposed.
    def visit(g, masked: bool):
        def body(t, carry):
            dk, dv = carry
            start = table_ref[t + 2] * block_q
            rows = pl.ds(start, block_q)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            s = _base2(_dot(k, q, trans_b=True), logits)
            p = jnp.exp2(s - lse_ref[g, rows][None, :])
            if masked:
                queries = _tile_tokens(*tokens, start, block_q)
                p = jnp.where(_pair_mask(window, queries, keys, keys_first=True), p, 0.0)
            dv = dv + _dot(p.astype(do.dtype), do)
            dp = _dot(v, do, trans_b=True) - delta_ref[g, rows][None, :]
            ds = p * dp * _score_derivative(s, logits)
            dk = dk + _dot(ds.astype(q.dtype), q)
            return dk, dv

        return body

    def head(g, carry):
        full, partial = table_ref[0], table_ref[1]
        carry = jax.lax.fori_loop(0, full, visit(g, masked=False), carry)
        return jax.lax.fori_loop(full, full + partial, visit(g, masked=True), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(window_ref, table_ref, *refs, logits: Logits, block_q: int, block_k: int):
    seg_ref, br_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    window = window_ref[0]
    tokens = (seg_ref, br_ref, pos_ref)
    queries = _tile_tokens(*tokens, pl.program_id(0) * block_q, block_q)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def visit(masked: bool):
        def body(t, dq):
            start = table_ref[t + 2] * block_k
            rows = pl.ds(start, block_k)
            k, v = k_ref[rows, :], v_ref[rows, :]
            s = _base2(_dot(q, k, trans_b=True), logits)
            p = jnp.exp2(s - lse[:, None])
            if masked:
                keys = _tile_tokens(*tokens, start, block_k)
                p = jnp.where(_pair_mask(window, queries, keys), p, 0.0)
            dp = _dot(do, v, trans_b=True) - delta[:, None]
            ds = p * dp * _score_derivative(s, logits)
            return dq + _dot(ds.astype(k.dtype), k)

        return body

    full, partial = table_ref[0], table_ref[1]
    dq = jax.lax.fori_loop(0, full, visit(masked=False), jnp.zeros(q.shape, jnp.float32))
    dq = jax.lax.fori_loop(full, full + partial, visit(masked=True), dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _params(blocks: BlockSizes, dim: int) -> plgpu.CompilerParams:
    warps = blocks.num_warps or (4 if dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=warps, num_stages=blocks.num_stages)


def _token_specs(table: jax.Array, length: int) -> list[pl.BlockSpec]:
    """The window, the program's visit list, and the segment, branch and position ids of its row
    (every grid is (tile, row, head))."""
    row = pl.BlockSpec((None, length), lambda i, b, h: (b, 0))
    return [
        pl.BlockSpec((1,), lambda i, b, h: (0,)),
        pl.BlockSpec((None, None, table.shape[-1]), lambda i, b, h: (b, i, 0)),
        row,
        row,
        row,
    ]


def _forward(q, k, v, tokens, window, tables: Tables, logits, blocks: BlockSizes, interpret):
    rows, length, heads, dim = q.shape
    groups = heads // k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    specs = _token_specs(tables.forward, length)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, logits=logits, block_q=bq, block_k=bk),
        grid=(length // bq, rows, heads),
        in_specs=[
            *specs,
            pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, length, None, dim), lambda i, b, h: (b, 0, h // groups, 0)),
            pl.BlockSpec((None, length, None, dim), lambda i, b, h: (b, 0, h // groups, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((rows, heads, length), jnp.float32),
        ],
        compiler_params=_params(blocks, dim),
        interpret=interpret,
        name="pallas_attention_forward",
    )(window, tables.forward, *tokens, q, k, v)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, tokens, window, tables, logits, blocks, interpret):
    return _forward(q, k, v, tokens, window, tables, logits, blocks, interpret)[0]


def _attention_forward(q, k, v, tokens, window, tables, logits, blocks, interpret):
    out, lse = _forward(q, k, v, tokens, window, tables, logits, blocks, interpret)
    return out, (q, k, v, tokens, window, tables, out, lse)


def _attention_backward(logits, blocks: BlockSizes, interpret, residuals, d_out):
    q, k, v, tokens, window, tables, out, lse = residuals
    rows, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    # delta_i = sum_d dO_i * O_i  (FlashAttention-2's D), [B, H, T] like the log-sum-exp
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    params = _params(blocks, dim)

    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    specs = _token_specs(tables.dkv, length)
    whole_group = pl.BlockSpec((None, length, groups, dim), lambda j, b, h: (b, 0, h, 0))
    key_tile = pl.BlockSpec((None, bk, None, dim), lambda j, b, h: (b, j, h, 0))
    group_stats = pl.BlockSpec((None, groups, length), lambda j, b, h: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, logits=logits, block_q=bq, block_k=bk, groups=groups),
        grid=(length // bk, rows, kv_heads),
        in_specs=[*specs, whole_group, key_tile, key_tile, whole_group, group_stats, group_stats],
        out_specs=[key_tile, key_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="pallas_attention_dkv",
    )(window, tables.dkv, *tokens, q, k, v, d_out, lse, delta)

    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    specs = _token_specs(tables.dq, length)
    query_tile = pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0))
    kv_whole = pl.BlockSpec((None, length, None, dim), lambda i, b, h: (b, 0, h // groups, 0))
    query_stats = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, logits=logits, block_q=bq, block_k=bk),
        grid=(length // bq, rows, heads),
        in_specs=[*specs, query_tile, kv_whole, kv_whole, query_tile, query_stats, query_stats],
        out_specs=query_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="pallas_attention_dq",
    )(window, tables.dq, *tokens, q, k, v, d_out, lse, delta)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_forward, _attention_backward)


# Right-padded rows run as one segment per row (padding its own, so its blocks are skipped).
PALLAS = Implementation(
    "pallas",
    dict.fromkeys(MASK_KINDS, pallas_packed),
    backends=("gpu",),
    max_head_dim=256,
    padded_rows_as_segments=True,
)
