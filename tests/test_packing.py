"""Packed and prefix-shared batches: the layout's invariants, and the same rewards, loss and
gradients as right-padded rows (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm.data.packing import (
    PackSpec,
    first_fit_decreasing,
    pack,
    pack_sequences,
    shared_prefix_lengths,
)
from jaxrm.data.pairs import Pairs, Ragged
from jaxrm.hf import load_reward_model
from jaxrm.sharding import make_mesh
from tests.hf_reference import save_tiny_classifier

VOCAB = 96


def make_pairs(lists) -> Pairs:
    n = len(lists)
    return Pairs(
        Ragged.from_lists([c for c, _ in lists]),
        Ragged.from_lists([r for _, r in lists]),
        np.linspace(-0.5, 0.5, n).astype(np.float32),
        np.zeros(n, np.int32),
        0,
    )


def special_pairs(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random pairs plus the edge cases: the last token differs, nothing in common, chosen and
    rejected of different lengths, a pair that fills a whole 128-token row."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(9):
        prompt = list(rng.integers(1, VOCAB, rng.integers(0, 25)))
        pairs.append(
            (
                prompt + list(rng.integers(1, VOCAB, rng.integers(1, 30))),
                prompt + list(rng.integers(1, VOCAB, rng.integers(1, 30))),
            )
        )
    same = list(rng.integers(1, VOCAB, 17))
    pairs.append((same + [5], same + [6]))  # only the last token differs
    pairs.append(([7, 8, 9], [10, 11, 12, 13]))  # no common prefix
    prompt = list(rng.integers(1, VOCAB, 20))
    pairs.append(  # 20 + 60 + 48 = 128 tokens: one row exactly
        (prompt + list(rng.integers(1, VOCAB, 60)), prompt + list(rng.integers(1, VOCAB, 48)))
    )
    return pairs


def test_shared_prefix_is_the_common_start_capped_to_leave_each_rest_a_token():
    pairs = make_pairs([([1, 2, 3, 4], [1, 2, 3, 5]), ([1, 2], [1, 2, 3]), ([4], [5]), ([6], [6])])
    np.testing.assert_array_equal(shared_prefix_lengths(pairs), [3, 1, 0, 0])


@pytest.mark.parametrize("share", [True, False])
def test_layout_invariants(share):
    """Every pair once; each sequence is exactly its tokens at positions 0..n-1 within its
    segment (the shared prefix plus its own rest); rewards are read at its last token."""
    lists = special_pairs()
    pairs = make_pairs(lists)
    length = 128 if share else 256  # shared, the last pair fills a row exactly
    spec = PackSpec(length=length, rows=2, devices=2, slots=len(lists), share_prefix=share)
    micro = pack(pairs, np.arange(len(lists)), spec)
    seen = []
    for batch in micro:
        assert batch["input_ids"].shape == (4, length)
        assert batch["weight"].shape == (2, len(lists))
        for device, slot in zip(*np.nonzero(batch["weight"]), strict=True):
            pair = pair_of(batch, device, slot, pairs)
            seen.append(pair)
            rows = slice(2 * device, 2 * device + 2)
            fields = {k: batch[k][rows].reshape(-1) for k in ("input_ids", "positions")}
            segments = batch["segment_ids"][rows].reshape(-1)
            branches = batch["branch_ids"][rows].reshape(-1)
            for key, seq, branch in (
                ("chosen", lists[pair][0], 1),
                ("rejected", lists[pair][1], 2),
            ):
                end = batch[f"{key}_index"][device, slot]
                same_row = np.arange(len(segments)) // length == end // length
                own = same_row & (segments == segments[end]) & np.isin(branches, [0, branch])
                assert fields["input_ids"][own].tolist() == seq
                assert fields["positions"][own].tolist() == list(range(len(seq)))
                assert np.flatnonzero(own)[-1] == end
            assert share or not branches.any()
    assert sorted(seen) == list(range(len(lists)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    save_tiny_classifier(path, "gqa", seed=5)
    return path


def padded_loss_fn(graphdef, lists):
    rows = [c for c, _ in lists] + [r for _, r in lists]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1

    def loss(params):
        rewards = nnx.merge(graphdef, params)(ids, mask)
        chosen, rejected = jnp.split(rewards, 2)
        return jnp.mean(-jax.nn.log_sigmoid(chosen - rejected)), (chosen, rejected)

    return loss


def packed_loss_fn(graphdef, lists, spec):
    pairs = make_pairs(lists)
    micro = pack(pairs, np.arange(len(lists)), spec)

    def loss(params):
        model = nnx.merge(graphdef, params)
        total, chosen, rejected, order = 0.0, [], [], []
        for batch in micro:
            scores = model.token_scores(
                batch["input_ids"], batch["positions"], batch["segment_ids"], batch["branch_ids"]
            ).reshape(spec.devices, -1)
            c = jnp.take_along_axis(scores, batch["chosen_index"], 1).reshape(-1)
            r = jnp.take_along_axis(scores, batch["rejected_index"], 1).reshape(-1)
            w = batch["weight"].reshape(-1)
            total += jnp.sum(jnp.where(w > 0, -jax.nn.log_sigmoid(c - r), 0.0))
            keep = np.flatnonzero(w)
            chosen.append(c[keep])
            rejected.append(r[keep])
            slots = zip(*np.nonzero(batch["weight"]), strict=True)
            order += [pair_of(batch, d, s, pairs) for d, s in slots]
        inverse = np.argsort(order)
        chosen, rejected = jnp.concatenate(chosen)[inverse], jnp.concatenate(rejected)[inverse]
        return total / len(lists), (chosen, rejected)

    return loss


def pair_of(batch, device, slot, pairs) -> int:
    """Which pair a slot holds (its margin is unique in these tests)."""
    return int(np.flatnonzero(pairs.margin == batch["margin"][device, slot])[0])


@pytest.mark.parametrize("attention", ["flash", "xla"])
@pytest.mark.parametrize("share", [True, False])
def test_packed_rewards_loss_and_gradients_equal_padded_rows(model_dir, attention, share):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model, _, _ = load_reward_model(str(model_dir), mesh, attention=attention)
    graphdef, params = nnx.split(model)
    lists = special_pairs(seed=1)
    length = 128 if share else 256
    spec = PackSpec(length=length, rows=1, devices=1, slots=len(lists), share_prefix=share)
    (want, (c_want, r_want)), g_want = jax.value_and_grad(
        padded_loss_fn(graphdef, lists), has_aux=True
    )(params)
    (got, (c_got, r_got)), g_got = jax.value_and_grad(
        packed_loss_fn(graphdef, lists, spec), has_aux=True
    )(params)
    np.testing.assert_allclose(c_got, c_want, atol=1e-5)
    np.testing.assert_allclose(r_got, r_want, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_got), nnx.to_flat_state(g_want), strict=True):
        np.testing.assert_allclose(
            np.asarray(a.value), np.asarray(b.value), atol=2e-6, err_msg=path
        )


def test_sequences_for_scoring_are_read_at_their_last_token():
    lengths = np.array([5, 128, 1, 60, 70, 3])
    micro = pack_sequences(lengths, PackSpec(length=128, rows=1, devices=2, slots=0))
    seen = {}
    for batch in micro:
        for device, slot in zip(*np.nonzero(batch["weight"]), strict=True):
            index = batch["index"][device, slot]
            row, col = device + index // 128, index % 128
            seen[int(batch["order"][device, slot])] = int(batch["positions"][row, col]) + 1
    assert seen == {i: int(n) for i, n in enumerate(lengths)}


def naive_first_fit_decreasing(lengths, capacity):
    """The quadratic definition: longest first, each into the first bin with room, else a new."""
    bins, room = [], []
    for item in np.argsort(-lengths, kind="stable"):
        size = int(lengths[item])
        fits = [b for b, free in enumerate(room) if size <= free]
        if fits:
            bins[fits[0]].append(int(item))
            room[fits[0]] -= size
        else:
            bins.append([int(item)])
            room.append(capacity - size)
    return bins


@pytest.mark.parametrize("seed", range(6))
def test_first_fit_decreasing_equals_the_quadratic_definition(seed):
    """The same bins in the same order, items in the same order, ties (equal lengths) included,
    items of the whole capacity, of 0 tokens and (bins of their own) longer than it."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 600))
    capacity = int(rng.choice([8, 128, 1000]))
    lengths = rng.integers(0, capacity + 1, n)
    if seed % 2:  # many equal lengths
        lengths = rng.choice([1, capacity // 3, capacity // 2, capacity], n)
    if seed == 5:
        lengths[rng.integers(0, n, 3)] = capacity + 7
    got = first_fit_decreasing(lengths, capacity)
    assert got == naive_first_fit_decreasing(lengths, capacity)
    assert sorted(i for b in got for i in b) == list(range(n))


def test_first_fit_decreasing_of_nothing_and_of_one():
    assert first_fit_decreasing(np.zeros(0, np.int64), 128) == []
    assert first_fit_decreasing(np.array([5]), 128) == [[0]]
