"""The Mistral family's adapter: Llama's math and names; `sliding_window` (when not null) on
every layer, by token position (transformers' `MistralConfig`, whose default window is 4096)."""

from __future__ import annotations

from typing import Any

from jaxrm.models import hf_adapter as hf_
from jaxrm.models.decoder import DecoderConfig

DEFAULTS = {**hf_.COMMON_DEFAULTS, "max_position_embeddings": 4096 * 32, "sliding_window": 4096}


def mistral_config_from_hf(hf: dict[str, Any], **execution: Any) -> DecoderConfig:
    keys = hf_.Keys(hf, DEFAULTS)
    window = keys.optional("sliding_window")
    layers = keys("num_hidden_layers")
    windows = (window,) * layers if window is not None else None
    return hf_.decoder_config(keys, execution, layer_windows=windows, family="mistral")


MISTRAL = hf_.decoder_family(
    "mistral", ("mistral",), mistral_config_from_hf, "MistralForSequenceClassification"
)
