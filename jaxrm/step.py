"""The sharded train and eval steps: pure `jax.jit` functions over (params, opt_state).

The model is `nnx.split` once; the steps `nnx.merge` inside the trace, so no NNX graph work runs
per call. A train step takes one optimizer step's batch `[k, 2m, T]` (k accumulation micro-batches;
see jaxrm/data/batch.py), scans the micro-batches accumulating float32 gradients and metric sums,
then applies clipping + AdamW once. Gradients are of the mean loss over all real pairs of the step,
so k micro-batches of b pairs give the same update as one batch of k*b pairs.

Packed steps (jaxrm/data/packing.py) hold a varying number of micro-batches of one shape: each is
a jitted accumulation of gradients and sums, then one jitted update, so nothing recompiles.

Divergence guard: a step whose loss or gradient norm is not finite is not applied (parameters and
optimizer state, its step count included, stay as they were); it reports `skipped = 1` and zero
metric sums. Finite gradients make a finite AdamW update, so the guard decides before the update
and applies it under a condition: no second copy of the parameters and Adam state.

Stop votes: every process passes its own stop request (e.g. a SIGTERM) for each of its devices,
and every process reads back the same `stop` (their maximum), so all processes of a multi-host run
agree on the step to stop at without any extra collective.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrm.data.batch import FIELDS, KWISE_FIELDS, PACKED_FIELDS, batch_shardings
from jaxrm.objective import (
    METRIC_SUM_KEYS,
    Objective,
    add_metrics,
    group_metrics,
    mean_loss,
    pair_metrics,
    split_pair_rewards,
)
from jaxrm.sharding import MESH_AXES, activation_sharding

Batch = dict[str, jax.Array]


def init_optimizer_state(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh):
    """Optimizer state laid out like the parameters it tracks (ZeRO-3: sharded over fsdp)."""
    shardings = optimizer_state_shardings(optimizer, params, mesh)
    return jax.jit(optimizer.init, out_shardings=shardings)(params)


def optimizer_state_shardings(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh):
    """The shardings of `optimizer.init(params)`: parameter-shaped parts (Adam's moments) like
    the parameters, the rest (step counts) replicated. `params` may be abstract (with shardings)."""
    param_struct = jax.tree.structure(params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def is_params_like(node: Any) -> bool:
        return not isinstance(node, jax.ShapeDtypeStruct) and _structure(node) == param_struct

    return jax.tree.map(
        lambda node: param_shardings if is_params_like(node) else replicated,
        jax.eval_shape(optimizer.init, params),
        is_leaf=is_params_like,
    )


def _structure(node: Any) -> Any:
    try:
        return jax.tree.structure(node)
    except Exception:  # noqa: BLE001 - not a pytree we can compare
        return None


def packed_scores(
    graphdef: nnx.GraphDef, params: Any, micro: Batch, shared_prefix: bool = True
) -> jax.Array:
    """The score at every token of a packed micro-batch, [devices, tokens per device]. Rows
    without `shared_prefix` have no branches (their `branch_ids` are all 0): the model gets none,
    so attention runs the `segments` mask kind, not `tree`."""
    model = nnx.merge(graphdef, params)
    branch_ids = micro["branch_ids"] if shared_prefix else None
    scores = model.token_scores(
        micro["input_ids"], micro["positions"], micro["segment_ids"], branch_ids
    )
    return scores.reshape(micro["chosen_index"].shape[0], -1)


def read_scores(per_device: jax.Array, index: jax.Array) -> jax.Array:
    """The scores at `index` ([devices, ...] flat token indices into each device's rows)."""
    flat = index.reshape(index.shape[0], -1)
    return jnp.take_along_axis(per_device, flat, axis=1).reshape(index.shape)


def pair_rewards(
    graphdef: nnx.GraphDef, params: Any, micro: Batch, obj: Objective, shared_prefix: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(chosen, rejected, weight, margin) of one micro-batch's pairs, float32, either layout."""
    if "segment_ids" in micro:  # packed: the score at every token, read at each sequence's end
        per_device = packed_scores(graphdef, params, micro, shared_prefix)
        chosen = read_scores(per_device, micro["chosen_index"]).reshape(-1)
        rejected = read_scores(per_device, micro["rejected_index"]).reshape(-1)
        return chosen, rejected, micro["weight"].reshape(-1), micro["margin"].reshape(-1)
    rewards = nnx.merge(graphdef, params)(micro["input_ids"], micro["attention_mask"])
    chosen, rejected = split_pair_rewards(rewards, obj.num_blocks)
    return chosen, rejected, micro["weight"], micro["margin"]


def _rewards_and_sums(
    graphdef: nnx.GraphDef, params: Any, micro: Batch, obj: Objective, shared_prefix: bool
) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
    """One micro-batch's forward pass: rewards, pair weights and the metric sums (K-wise
    micro-batches: over the pairs their groups imply, plus the groups' sums)."""
    if "group_index" in micro:
        return _kwise_rewards_and_sums(graphdef, params, micro, obj, shared_prefix)
    chosen, rejected, weight, margin = pair_rewards(graphdef, params, micro, obj, shared_prefix)
    margin = margin if obj.use_margin else None
    sums = pair_metrics(chosen, rejected, weight, margin, obj.center_coef)
    return chosen, rejected, weight, sums


def _kwise_rewards_and_sums(
    graphdef: nnx.GraphDef, params: Any, micro: Batch, obj: Objective, shared_prefix: bool
) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
    per_device = packed_scores(graphdef, params, micro, shared_prefix)
    chosen = read_scores(per_device, micro["chosen_index"]).reshape(-1)
    rejected = read_scores(per_device, micro["rejected_index"]).reshape(-1)
    weight = micro["weight"].reshape(-1)
    margin = micro["margin"].reshape(-1) if obj.use_margin else None
    loss_weight = micro["loss_weight"].reshape(-1)
    sums = pair_metrics(chosen, rejected, weight, margin, obj.center_coef, loss_weight)
    group = read_scores(per_device, micro["group_index"])
    sums.update(group_metrics(group, micro["group_score"], micro["group_mask"], obj.ranking))
    return chosen, rejected, weight, sums


def stop_votes(mesh: Mesh, stop: bool) -> jax.Array:
    """This process's stop request as its part of the global vote array (one entry per device)."""
    sharding = NamedSharding(mesh, PartitionSpec(MESH_AXES))
    local = np.full(len(mesh.local_devices), int(stop), np.int32)
    return jax.make_array_from_process_local_data(sharding, local, (mesh.devices.size,))


def _zero_sums() -> dict[str, jax.Array]:
    return {k: jnp.zeros((), jnp.float32) for k in METRIC_SUM_KEYS}


GUARD_COND, GUARD_SELECT = "cond", "select"


def guard_form(backend: str) -> str:
    """How the divergence guard keeps a non-finite step out, in the form the backend's XLA
    updates in place (the donated parameters and Adam moments, no second copy). Measured with
    scripts/memory_plan.py and deviceless compiles of the same update: XLA:CPU adds no
    temporaries under `lax.cond` but fuses a select less well; XLA:GPU (H100 target) copies the
    whole state out of a `lax.cond` (temporaries = the new parameters and moments) but fuses an
    elementwise select into the update (none); XLA:TPU is in place either way."""
    return GUARD_COND if backend == "cpu" else GUARD_SELECT


def _apply(
    optimizer: optax.GradientTransformation,
    state: Any,
    grads: Any,
    sums: dict[str, jax.Array],
    votes: jax.Array,
    guard: str | None = None,
) -> tuple[Any, dict[str, jax.Array]]:
    """Clipping + AdamW with the divergence guard; the step's outputs.

    The guard decides before the update, from the loss and the gradient norm (finite gradients
    give a finite AdamW update: its denominator is at least eps), then keeps the old state for a
    non-finite step by `guard` (default: `guard_form` of the backend traced for)."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)

    def update(state: Any) -> Any:
        params, opt_state = state
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    if (guard or guard_form(jax.default_backend())) == GUARD_COND:
        state = jax.lax.cond(finite, update, lambda state: state, state)
    else:
        state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), update(state), state)
    sums = {k: jnp.where(finite, v, 0.0) for k, v in sums.items()}
    outputs = dict(
        sums, grad_norm=grad_norm, skipped=1 - finite.astype(jnp.int32), stop=jnp.max(votes)
    )
    return state, outputs


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: Any,
    obj: Objective,
    packed: bool = False,
    shared_prefix: bool = True,
    kwise: bool = False,
) -> Callable[[Any, Any, jax.Array], tuple[Any, dict[str, jax.Array]]]:
    """`(params, opt_state), batch, stop votes -> (params, opt_state), outputs`.

    Padded batches: one jitted call that scans the k micro-batches. Packed steps (a varying
    number of micro-batches of one shape): a jitted accumulation per micro-batch, then one jitted
    update. Outputs: the metric sums (zero for a skipped step), `grad_norm`, `skipped` (0 or 1)
    and `stop` (1 when any process asked to stop). `shared_prefix`: packed rows share prompts;
    `kwise`: packed micro-batches of K-wise groups (`KWISE_FIELDS`).
    """

    def loss_fn(params: Any, micro: Batch, normalizer: jax.Array):
        _, _, _, sums = _rewards_and_sums(graphdef, params, micro, obj, shared_prefix)
        return mean_loss(sums, normalizer), sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    replicated = NamedSharding(mesh, PartitionSpec())
    votes_sharding = NamedSharding(mesh, PartitionSpec(MESH_AXES))
    if packed:
        fields = KWISE_FIELDS if kwise else PACKED_FIELDS
        return _packed_train_step(grad_fn, optimizer, mesh, state_shardings, replicated, fields)

    def step(state: Any, batch: Batch, votes: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        params, _ = state
        normalizer = jnp.sum(batch["weight"])

        def micro_step(carry, micro):
            grads, sums = carry
            (_, micro_sums), micro_grads = grad_fn(params, micro, normalizer)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (grads, add_metrics(sums, micro_sums)), None

        zero_grads = jax.tree.map(jnp.zeros_like, params)
        with activation_sharding(mesh):
            (grads, sums), _ = jax.lax.scan(micro_step, (zero_grads, _zero_sums()), batch)
        return _apply(optimizer, state, grads, sums, votes)

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings(mesh), votes_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def _packed_train_step(grad_fn, optimizer, mesh, state_shardings, replicated, fields):
    param_shardings = state_shardings[0]
    micro_shardings = batch_shardings(mesh, fields)

    @functools.partial(
        jax.jit,
        in_shardings=(param_shardings, param_shardings, replicated, micro_shardings, replicated),
        out_shardings=(param_shardings, replicated),
        donate_argnums=(1, 2),
    )
    def accumulate(params, grads, sums, micro, normalizer):
        with activation_sharding(mesh):
            (_, micro_sums), micro_grads = grad_fn(params, micro, normalizer)
        return jax.tree.map(jnp.add, grads, micro_grads), add_metrics(sums, micro_sums)

    zeros = jax.jit(
        lambda params: (jax.tree.map(jnp.zeros_like, params), _zero_sums()),
        out_shardings=(param_shardings, replicated),
    )
    apply = jax.jit(
        functools.partial(_apply, optimizer),
        in_shardings=(state_shardings, param_shardings, replicated, None),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

    return PackedTrainStep(zeros, accumulate, apply)


@dataclasses.dataclass(frozen=True)
class PackedTrainStep:
    """One packed optimizer step from three jitted pieces (exposed so that scripts/memory_plan.py
    can compile each): `zeros(params)`, `accumulate(params, grads, sums, micro, normalizer)` per
    micro-batch (grads and sums donated), `apply(state, grads, sums, votes)` (state donated)."""

    zeros: Callable
    accumulate: Callable
    apply: Callable

    def __call__(self, state: Any, batch: dict[str, Any], votes: jax.Array):
        grads, sums = self.zeros(state[0])
        normalizer = jnp.float32(batch["normalizer"])
        for micro in batch["micro_batches"]:
            grads, sums = self.accumulate(state[0], grads, sums, micro, normalizer)
        return self.apply(state, grads, sums, votes)


def make_eval_step(
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    param_shardings: Any,
    obj: Objective,
    packed: bool = False,
    shared_prefix: bool = True,
    kwise: bool = False,
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """`params, micro-batch -> metric sums` plus reward sums for the export's statistics (padded:
    a batch `[1, 2m, T]`; packed: one micro-batch, prompts shared when `shared_prefix`)."""

    def step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        micro = batch if packed else jax.tree.map(lambda x: x[0], batch)
        with activation_sharding(mesh):
            chosen, rejected, weight, sums = _rewards_and_sums(
                graphdef, params, micro, obj, shared_prefix
            )
        both_weight = jnp.concatenate([weight, weight])
        both = jnp.where(both_weight > 0, jnp.concatenate([chosen, rejected]), 0.0)
        sums["reward_sum"] = jnp.sum(both_weight * both)
        sums["reward_sq_sum"] = jnp.sum(both_weight * both**2)
        return sums

    fields = (KWISE_FIELDS if kwise else PACKED_FIELDS) if packed else FIELDS
    return jax.jit(step, in_shardings=(param_shardings, batch_shardings(mesh, fields)))
