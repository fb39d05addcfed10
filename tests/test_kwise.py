"""K-wise groups: packing, objective and train step against the same data cut into pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm.data import to_global
from jaxrm.data.group_packing import (
    GroupSlots,
    KwiseSpec,
    group_lengths,
    pack_groups,
    split_group,
)
from jaxrm.data.groups import Groups
from jaxrm.data.packing import PackSpec, pack
from jaxrm.hf import load_reward_model
from jaxrm.objective import (
    BRADLEY_TERRY,
    PLACKETT_LUCE,
    Objective,
    finalize_metrics,
    group_metrics,
    plackett_luce_terms,
)
from jaxrm.optimizer import make_optimizer, make_schedule
from jaxrm.sharding import data_parallel_size, make_mesh
from jaxrm.step import _rewards_and_sums, init_optimizer_state, make_train_step, stop_votes
from tests.hf_reference import save_tiny_classifier

VOCAB = 96
LENGTH = 128


def random_groups(n: int, seed: int = 0, sizes=(2, 3, 4, 5)) -> Groups:
    """Groups with a shared prompt, K responses and scores with ties (never all equal)."""
    rng = np.random.default_rng(seed)
    groups, scores = [], []
    for _ in range(n):
        prompt = list(rng.integers(1, VOCAB, rng.integers(1, 8)))
        k = int(rng.choice(sizes))
        groups.append(
            [prompt + list(rng.integers(1, VOCAB, rng.integers(1, 12))) for _ in range(k)]
        )
        s = list(rng.integers(0, 3, k).astype(float))
        if len(set(s)) < 2:
            s[0] = 3.0
        scores.append(s)
    return Groups.from_lists(groups, scores)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_classifier(path, "gqa", seed=5)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    loaded, _, _ = load_reward_model(str(path), mesh, attention="xla")
    return mesh, loaded


def _loss_and_grads(model, micro_batches, normalizer, obj, shared_prefix=True):
    """Σ over micro-batches of (loss sum / normalizer) and its gradient, plus the metric sums."""
    mesh, m = model
    graphdef, params = nnx.split(m)

    def loss(params, micro):
        _, _, _, sums = _rewards_and_sums(graphdef, params, micro, obj, shared_prefix)
        return sums["loss_sum"] / normalizer, sums

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    total, grads, sums = 0.0, None, None
    for micro in micro_batches:
        (value, s), g = grad(params, to_global(micro, mesh))
        total += float(value)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
    return total, grads, {k: float(v) for k, v in sums.items()}


def _close(a, b, rtol=2e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_split_group_covers_every_pair_once_within_the_row():
    rng = np.random.default_rng(1)
    sequences = [np.r_[[7] * 10, rng.integers(1, 50, n)] for n in (30, 25, 40, 20, 35)]
    pairs = [(a, b) for a in range(5) for b in range(a + 1, 5)]
    parts = split_group(sequences, pairs, 100, share_prefix=True)
    assert len(parts) > 1
    covered = [p for _, inside in parts for p in inside]
    assert sorted(covered) == sorted(pairs)
    for members, _ in parts:
        tokens = 10 + sum(len(sequences[i]) - 10 for i in members)
        assert tokens <= 100


@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_group_takes_the_tokens_its_layout_counts(share_prefix):
    """`layout_tokens` (what packing plans with) is what the rows hold, and a group of exactly
    a row's length fills one row unsplit."""
    groups = random_groups(20, seed=9, sizes=(3, 4, 5))
    spec = PackSpec(LENGTH, 1, 1, 0, share_prefix)
    micro, _ = pack_groups(groups, np.arange(len(groups)), spec, KwiseSpec())
    placed = sum(int((m["segment_ids"] > 0).sum()) for m in micro)
    planned = group_lengths(groups, np.arange(len(groups)), share_prefix)
    assert placed == planned.sum()
    fitted = PackSpec(int(planned.max()), 1, 1, 0, share_prefix)
    widest = np.array([int(np.argmax(planned))])
    (one,) = pack_groups(groups, widest, fitted, KwiseSpec())[0]
    assert (one["segment_ids"] > 0).all() and one["group_mask"].sum() == groups.sizes()[widest[0]]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_groups_of_two_pack_exactly_like_pairs(share_prefix):
    groups = random_groups(30, seed=2, sizes=(2,))
    pairs, _ = groups.to_pairs()
    spec = PackSpec(LENGTH, 2, 2, len(pairs), share_prefix)
    as_pairs = pack(pairs, np.arange(len(pairs)), spec)
    from_groups = Groups.from_pairs(pairs)
    as_groups, normalizer = pack_groups(
        from_groups, np.arange(len(pairs)), spec, KwiseSpec(), GroupSlots(len(pairs), 30, 2)
    )
    assert normalizer == len(pairs) and len(as_pairs) == len(as_groups)
    for a, b in zip(as_pairs, as_groups, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_kwise_loss_and_gradients_equal_the_pairs_cut_from_the_groups(model, share_prefix):
    """Per-pair averaging: one pass over each group's responses (sharing the prompt, or each
    response its own segment) gives the loss, gradients and metrics of the pair path on every
    implied pair (float32)."""
    groups = random_groups(12, seed=3)
    pairs, _ = groups.to_pairs()
    spec = PackSpec(LENGTH, 2, 1, 0, share_prefix)
    kwise, norm_k = pack_groups(groups, np.arange(len(groups)), spec, KwiseSpec())
    as_pairs = pack(pairs, np.arange(len(pairs)), spec)
    assert norm_k == len(pairs) == int(groups.pair_counts().sum())
    obj = Objective(1)
    loss_k, grads_k, sums_k = _loss_and_grads(model, kwise, norm_k, obj, share_prefix)
    loss_p, grads_p, sums_p = _loss_and_grads(model, as_pairs, len(pairs), obj, share_prefix)
    np.testing.assert_allclose(loss_k, loss_p, rtol=1e-5)
    _close(grads_k, grads_p)
    for key in ("correct_sum", "chosen_sum", "rejected_sum", "margin_sum", "count"):
        np.testing.assert_allclose(sums_k[key], sums_p[key], rtol=1e-5, atol=1e-5, err_msg=key)
    tokens_pairs = sum(int((m["segment_ids"] > 0).sum()) for m in as_pairs)
    tokens_kwise = sum(int((m["segment_ids"] > 0).sum()) for m in kwise)
    assert tokens_kwise < tokens_pairs


def test_kwise_margin_and_per_prompt_average(model):
    """Margin = scale x score difference; per-prompt averaging weighs each pair 1 / its group's
    pairs and divides by the number of groups: equal to the pair path with those weights."""
    groups = random_groups(10, seed=4)
    pairs, owner = groups.to_pairs(margin_scale=0.5)
    counts = groups.pair_counts()[owner]
    spec = PackSpec(LENGTH, 2, 1, 0)
    kwise_spec = KwiseSpec(average="prompt", margin_scale=0.5)
    kwise, normalizer = pack_groups(groups, np.arange(len(groups)), spec, kwise_spec)
    assert normalizer == len(groups)
    obj = Objective(1, use_margin=True)
    loss_k, grads_k, _ = _loss_and_grads(model, kwise, normalizer, obj)

    one = PackSpec(LENGTH, 1, 1, 1)
    alone = []  # the pair path, one pair per micro-batch, its slot weighted 1 / its group's pairs
    for i in range(len(pairs)):
        (micro,) = pack(pairs, np.array([i]), one)
        micro["loss_weight"] = np.full((1, 1), 1.0 / counts[i], np.float32)
        micro["group_index"] = np.zeros((1, 1, 2), np.int32)
        micro["group_score"] = np.zeros((1, 1, 2), np.float32)
        micro["group_mask"] = np.zeros((1, 1, 2), np.float32)
        alone.append(micro)
    loss_p, grads_p, _ = _loss_and_grads(model, alone, len(groups), obj)
    np.testing.assert_allclose(loss_k, loss_p, rtol=1e-5)
    _close(grads_k, grads_p)


def _reference_pl(rewards: np.ndarray, scores: np.ndarray) -> float:
    """Plackett-Luce (Breslow ties) of one group, float64."""
    loss = 0.0
    for a in range(len(rewards)):
        if scores[a] == scores.min():
            continue
        risk = rewards[scores <= scores[a]]
        loss += np.log(np.exp(risk - risk.max()).sum()) + risk.max() - rewards[a]
    return loss


def test_plackett_luce_and_top1_equal_a_direct_reading():
    rng = np.random.default_rng(6)
    rewards = rng.normal(size=(5, 4)).astype(np.float32)
    scores = np.array(
        [[3, 2, 1, 0], [1, 1, 0, 0], [0, 2, 2, 1], [1, 0, 0, 0], [2, 1, 0, 0]], np.float32
    )
    mask = np.ones((5, 4), np.float32)
    mask[4, 3] = 0.0  # a group of three
    terms = np.asarray(plackett_luce_terms(rewards, scores, mask))
    for g in range(5):
        real = mask[g] > 0
        expected = _reference_pl(rewards[g][real].astype(np.float64), scores[g][real])
        np.testing.assert_allclose(terms[g], expected, rtol=1e-6, atol=1e-6)
    sums = group_metrics(rewards, scores, mask)
    top1 = 0
    for g in range(5):
        real = mask[g] > 0
        r, s = rewards[g][real], scores[g][real]
        top1 += r[s == s.max()].max() > r[s < s.max()].max()
    assert float(sums["group_count"]) == 5 and float(sums["top1_sum"]) == top1
    grads = jax.grad(lambda r: plackett_luce_terms(r, scores, mask).sum())(rewards)
    assert np.all(np.isfinite(np.asarray(grads))) and np.all(np.asarray(grads)[4, 3] == 0)


def test_plackett_luce_step_equals_rewards_scored_alone(model):
    """The packed Plackett-Luce loss and its gradient equal the loss of each response scored on
    its own (the padded reference forward) fed to a direct Plackett-Luce."""
    mesh, m = model
    groups = random_groups(6, seed=7, sizes=(3, 4))
    spec = PackSpec(LENGTH, 2, 1, 0)
    micro, normalizer = pack_groups(
        groups, np.arange(len(groups)), spec, KwiseSpec(objective=PLACKETT_LUCE)
    )
    assert normalizer == len(groups)
    loss_k, grads_k, sums = _loss_and_grads(
        model, micro, normalizer, Objective(1, ranking=PLACKETT_LUCE)
    )

    graphdef, params = nnx.split(m)
    width = max(groups.responses.lengths())
    ids = np.zeros((len(groups.responses), width), np.int32)
    mask = np.zeros_like(ids)
    for i in range(len(groups.responses)):
        seq = groups.responses[i]
        ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
    k = int(groups.sizes().max())
    index = np.zeros((len(groups), k), np.int32)
    valid = np.zeros((len(groups), k), np.float32)
    score = np.zeros((len(groups), k), np.float32)
    for g in range(len(groups)):
        members = list(groups.members(g))
        index[g, : len(members)], valid[g, : len(members)] = members, 1.0
        score[g, : len(members)] = groups.scores[members]

    def reference(params):
        rewards = nnx.merge(graphdef, params)(ids, mask)
        return plackett_luce_terms(rewards[index], score, valid).sum() / len(groups)

    loss_r, grads_r = jax.value_and_grad(reference)(params)
    np.testing.assert_allclose(loss_k, float(loss_r), rtol=1e-5)
    _close(grads_k, grads_r, rtol=1e-4, atol=1e-6)
    assert sums["group_count"] == len(groups)
    assert "rm/top1_accuracy" in finalize_metrics(sums)


def test_groups_of_two_train_exactly_like_pairs(model, tmp_path):
    """Two optimizer steps on groups of two (the K-wise step) leave the parameters bit-identical
    to the pair step on the same pairs."""
    mesh, m = model
    groups = random_groups(16, seed=8, sizes=(2,))
    pairs, _ = groups.to_pairs()
    spec = PackSpec(LENGTH, 1, 1, len(pairs))

    def train(kwise: bool):
        graphdef, params = nnx.split(m)
        params = jax.tree.map(jnp.copy, params)
        optimizer = make_optimizer(make_schedule(3e-3, 2, "linear"))
        opt_state = init_optimizer_state(optimizer, params, mesh)
        shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
        step = make_train_step(
            graphdef, optimizer, mesh, shardings, Objective(1), packed=True, kwise=kwise
        )
        state = (params, opt_state)
        for half in (np.arange(8), np.arange(8, 16)):
            if kwise:
                micro, normalizer = pack_groups(
                    Groups.from_pairs(pairs), half, spec, KwiseSpec(), GroupSlots(16, 16, 2)
                )
            else:
                micro, normalizer = pack(pairs, half, spec), len(half)
            batch = to_global({"micro_batches": micro, "normalizer": normalizer}, mesh)
            state, _ = step(state, batch, stop_votes(mesh, False))
        return state[0]

    for a, b in zip(jax.tree.leaves(train(False)), jax.tree.leaves(train(True)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("ranking", [BRADLEY_TERRY, PLACKETT_LUCE])
def test_sharded_kwise_step_follows_single_device(tmp_path, ranking):
    """Group slots split over the data-parallel devices like pair slots: on a (1, 4, 2) mesh of
    fake devices the loss, metrics and gradients equal one device's."""
    save_tiny_classifier(tmp_path, "gqa", seed=5)
    groups = random_groups(12, seed=10)
    results = []
    for mesh in (make_mesh(1, 1, 1, devices=jax.devices()[:1]), make_mesh(1, 4, 2)):
        loaded, _, _ = load_reward_model(str(tmp_path), mesh, attention="flash")
        spec = PackSpec(LENGTH, 1, data_parallel_size(mesh), 0)
        micro, normalizer = pack_groups(
            groups, np.arange(len(groups)), spec, KwiseSpec(objective=ranking)
        )
        results.append(
            _loss_and_grads((mesh, loaded), micro, normalizer, Objective(1, ranking=ranking))
        )
    (loss_1, grads_1, sums_1), (loss_n, grads_n, sums_n) = results
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
    for key in ("correct_sum", "count", "top1_sum", "group_count", "loss_count"):
        assert sums_n[key] == sums_1[key], key
    assert sums_1["group_count"] == len(groups)
    _close(grads_n, grads_1, rtol=1e-4, atol=1e-6)
