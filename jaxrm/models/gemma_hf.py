"""The Gemma 2 and Gemma 3 (text) adapters: RMSNorm times (1 + weight) in float32, four norms per
layer (`sandwich`), embeddings times sqrt(hidden) in the compute dtype, gelu_pytorch_tanh, the
attention scale from `query_pre_attn_scalar`, sliding and global layers (`layer_types`; Gemma 2
alternating, Gemma 3 five local to one global), tied embeddings. Gemma 2: attention logits
soft-capped. Gemma 3: q/k norms per head, its own rope on each layer type (local and global
bases, scaling on the global layers only); its multimodal checkpoints (`gemma3`) are read for their
text model, exported as `Gemma3TextForSequenceClassification` with a flat `gemma3_text` config."""

from __future__ import annotations

from typing import Any

from jaxrm.errors import UserError
from jaxrm.models.decoder import DecoderConfig
from jaxrm.models.hf_adapter import (
    FULL,
    SLIDING,
    Keys,
    attention_biases,
    decoder_config,
    decoder_family,
    rope_of,
    windows,
)

GEMMA2_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 8192,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh",
    "head_dim": 256,
    "num_key_value_heads": 4,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
}
GEMMA3_DEFAULTS = {  # transformers' Gemma3TextConfig: hub multimodal text_configs omit many
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}
GEMMA3_PATTERN = 6  # one global layer in six


def gemma_switches(keys: Keys, layer_types: list[str]) -> dict[str, Any]:
    if keys.hf.get("use_bidirectional_attention"):
        raise UserError("config.json: use_bidirectional_attention is not a causal reward model")
    return dict(
        layer_windows=windows(layer_types, keys.optional("sliding_window")),
        norm="gemma",
        placement="sandwich",
        embed_scale=True,
        query_pre_attn_scalar=keys("query_pre_attn_scalar"),
        activation=keys("hidden_activation"),
        **attention_biases(keys),
    )


def gemma2_config_from_hf(hf: dict[str, Any], **execution: Any) -> DecoderConfig:
    keys = Keys(hf, GEMMA2_DEFAULTS)
    layers = keys("num_hidden_layers")
    types = hf.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(layers)]
    return decoder_config(
        keys,
        execution,
        attn_softcap=keys.optional("attn_logit_softcapping"),
        family="gemma2",
        **gemma_switches(keys, types),
    )


def gemma3_text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """A multimodal `gemma3` config.json's text model as a flat `gemma3_text` config."""
    if hf.get("model_type") != "gemma3":
        return dict(hf)
    text = dict(hf.get("text_config") or {})
    for key in ("pad_token_id", "eos_token_id", "bos_token_id", "dtype", "torch_dtype"):
        if key in hf and key not in text:
            text[key] = hf[key]
    text["model_type"] = "gemma3_text"
    return text


def gemma3_ropes(keys: Keys, types: list[str]) -> tuple[tuple, tuple[int, ...]]:
    """(ropes, per-layer index): the global rope (v4: `rope_theta` and `rope_scaling`) and the
    local one (v4: `rope_local_base_freq`, never scaled), or v5's `rope_parameters` per type."""
    nested = keys.hf.get("rope_parameters") or {}
    if FULL in nested or SLIDING in nested:
        full = rope_of(keys, nested.get(FULL))
        sliding = rope_of(keys, nested.get(SLIDING), "rope_local_base_freq")
    else:
        full = rope_of(keys, keys.hf.get("rope_scaling"))
        sliding = rope_of(keys, None, "rope_local_base_freq")
    return (full, sliding), tuple(int(t == SLIDING) for t in types)


def gemma3_config_from_hf(hf: dict[str, Any], **execution: Any) -> DecoderConfig:
    keys = Keys(gemma3_text_config(hf), GEMMA3_DEFAULTS)
    layers = keys("num_hidden_layers")
    pattern = keys.hf.get("sliding_window_pattern") or keys.hf.get("_sliding_window_pattern")
    pattern = pattern or GEMMA3_PATTERN
    types = keys.hf.get("layer_types") or [
        SLIDING if (i + 1) % pattern else FULL for i in range(layers)
    ]
    ropes, layer_ropes = gemma3_ropes(keys, types)
    return decoder_config(
        keys,
        execution,
        ropes=ropes,
        layer_ropes=layer_ropes,
        qk_norm="head",
        family="gemma3",
        **gemma_switches(keys, types),
    )


GEMMA2 = decoder_family(
    "gemma2", ("gemma2",), gemma2_config_from_hf, "Gemma2ForSequenceClassification"
)
GEMMA3 = decoder_family(
    "gemma3",
    ("gemma3_text", "gemma3"),
    gemma3_config_from_hf,
    "Gemma3TextForSequenceClassification",
    flat_config=gemma3_text_config,
)
