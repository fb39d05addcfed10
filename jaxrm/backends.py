"""What `auto` means for the config keys `dtype` and `attention` on each JAX backend.

`BACKEND_DEFAULTS` is the one table: per backend, the compute dtype and the attention
implementations fastest first; `auto` runs the first one whose needs (`ATTENTION_NEEDS`) the
backend, compute dtype and head_dim meet. An explicit value is kept, and one whose needs are not
met is a one-line error rather than a failure deep inside the compiled step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections

from jaxrm.dtypes import COMPUTE_DTYPES
from jaxrm.errors import UserError
from jaxrm.hf import model_architecture
from jaxrm.models.attention import ATTENTION_IMPLEMENTATIONS
from jaxrm.models.families import model_config_from_hf
from jaxrm.models.family import ModelConfig

log = logging.getLogger(__name__)

AUTO = "auto"

# backend -> (compute dtype, attention implementations, fastest first). `flash` (jaxrm's blocked
# kernel) skips masked and padded blocks and never forms T x T: on CPU it measured ~5x faster than
# XLA's fwd+bwd (benchmarks/RESULTS.md); cuDNN serves right-padded rows on GPUs.
BACKEND_DEFAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpu": ("bfloat16", ("cudnn", "flash", "xla")),
    "tpu": ("bfloat16", ("flash", "xla")),
    "cpu": ("float32", ("flash", "xla")),  # XLA:CPU has no native bf16 and runs it slower
}
OTHER_BACKEND = "cpu"  # the row for a backend the table does not name


@dataclasses.dataclass(frozen=True)
class Needs:
    """What an attention implementation needs (None: anything)."""

    backends: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    head_dim_multiple: int = 1
    max_head_dim: int | None = None
    layouts: tuple[str, ...] | None = None  # batch layouts (packed, padded)
    plain_only: bool = False  # no soft-capped logits, no sliding window (Gemma 2/3, Mistral)


ATTENTION_NEEDS: dict[str, Needs] = {
    # cuDNN flash attention: head_dim up to 128 runs on every GPU (jax allows 256 from Hopper on);
    # jaxrm uses it for right-padded rows (packed rows with a shared prompt need a tree mask).
    "cudnn": Needs(
        backends=("gpu",),
        dtypes=("bfloat16", "float16"),
        head_dim_multiple=8,
        max_head_dim=128,
        layouts=("padded",),
        plain_only=True,
    ),
}


@dataclasses.dataclass(frozen=True)
class Execution:
    """How the model runs: compute dtype and attention names, and why (for the logs)."""

    dtype: str
    attention: str
    reason: str


def model_attention(config: ModelConfig) -> dict[str, Any]:
    """What the attention choice reads of a model: its head_dim and whether its attention is
    plain (no soft-cap, no sliding window), as `resolve_execution`'s keywords."""
    return {"head_dim": config.head_dim, "plain": config.plain_attention}


def attention_misfit(
    implementation: str,
    backend: str,
    dtype: str,
    head_dim: int | None,
    layout: str = "padded",
    plain: bool = True,
) -> str | None:
    """Why `implementation` cannot run here, or None when it can (head_dim None: not checked;
    `plain`: the model's attention has no soft-cap and no sliding window)."""
    needs = ATTENTION_NEEDS.get(implementation, Needs())
    if needs.backends is not None and backend not in needs.backends:
        wanted = "/".join(needs.backends)
        return f"{implementation} attention needs a {wanted} backend, not {backend}"
    if needs.dtypes is not None and dtype not in needs.dtypes:
        return f"{implementation} attention needs dtype {' or '.join(needs.dtypes)}, not {dtype}"
    if head_dim is not None and (
        head_dim % needs.head_dim_multiple
        or (needs.max_head_dim is not None and head_dim > needs.max_head_dim)
    ):
        limit = f" and at most {needs.max_head_dim}" if needs.max_head_dim else ""
        return (
            f"{implementation} attention needs head_dim a multiple of {needs.head_dim_multiple}"
            f"{limit}; the model's is {head_dim}"
        )
    if needs.layouts is not None and layout not in needs.layouts:
        return f"{implementation} attention needs batch_layout {' or '.join(needs.layouts)}"
    if needs.plain_only and not plain:
        return (
            f"{implementation} attention takes no soft-capped logits or sliding windows, "
            "which the model has"
        )
    return None


def resolve_execution(
    dtype: str,
    attention: str,
    backend: str,
    head_dim: int | None = None,
    layout: str = "padded",
    plain: bool = True,
) -> Execution:
    """The compute dtype and attention for config values that may be `auto`."""
    if dtype != AUTO and dtype not in COMPUTE_DTYPES:
        choices = ", ".join((AUTO, *COMPUTE_DTYPES))
        raise UserError(f"config key 'dtype' must be one of {choices}, got {dtype!r}")
    if attention != AUTO and attention not in ATTENTION_IMPLEMENTATIONS:
        choices = ", ".join((AUTO, *ATTENTION_IMPLEMENTATIONS))
        raise UserError(f"config key 'attention' must be one of {choices}, got {attention!r}")
    default_dtype, candidates = BACKEND_DEFAULTS.get(backend, BACKEND_DEFAULTS[OTHER_BACKEND])
    dtype_reason = "set" if dtype != AUTO else f"auto on {backend}"
    dtype = default_dtype if dtype == AUTO else dtype
    if attention != AUTO:
        misfit = attention_misfit(attention, backend, dtype, head_dim, layout, plain)
        if misfit:
            raise UserError(f"config key 'attention': {misfit} (leave it at 'auto' to choose)")
        return Execution(dtype, attention, f"dtype {dtype_reason}, attention set")
    skipped = []
    for candidate in candidates:
        misfit = attention_misfit(candidate, backend, dtype, head_dim, layout, plain)
        if misfit is None:
            reason = f"dtype {dtype_reason}, attention auto on {backend}"
            if skipped:
                reason += f" ({'; '.join(skipped)})"
            return Execution(dtype, candidate, reason)
        skipped.append(misfit)
    raise UserError(f"config key 'attention': no implementation fits ({'; '.join(skipped)})")


def model_needs(model_name_or_path: str, revision: str = "") -> dict[str, Any]:
    """`model_attention` from the model's config.json alone (see `model_architecture`)."""
    hf_config, _ = model_architecture(model_name_or_path, revision or None)
    return model_attention(model_config_from_hf(hf_config))


def with_backend_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `cfg` whose `dtype` and `attention` are resolved for the default JAX backend
    and the model's head_dim."""
    needs = model_needs(cfg.model_name_or_path, cfg.model_revision)
    run = resolve_execution(
        cfg.dtype, cfg.attention, jax.default_backend(), layout=cfg.batch_layout, **needs
    )
    return with_execution(cfg, run)


def with_execution(cfg: ml_collections.ConfigDict, run: Execution) -> ml_collections.ConfigDict:
    """A copy of `cfg` whose `dtype` and `attention` are those of `run` (logged with why)."""
    log.info("compute dtype %s, attention %s (%s)", run.dtype, run.attention, run.reason)
    resolved = cfg.copy_and_resolve_references()
    resolved.dtype, resolved.attention = run.dtype, run.attention
    return resolved
