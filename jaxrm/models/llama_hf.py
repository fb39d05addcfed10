"""The Llama family's HF adapter: config.json -> `LlamaConfig`, and the HF name of every parameter
(Levanter-style: a family owns its HF conversion; jaxrm/hf.py holds the generic machinery)."""

from __future__ import annotations

from typing import Any

from jaxrm.errors import UserError
from jaxrm.models.family import Family, TensorMap
from jaxrm.models.llama import LlamaConfig, LlamaModel


def llama_config_from_hf(hf: dict[str, Any], **execution: Any) -> LlamaConfig:
    """LlamaConfig from config.json (transformers 4 `rope_scaling` or 5 `rope_parameters`)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json: unsupported hidden_act {hf.get('hidden_act')!r} (silu only)")
    try:
        heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        return LlamaConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope or None,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **execution,
        )
    except KeyError as e:
        raise UserError(f"config.json: missing key {e.args[0]!r}") from None


ATTENTION_KERNELS = {"q": "heads_in", "k": "heads_in", "v": "heads_in", "o": "heads_out"}
ATTENTION_BIASES = {"q": "heads_bias", "k": "heads_bias", "v": "heads_bias", "o": "copy"}
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


def llama_tensor_map(config: LlamaConfig, prefix: str = "model.") -> list[TensorMap]:
    """HF names of `LlamaModel` (under `prefix`) and of the score head."""
    layer = prefix + "layers.{layer}."
    entries = [
        TensorMap(("model", "embed_tokens"), prefix + "embed_tokens.weight", "copy"),
        TensorMap(("model", "norm", "weight"), prefix + "norm.weight", "copy"),
        TensorMap(("score", "kernel"), "score.weight", "linear"),
    ]
    stacked = [
        (("input_layernorm", "weight"), "input_layernorm.weight", "copy"),
        (("post_attention_layernorm", "weight"), "post_attention_layernorm.weight", "copy"),
        *projections("self_attn", ATTENTION_KERNELS, "kernel"),
        *projections("mlp", dict.fromkeys(MLP_PROJECTIONS, "linear"), "kernel"),
    ]
    if config.attention_bias:
        stacked += projections("self_attn", ATTENTION_BIASES, "bias")
    if config.mlp_bias:
        stacked += projections("mlp", dict.fromkeys(MLP_PROJECTIONS, "copy"), "bias")
    entries += [
        TensorMap(("model", "layers", *path), layer + name, layout, stacked=True)
        for path, name, layout in stacked
    ]
    return entries


LLAMA = Family(
    name="llama",
    model_types=("llama",),
    config_from_hf=llama_config_from_hf,
    tensor_map=llama_tensor_map,
    exported_class="LlamaForSequenceClassification",
    backbone=LlamaModel,
)
