"""Rotary position embeddings as transformers computes them (modeling_rope_utils.py): the inverse
frequencies of each `rope_type` jaxrm reads (default, linear, dynamic, llama3, yarn) and the
cos/sin tables in HF's half-split layout, multiplied by the type's attention factor (yarn)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class Rope:
    """One rope setting: `theta`, `rope_type` and its parameters (hashable: items of the HF
    dict). A model whose layers differ (Gemma 3: local vs global) has one per layer type."""

    theta: float = 10000.0
    rope_type: str = "default"
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    @classmethod
    def from_hf(cls, rope: dict[str, Any], theta: float, max_positions: int) -> Rope:
        """From an HF rope dict (`rope_parameters` of transformers 5 or `rope_scaling` of 4);
        `original_max_position_embeddings` defaults to `max_positions`, as transformers does."""
        rope = {k: v for k, v in rope.items() if v is not None}
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        theta = float(rope.pop("rope_theta", theta))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r} (jaxrm reads {ROPE_TYPES})")
        if rope_type == "default":
            return cls(theta)
        if rope_type in ("llama3", "yarn"):
            rope.setdefault("original_max_position_embeddings", max_positions)
        rope.pop("partial_rotary_factor", None)
        return cls(theta, rope_type, tuple(sorted(rope.items())))


def inverse_frequencies(
    rope: Rope, head_dim: int, max_positions: int, seq_len: jax.Array | None = None
) -> tuple[jax.Array, float]:
    """(inv_freq [head_dim/2] float32, attention factor). `seq_len` (a traced scalar: the batch's
    largest position + 1) matters only to `dynamic`, which rescales theta beyond
    `max_positions` as transformers does on a fresh model (its cache of the longest length seen
    is state jaxrm does not keep)."""
    dim = head_dim
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    base = rope.theta
    if rope.rope_type == "default":
        return 1.0 / (base**exponents), 1.0
    factor = rope.get("factor")
    if rope.rope_type == "linear":
        return 1.0 / (base**exponents) / factor, 1.0
    if rope.rope_type == "dynamic":
        length = jnp.asarray(max_positions if seq_len is None else seq_len, jnp.float32)
        length = jnp.maximum(length, max_positions)
        scaled = base * ((factor * length / max_positions) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (scaled**exponents), 1.0
    if rope.rope_type == "llama3":
        return _llama3(rope, 1.0 / (base**exponents)), 1.0
    return _yarn(rope, dim, max_positions)


def _llama3(rope: Rope, inv_freq: jax.Array) -> jax.Array:
    factor = rope.get("factor")
    low_freq_factor = rope.get("low_freq_factor")
    high_freq_factor = rope.get("high_freq_factor")
    old_context = rope.get("original_max_position_embeddings")
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def _yarn(rope: Rope, dim: int, max_positions: int) -> tuple[jax.Array, float]:
    base = rope.theta
    original = rope.get("original_max_position_embeddings")
    factor = rope.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = (
            mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        )
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    extrapolation = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return inv_freq, float(attention_factor)


def cos_sin(
    rope: Rope, head_dim: int, max_positions: int, positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, head_dim] float32 for positions [B, T] (HF's half-split layout)."""
    seq_len = jnp.max(positions) + 1
    inv_freq, attention_factor = inverse_frequencies(rope, head_dim, max_positions, seq_len)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, in_float32: bool = False) -> jax.Array:
    """x: [B, T, heads, head_dim]; cos/sin: [B, T, head_dim]. Like transformers, the tables are
    cast to x's dtype, or (`in_float32`, OLMo 2) x is rotated in float32 and cast back."""
    dtype = jnp.float32 if in_float32 else x.dtype
    y = x.astype(dtype)
    cos = cos[:, :, None, :].astype(dtype)
    sin = sin[:, :, None, :].astype(dtype)
    half = y.shape[-1] // 2
    rotated = jnp.concatenate([-y[..., half:], y[..., :half]], axis=-1)
    return (y * cos + rotated * sin).astype(x.dtype)
