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

Implementations (`IMPLEMENTATIONS`, each declaring what it can express: `table.py`): `xla` (T x T
scores: the tests' reference, `reference.py`, or XLA's fused attention for causal rows), `flash`
(a blocked kernel in plain JAX that never forms T x T and skips dead blocks, `flash.py`: the
CPU's), `cudnn` (cuDNN flash attention, packed masks as a dense array: `cudnn.py`, GPU), `splash`
(the TPU's splash attention: `splash_tpu.py`), `pallas` (block-sparse flash attention in Pallas
for GPUs, every mask kind: `pallas_gpu.py`). A new implementation is a module with its
`Implementation` entry, added to `IMPLEMENTATIONS` (and to a backend's auto order in
`jaxrm.backends`). A model config's `attention` is one name or a `Choice` (one per mask kind).
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from jaxrm.models.attention.cudnn import CUDNN
from jaxrm.models.attention.flash import flash_packed
from jaxrm.models.attention.mask import NO_WINDOW, Logits, Mask, allowed_pairs
from jaxrm.models.attention.pallas_gpu import PALLAS
from jaxrm.models.attention.reference import reference_attention
from jaxrm.models.attention.splash_tpu import SPLASH
from jaxrm.models.attention.table import (
    MASK_KINDS,
    Choice,
    Features,
    Implementation,
    Kernel,
    check_attention,
    implementation_name,
)

DEFAULT_BLOCK = 128

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "DEFAULT_BLOCK",
    "IMPLEMENTATIONS",
    "KERNELS",
    "MASK_KINDS",
    "Choice",
    "Features",
    "Implementation",
    "NO_WINDOW",
    "Logits",
    "Mask",
    "allowed_pairs",
    "attend",
    "check_model_attention",
    "padded_rows_as_segments",
    "prepare_mask",
    "reference_attention",
]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    implementation: str | Choice,
    logits: Logits | None = None,
    *,
    block: int = DEFAULT_BLOCK,
    mesh: jax.sharding.Mesh | None = None,
    specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None = None,
) -> jax.Array:
    """Attention under `mask` by `implementation` (one name, or a `Choice` per mask kind), as
    `KERNELS` says. `logits` defaults to the plain 1/sqrt(head_dim) scale; `block`, `mesh` and
    `specs` (q/k specs, row spec) are for the kernels that run per device under `mesh`."""
    implementation = implementation_name(implementation, mask.kind)
    kernels = KERNELS[mask.kind]
    if implementation not in kernels:
        raise ValueError(
            f"{mask.kind} masks need attention {' or '.join(map(repr, kernels))}, "
            f"not {implementation!r}"
        )
    logits = logits or Logits(q.shape[-1] ** -0.5)
    return kernels[implementation](q, k, v, mask, logits, block, mesh, specs)


def prepare_mask(mask: Mask, implementation: str | Choice) -> Mask:
    """`mask` with what its implementation computes once per forward pass (a dense mask, block
    maps): the backbone calls it before the layer scan, so it is not redone per layer."""
    prepare = IMPLEMENTATIONS[implementation_name(implementation, mask.kind)].prepare
    return mask if prepare is None else prepare(mask)


def padded_rows_as_segments(attention: str | Choice) -> bool:
    """Whether right-padded rows run as one segment per row (padding apart) under `attention`:
    for kernels that skip the padding's blocks that way."""
    return IMPLEMENTATIONS[implementation_name(attention, "causal")].padded_rows_as_segments


def check_model_attention(attention: str | Choice) -> None:
    """ValueError unless a model config's `attention` names known implementations."""
    check_attention(attention, ATTENTION_IMPLEMENTATIONS)


def _reference(q, k, v, mask: Mask, logits: Logits, *_: object) -> jax.Array:
    return reference_attention(q, k, v, mask, logits)


def _xla_causal(q, k, v, mask: Mask, logits: Logits, *_: object) -> jax.Array:
    """XLA's fused causal attention; it takes no soft-cap or traced window, so a model with
    either runs the reference."""
    if mask.window is not None or logits.softcap is not None:
        return reference_attention(q, k, v, mask, logits)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=logits.scale)


XLA = Implementation("xla", {"causal": _xla_causal, "segments": _reference, "tree": _reference})
FLASH = Implementation(
    "flash",
    # right-padded rows run as segments (`padded_rows_as_segments`); a caller asking `flash` for a
    # causal mask gets XLA's
    {"causal": _xla_causal, "segments": flash_packed, "tree": flash_packed},
    padded_rows_as_segments=True,
)
IMPLEMENTATIONS: dict[str, Implementation] = {
    i.name: i for i in (FLASH, XLA, CUDNN, SPLASH, PALLAS)
}
ATTENTION_IMPLEMENTATIONS = tuple(IMPLEMENTATIONS)

# What runs for each kind of mask, by `attention` name.
KERNELS: dict[str, dict[str, Kernel]] = {
    kind: {name: i.kernels[kind] for name, i in IMPLEMENTATIONS.items() if kind in i.kernels}
    for kind in MASK_KINDS
}
