"""The jaxrm reward model against transformers' PyTorch LlamaForSequenceClassification."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm.hf import load_reward_model
from jaxrm.models.llama import LlamaConfig
from jaxrm.models.reward import RewardModel
from jaxrm.sharding import make_mesh
from tests.hf_reference import (
    TINY_VARIANTS,
    right_padded_batch,
    save_tiny_classifier,
    torch_rewards,
)

LENGTHS = [7, 19, 1, 12, 19, 3]


def single_device_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_float32_rewards_match_transformers(tmp_path, variant):
    reference = save_tiny_classifier(tmp_path, variant)
    model, _, report = load_reward_model(str(tmp_path), single_device_mesh())
    assert report.head == "loaded"
    ids, mask = right_padded_batch(LENGTHS, vocab=96)
    expected = torch_rewards(reference, ids, mask)
    got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_bf16_rewards_close_to_transformers(tmp_path):
    """bf16 compute: within 0.05 absolute of float32 PyTorch (rewards here are O(1))."""
    reference = save_tiny_classifier(tmp_path, "gqa")
    model, _, _ = load_reward_model(str(tmp_path), single_device_mesh(), dtype=jnp.bfloat16)
    ids, mask = right_padded_batch(LENGTHS, vocab=96)
    expected = torch_rewards(reference, ids, mask)
    got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=5e-2, rtol=0)


def test_pair_alone_equals_pair_in_padded_batch(tmp_path):
    save_tiny_classifier(tmp_path, "gqa")
    model, _, _ = load_reward_model(str(tmp_path), single_device_mesh())
    forward = jax.jit(lambda m, i, a: m(i, a))
    ids, mask = right_padded_batch(LENGTHS, vocab=96)
    batched = np.asarray(forward(model, ids, mask))
    for row, n in enumerate(LENGTHS):
        alone = np.asarray(forward(model, ids[row : row + 1, :n], mask[row : row + 1, :n]))
        np.testing.assert_allclose(alone[0], batched[row], atol=1e-5, rtol=0)
    # Garbage in the padding (e.g. pad == eos ids) changes nothing.
    noisy = np.where(mask > 0, ids, 5)
    np.testing.assert_allclose(np.asarray(forward(model, noisy, mask)), batched, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 4, 2), (2, 2, 2)])
def test_sharded_forward_equals_single_device(tmp_path, mesh_shape):
    reference = save_tiny_classifier(tmp_path, "mha")
    ids, mask = right_padded_batch(LENGTHS + [5, 9], vocab=96)
    mesh = make_mesh(*mesh_shape)
    model, _, _ = load_reward_model(str(tmp_path), mesh)
    kernel = nnx.state(model)["model"]["layers"]["mlp"]["gate_kernel"].value
    assert len(kernel.sharding.device_set) == 8
    assert kernel.addressable_shards[0].data.size < kernel.size  # really sharded
    from jaxrm.sharding import activation_sharding, batch_sharding

    with activation_sharding(mesh):
        forward = jax.jit(lambda m, i, a: m(i, a))
        got = forward(
            model,
            jax.device_put(ids, batch_sharding(mesh, 2)),
            jax.device_put(mask, batch_sharding(mesh, 2)),
        )
    np.testing.assert_allclose(
        np.asarray(got), torch_rewards(reference, ids, mask), atol=1e-4, rtol=0
    )


def test_score_head_init_statistics():
    d = 4096
    config = LlamaConfig(
        vocab_size=8, hidden_size=d, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=8,
    )
    model = RewardModel(config, rngs=nnx.Rngs(3))
    kernel = np.asarray(model.score.kernel.value)
    assert kernel.shape == (d, 1) and kernel.dtype == np.float32
    assert model.score.bias is None
    assert abs(kernel.std() / (1 / np.sqrt(d + 1)) - 1) < 0.05
    assert abs(kernel.mean()) < 3 / np.sqrt(d + 1) / np.sqrt(d)


def test_fresh_head_from_causal_lm(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from tests.hf_reference import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config("gqa")).save_pretrained(tmp_path)
    model, _, report = load_reward_model(str(tmp_path), single_device_mesh(), seed=1)
    assert report.head == "initialized"
    assert "lm_head.weight" in report.ignored
    kernel = np.asarray(model.score.kernel.value)
    assert kernel.shape == (32, 1) and 0 < kernel.std() < 0.5
    again, _, _ = load_reward_model(str(tmp_path), single_device_mesh(), seed=1)
    np.testing.assert_array_equal(kernel, np.asarray(again.score.kernel.value))
