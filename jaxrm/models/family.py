"""What a model family gives the rest of jaxrm (DESIGN.md decision 12): an adapter from config.json
to a model config, the HF tensor names of its parameters, the class an export declares and the
backbone a `RewardModel` wraps. Code outside `jaxrm/models/` reaches a family only through
`jaxrm.models.families`, so adding one touches `jaxrm/models/` and nothing else."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from flax import nnx


class ModelConfig(Protocol):
    """The fields of a model config that code outside the family reads."""

    family: str  # the `Family.name` whose adapter made it
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    head_dim: int
    attention: Any  # an implementation name, or a `jaxrm.models.attention.Choice` per mask kind

    def replace(self, **changes: Any) -> ModelConfig: ...


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor <-> one jaxrm parameter (a stacked one holds all layers' tensors)."""

    path: tuple[str, ...]  # nnx state path in RewardModel
    hf_name: str  # may contain {layer}
    layout: str  # how jaxrm's layout derives from HF's, see `jaxrm.hf._from_hf_slice`
    stacked: bool = False

    def hf_names(self, num_layers: int) -> list[str]:
        if not self.stacked:
            return [self.hf_name]
        return [self.hf_name.format(layer=i) for i in range(num_layers)]


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: `config_from_hf(config.json dict, **execution)` -> its model config
    (execution: dtype, param_dtype, remat_policy, attention, attention_block_size);
    `tensor_map(config, prefix)` -> where each HF tensor (backbone under `prefix`) lives;
    `exported_class`: the `architectures` entry of an export (a flat config of `model_types[0]`);
    `backbone(config, rngs=...)`: the module that maps token ids to final-norm hidden states;
    `flat_config(config.json dict)`: the config.json its model reads and an export writes (a
    multimodal checkpoint's text model as a flat config; most families: unchanged)."""

    name: str
    model_types: tuple[str, ...]  # config.json `model_type`s it reads
    config_from_hf: Callable[..., ModelConfig]
    tensor_map: Callable[[ModelConfig, str], list[TensorMap]]
    exported_class: str
    backbone: Callable[..., nnx.Module]
    flat_config: Callable[[dict[str, Any]], dict[str, Any]] = dict
