"""Llama backbone in Flax NNX, numerically matching transformers' `LlamaModel`.

Covers the `LlamaConfig` fields that Llama 2, 3, 3.1 and 3.2 checkpoints use: GQA, explicit
`head_dim`, `rope_theta` with `llama3`/`linear` rope scaling, `rms_norm_eps`, `attention_bias`,
`mlp_bias`. Layers are stacked (leading `layers` axis) and run with `jax.lax.scan` so compile time
stays flat in depth, optionally rematerialized. Parameters are `param_dtype` (float32 master
weights); matmuls run in `dtype`. No dropout anywhere: the reward model is deterministic.

Parameter layouts (logical axis names in brackets) differ from HF's only by transposes/reshapes,
done once at import (jaxrm/hf.py, by the names in jaxrm/models/llama_hf.py):
  embed_tokens.embedding [vocab, embed]        q_proj.kernel [embed, heads, head_dim]
  k_proj/v_proj.kernel   [embed, kv_heads, head_dim]   o_proj.kernel [heads, head_dim, embed]
  gate/up_proj.kernel    [embed, mlp]          down_proj.kernel [mlp, embed]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxrm.models.attention import (
    ATTENTION_IMPLEMENTATIONS,
    DEFAULT_BLOCK,
    Logits,
    Mask,
    attend,
    prepare_mask,
)
from jaxrm.models.remat import REMAT_POLICIES
from jaxrm.sharding import activation_specs, constrain

Q_NAMES = ("batch", "length", "act_heads", None)
KV_NAMES = ("batch", "length", "act_kv_heads", None)
ROW_NAMES = ("batch", "length")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture (from HF config.json) plus how to run it (dtypes, remat, attention kernel)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    family: str = "llama"  # the adapter that made it (jaxrm.models.families)
    # how to run it
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"
    attention: str = "xla"
    attention_block_size: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}")

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


def rope_inverse_frequencies(config: LlamaConfig) -> jax.Array:
    """Inverse frequencies as transformers computes them, incl. `linear` and `llama3` scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}")


def rope_cos_sin(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, head_dim] for positions [B, T], float32 (HF's half-split layout)."""
    inv_freq = rope_inverse_frequencies(config)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, head_dim]; cos/sin: [B, T, head_dim]."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    """A parameter annotated with logical axis names. Never eagerly sharded: jaxrm places every
    parameter itself (jaxrm/hf.py), and a model must be buildable without a mesh (eval_shape)."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


_weight_init = nnx.initializers.normal(0.02)
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


class RMSNorm(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.eps = config.rms_norm_eps
        self.dtype = config.dtype
        self.weight = _param(rngs, _ones, (config.hidden_size,), ("norm",), config.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight.value.astype(self.dtype) * x32.astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        pd = c.param_dtype
        self.q_kernel = _param(rngs, _weight_init, (d, n, h), ("embed", "heads", "head_dim"), pd)
        self.k_kernel = _param(rngs, _weight_init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.v_kernel = _param(rngs, _weight_init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.o_kernel = _param(rngs, _weight_init, (n, h, d), ("heads", "head_dim", "embed"), pd)
        if c.attention_bias:
            self.q_bias = _param(rngs, _zeros, (n, h), ("heads", "head_dim"), pd)
            self.k_bias = _param(rngs, _zeros, (k, h), ("kv_heads", "head_dim"), pd)
            self.v_bias = _param(rngs, _zeros, (k, h), ("kv_heads", "head_dim"), pd)
            self.o_bias = _param(rngs, _zeros, (d,), ("embed",), pd)

    def _project(self, x: jax.Array, kernel: nnx.Param, bias_name: str) -> jax.Array:
        dtype = self.config.dtype
        y = jnp.einsum("btd,dnh->btnh", x, kernel.value.astype(dtype))
        if self.config.attention_bias:
            y = y + getattr(self, bias_name).value.astype(dtype)
        return y

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: Mask
    ) -> jax.Array:
        c = self.config
        q = apply_rope(self._project(x, self.q_kernel, "q_bias"), cos, sin)
        k = apply_rope(self._project(x, self.k_kernel, "k_bias"), cos, sin)
        v = self._project(x, self.v_kernel, "v_bias")
        q = constrain(q, Q_NAMES)
        k = constrain(k, KV_NAMES)
        v = constrain(v, KV_NAMES)
        block = math.gcd(q.shape[1], c.attention_block_size)
        mesh, specs = None, None
        if mask.kind != "causal":
            rows = mask.segment_ids
            mesh, specs = activation_specs((Q_NAMES, KV_NAMES, ROW_NAMES), (q, k, rows))
        logits = Logits(c.head_dim**-0.5)
        out = attend(q, k, v, mask, c.attention, logits, block=block, mesh=mesh, specs=specs)
        y = jnp.einsum("btnh,nhd->btd", out, self.o_kernel.value.astype(c.dtype))
        if c.attention_bias:
            y = y + self.o_bias.value.astype(c.dtype)
        return y


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, f, pd = c.hidden_size, c.intermediate_size, c.param_dtype
        self.gate_kernel = _param(rngs, _weight_init, (d, f), ("embed", "mlp"), pd)
        self.up_kernel = _param(rngs, _weight_init, (d, f), ("embed", "mlp"), pd)
        self.down_kernel = _param(rngs, _weight_init, (f, d), ("mlp", "embed"), pd)
        if c.mlp_bias:
            self.gate_bias = _param(rngs, _zeros, (f,), ("mlp",), pd)
            self.up_bias = _param(rngs, _zeros, (f,), ("mlp",), pd)
            self.down_bias = _param(rngs, _zeros, (d,), ("embed",), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = x @ self.gate_kernel.value.astype(c.dtype)
        up = x @ self.up_kernel.value.astype(c.dtype)
        if c.mlp_bias:
            gate = gate + self.gate_bias.value.astype(c.dtype)
            up = up + self.up_bias.value.astype(c.dtype)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        y = hidden @ self.down_kernel.value.astype(c.dtype)
        if c.mlp_bias:
            y = y + self.down_bias.value.astype(c.dtype)
        return y


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config, rngs=rngs)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: Mask
    ) -> jax.Array:
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, mask)
        x = x + checkpoint_name(attn_out, "attn_out")
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        x = x + checkpoint_name(mlp_out, "mlp_out")
        return constrain(x, ("batch", "length", "act_embed"))


class LlamaModel(nnx.Module):
    """Embedding -> scanned decoder layers -> final norm; returns hidden states [B, T, D].

    Right-padded rows (no `segment_ids`): positions 0..T-1, causal attention. Packed rows:
    per-token `positions`, `segment_ids` and `branch_ids` (see jaxrm/models/attention/).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = _param(
            rngs,
            _weight_init,
            (config.vocab_size, config.hidden_size),
            ("vocab", "embed"),
            config.param_dtype,
        )

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, rngs=rngs)

        self.layers = create_layers(rngs)
        self.norm = RMSNorm(config, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        branch_ids: jax.Array | None = None,
    ) -> jax.Array:
        c = self.config
        x = jnp.take(self.embed_tokens.value, input_ids, axis=0).astype(c.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        cos, sin = rope_cos_sin(c, positions)
        mask = prepare_mask(Mask(segment_ids, branch_ids, positions), c.attention)
        graphdef, layer_state = nnx.split(self.layers)

        def layer_step(carry: jax.Array, state) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, state)(carry, cos, sin, mask), None

        policy = REMAT_POLICIES[c.remat_policy]
        if c.remat_policy != "none":
            layer_step = jax.checkpoint(layer_step, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(layer_step, x, layer_state)
        return self.norm(x)
