"""RewardModel = a family's backbone + a one-output score head read at each row's last real
token."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrm.models.attention import padded_rows_as_segments
from jaxrm.models.families import family_named
from jaxrm.models.family import ModelConfig


def score_head_stddev(hidden_size: int) -> float:
    """open-instruct's intended head init: normal(std = 1 / sqrt(hidden_size + 1))."""
    return 1.0 / math.sqrt(hidden_size + 1)


def last_token_indices(attention_mask: jax.Array) -> jax.Array:
    """Index of each row's last real token for right-padded rows, from the mask (never pad ids).

    Rows of only padding read position 0 (their reward is meaningless and must be weighted out).
    """
    lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
    return jnp.maximum(lengths - 1, 0)


class RewardModel(nnx.Module):
    """Returns one float32 reward per right-padded row.

    The head is `nnx.Linear(hidden, 1, use_bias=False)` in float32, applied to the final-norm hidden
    state at the last real token: the same number transformers' `*ForSequenceClassification`
    reports for right-padded rows, computed in float32 even when the backbone runs in bf16.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = family_named(config.family).backbone(config, rngs=rngs)
        self.score = nnx.Linear(
            config.hidden_size,
            1,
            use_bias=False,
            kernel_init=nnx.initializers.normal(score_head_stddev(config.hidden_size)),
            kernel_metadata={"out_sharding": ("embed", "score"), "eager_sharding": False},
            param_dtype=jnp.float32,
            dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids, attention_mask: [B, T] (right padding) -> rewards [B] float32."""
        input_ids = jnp.where(attention_mask > 0, input_ids, 0)
        segments = {}
        if padded_rows_as_segments(self.config.attention):  # padding apart: its blocks skipped
            segments = {"segment_ids": (attention_mask > 0).astype(jnp.int32)}
        hidden = self.model(input_ids, **segments)
        last = last_token_indices(attention_mask)
        picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return self.score(picked.astype(jnp.float32))[:, 0]

    def token_scores(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        branch_ids: jax.Array | None,
    ) -> jax.Array:
        """Packed rows [B, T] -> the score head at every token [B, T] float32; a sequence's
        reward is the score at its last token (jaxrm/data/packing.py says where). `branch_ids`
        None: no prompt is shared (the `segments` mask kind, not `tree`)."""
        hidden = self.model(input_ids, positions, segment_ids, branch_ids)
        return self.score(hidden.astype(jnp.float32))[..., 0]
