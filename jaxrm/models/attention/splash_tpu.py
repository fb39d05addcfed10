"""`splash`: the TPU's splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), a
Pallas/Mosaic kernel that skips the blocks its block map marks empty, forward and backward.

Per row (vmapped over the batch), heads as the kernel's leading axis, one mask shared by all
heads:
- `causal` (right-padded rows): the static causal mask;
- `segments` (packed, no prefix sharing): the static causal mask and `SegmentIds` (applied inside
  the blocks it visits: every causal block is computed);
- `tree` (packed with prefix sharing): a dynamic mask, the row's [T, T] allowed pairs, whose block
  map skips the blocks the tree leaves empty (the chosen x rejected rectangles, other groups).
  `prepare` builds the kernels (their block maps, about 3 x T^2 bytes per row) once per forward
  pass, before the layer scan.
Padding queries read themselves (segment 0 to segment 0) and get output 0. The soft-cap is the
kernel's own `attn_logits_soft_cap`; the scale multiplies q before it. A sliding window cannot be
expressed: the kernel's local mask is static and counts row offsets, while windows here are
per-layer (traced) and count positions. head_dim must be a multiple of 128 (the TPU's lanes).
Rows are padded to a multiple of 128 tokens. Off a TPU it runs in Pallas' interpret mode (the
tests); under a mesh it runs per device on its rows and heads (`shard_map`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxrm.models.attention.mask import Logits, Mask, dense_mask, zero_padding
from jaxrm.models.attention.table import MASK_KINDS, Implementation

LANES = 128  # rows are padded to a multiple of this; head_dim must be one
MAX_BLOCK = 512


def _splash():
    from jax.experimental.pallas.ops.tpu import splash_attention

    return splash_attention


def _block_sizes(length: int):
    b = math.gcd(length, MAX_BLOCK)
    return _splash().BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )


def _make_kernel(mask, length: int, softcap: float | None):
    """A splash kernel for one row of `length` tokens under `mask` (a static splash mask, or a
    [1, T, T] bool array). A dynamic kernel's `is_dynamic_mask` flag is dropped: as an array it
    is traced under jit and vmap, and the kernel only reads it to name its scope."""
    splash = _splash()
    kernel = splash.make_splash_mha(
        mask,
        block_sizes=_block_sizes(length),
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=softcap,
        interpret=jax.default_backend() != "tpu",
    )
    if not isinstance(mask, jax.Array):
        return kernel

    def static_flag(info):
        if info is None or "is_dynamic_mask" not in info._fields:
            return info
        return info._replace(is_dynamic_mask=None)

    return type(kernel)(
        static_flag(kernel.fwd_mask_info),
        static_flag(kernel.dq_mask_info),
        static_flag(kernel.dkv_mask_info),
        **kernel.kwargs,
    )


def _pad(x: jax.Array, length: int, axis: int = 1) -> jax.Array:
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def _padded_length(length: int) -> int:
    return -(-length // LANES) * LANES


def _with_softcap(kernel, softcap: float | None):
    """`kernel` (block maps kept) with the logits' soft-cap, a static argument of the call."""
    kwargs = {**kernel.kwargs, "attn_logits_soft_cap": softcap}
    return type(kernel)(kernel.fwd_mask_info, kernel.dq_mask_info, kernel.dkv_mask_info, **kwargs)


def prepare(mask: Mask) -> Mask:
    """For a tree: the rows' dynamic kernels (their block maps, batch-major), built once."""
    if mask.kind != "tree":
        return mask
    length = _padded_length(mask.segment_ids.shape[1])
    padded = mask._replace(
        segment_ids=_pad(mask.segment_ids, length), branch_ids=_pad(mask.branch_ids, length)
    )
    allowed = dense_mask(padded, padded.segment_ids.shape)
    kernels = jax.vmap(lambda row: _make_kernel(row[None], length, None))(allowed)
    return mask._replace(prepared=kernels)


def _row_attention(q, k, v, segment_ids, prepared, kind: str, logits: Logits) -> jax.Array:
    """Rows [B, T, H, D] (T a multiple of 128) -> [B, T, H, D] by splash, one row at a time."""
    length = q.shape[1]
    qh = (q.astype(jnp.float32) * logits.scale).astype(q.dtype).transpose(0, 2, 1, 3)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    splash = _splash()
    if kind == "tree":

        def row(kernel, q, k, v):
            return _with_softcap(kernel, logits.softcap)(q, k, v)

        out = jax.vmap(row)(prepared, qh, kh, vh)
    else:
        causal = splash.MultiHeadMask([splash.CausalMask((length, length))])
        kernel = _make_kernel(causal, length, logits.softcap)
        if kind == "segments":
            ids = jax.vmap(splash.SegmentIds)(segment_ids, segment_ids)
            out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(qh, kh, vh, ids)
        else:
            out = jax.vmap(kernel)(qh, kh, vh)
    return out.transpose(0, 2, 1, 3)


def splash_kernel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    logits: Logits,
    block: int,
    mesh: jax.sharding.Mesh | None,
    specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None,
) -> jax.Array:
    """The table's entry for every mask kind (see the module docstring)."""
    del block
    if mask.window is not None:
        raise ValueError("splash attention cannot slide a window by position")
    kind, length = mask.kind, q.shape[1]
    padded = _padded_length(length)
    q, k, v = (_pad(x, padded) for x in (q, k, v))
    segment_ids = None if mask.segment_ids is None else _pad(mask.segment_ids, padded)
    prepared = None
    if kind == "tree":
        prepared = mask.prepared if mask.prepared is not None else prepare(mask).prepared

    def attention(q, k, v, segment_ids, prepared):
        return _row_attention(q, k, v, segment_ids, prepared, kind, logits)

    if mesh is not None and specs is not None and kind != "causal":
        q_spec, kv_spec, row_spec = specs
        per_row = PartitionSpec(row_spec[0]) if len(row_spec) else PartitionSpec()
        attention = jax.shard_map(
            attention,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, row_spec, per_row),
            out_specs=q_spec,
            check_vma=False,
        )
    out = attention(q, k, v, segment_ids, prepared)[:, :length]
    return zero_padding(out, mask)


SPLASH = Implementation(
    "splash",
    kernels=dict.fromkeys(MASK_KINDS, splash_kernel),
    window=False,
    backends=("tpu",),
    head_dim_multiple=LANES,
    prepare=prepare,
    padded_rows_as_segments=True,
)
