"""`cudnn`: cuDNN's flash attention through the public `jax.nn.dot_product_attention(...,
implementation="cudnn")`, for every mask kind.

Right-padded rows are plain causal attention (`is_causal`). Packed rows, with or without prefix
sharing, give cuDNN the mask as a dense [B, 1, T, T] boolean array (which it turns into an additive
bias; `is_causal` still lets it skip the blocks above the diagonal). `prepare` builds that array
once per forward pass, before the layer scan (`prepare_mask`), with each padding query reading
itself so no row is empty; their output is zeroed after. A sliding window is a per-layer (traced)
value: the layer ANDs the prepared mask with `pos_q - pos_k < window` (one T x T comparison per
layer), so windows follow positions in every layout. cuDNN has no logit soft-cap: a soft-capped
model (Gemma 2) cannot use it. GPU only; on the CPU the same code runs with `implementation=None`
(XLA), which is how the tests check the wrapper and its masks.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from jaxrm.models.attention.mask import (
    Logits,
    Mask,
    dense_mask,
    window_pairs,
    zero_padding,
)
from jaxrm.models.attention.table import MASK_KINDS, Implementation


def prepare(mask: Mask) -> Mask:
    """The packed mask as a dense [B, 1, T, T] array, built once (right-padded rows need none)."""
    if mask.kind == "causal":
        return mask
    shape = mask.segment_ids.shape
    return mask._replace(prepared=dense_mask(mask, shape)[:, None])


def fused_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    logits: Logits,
    implementation: str | None = "cudnn",
) -> jax.Array:
    """`jax.nn.dot_product_attention` under `mask` (see the module docstring); `implementation`
    None runs XLA's, on any backend."""
    if logits.softcap is not None:
        raise ValueError(f"{implementation or 'XLA'} fused attention cannot soft-cap logits")
    dense = None
    if mask.kind != "causal":
        dense = mask.prepared if mask.prepared is not None else prepare(mask).prepared
    if mask.window is not None:
        near = window_pairs(mask, q.shape[:2])[:, None]
        dense = near if dense is None else dense & near
    out = jax.nn.dot_product_attention(
        q, k, v, mask=dense, is_causal=True, scale=logits.scale, implementation=implementation
    )
    return zero_padding(out, mask)


def cudnn_kernel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    logits: Logits,
    block: int,
    mesh: jax.sharding.Mesh | None,
    specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None,
) -> jax.Array:
    """The table's entry: cuDNN for every mask kind (XLA partitions its custom call itself)."""
    del block, mesh, specs
    return fused_attention(q, k, v, mask, logits, "cudnn")


CUDNN = Implementation(
    "cudnn",
    kernels=dict.fromkeys(MASK_KINDS, cudnn_kernel),
    softcap=False,
    backends=("gpu",),
    dtypes=("bfloat16", "float16"),
    # head_dim up to 128 runs on every GPU cuDNN supports (jax allows 256 from Hopper on)
    head_dim_multiple=8,
    max_head_dim=128,
    prepare=prepare,
)
