"""Learning-rate schedules and the AdamW optimizer, matching the reference's torch/HF semantics.

- Schedules equal transformers' `get_scheduler` lambdas (`linear`, `cosine` with 0.5 cycles,
  `constant` / `constant_with_warmup`), evaluated at the optimizer-update count: the update with
  0-based index `k` uses `schedule(k)`, as `LambdaLR` does when `scheduler.step()` follows every
  `optimizer.step()`. `total_steps` is the caller's number of optimizer updates for the whole run
  (the reference's epochs^2 horizon bug is not reproduced).
- The optimizer is torch's `clip_grad_norm_(max_grad_norm)` followed by `torch.optim.AdamW`:
  bias-corrected Adam with `eps` added after the square root, and decoupled weight decay
  (`p -= lr * wd * p`) on every parameter. Gradient accumulation is the train step's job.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxrm.errors import UserError

SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")


def num_warmup_steps(total_steps: int, warmup_ratio: float = 0.0, warmup_steps: int = 0) -> int:
    """HF `TrainingArguments.get_warmup_steps`: explicit steps win, else ceil(total * ratio)."""
    if warmup_steps < 0 or warmup_ratio < 0:
        raise UserError(f"warmup must be >= 0, got steps={warmup_steps} ratio={warmup_ratio}")
    if warmup_steps and warmup_ratio:
        raise UserError("give warmup_steps or warmup_ratio, not both")
    if warmup_steps:
        return int(warmup_steps)
    if warmup_ratio > 1:
        raise UserError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)


def make_schedule(
    learning_rate: float,
    total_steps: int,
    scheduler_type: str = "linear",
    *,
    warmup_ratio: float = 0.0,
    warmup_steps: int = 0,
) -> optax.Schedule:
    """An optax schedule equal to HF `get_scheduler(scheduler_type, ...)` times `learning_rate`.

    linear: `step / warmup` during warmup, then `max(0, (total - step) / max(1, total - warmup))`.
    cosine: `step / warmup`, then `max(0, 0.5 * (1 + cos(pi * progress)))`.
    constant / constant_with_warmup: `step / warmup` during warmup, then 1. (Unlike HF's plain
    `constant`, which silently ignores warmup, `constant` with a warmup here warms up.)
    """
    if scheduler_type not in SCHEDULER_TYPES:
        raise UserError(f"unknown lr scheduler {scheduler_type!r}; choose from {SCHEDULER_TYPES}")
    if total_steps < 1:
        raise UserError(f"total_steps must be >= 1, got {total_steps}")
    warmup = num_warmup_steps(total_steps, warmup_ratio, warmup_steps)
    lr = float(learning_rate)
    decay_len = float(max(1, total_steps - warmup))
    warmup_den = float(max(1, warmup))

    def schedule(count: jax.Array | int) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        warm = step / warmup_den
        if scheduler_type == "linear":
            after = jnp.maximum(0.0, (total_steps - step) / decay_len)
        elif scheduler_type == "cosine":
            # 0.5 * (1 + cos(pi * p)) == sin(pi/2 * (1 - p))**2: same values for every p, without
            # float32 cancellation near the end of the run, where the factor is small.
            remaining = (total_steps - step) / decay_len
            after = jnp.maximum(0.0, jnp.square(jnp.sin(0.5 * jnp.pi * remaining)))
        else:
            after = jnp.ones_like(step)
        return lr * jnp.where(step < warmup, warm, after)

    return schedule


def current_lr(schedule: optax.Schedule, step: int | jax.Array) -> float:
    """The learning rate the update with 0-based index `step` uses (optimizer count before it)."""
    return float(schedule(step))


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch `clip_grad_norm_`: scale by `min(1, max_norm / (norm + 1e-6))`, norm in float32.

    Differs from `optax.clip_by_global_norm` only by torch's 1e-6 in the denominator; kept for
    bit-level parity with the reference (DeepSpeed adds the same 1e-6).
    """

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        leaves = jax.tree.leaves(updates)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adam_torch(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-5
) -> optax.GradientTransformation:
    """Adam direction `m_hat / (sqrt(v_hat) + eps)` computed as torch.optim.Adam(W) does.

    Same state as `optax.scale_by_adam` (`ScaleByAdamState`). The difference: optax forms the bias
    corrections as `1 - b**t` in float32, which for b2 = 0.999 at small t loses ~1e-5 relative
    precision (0.999 is not a float32 number and the subtraction cancels); torch does it in float64.
    Here `1 - b**t = -expm1(t * log(b))` with `log(b)` precomputed in float64, accurate to ~1e-7.
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init_fn(params: optax.Params) -> optax.ScaleByAdamState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update_fn(
        updates: optax.Updates, state: optax.ScaleByAdamState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.ScaleByAdamState]:
        del params
        mu = jax.tree.map(lambda g, m: m + (1 - b1) * (g - m), updates, state.mu)  # torch lerp_
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * g * g, updates, state.nu)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1 = -jnp.expm1(t * log_b1)
        bc2_sqrt = jnp.sqrt(-jnp.expm1(t * log_b2))

        def direction(m: jax.Array, v: jax.Array) -> jax.Array:
            out = (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps)
            return out.astype(m.dtype)

        return jax.tree.map(direction, mu, nu), optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    schedule: optax.Schedule | float,
    *,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-5,
    max_grad_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping (torch semantics; None or <= 0 disables it) then torch-style AdamW.

    update = -lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), which is torch's
    `p *= 1 - lr*wd; p -= lr * m_hat / (sqrt(v_hat) + eps)` (both decay the pre-update parameter;
    eps after the square root). This is optax.adamw's formula, but with float64-accurate bias
    corrections (see `scale_by_adam_torch`); tests check it against torch. Weight decay applies to
    all parameters, as in the reference. Moments are kept in the parameters' dtype (float32
    masters). Chain order: [clip], adam, decayed weights, -lr (`optax.ScaleByScheduleState.count`
    in the last element is the number of updates applied).
    """
    adamw = optax.chain(
        scale_by_adam_torch(b1, b2, eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    if max_grad_norm is None or max_grad_norm <= 0:
        return adamw
    return optax.chain(clip_by_global_norm_torch(float(max_grad_norm)), adamw)
