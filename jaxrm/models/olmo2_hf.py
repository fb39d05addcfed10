"""The OLMo 2 family's adapter: no input norm, norms on the attention and MLP outputs inside the
residual (`post`), q/k RMSNorm over the whole projection before the head split, RMSNorm casting
after the weight multiply, rope applied in float32 (transformers' `Olmo2*`)."""

from __future__ import annotations

from typing import Any

from jaxrm.models import hf_adapter as hf_
from jaxrm.models.decoder import DecoderConfig

DEFAULTS = {**hf_.COMMON_DEFAULTS, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048}


def olmo2_config_from_hf(hf: dict[str, Any], **execution: Any) -> DecoderConfig:
    keys = hf_.Keys(hf, DEFAULTS)
    return hf_.decoder_config(
        keys,
        execution,
        qk_norm="full",
        norm="olmo2",
        placement="post",
        rope_in_float32=True,
        family="olmo2",
        **hf_.attention_biases(keys),
    )


OLMO2 = hf_.decoder_family(
    "olmo2", ("olmo2",), olmo2_config_from_hf, "Olmo2ForSequenceClassification"
)
