"""The model-family registry (jaxrm/models/families.py): config.json's `model_type` picks the
family whose adapter reads it; the model config names its family, which picks the backbone, the
tensor names and the exported class."""

from __future__ import annotations

import pytest

from jaxrm.assets import TINY_MODEL_DIR
from jaxrm.errors import UserError
from jaxrm.hf import abstract_reward_model, read_hf_config, tensor_map
from jaxrm.models.families import FAMILIES, family_named, family_of, model_config_from_hf
from jaxrm.models.llama import LlamaModel
from jaxrm.models.llama_hf import LLAMA


def test_model_type_picks_the_family():
    hf_config = read_hf_config(TINY_MODEL_DIR)
    assert family_of(hf_config) is LLAMA
    config = model_config_from_hf(hf_config, attention="flash")
    assert config.family == "llama" and config.attention == "flash"
    assert family_named(config.family) is LLAMA


def test_an_unknown_model_type_is_one_line_naming_the_supported():
    with pytest.raises(UserError) as e:
        family_of({"model_type": "qwen3"}, "m/config.json")
    assert str(e.value) == "m/config.json: unsupported model_type 'qwen3' (jaxrm supports llama)"
    with pytest.raises(UserError, match="unsupported model_type None"):
        family_of({})


def test_the_config_picks_backbone_and_tensor_names():
    config = model_config_from_hf(read_hf_config(TINY_MODEL_DIR))
    graphdef, _ = abstract_reward_model(config)
    assert "LlamaModel" in repr(graphdef) and LLAMA.backbone is LlamaModel
    names = [e.hf_name for e in tensor_map(config)]
    assert names[:3] == ["model.embed_tokens.weight", "model.norm.weight", "score.weight"]
    assert "model.layers.{layer}.self_attn.q_proj.weight" in names
    assert [e.hf_name for e in tensor_map(config, "")][0] == "embed_tokens.weight"
    assert LLAMA.exported_class == "LlamaForSequenceClassification"


def test_families_have_distinct_names_and_model_types():
    names = [f.name for f in FAMILIES]
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(set(names)) == len(names) and len(set(types)) == len(types)
