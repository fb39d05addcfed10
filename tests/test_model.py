"""The jaxrm reward model against transformers' PyTorch LlamaForSequenceClassification."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm.hf import load_reward_model
from jaxrm.models.decoder import DecoderConfig
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
    config = DecoderConfig(
        vocab_size=8,
        hidden_size=d,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
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


def test_pytorch_bin_checkpoint_loads_like_safetensors(tmp_path):
    import shutil

    import torch

    reference = save_tiny_classifier(tmp_path / "st", "gqa")
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(reference.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model, _, _ = load_reward_model(str(tmp_path / "bin"), single_device_mesh())
    ids, mask = right_padded_batch(LENGTHS, vocab=96)
    got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    np.testing.assert_allclose(got, torch_rewards(reference, ids, mask), atol=1e-4, rtol=0)


@pytest.mark.parametrize("policy", ["full", "dots", "save_attn_mlp_out"])
def test_remat_policies_give_the_same_gradients(tmp_path, policy):
    save_tiny_classifier(tmp_path, "gqa")
    ids, mask = right_padded_batch(LENGTHS, vocab=96)

    def grads(remat_policy):
        model, _, _ = load_reward_model(
            str(tmp_path), single_device_mesh(), remat_policy=remat_policy
        )
        graphdef, params = nnx.split(model)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, mask) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    plain, rematerialized = grads("none"), grads(policy)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(plain), nnx.to_flat_state(rematerialized), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(b.value), np.asarray(a.value), atol=1e-6, err_msg=path
        )


def test_embedding_grows_for_a_larger_tokenizer(tmp_path):
    """A tokenizer with added tokens (e.g. a pad token): the embedding grows to a multiple of 8,
    new rows are the mean of the old ones, and existing tokens score exactly as before."""
    reference = save_tiny_classifier(tmp_path, "gqa")
    model, hf_config, report = load_reward_model(
        str(tmp_path), single_device_mesh(), min_vocab_size=99
    )
    table = np.asarray(model.model.embed_tokens.value)
    old = reference.model.embed_tokens.weight.detach().numpy()
    assert table.shape == (104, 32) and hf_config["vocab_size"] == 104
    assert report.resized_vocab == (96, 104)
    np.testing.assert_array_equal(table[:96], old)
    np.testing.assert_allclose(table[96:], np.broadcast_to(old.mean(0), (8, 32)), atol=1e-6)
    ids, mask = right_padded_batch(LENGTHS, vocab=96)
    got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    np.testing.assert_allclose(got, torch_rewards(reference, ids, mask), atol=1e-4, rtol=0)
