"""The Qwen families' adapters. Qwen2/2.5: q/k/v bias, no o bias. Qwen3 (dense): `attention_bias`
on all four projections, q/k RMSNorm per head before rope, explicit head_dim (default 128). Both:
sliding windows only with `use_sliding_window`, on layers from `max_window_layers` on (or as
`layer_types` says); small sizes tie their embeddings (no lm_head on disk)."""

from __future__ import annotations

from typing import Any

from jaxrm.models import hf_adapter as hf_
from jaxrm.models.decoder import DecoderConfig

QWEN2_DEFAULTS = {
    **hf_.COMMON_DEFAULTS,
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
}
QWEN3_DEFAULTS = {**QWEN2_DEFAULTS, "head_dim": 128}


def qwen_windows(keys: hf_.Keys) -> tuple[int | None, ...] | None:
    """transformers' rule: no window unless `use_sliding_window`; then `layer_types`, by default
    sliding from layer `max_window_layers` on."""
    if not keys("use_sliding_window"):
        return None
    layers = keys("num_hidden_layers")
    types = keys.hf.get("layer_types") or [
        hf_.SLIDING if i >= keys("max_window_layers") else hf_.FULL for i in range(layers)
    ]
    return hf_.windows(types, keys("sliding_window"))


def qwen2_config_from_hf(hf: dict[str, Any], **execution: Any) -> DecoderConfig:
    keys = hf_.Keys(hf, QWEN2_DEFAULTS)
    return hf_.decoder_config(
        keys, execution, layer_windows=qwen_windows(keys), qkv_bias=True, family="qwen2"
    )


def qwen3_config_from_hf(hf: dict[str, Any], **execution: Any) -> DecoderConfig:
    keys = hf_.Keys(hf, QWEN3_DEFAULTS)
    return hf_.decoder_config(
        keys,
        execution,
        layer_windows=qwen_windows(keys),
        qk_norm="head",
        family="qwen3",
        **hf_.attention_biases(keys),
    )


QWEN2 = hf_.decoder_family(
    "qwen2", ("qwen2",), qwen2_config_from_hf, "Qwen2ForSequenceClassification"
)
QWEN3 = hf_.decoder_family(
    "qwen3", ("qwen3",), qwen3_config_from_hf, "Qwen3ForSequenceClassification"
)
