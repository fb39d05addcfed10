"""The Phi-3 family's adapter: Llama's math with fused projections on disk, split at the HF
boundary (`self_attn.qkv_proj.weight` = q|k|v rows, `mlp.gate_up_proj.weight` = gate|up rows),
no biases, `sliding_window` (when set) on every layer, partial rotary (`partial_rotary_factor`).
Rope default only: `longrope` (Phi-3.5, the 128k Phi-3s, Phi-4-mini) is refused in one line."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxrm.models import hf_adapter as hf_
from jaxrm.models.decoder import DecoderConfig
from jaxrm.models.family import TensorMap

DEFAULTS = {
    **hf_.COMMON_DEFAULTS,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "sliding_window": None,
}


def phi3_config_from_hf(hf: dict[str, Any], **execution: Any) -> DecoderConfig:
    keys = hf_.Keys(hf, DEFAULTS)
    rope = dict(keys.hf.get("rope_parameters") or keys.hf.get("rope_scaling") or {})
    if keys.has("partial_rotary_factor"):
        rope.setdefault("partial_rotary_factor", keys("partial_rotary_factor"))
    window = keys.optional("sliding_window")
    layers = keys("num_hidden_layers")
    return hf_.decoder_config(
        keys,
        execution,
        ropes=(hf_.rope_of(keys, rope),),
        layer_windows=(window,) * layers if window is not None else None,
        family="phi3",
    )


# fused HF tensor -> its parts' names in the decoder's map, in row order
FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}  # fmt: skip


def phi3_tensor_map(config: DecoderConfig, prefix: str = "model.") -> list[TensorMap]:
    """The decoder's map with q/k/v and gate/up as row ranges of Phi-3's fused tensors."""
    d = config.head_dim
    rows = {
        "q": config.num_attention_heads * d,
        "k": config.num_key_value_heads * d,
        "v": config.num_key_value_heads * d,
        "gate": config.intermediate_size,
        "up": config.intermediate_size,
    }
    entries = hf_.decoder_tensor_map(config, prefix)
    layer = prefix + "layers.{layer}."
    for fused, parts in FUSED.items():
        start = 0
        for part in parts:
            name = part.split(".")[1].removesuffix("_proj")
            index = next(i for i, e in enumerate(entries) if e.hf_name == layer + part)
            span = (start, start + rows[name])
            entries[index] = dataclasses.replace(entries[index], hf_name=layer + fused, part=span)
            start = span[1]
    return entries


PHI3 = dataclasses.replace(
    hf_.decoder_family("phi3", ("phi3",), phi3_config_from_hf, "Phi3ForSequenceClassification"),
    tensor_map=phi3_tensor_map,
)
