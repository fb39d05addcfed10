"""The sharded train step: PyTorch parity, sharding invariance, gradient accumulation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrm.data.packing import PackSpec, pack
from jaxrm.data.pairs import Pairs, Ragged
from jaxrm.hf import load_reward_model
from jaxrm.objective import Objective
from jaxrm.optimizer import make_optimizer, make_schedule
from jaxrm.sharding import make_mesh
from jaxrm.step import init_optimizer_state, make_train_step, stop_votes
from tests.hf_reference import save_tiny_classifier

LR = 3e-3
VOCAB = 96


def random_pairs(num_pairs: int, seed: int = 0, max_len: int = 14):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(num_pairs):
        prompt = list(rng.integers(1, VOCAB, rng.integers(1, 6)))
        chosen = prompt + list(rng.integers(1, VOCAB, rng.integers(1, max_len - 6)))
        rejected = prompt + list(rng.integers(1, VOCAB, rng.integers(1, max_len - 6)))
        pairs.append((chosen, rejected))
    return pairs


def contract_batch(pairs, k: int, width: int = 16):
    """The data loader's batch contract for one process: [k, 2m, T], chosen rows then rejected."""
    m = len(pairs) // k
    ids = np.zeros((k, 2 * m, width), np.int32)
    lengths = np.zeros((k, 2 * m), np.int32)
    for a in range(k):
        for j, (chosen, rejected) in enumerate(pairs[a * m : (a + 1) * m]):
            for row, seq in ((j, chosen), (m + j, rejected)):
                ids[a, row, : len(seq)] = seq
                lengths[a, row] = len(seq)
    return {
        "input_ids": ids,
        "attention_mask": (np.arange(width) < lengths[..., None]).astype(np.int32),
        "lengths": lengths,
        "margin": np.zeros((k, m), np.float32),
        "weight": np.ones((k, m), np.float32),
    }


def packed_step(pairs, devices: int, rows: int = 1):
    """The packed layout of one optimizer step (prompts shared), as the loader builds it."""
    data = Pairs(
        Ragged.from_lists([c for c, _ in pairs]),
        Ragged.from_lists([r for _, r in pairs]),
        np.zeros(len(pairs), np.float32),
        np.zeros(len(pairs), np.int32),
        0,
    )
    spec = PackSpec(length=64, rows=rows, devices=devices, slots=len(pairs))
    return {"micro_batches": pack(data, np.arange(len(pairs)), spec), "normalizer": len(pairs)}


def jax_losses(
    model_dir,
    mesh,
    steps_pairs,
    k: int = 1,
    total_steps: int | None = None,
    packed: bool = False,
):
    """Per-step losses (before each update) of the jaxrm train step (padded or packed)."""
    total_steps = total_steps or len(steps_pairs)
    model, _, _ = load_reward_model(str(model_dir), mesh, attention="flash" if packed else "xla")
    schedule = make_schedule(LR, total_steps, "linear")
    optimizer = make_optimizer(schedule)
    graphdef, params = nnx.split(model)
    opt_state = init_optimizer_state(optimizer, params, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    step = make_train_step(graphdef, optimizer, mesh, shardings, Objective(1), packed=packed)
    state, losses = (params, opt_state), []
    from jaxrm.data import to_global
    from jaxrm.sharding import data_parallel_size

    for pairs in steps_pairs:
        host = packed_step(pairs, data_parallel_size(mesh)) if packed else contract_batch(pairs, k)
        batch = to_global(host, mesh)
        state, sums = step(state, batch, stop_votes(mesh, False))
        losses.append(float(sums["loss_sum"] / sums["count"]))
    return np.array(losses), state[0]


def torch_losses(model_dir, steps_pairs):
    """open-instruct's recipe in plain PyTorch: one forward on chosen+rejected, -logsigmoid loss,
    clip 1.0, AdamW(eps=1e-5, weight_decay=0.01), linear decay to 0 stepped per update."""
    import torch
    from transformers import AutoModelForSequenceClassification, get_scheduler

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-5, weight_decay=0.01
    )
    scheduler = get_scheduler("linear", optimizer, 0, len(steps_pairs))
    losses = []
    for pairs in steps_pairs:
        batch = contract_batch(pairs, 1)
        ids = torch.as_tensor(batch["input_ids"][0], dtype=torch.long)
        mask = torch.as_tensor(batch["attention_mask"][0], dtype=torch.long)
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        chosen, rejected = rewards.chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return np.array(losses)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    save_tiny_classifier(path, "gqa", seed=3)
    return path


def single_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.mark.parametrize("packed", [False, True])
def test_training_matches_pytorch(model_dir, packed):
    steps = [random_pairs(8, seed=s) for s in range(12)]
    ours, _ = jax_losses(model_dir, single_mesh(), steps, packed=packed)
    reference = torch_losses(model_dir, steps)
    assert reference[-1] < reference[0] - 0.05  # it really trains
    np.testing.assert_allclose(ours, reference, rtol=1e-4)


@pytest.mark.parametrize(
    "mesh_shape, packed", [((1, 8, 1), False), ((1, 4, 2), False), ((1, 4, 2), True)]
)
def test_sharded_training_follows_single_device(model_dir, mesh_shape, packed):
    steps = [random_pairs(8, seed=100 + s) for s in range(6)]
    single, single_params = jax_losses(model_dir, single_mesh(), steps, packed=packed)
    sharded, sharded_params = jax_losses(model_dir, make_mesh(*mesh_shape), steps, packed=packed)
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
    kernel = sharded_params["model"]["layers"]["mlp"]["up_kernel"].value
    assert kernel.addressable_shards[0].data.size < kernel.size
    np.testing.assert_allclose(
        np.asarray(kernel),
        np.asarray(single_params["model"]["layers"]["mlp"]["up_kernel"].value),
        atol=1e-5,
    )


def test_accumulation_equals_one_big_batch(model_dir):
    steps = [random_pairs(8, seed=200 + s) for s in range(4)]
    whole, whole_params = jax_losses(model_dir, single_mesh(), steps, k=1)
    accumulated, acc_params = jax_losses(model_dir, single_mesh(), steps, k=4)
    np.testing.assert_allclose(accumulated, whole, rtol=1e-5)
    for path, leaf in nnx.to_flat_state(whole_params):
        other = dict(nnx.to_flat_state(acc_params))[path]
        np.testing.assert_allclose(np.asarray(other.value), np.asarray(leaf.value), atol=1e-6)


def test_a_poisoned_step_is_skipped_and_leaves_no_trace(model_dir):
    """An infinite margin poisons step 2's loss: the step is not applied (params and optimizer
    state, its count included, unchanged), reported as skipped with zero sums, and the run ends
    with exactly the weights of a run that never saw that batch."""
    mesh = single_mesh()
    steps = [random_pairs(8, seed=300 + s) for s in range(5)]
    poisoned_at = 2

    def run(batches_and_margins):
        model, _, _ = load_reward_model(str(model_dir), mesh)
        optimizer = make_optimizer(make_schedule(LR, 5, "linear"))
        graphdef, params = nnx.split(model)
        opt_state = init_optimizer_state(optimizer, params, mesh)
        shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
        step = make_train_step(graphdef, optimizer, mesh, shardings, Objective(1, use_margin=True))
        state, outputs = (params, opt_state), []
        from jaxrm.data import to_global

        for pairs, margin in batches_and_margins:
            batch = contract_batch(pairs, 1)
            batch["margin"][0, 0] = margin
            state, out = step(state, to_global(batch, mesh), stop_votes(mesh, False))
            outputs.append(jax.device_get(out))
        return state, outputs

    poisoned_state, outputs = run(
        [(pairs, np.inf if i == poisoned_at else 0.0) for i, pairs in enumerate(steps)]
    )
    clean_state, clean_outputs = run(
        [(pairs, 0.0) for i, pairs in enumerate(steps) if i != poisoned_at]
    )
    assert [int(o["skipped"]) for o in outputs] == [0, 0, 1, 0, 0]
    assert outputs[poisoned_at]["loss_sum"] == 0.0 and outputs[poisoned_at]["count"] == 0.0
    assert [int(o["skipped"]) for o in clean_outputs] == [0, 0, 0, 0]
    for got, want in zip(
        jax.tree.leaves(poisoned_state), jax.tree.leaves(clean_state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_stop_votes_of_any_device_reach_every_output(model_dir):
    mesh = make_mesh(1, 8, 1)
    model, _, _ = load_reward_model(str(model_dir), mesh)
    optimizer = make_optimizer(make_schedule(LR, 2, "linear"))
    graphdef, params = nnx.split(model)
    opt_state = init_optimizer_state(optimizer, params, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    step = make_train_step(graphdef, optimizer, mesh, shardings, Objective(1))
    from jaxrm.data import to_global

    batch = to_global(contract_batch(random_pairs(8), 1), mesh)
    state, out = step((params, opt_state), batch, stop_votes(mesh, False))
    assert int(out["stop"]) == 0
    _, out = step(state, batch, stop_votes(mesh, True))
    assert int(out["stop"]) == 1


@pytest.mark.parametrize("guard", ["cond", "select"])
def test_both_guard_forms_apply_a_finite_step_and_keep_out_a_non_finite_one(guard):
    """`_apply`'s two forms of the divergence guard (one per backend, `guard_form`) give the
    same update, bit for bit, and leave the state untouched on a non-finite loss or gradient."""
    import jax.numpy as jnp
    import optax

    from jaxrm.step import _apply

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-5))
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    state = (params, optimizer.init(params))
    grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.array([1.0, -2.0, 3.0])}
    sums = {"loss_sum": jnp.float32(1.0)}
    votes = jnp.zeros(1, jnp.int32)
    apply = jax.jit(_apply, static_argnums=(0, 5))
    new, out = apply(optimizer, state, grads, sums, votes, guard)
    expected, _ = apply(optimizer, state, grads, sums, votes, "cond")
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(out["skipped"]) == 0 and not np.allclose(new[0]["w"], params["w"])
    for bad_sums, bad_grads in (
        ({"loss_sum": jnp.float32(jnp.nan)}, grads),
        (sums, {**grads, "b": jnp.array([1.0, jnp.inf, 0.0])}),
    ):
        kept, out = apply(optimizer, state, bad_grads, bad_sums, votes, guard)
        for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(out["skipped"]) == 1 and float(out["loss_sum"]) == 0.0
