"""What `auto` means for the config keys `dtype` and `attention` on each JAX backend.

`BACKEND_DEFAULTS` is the one table: per backend, the compute dtype and the attention
implementations fastest first. Attention is chosen per mask kind (`jaxrm.models.attention`:
`causal` right-padded rows, `segments` packed rows, `tree` packed rows sharing prompts): `auto`
runs, for each kind, the first implementation that can express it and the model's features
(soft-cap, sliding window) on this backend, compute dtype and head_dim. An explicit value is kept
for every kind the run meets, and one that cannot serve one of them is a one-line error naming
what can, rather than a failure deep inside the compiled step.
"""

from __future__ import annotations

import dataclasses
import logging

import ml_collections

from jaxrm.dtypes import COMPUTE_DTYPES
from jaxrm.errors import UserError
from jaxrm.models.attention import (
    ATTENTION_IMPLEMENTATIONS,
    IMPLEMENTATIONS,
    MASK_KINDS,
    Choice,
    Features,
)
from jaxrm.models.attention.table import NO_FEATURES, candidates_for, choose

log = logging.getLogger(__name__)

AUTO = "auto"

# backend -> (compute dtype, attention implementations fastest first: one order, or one per mask
# kind). `flash` (jaxrm's blocked kernel) skips masked and padded blocks and never forms T x T: on
# CPU it measured ~5x faster than XLA's fwd+bwd. On accelerators its loop syncs with the host per
# block, so the fused kernels come first. Measured on one H100 (benchmarks/RESULTS.md, fwd+bwd at
# T = 8192, Llama-3.1-8B heads, bf16): right-padded rows cuDNN 4.1 ms, pallas 8.8, flash 29.4;
# packed rows with shared prompts pallas 1.8 ms, cuDNN (dense mask) 8.9, flash 17.9. TPU: splash
# first (not measured against flash yet).
_GPU_PACKED = ("pallas", "cudnn", "flash", "xla")
BACKEND_DEFAULTS: dict[str, tuple[str, tuple[str, ...] | dict[str, tuple[str, ...]]]] = {
    "gpu": (
        "bfloat16",
        {
            "causal": ("cudnn", "pallas", "flash", "xla"),
            "segments": _GPU_PACKED,
            "tree": _GPU_PACKED,
        },
    ),
    "tpu": ("bfloat16", ("splash", "flash", "xla")),
    "cpu": ("float32", ("flash", "xla")),  # XLA:CPU has no native bf16 and runs it slower
}
OTHER_BACKEND = "cpu"  # the row for a backend the table does not name


@dataclasses.dataclass(frozen=True)
class Execution:
    """How the model runs: compute dtype, attention per mask kind, and why (for the logs)."""

    dtype: str
    reason: str
    kernels: Choice  # the implementation for each mask kind (the model config's `attention`)
    kind: str  # the training layout's mask kind

    @property
    def attention(self) -> str:
        """The training layout's implementation: the config's one name, resolved."""
        return self.kernels.for_kind(self.kind)


def mask_kinds(layout: str, prefix_sharing: bool = True) -> tuple[str, ...]:
    """The mask kinds a run meets, its training (and eval) layout's first: padded rows are
    `causal`, packed ones `tree` with prefix sharing, else `segments`; scoring (benchmarks during
    training, `jaxrm.score`) packs without sharing: `segments`."""
    if layout != "packed":
        return ("causal", "segments")
    return ("tree", "segments") if prefix_sharing else ("segments",)


def resolve_execution(
    dtype: str,
    attention: str,
    backend: str,
    head_dim: int | None = None,
    layout: str = "padded",
    *,
    prefix_sharing: bool = True,
    features: Features = NO_FEATURES,
) -> Execution:
    """The compute dtype and the attention per mask kind for config values that may be `auto`
    (head_dim None: not checked)."""
    if dtype != AUTO and dtype not in COMPUTE_DTYPES:
        choices = ", ".join((AUTO, *COMPUTE_DTYPES))
        raise UserError(f"config key 'dtype' must be one of {choices}, got {dtype!r}")
    if attention != AUTO and attention not in ATTENTION_IMPLEMENTATIONS:
        choices = ", ".join((AUTO, *ATTENTION_IMPLEMENTATIONS))
        raise UserError(f"config key 'attention' must be one of {choices}, got {attention!r}")
    default_dtype, candidates = BACKEND_DEFAULTS.get(backend, BACKEND_DEFAULTS[OTHER_BACKEND])
    dtype_reason = "set" if dtype != AUTO else f"auto on {backend}"
    dtype = default_dtype if dtype == AUTO else dtype
    used = mask_kinds(layout, prefix_sharing)
    chosen = choose(
        IMPLEMENTATIONS, attention, candidates, used, features, backend, dtype, head_dim
    )
    if isinstance(chosen, str):
        tail = " (leave it at 'auto' to choose)" if attention != AUTO else ""
        raise UserError(f"config key 'attention': {chosen}{tail}")
    kind = used[0]
    if attention != AUTO:
        reason = f"dtype {dtype_reason}, attention set"
    else:
        reason = f"dtype {dtype_reason}, attention auto on {backend}"
        if chosen.skipped[kind]:
            reason += f" ({'; '.join(chosen.skipped[kind])})"
    return Execution(dtype, reason, chosen.choice, kind)


def attention_misfit(
    implementation: str, backend: str, dtype: str, head_dim: int | None, layout: str = "padded"
) -> str | None:
    """Why `implementation` cannot run a `layout`'s training mask kind here (None: it can)."""
    kind = mask_kinds(layout)[0]
    return IMPLEMENTATIONS[implementation].misfit(
        kind, backend=backend, dtype=dtype, head_dim=head_dim
    )


def compiled_by(run: Execution, backend: str) -> Execution:
    """`run` with each mask kind's implementation that cannot run on `backend` replaced by what
    `auto` picks there (a memory plan compiles an accelerator's step with XLA:CPU)."""
    _, candidates = BACKEND_DEFAULTS.get(backend, BACKEND_DEFAULTS[OTHER_BACKEND])
    names = []
    for kind, name in zip(MASK_KINDS, run.kernels, strict=True):
        if IMPLEMENTATIONS[name].misfit(kind, backend=backend) is not None:
            order = candidates_for(candidates, kind)
            name = next(c for c in order if IMPLEMENTATIONS[c].misfit(kind) is None)
        names.append(name)
    kernels = Choice(*names)
    if kernels == run.kernels:
        return run
    return dataclasses.replace(
        run,
        reason=f"{run.reason}; {run.kernels.describe()} compiled as {kernels.describe()}",
        kernels=kernels,
    )


def with_execution(cfg: ml_collections.ConfigDict, run: Execution) -> ml_collections.ConfigDict:
    """A copy of `cfg` whose `dtype` and `attention` are those of `run` (logged with why)."""
    attention = run.kernels.describe()  # one name, or one per mask kind where they differ
    log.info("compute dtype %s, attention %s (%s)", run.dtype, attention, run.reason)
    resolved = cfg.copy_and_resolve_references()
    resolved.dtype, resolved.attention = run.dtype, run.attention
    return resolved
