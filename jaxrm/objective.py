"""Bradley-Terry pairwise objective and the metric sums logged for it.

Everything is computed in float32 whatever the dtype of the rewards (bf16 backbones included), and
the loss uses `log_sigmoid`, never `log(sigmoid(.))`, so huge reward gaps stay finite.

Per pair the optimized objective is (TRL RewardTrainer semantics)

    loss_i = -log_sigmoid(r_chosen_i - r_rejected_i - margin_i)
             + center_coef * (r_chosen_i + r_rejected_i) ** 2

and its mean over real pairs equals TRL's `-logsigmoid(rc - rr - margin).mean()
+ center_coef * ((rc + rr) ** 2).mean()`. With no margin column and `center_coef == 0` this is
exactly the reference's `-logsigmoid(rc - rr).mean()`.

Logged metrics (`rm/loss` etc.) are kept as weighted sums plus a count, so averages over
micro-batches, devices, hosts and eval batches are exact (sum everything, divide once):
- `rm/loss` is the full objective above (margin and centering included): the number that is
  optimized, so a logged curve always matches what the gradient sees.
- `rm/accuracy` is strict `r_chosen > r_rejected` (ties are wrong) and ignores the margin column,
  as in TRL and the reference.
- `rm/reward_margin` is `r_chosen - r_rejected` (the model's margin, not the margin column).

K-wise groups (jaxrm/data/group_packing.py) use the same per-pair terms over every pair their
scores imply, each weighed by its `loss_weight` (1, or one over its group's pairs), or the
Plackett-Luce loss of each group's ranking (`plackett_luce_terms`); `rm/accuracy` stays the
pairwise accuracy (the same number as for pairs on groups of two) and `rm/top1_accuracy` counts
groups whose best response gets the highest reward.

`weight` is 1 for real pairs and 0 for filler pairs (padding a batch to a fixed shape). Filler pairs
are masked with `where` on the inputs as well as the terms, so even non-finite filler rewards cannot
leak NaN into the loss or its gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

METRIC_SUM_KEYS = (
    "loss_sum",
    "loss_count",
    "correct_sum",
    "chosen_sum",
    "rejected_sum",
    "margin_sum",
    "count",
    "top1_sum",
    "group_count",
)
BRADLEY_TERRY = "bradley_terry"
PLACKETT_LUCE = "plackett_luce"


@dataclasses.dataclass(frozen=True)
class Objective:
    """The objective's settings a train or eval step is built with."""

    num_blocks: int  # process blocks per micro-batch (see split_pair_rewards)
    use_margin: bool = False  # subtract the dataset's margin column inside the log-sigmoid
    center_coef: float = 0.0  # the centering term's coefficient
    ranking: str = BRADLEY_TERRY  # K-wise batches: plackett_luce over each group instead


def split_pair_rewards(rewards: jax.Array, num_blocks: int = 1) -> tuple[jax.Array, jax.Array]:
    """Splits [2M] rewards laid out as `num_blocks` x (m chosen, m rejected) into ([M], [M]).

    With one block the first half is chosen, the second half rejected. Pair order is preserved:
    chosen[i] and rejected[i] belong to the same pair.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {rewards.shape}")
    if num_blocks < 1 or rewards.shape[0] % (2 * num_blocks) != 0:
        raise ValueError(
            f"{rewards.shape[0]} rewards do not split into {num_blocks} blocks of chosen+rejected"
        )
    blocks = rewards.reshape(num_blocks, 2, -1)
    return blocks[:, 0, :].reshape(-1), blocks[:, 1, :].reshape(-1)


def _f32(x: jax.Array | float) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


def pair_loss_terms(
    chosen: jax.Array,
    rejected: jax.Array,
    margin: jax.Array | None = None,
    center_coef: float = 0.0,
) -> jax.Array:
    """Per-pair float32 loss: `-log_sigmoid(c - r - margin) + center_coef * (c + r)**2`."""
    chosen, rejected = _f32(chosen), _f32(rejected)
    diff = chosen - rejected
    if margin is not None:
        diff = diff - _f32(margin)
    terms = -jax.nn.log_sigmoid(diff)
    if center_coef:
        terms = terms + _f32(center_coef) * jnp.square(chosen + rejected)
    return terms


def _masked_inputs(
    chosen: jax.Array, rejected: jax.Array, weight: jax.Array, margin: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """float32 inputs with filler pairs (weight 0) zeroed, so they contribute nothing, not NaN."""
    weight = _f32(weight)
    real = weight != 0
    chosen = jnp.where(real, _f32(chosen), 0.0)
    rejected = jnp.where(real, _f32(rejected), 0.0)
    if margin is not None:
        margin = jnp.where(real, _f32(margin), 0.0)
    return chosen, rejected, weight, real, margin


def mean_loss(sums: dict[str, jax.Array], normalizer: jax.Array | float) -> jax.Array:
    """The loss to differentiate: `sums["loss_sum"] / normalizer` (of `pair_metrics`).

    Pass the number of real pairs in the whole accumulation window / global batch as `normalizer`
    to make the accumulated gradient the exact gradient of the global mean even when micro-batches
    hold different numbers of real pairs. A zero normalizer (all filler) gives loss 0 and zero
    gradient, not NaN.
    """
    den = _f32(normalizer)
    return sums["loss_sum"] / jnp.where(den > 0, den, 1.0)


def pair_metrics(
    chosen: jax.Array,
    rejected: jax.Array,
    weight: jax.Array,
    margin: jax.Array | None = None,
    center_coef: float = 0.0,
    loss_weight: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Weighted float32 sums (keys `METRIC_SUM_KEYS`) for exact averaging; add them, then finalize.

    Pass the same `margin` / `center_coef` as the loss so `loss_sum` is the optimized objective.
    `loss_weight` (K-wise, default `weight`) weighs a pair's loss term only: the metrics count
    every real pair once.
    """
    chosen, rejected, weight, real, margin = _masked_inputs(chosen, rejected, weight, margin)
    terms = pair_loss_terms(chosen, rejected, margin, center_coef)
    w = jnp.where(real, weight, 0.0)
    lw = w if loss_weight is None else jnp.where(real, _f32(loss_weight), 0.0)
    zero = jnp.zeros((), jnp.float32)
    return {
        "loss_sum": jnp.sum(jnp.where(real, lw * terms, 0.0)),
        "loss_count": jnp.sum(lw),
        "correct_sum": jnp.sum(w * (chosen > rejected).astype(jnp.float32)),
        "chosen_sum": jnp.sum(w * chosen),
        "rejected_sum": jnp.sum(w * rejected),
        "margin_sum": jnp.sum(w * (chosen - rejected)),
        "count": jnp.sum(w),
        "top1_sum": zero,
        "group_count": zero,
    }


def _group_inputs(
    rewards: jax.Array, scores: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 rewards (0 where masked), scores and a boolean mask, [..., K]."""
    real = mask > 0
    return jnp.where(real, _f32(rewards), 0.0), _f32(scores), real


def plackett_luce_terms(rewards: jax.Array, scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Per group ([..., K] inputs, `mask` 1 on real responses) the Plackett-Luce loss of its
    ranking by `scores`: the sum, over each response a that is not among the lowest-scored, of
    `logsumexp(r_b for b with score_b <= score_a) - r_a` (a is picked from itself and every
    response it does not lose to). Without ties this is the Plackett-Luce negative
    log-likelihood of the ranking; tied responses share one risk set (Breslow's rule)."""
    rewards, scores, real = _group_inputs(rewards, scores, mask)
    not_above = scores[..., None, :] <= scores[..., :, None]  # [..., a, b]: score_b <= score_a
    eye = jnp.eye(rewards.shape[-1], dtype=bool)
    risk = (real[..., None, :] & not_above) | eye  # the diagonal keeps every row non-empty
    logits = jnp.where(risk, rewards[..., None, :], -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    lowest = jnp.min(jnp.where(real, scores, jnp.inf), axis=-1, keepdims=True)
    active = real & (scores > lowest)
    return jnp.sum(jnp.where(active, lse - rewards, 0.0), axis=-1)


def group_metrics(
    rewards: jax.Array, scores: jax.Array, mask: jax.Array, ranking: str = BRADLEY_TERRY
) -> dict[str, jax.Array]:
    """Sums over groups ([..., K] inputs): `top1_sum` counts groups whose best-scored responses
    hold a reward strictly above every other response's, over `group_count` groups. With
    `ranking` Plackett-Luce, also `loss_sum` and `loss_count` (each group weighs 1)."""
    rewards, scores, real = _group_inputs(rewards, scores, mask)
    group = jnp.any(real, axis=-1)
    best = jnp.max(jnp.where(real, scores, -jnp.inf), axis=-1, keepdims=True)
    top = real & (scores == best)
    top_reward = jnp.max(jnp.where(top, rewards, -jnp.inf), axis=-1)
    rest_reward = jnp.max(jnp.where(real & ~top, rewards, -jnp.inf), axis=-1)
    out = {
        "top1_sum": jnp.sum(group & (top_reward > rest_reward)).astype(jnp.float32),
        "group_count": jnp.sum(group).astype(jnp.float32),
    }
    if ranking == PLACKETT_LUCE:
        out["loss_sum"] = jnp.sum(plackett_luce_terms(rewards, scores, real))
        out["loss_count"] = out["group_count"]
    return out


def add_metrics(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Adds two metric-sum dicts (micro-batches, eval batches)."""
    return {k: a[k] + b[k] for k in METRIC_SUM_KEYS}


def finalize_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Means (sum / count) under the logged names; a zero count gives NaN (nothing was measured).
    `rm/loss` is the loss sum over its weights (pairs, or prompts), `rm/top1_accuracy` is there
    when groups were measured (K-wise)."""
    count = sums["count"]
    out = {
        "rm/loss": sums["loss_sum"] / sums["loss_count"],
        "rm/accuracy": sums["correct_sum"] / count,
        "rm/chosen_rewards": sums["chosen_sum"] / count,
        "rm/rejected_rewards": sums["rejected_sum"] / count,
        "rm/reward_margin": sums["margin_sum"] / count,
    }
    if float(sums.get("group_count", 0.0)) > 0:  # K-wise groups were measured
        out["rm/top1_accuracy"] = sums["top1_sum"] / sums["group_count"]
    return out
