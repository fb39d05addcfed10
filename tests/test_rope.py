"""Rotary tables against transformers' own rope functions (modeling_rope_utils.py), for each rope
type jaxrm reads, including the parameters hub configs set (yarn's mscale and attention factor,
dynamic beyond max_position_embeddings)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrm.models.rope import Rope, inverse_frequencies

HEAD_DIM, MAX_POSITIONS = 16, 64
ROPES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    "llama3": dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    ),
    "yarn": dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16
    ),
    "yarn_mscale": dict(
        rope_type="yarn",
        rope_theta=1e6,
        factor=8.0,
        original_max_position_embeddings=32,
        mscale=0.707,
        mscale_all_dim=1.0,
        beta_fast=16,
        beta_slow=2,
    ),
    "yarn_attention_factor": dict(
        rope_type="yarn", rope_theta=5e5, factor=8.0, attention_factor=1.2079, truncate=False
    ),
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
}


def transformers_rope(rope: dict, seq_len: int | None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=dict(rope),
    )
    if rope["rope_type"] == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        inv, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv, factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None, seq_len=seq_len)
    return inv.numpy(), factor


@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("seq_len", [None, 3 * MAX_POSITIONS])
def test_inverse_frequencies_equal_transformers(name, seq_len):
    rope = Rope.from_hf(ROPES[name], 10000.0, MAX_POSITIONS)
    got, got_factor = inverse_frequencies(rope, HEAD_DIM, MAX_POSITIONS, seq_len)
    want, want_factor = transformers_rope(ROPES[name], seq_len)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    assert got_factor == pytest.approx(want_factor, rel=1e-6)
    if name == "dynamic" and seq_len:  # beyond max_position_embeddings it really rescales
        default, _ = inverse_frequencies(Rope(10000.0), HEAD_DIM, MAX_POSITIONS)
        assert np.abs(np.asarray(got) - np.asarray(default)).max() > 1e-3


def test_an_unknown_rope_type_is_refused():
    with pytest.raises(ValueError, match="unsupported rope type 'longrope'"):
        Rope.from_hf({"rope_type": "longrope"}, 10000.0, MAX_POSITIONS)
