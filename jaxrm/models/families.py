"""The model families jaxrm reads, found by config.json's `model_type` (or a model config's
`family`): the one door from the rest of jaxrm to family-specific code."""

from __future__ import annotations

from typing import Any

from jaxrm.errors import UserError
from jaxrm.models.family import Family, ModelConfig
from jaxrm.models.gemma_hf import GEMMA2, GEMMA3
from jaxrm.models.llama_hf import LLAMA
from jaxrm.models.mistral_hf import MISTRAL
from jaxrm.models.olmo2_hf import OLMO2
from jaxrm.models.phi3_hf import PHI3
from jaxrm.models.qwen_hf import QWEN2, QWEN3

# Dense decoders only: mixture-of-experts families (qwen3_moe, olmoe, mixtral) are not read.
FAMILIES: tuple[Family, ...] = (LLAMA, QWEN2, QWEN3, MISTRAL, OLMO2, GEMMA2, GEMMA3, PHI3)


def supported_model_types() -> list[str]:
    return [t for family in FAMILIES for t in family.model_types]


def family_of(hf_config: dict[str, Any], where: str = "config.json") -> Family:
    """The family of a config.json; an unknown `model_type` is one line naming the supported."""
    model_type = hf_config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UserError(
        f"{where}: unsupported model_type {model_type!r} (jaxrm supports "
        f"{', '.join(supported_model_types())})"
    )


def family_named(name: str) -> Family:
    """The family that made a model config (`config.family`)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"no model family {name!r}")


def flat_config(hf_config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The config.json a family's model reads (a multimodal checkpoint's text model, flat)."""
    return family_of(hf_config, where).flat_config(hf_config)


def model_config_from_hf(hf_config: dict[str, Any], **execution: Any) -> ModelConfig:
    """The model config of a config.json, by its family's adapter; values the decoder cannot take
    (a `layer_types` list of another length than the layers) are one line."""
    family = family_of(hf_config)
    try:
        return family.config_from_hf(family.flat_config(hf_config), **execution)
    except ValueError as e:
        raise UserError(f"config.json: {e}") from None
