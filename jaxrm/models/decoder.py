"""One decoder-only transformer in Flax NNX for every dense family jaxrm reads, numerically
matching transformers' `*Model` classes. A family is a set of switches on `DecoderConfig` (set by
its adapter, jaxrm/models/*_hf.py), never a branch on its name:

- projections: q/k/v bias (`qkv_bias`) separate from the o bias (`o_bias`), `mlp_bias`;
- q/k RMSNorm (`qk_norm`): none, per head over head_dim (one weight shared by the heads), or over
  the full projection before the head split (weights [heads, head_dim]);
- RMSNorm (`norm`): `llama` (weight times the normed value cast to the compute dtype), `olmo2`
  (the product cast), `gemma` (times (1 + weight), all in float32);
- norm placement (`placement`): `pre` (input and pre-MLP norms), `post` (norms on the attention
  and MLP outputs, inside the residual), `sandwich` (all four);
- `activation` (silu, gelu_pytorch_tanh), `embed_scale` (embeddings times sqrt(hidden) cast to
  the compute dtype), the attention scale (`query_pre_attn_scalar`), attention soft-cap;
- per layer: a sliding window and a rope table (`layer_windows`, `layer_ropes` into `ropes`),
  both scanned inputs of the one layer scan; every distinct rope table is computed once.

Layers are stacked (leading `layers` axis) and run with `jax.lax.scan` so compile time stays flat
in depth, optionally rematerialized. Parameters are `param_dtype` (float32 master weights);
matmuls run in `dtype`. No dropout anywhere: the reward model is deterministic.

Parameter layouts (logical axis names in brackets) differ from HF's only by transposes/reshapes,
done once at import (jaxrm/hf.py, by the names in the family's adapter):
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
    DEFAULT_BLOCK,
    NO_WINDOW,
    Choice,
    Logits,
    Mask,
    attend,
    check_model_attention,
    prepare_mask,
)
from jaxrm.models.remat import REMAT_POLICIES
from jaxrm.models.rope import Rope, apply_rope, cos_sin
from jaxrm.sharding import activation_specs, constrain

Q_NAMES = ("batch", "length", "act_heads", None)
KV_NAMES = ("batch", "length", "act_kv_heads", None)
ROW_NAMES = ("batch", "length")

NORMS = ("llama", "olmo2", "gemma")
QK_NORMS = ("none", "head", "full")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
# placement -> the layer's norms by role (attention input/output, MLP input/output) and HF name
PLACEMENTS: dict[str, dict[str, str]] = {
    "pre": {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"},
    "post": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
    "sandwich": {
        "attn_in": "input_layernorm",
        "attn_out": "post_attention_layernorm",
        "mlp_in": "pre_feedforward_layernorm",
        "mlp_out": "post_feedforward_layernorm",
    },
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture (from HF config.json, by the family's adapter) plus how to run it (dtypes,
    remat, attention kernel)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    ropes: tuple[Rope, ...] = (Rope(),)  # the distinct rope settings
    layer_ropes: tuple[int, ...] | None = None  # per layer, an index into `ropes` (None: all 0)
    layer_windows: tuple[int | None, ...] | None = None  # per layer, sliding window or None
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str = "none"
    norm: str = "llama"
    placement: str = "pre"
    activation: str = "silu"
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None  # attention scale its ** -0.5 (None: head_dim)
    attn_softcap: float | None = None
    rope_in_float32: bool = False
    tie_word_embeddings: bool = False
    family: str = "llama"  # the adapter that made it (jaxrm.models.families)
    # how to run it
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"
    attention: str | Choice = "xla"  # one implementation, or one per mask kind
    attention_block_size: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}")
        check_model_attention(self.attention)
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("qk_norm", self.qk_norm, QK_NORMS),
            ("placement", self.placement, tuple(PLACEMENTS)),
            ("activation", self.activation, tuple(ACTIVATIONS)),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
        for name in ("layer_ropes", "layer_windows"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_hidden_layers:
                raise ValueError(f"{name} needs one entry per layer ({self.num_hidden_layers})")

    def replace(self, **changes: Any) -> DecoderConfig:
        return dataclasses.replace(self, **changes)

    @property
    def logits(self) -> Logits:
        scalar = self.query_pre_attn_scalar or self.head_dim
        return Logits(float(scalar) ** -0.5, self.attn_softcap)

    @property
    def windowed(self) -> bool:
        """Whether any layer slides (then every layer gets a scanned window, NO_WINDOW if not)."""
        return any(w is not None for w in self.layer_windows or ())

    def layer_inputs(self) -> dict[str, jax.Array]:
        """The per-layer scanned inputs: rope table index and window (int32 [layers])."""
        n = self.num_hidden_layers
        inputs = {"rope": jnp.asarray(self.layer_ropes or (0,) * n, jnp.int32)}
        if self.windowed:
            windows = [NO_WINDOW if w is None else w for w in self.layer_windows]
            inputs["window"] = jnp.asarray(windows, jnp.int32)
        return inputs


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    """A parameter annotated with logical axis names. Never eagerly sharded: jaxrm places every
    parameter itself (jaxrm/hf.py), and a model must be buildable without a mesh (eval_shape)."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


_weight_init = nnx.initializers.normal(0.02)
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, kind: str, axes: tuple[int, ...]):
    """RMSNorm over `axes` as the family's transformers class computes it (see the module
    docstring); the result in x's dtype, the weight first cast to it (as HF's weights are)."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + eps)
    w = weight.astype(dtype)
    if kind == "llama":
        return w * x32.astype(dtype)
    if kind == "olmo2":
        return (w.astype(jnp.float32) * x32).astype(dtype)
    return (x32 * (1.0 + w.astype(jnp.float32))).astype(dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the trailing `shape` (hidden, head_dim, or heads x head_dim)."""

    def __init__(self, config: DecoderConfig, shape: tuple[int, ...], names, *, rngs: nnx.Rngs):
        self.eps = config.rms_norm_eps
        self.kind = config.norm
        init = _zeros if config.norm == "gemma" else _ones
        self.weight = _param(rngs, init, shape, names, config.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(-len(self.weight.shape), 0))
        return rms_norm(x, self.weight.value, self.eps, self.kind, axes)


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        pd = c.param_dtype
        self.q_kernel = _param(rngs, _weight_init, (d, n, h), ("embed", "heads", "head_dim"), pd)
        self.k_kernel = _param(rngs, _weight_init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.v_kernel = _param(rngs, _weight_init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.o_kernel = _param(rngs, _weight_init, (n, h, d), ("heads", "head_dim", "embed"), pd)
        if c.qkv_bias:
            self.q_bias = _param(rngs, _zeros, (n, h), ("heads", "head_dim"), pd)
            self.k_bias = _param(rngs, _zeros, (k, h), ("kv_heads", "head_dim"), pd)
            self.v_bias = _param(rngs, _zeros, (k, h), ("kv_heads", "head_dim"), pd)
        if c.o_bias:
            self.o_bias = _param(rngs, _zeros, (d,), ("embed",), pd)
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(c, (h,), ("head_dim",), rngs=rngs)
            self.k_norm = RMSNorm(c, (h,), ("head_dim",), rngs=rngs)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(c, (n, h), ("heads", "head_dim"), rngs=rngs)
            self.k_norm = RMSNorm(c, (k, h), ("kv_heads", "head_dim"), rngs=rngs)

    def _project(self, x: jax.Array, kernel: nnx.Param, bias_name: str) -> jax.Array:
        dtype = self.config.dtype
        y = jnp.einsum("btd,dnh->btnh", x, kernel.value.astype(dtype))
        if self.config.qkv_bias:
            y = y + getattr(self, bias_name).value.astype(dtype)
        return y

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: Mask) -> jax.Array:
        c = self.config
        q = self._project(x, self.q_kernel, "q_bias")
        k = self._project(x, self.k_kernel, "k_bias")
        v = self._project(x, self.v_kernel, "v_bias")
        if c.qk_norm != "none":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin, c.rope_in_float32)
        k = apply_rope(k, cos, sin, c.rope_in_float32)
        q = constrain(q, Q_NAMES)
        k = constrain(k, KV_NAMES)
        v = constrain(v, KV_NAMES)
        block = math.gcd(q.shape[1], c.attention_block_size)
        rows = mask.token_positions(q.shape[:2])  # per device kernels split rows like q
        mesh, specs = activation_specs((Q_NAMES, KV_NAMES, ROW_NAMES), (q, k, rows))
        out = attend(q, k, v, mask, c.attention, c.logits, block=block, mesh=mesh, specs=specs)
        y = jnp.einsum("btnh,nhd->btd", out, self.o_kernel.value.astype(c.dtype))
        if c.o_bias:
            y = y + self.o_bias.value.astype(c.dtype)
        return y


class MLP(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
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
        hidden = constrain(ACTIVATIONS[c.activation](gate) * up, ("batch", "length", "act_mlp"))
        y = hidden @ self.down_kernel.value.astype(c.dtype)
        if c.mlp_bias:
            y = y + self.down_bias.value.astype(c.dtype)
        return y


class DecoderLayer(nnx.Module):
    """Attention and MLP, each in the residual stream, with the norms `placement` names (each
    held under its HF name, e.g. `input_layernorm`)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.placement = config.placement
        for name in PLACEMENTS[config.placement].values():
            norm = RMSNorm(config, (config.hidden_size,), ("norm",), rngs=rngs)
            setattr(self, name, norm)
        self.self_attn = Attention(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def _norm(self, role: str, x: jax.Array) -> jax.Array:
        name = PLACEMENTS[self.placement].get(role)
        return x if name is None else getattr(self, name)(x)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: Mask) -> jax.Array:
        attn_out = self._norm("attn_out", self.self_attn(self._norm("attn_in", x), cos, sin, mask))
        x = x + checkpoint_name(attn_out, "attn_out")
        mlp_out = self._norm("mlp_out", self.mlp(self._norm("mlp_in", x)))
        x = x + checkpoint_name(mlp_out, "mlp_out")
        return constrain(x, ("batch", "length", "act_embed"))


class Decoder(nnx.Module):
    """Embedding -> scanned decoder layers -> final norm; returns hidden states [B, T, D].

    Right-padded rows (no `segment_ids`): positions 0..T-1, causal attention. Packed rows:
    per-token `positions`, `segment_ids` and `branch_ids` (see jaxrm/models/attention/).
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
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
        self.norm = RMSNorm(config, (config.hidden_size,), ("norm",), rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        branch_ids: jax.Array | None = None,
    ) -> jax.Array:
        c = self.config
        x = jnp.take(self.embed_tokens.value, input_ids, axis=0).astype(c.dtype)
        if c.embed_scale:  # sqrt(hidden) in the compute dtype, as HF casts it to its weights'
            x = x * jnp.asarray(c.hidden_size**0.5, c.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        tables = [cos_sin(r, c.head_dim, c.max_position_embeddings, positions) for r in c.ropes]
        cos = jnp.stack([t[0] for t in tables])
        sin = jnp.stack([t[1] for t in tables])
        mask = prepare_mask(Mask(segment_ids, branch_ids, positions), c.attention)
        graphdef, layer_state = nnx.split(self.layers)

        def layer_step(carry: jax.Array, scanned) -> tuple[jax.Array, None]:
            state, inputs = scanned
            layer_mask = mask._replace(window=inputs.get("window"))
            rope = inputs["rope"]
            layer = nnx.merge(graphdef, state)
            return layer(carry, cos[rope], sin[rope], layer_mask), None

        policy = REMAT_POLICIES[c.remat_policy]
        if c.remat_policy != "none":
            layer_step = jax.checkpoint(layer_step, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(layer_step, x, (layer_state, c.layer_inputs()))
        return self.norm(x)
