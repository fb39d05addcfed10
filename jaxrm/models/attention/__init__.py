"""Attention: one entry point, `attend`, and one table, `KERNELS`, of what runs for each kind of
mask (`mask.py` states the rule every implementation expresses).

Layouts. q: [B, T, H, Dh]; k, v: [B, T, K, Dh] with H a multiple of K (GQA).

Mask kinds:
- `causal`: right-padded rows (the reference layout). A real token only attends to earlier tokens,
  which are all real, so causality is the whole mask.
- `segments`: packed rows, `segment_ids` [B, T] (0 = padding, > 0 = one sequence per id,
  contiguous).
- `tree`: packed rows with prefix sharing: also `branch_ids` [B, T] (0 = the group's shared prompt,
  b > 0 = one of its rests), so a rest reads the shared prompt and itself, never another rest.
Each may carry the model's sliding window (by token position) and its logits' scale and soft-cap.

Implementations: `xla` (T x T scores: the tests' reference, `reference.py`, or XLA's fused
attention where it can express the mask), `flash` (a blocked kernel in plain JAX that never forms
T x T and skips dead blocks, `flash.py`), `cudnn` (cuDNN flash attention, right-padded rows).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec

from jaxrm.models.attention.flash import flash_packed
from jaxrm.models.attention.mask import NO_WINDOW, Logits, Mask, allowed_pairs
from jaxrm.models.attention.reference import reference_attention

DEFAULT_BLOCK = 128
ATTENTION_IMPLEMENTATIONS = ("flash", "xla", "cudnn")

Kernel = Callable[..., jax.Array]

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "DEFAULT_BLOCK",
    "KERNELS",
    "NO_WINDOW",
    "Logits",
    "Mask",
    "allowed_pairs",
    "attend",
    "prepare_mask",
    "reference_attention",
]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    implementation: str,
    logits: Logits | None = None,
    *,
    block: int = DEFAULT_BLOCK,
    mesh: jax.sharding.Mesh | None = None,
    specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None = None,
) -> jax.Array:
    """Attention under `mask` by `implementation`, as `KERNELS` says. `logits` defaults to the
    plain 1/sqrt(head_dim) scale; `block`, `mesh` and `specs` (q/k specs, row spec) are for the
    blocked kernels, which run per device under `mesh`."""
    kernels = KERNELS[mask.kind]
    if implementation not in kernels:
        raise ValueError(
            f"{mask.kind} masks need attention {' or '.join(map(repr, kernels))}, "
            f"not {implementation!r}"
        )
    logits = logits or Logits(q.shape[-1] ** -0.5)
    return kernels[implementation](q, k, v, mask, logits, block, mesh, specs)


def prepare_mask(mask: Mask, implementation: str) -> Mask:
    """Whatever an implementation computes once per forward pass, before the layer scan (today
    nothing: the hook where a dense-mask kernel builds its mask once, not once per layer)."""
    del implementation
    return mask


def _reference(q, k, v, mask: Mask, logits: Logits, *_: object) -> jax.Array:
    return reference_attention(q, k, v, mask, logits)


def _fused_causal(implementation: str | None) -> Kernel:
    """XLA's (None) or cuDNN's fused causal attention; neither takes a soft-cap or a traced
    window, so a model with either runs the reference under `xla` (and cannot use `cudnn`)."""

    def kernel(q, k, v, mask: Mask, logits: Logits, *_: object) -> jax.Array:
        if mask.window is not None or logits.softcap is not None:
            if implementation is not None:
                raise ValueError(f"{implementation} attention takes no window or soft-cap")
            return reference_attention(q, k, v, mask, logits)
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, scale=logits.scale, implementation=implementation
        )

    return kernel


# What runs for each kind of mask, by `attention` name. A right-padded row under `flash` without
# segments runs `xla` (RewardModel gives flash a padding segment, so it never asks for this).
KERNELS: dict[str, dict[str, Kernel]] = {
    "causal": {
        "xla": _fused_causal(None),
        "cudnn": _fused_causal("cudnn"),
        "flash": _fused_causal(None),
    },
    "segments": {"flash": flash_packed, "xla": _reference},
    "tree": {"flash": flash_packed, "xla": _reference},
}
