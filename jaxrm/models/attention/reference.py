"""Attention by its definition, with every score in a T x T float32 matrix: the tests' reference
for every implementation, and `xla` where XLA's fused attention cannot express the mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrm.models.attention.mask import Logits, Mask, allowed_pairs, cap


def reference_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, logits: Logits
) -> jax.Array:
    """q [B, T, H, Dh], k/v [B, T, K, Dh] -> [B, T, H, Dh]; a query with no key reads zeros."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = cap(scores, logits)
    allowed = allowed_pairs(mask, (b, t))[:, None, None]
    scores = jnp.where(allowed, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.where(allowed, jnp.exp(scores - top), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)
