"""The Llama family's adapter (Llama 2, 3, 3.1, 3.2): config.json -> `DecoderConfig`
(transformers' `LlamaConfig`: GQA, explicit `head_dim`, rope default/linear/dynamic/llama3/yarn,
`attention_bias` on q/k/v/o, `mlp_bias`)."""

from __future__ import annotations

from typing import Any

from jaxrm.models import hf_adapter as hf_
from jaxrm.models.decoder import DecoderConfig

DEFAULTS = {**hf_.COMMON_DEFAULTS, "max_position_embeddings": 2048}


def llama_config_from_hf(hf: dict[str, Any], **execution: Any) -> DecoderConfig:
    keys = hf_.Keys(hf, DEFAULTS)
    return hf_.decoder_config(
        keys,
        execution,
        mlp_bias=bool(keys("mlp_bias")),
        family="llama",
        **hf_.attention_biases(keys),
    )


LLAMA = hf_.decoder_family(
    "llama", ("llama",), llama_config_from_hf, "LlamaForSequenceClassification"
)
