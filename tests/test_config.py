"""Config validation (one table, checked at parse time) and config drift on resume."""

from __future__ import annotations

import math

import jax
import pytest

from jaxrm.config import (
    CHECKS,
    TRAINING_KEYS,
    base_config,
    check_context_length,
    config_drift,
    get_config,
    to_dict,
)
from jaxrm.errors import UserError
from jaxrm.hf import abstract_reward_model, model_architecture
from jaxrm.models.families import model_config_from_hf

TINY = ["--config", "configs/tiny.py"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("logging_steps=0", "'logging_steps' must be >= 1, got 0"),
        ("attention=blocked", "'attention' must be one of"),
        ("export_dtype=bf16", "'export_dtype' must be one of float32, bfloat16, got 'bf16'"),
        ("lr_scheduler_type=lineer", "'lr_scheduler_type' must be one of linear"),
        ("dtype=fp32", "'dtype' must be one of"),
        ("remat_policy=everything", "'remat_policy' must be one of"),
        ("distributed.mode=maybe", "'distributed.mode' must be one of auto, on, off"),
        ("learning_rate=-1e-5", "'learning_rate' must be > 0, got -1e-05"),
        ("max_checkpoints_to_keep=0", "'max_checkpoints_to_keep' must be >= 1, got 0"),
        ("warmup_ratio=1.5", "'warmup_ratio' must be >= 0 and <= 1, got 1.5"),
        ("adam_beta2=1.0", "'adam_beta2' must be >= 0 and < 1, got 1.0"),
        ("mesh.fsdp=0", "'mesh.fsdp' must be >= 1 (or -1), got 0"),
        ("max_consecutive_skipped_steps=0", "'max_consecutive_skipped_steps' must be >= 1"),
        ("model_name_or_path=", "'model_name_or_path' is empty"),
        ("dataset_mixer_list=[]", "'dataset_mixer_list' is empty"),
    ],
)
def test_bad_values_are_refused_at_parse_time(override, message):
    with pytest.raises(UserError, match=None) as error:
        get_config([*TINY, f"--config.{override}"])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_every_check_names_a_real_key_and_the_defaults_pass():
    config = base_config()
    for key in CHECKS:
        node = config
        for part in key.split("."):
            assert part in node, key
            node = node[part]
    for key in TRAINING_KEYS:
        assert key in config, key
    get_config(TINY)  # the shipped defaults are valid
    get_config(["--config", "configs/tulu8b.py"])


@pytest.mark.parametrize(
    "name, family, parameters",
    [
        ("tulu8b", "llama", 7_504_961_536),
        ("qwen3_8b", "qwen3", 7_568_409_600),
        ("olmo2_7b", "olmo2", 6_887_579_648),
        ("gemma2_27b", "gemma2", 27_227_132_928),
        ("llama70b", "llama", 69_503_107_072),
    ],
)
def test_every_recipe_is_valid_and_its_model_is_known_offline(name, family, parameters):
    """Each shipped recipe parses, and its model's architecture comes from jaxrm's copy of the
    hub's config.json (no download) through its family's adapter."""
    cfg = get_config(["--config", f"configs/{name}.py"])
    hf_config, where = model_architecture(cfg.model_name_or_path, cfg.model_revision)
    assert "jaxrm's copy of the hub's config.json" in where
    config = model_config_from_hf(hf_config)
    assert config.family == family
    _, state = abstract_reward_model(config)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(state)) == parameters


def test_drift_names_every_changed_training_key():
    stored = to_dict(get_config(TINY))
    current = to_dict(
        get_config(
            [
                *TINY,
                "--config.learning_rate=1e-4",
                "--config.seed=3",
                "--config.logging_steps=5",  # cadence: may change
                "--config.eval_steps=7",
                "--config.mesh.fsdp=2",  # layout of devices: may change
            ]
        )
    )
    stored["derived.pairs_per_step"], current["derived.pairs_per_step"] = 32, 16
    assert config_drift(stored, current) == [
        ("learning_rate", 0.001, 0.0001),
        ("seed", 8, 3),
        ("derived.pairs_per_step", 32, 16),
    ]
    assert config_drift(stored, stored) == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("learning_rte=1e-5", "unknown config key 'learning_rte'; did you mean 'learning_rate'?"),
        ("mesh.fsdq=2", "unknown config key 'mesh.fsdq'; did you mean 'mesh.fsdp'?"),
        ("mesj.fsdp=2", "unknown config key 'mesj'; did you mean 'mesh'?"),
        ("distributed.proces_id=1", "did you mean 'distributed.process_id'?"),
    ],
)
def test_an_unknown_key_names_the_closest_one(override, message):
    with pytest.raises(UserError) as error:
        get_config([*TINY, f"--config.{override}"])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_unknown_key_in_a_file_names_the_closest_one(tmp_path):
    file = tmp_path / "typo.py"
    file.write_text(
        "from jaxrm.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.warmup_ration = 0.1\n"
        "    c.zqxjkv = 1\n"
        "    return c\n"
    )
    with pytest.raises(UserError, match="'warmup_ration'; did you mean 'warmup_ratio'\\?"):
        get_config(["--config", str(file)])
    file.write_text(file.read_text().replace("    c.warmup_ration = 0.1\n", ""))
    with pytest.raises(UserError) as error:
        get_config(["--config", str(file)])
    assert str(error.value).endswith("unknown config key 'zqxjkv'")  # nothing close


def test_drift_of_the_drop_key_and_checkpoints_that_predate_it():
    stored = to_dict(get_config(TINY))
    assert "drop_pairs_longer_than_pack_length" in TRAINING_KEYS
    dropping = to_dict(get_config([*TINY, "--config.drop_pairs_longer_than_pack_length=true"]))
    assert config_drift(stored, dropping) == [("drop_pairs_longer_than_pack_length", False, True)]
    del stored["drop_pairs_longer_than_pack_length"]  # a checkpoint written before the key
    assert config_drift(stored, to_dict(get_config(TINY))) == []
    assert config_drift(stored, dropping) == [("drop_pairs_longer_than_pack_length", False, True)]


def test_a_context_beyond_the_models_positions_is_refused():
    config = get_config([*TINY, "--config.max_token_length=256"])
    check_context_length(config, {"max_position_embeddings": 256}, "m/config.json")
    check_context_length(config, {}, "m/config.json")  # no limit stated
    with pytest.raises(UserError) as error:
        check_context_length(config, {"max_position_embeddings": 128}, "m/config.json")
    assert str(error.value) == (
        "config key 'max_token_length' is 256, more than the model's max_position_embeddings=128 "
        "(m/config.json); lower max_token_length to at most 128"
    )
