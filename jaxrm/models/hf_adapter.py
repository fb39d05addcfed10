"""What the family adapters (jaxrm/models/*_hf.py) share: reading config.json's common keys with
the family's transformers defaults, rope settings (flat or per layer type), per-layer windows, and
the HF name of every `Decoder` parameter, derived from the config's switches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jaxrm.errors import UserError
from jaxrm.models.decoder import ACTIVATIONS, PLACEMENTS, Decoder, DecoderConfig
from jaxrm.models.family import Family, TensorMap
from jaxrm.models.rope import Rope

SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' defaults that most families' config classes share
COMMON_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


class Keys:
    """config.json's keys with the family's defaults (what its transformers config class
    assumes when a key is absent or null); a missing required key is one line."""

    def __init__(self, hf: dict[str, Any], defaults: dict[str, Any]):
        self.hf, self.defaults = hf, defaults

    def __call__(self, key: str) -> Any:
        value = self.hf.get(key)
        if value is None:
            value = self.defaults.get(key)
        if value is None and key not in self.defaults:
            raise UserError(f"config.json: missing key {key!r}")
        return value

    def optional(self, key: str) -> Any:
        """A key whose null means off (a window, a soft-cap): the default only when absent."""
        return self.hf[key] if key in self.hf else self.defaults.get(key)


def activation(name: str) -> str:
    if name not in ACTIVATIONS:
        supported = ", ".join(ACTIVATIONS)
        raise UserError(
            f"config.json: unsupported activation {name!r} (jaxrm supports {supported})"
        )
    return name


def rope_of(keys: Keys, rope: dict[str, Any] | None, theta_key: str = "rope_theta") -> Rope:
    """One rope setting from an HF rope dict (v5 `rope_parameters` or v4 `rope_scaling`)."""
    try:
        return Rope.from_hf(dict(rope or {}), keys(theta_key), keys("max_position_embeddings"))
    except (ValueError, KeyError) as e:
        raise UserError(f"config.json: rope: {e}") from None


def flat_rope(keys: Keys) -> Rope:
    """The rope of a model whose layers share one (v5 `rope_parameters` or v4 `rope_scaling`)."""
    return rope_of(keys, keys.hf.get("rope_parameters") or keys.hf.get("rope_scaling"))


def windows(layer_types: Sequence[str], window: int | None) -> tuple[int | None, ...] | None:
    """Per-layer windows: `window` on sliding layers (None when no layer slides)."""
    found = tuple(window if t == SLIDING else None for t in layer_types)
    return found if window is not None and any(w is not None for w in found) else None


def attention_biases(keys: Keys) -> dict[str, bool]:
    """`attention_bias` on all four projections (most families)."""
    bias = bool(keys("attention_bias"))
    return {"qkv_bias": bias, "o_bias": bias}


def decoder_config(keys: Keys, execution: dict[str, Any], **switches: Any) -> DecoderConfig:
    """The shape keys every family shares, plus the family's `switches` (by default one rope
    for all layers and the activation of `hidden_act`)."""
    switches.setdefault("ropes", (flat_rope(keys),))
    switches["activation"] = activation(switches.get("activation") or keys("hidden_act"))
    heads = keys("num_attention_heads")
    return DecoderConfig(
        vocab_size=keys("vocab_size"),
        hidden_size=keys("hidden_size"),
        intermediate_size=keys("intermediate_size"),
        num_hidden_layers=keys("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=keys.hf.get("num_key_value_heads")
        or keys.defaults.get("num_key_value_heads")
        or heads,
        head_dim=keys.hf.get("head_dim")
        or keys.defaults.get("head_dim")
        or (keys("hidden_size") // heads),
        rms_norm_eps=keys("rms_norm_eps"),
        max_position_embeddings=keys("max_position_embeddings"),
        tie_word_embeddings=bool(keys("tie_word_embeddings")),
        **switches,
        **execution,
    )


ATTENTION_KERNELS = {"q": "heads_in", "k": "heads_in", "v": "heads_in", "o": "heads_out"}
QKV_BIASES = {"q": "heads_bias", "k": "heads_bias", "v": "heads_bias"}
MLP_PROJECTIONS = ("gate", "up", "down")


def projections(
    module: str, layouts: dict[str, str], kind: str
) -> list[tuple[tuple[str, str], str, str]]:
    """(path in a layer, HF name in a layer, layout) of `module`'s `{p}_proj` projections'
    `kind` ("kernel", HF's `weight`, or "bias"), one per key of `layouts`, in its order."""
    hf_kind = "weight" if kind == "kernel" else kind
    return [
        ((module, f"{p}_{kind}"), f"{module}.{p}_proj.{hf_kind}", layout)
        for p, layout in layouts.items()
    ]


def decoder_tensor_map(config: DecoderConfig, prefix: str = "model.") -> list[TensorMap]:
    """HF names of a `Decoder` (under `prefix`) and of the score head, from its switches."""
    layer = prefix + "layers.{layer}."
    entries = [
        TensorMap(("model", "embed_tokens"), prefix + "embed_tokens.weight", "copy"),
        TensorMap(("model", "norm", "weight"), prefix + "norm.weight", "copy"),
        TensorMap(("score", "kernel"), "score.weight", "linear"),
    ]
    stacked = [
        ((name, "weight"), f"{name}.weight", "copy")
        for name in PLACEMENTS[config.placement].values()
    ]
    stacked += [
        *projections("self_attn", ATTENTION_KERNELS, "kernel"),
        *projections("mlp", dict.fromkeys(MLP_PROJECTIONS, "linear"), "kernel"),
    ]
    if config.qkv_bias:
        stacked += projections("self_attn", QKV_BIASES, "bias")
    if config.o_bias:
        stacked += projections("self_attn", {"o": "copy"}, "bias")
    if config.qk_norm != "none":
        layout = "copy" if config.qk_norm == "head" else "heads_bias"
        stacked += [
            (("self_attn", f"{p}_norm", "weight"), f"self_attn.{p}_norm.weight", layout)
            for p in ("q", "k")
        ]
    if config.mlp_bias:
        stacked += projections("mlp", dict.fromkeys(MLP_PROJECTIONS, "copy"), "bias")
    entries += [
        TensorMap(("model", "layers", *path), layer + name, layout, stacked=True)
        for path, name, layout in stacked
    ]
    return entries


def decoder_family(
    name: str,
    model_types: tuple[str, ...],
    config_from_hf: Callable[..., DecoderConfig],
    exported_class: str,
    **hooks: Any,
) -> Family:
    """A family whose backbone is the `Decoder` and whose tensor names follow its switches."""
    return Family(
        name=name,
        model_types=model_types,
        config_from_hf=config_from_hf,
        tensor_map=decoder_tensor_map,
        exported_class=exported_class,
        backbone=Decoder,
        **hooks,
    )
