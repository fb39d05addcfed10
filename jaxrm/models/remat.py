"""Rematerialization policies by name (`remat_policy`): what a scanned layer keeps for the
backward pass."""

from __future__ import annotations

import jax

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_mlp_out": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
    "offload_attn_mlp_out": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=("attn_out", "mlp_out"),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}
