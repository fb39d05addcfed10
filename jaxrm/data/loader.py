"""Batches for the trainer: grain datasets of host-local numpy steps in the batch contract
(jaxrm/data/batch.py).

T is the smallest length bucket that fits the longest row of the whole *global* step (all k
micro-batches on all processes), so every process pads to the same T and the number of compiled
shapes is bounded by the bucket count.

Order: every host shuffles the full dataset the same way (grain's index shuffle, seed + epoch),
cuts it into global steps of k x G pairs, drops the incomplete last step of each epoch, and hands
process p the contiguous slice [p*m, (p+1)*m) of each global micro-batch, so all processes get the
same number of steps.

The train iterator's `get_state()` is a small JSON-serializable dict (`{"next_index": step}`);
`set_state()` resumes at exactly the next step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grain
import jax
import numpy as np

from jaxrm.data import packing
from jaxrm.data.batch import local_part
from jaxrm.data.group_packing import KwiseSpec, pack_groups, slots_for
from jaxrm.data.groups import Groups
from jaxrm.data.packing import PackSpec
from jaxrm.data.pairs import Pairs
from jaxrm.errors import UserError


def length_buckets(max_token_length: int, min_length: int = 64) -> list[int]:
    """Padded lengths: min_length, doubling, capped by (and always ending at) max_token_length."""
    buckets, b = [], min_length
    while b < max_token_length:
        buckets.append(b)
        b *= 2
    return [*buckets, max_token_length]


def steps_per_epoch(
    num_pairs: int, global_pairs_per_micro_batch: int, grad_accum_steps: int
) -> int:
    """Optimizer steps in one epoch (the incomplete last global step is dropped)."""
    return num_pairs // (global_pairs_per_micro_batch * grad_accum_steps)


def train_dataset(
    pairs: Pairs | Groups,
    *,
    global_pairs_per_micro_batch: int,
    grad_accum_steps: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    buckets: Sequence[int] | None = None,
    num_epochs: int | None = None,
    pack: PackSpec | None = None,
    kwise: KwiseSpec | None = None,
) -> grain.MapDataset:
    """One element per optimizer step (the batch contract: padded, or packed with `pack`);
    infinite when num_epochs is None. K-wise `Groups` (packed only, with `kwise`) count groups
    where pairs count pairs."""
    process_index, process_count = _process(process_index, process_count)
    if isinstance(pairs, Groups):
        return _group_steps(
            pairs,
            global_pairs_per_micro_batch * grad_accum_steps,
            seed,
            process_index,
            process_count,
            num_epochs,
            pack,
            kwise,
        )
    m = _local_pairs(global_pairs_per_micro_batch, process_count)
    per_step = global_pairs_per_micro_batch * grad_accum_steps
    steps, step_ids = _shuffled_steps(len(pairs), per_step, seed, "pairs")
    collate = _Collate(pairs, buckets)

    def make_step(index: int, _: int) -> dict[str, np.ndarray]:
        ids = step_ids(index)
        tokens = int(pairs.chosen.lengths()[ids].sum() + pairs.rejected.lengths()[ids].sum())
        if pack is not None:
            micro = packing.pack(pairs, ids, pack)
            local = [local_part(x, process_index, process_count) for x in micro]
            return {"micro_batches": local, "normalizer": per_step, "tokens": tokens}
        ids = ids.reshape(grad_accum_steps, global_pairs_per_micro_batch)
        local = ids[:, process_index * m : (process_index + 1) * m]
        batch = collate(local, np.ones(local.shape, np.float32), collate.bucket(ids))
        return {**batch, "tokens": tokens}

    return grain.MapDataset.range(steps).repeat(num_epochs).map_with_index(make_step)


def _shuffled_steps(
    n: int, per_step: int, seed: int, unit: str
) -> tuple[int, Callable[[int], np.ndarray]]:
    """(steps per epoch, the item ids of step `index` counted across epochs): every epoch the
    `n` items shuffled by grain (seed + epoch) and cut into whole steps of `per_step`."""
    steps = n // per_step
    if not steps:
        raise UserError(
            f"{n} training {unit} are fewer than one optimizer step of {per_step} "
            f"({unit} per micro-batch x gradient accumulation steps)"
        )
    order = grain.MapDataset.range(n).shuffle(seed=seed)

    def step_ids(index: int) -> np.ndarray:
        epoch, step = divmod(index, steps)
        start = epoch * n + step * per_step
        return np.array([order[i] for i in range(start, start + per_step)], dtype=np.int64)

    return steps, step_ids


def _group_steps(
    groups: Groups,
    per_step: int,
    seed: int,
    process_index: int,
    process_count: int,
    num_epochs: int | None,
    pack: PackSpec | None,
    kwise: KwiseSpec | None,
) -> grain.MapDataset:
    """`train_dataset` of K-wise groups: `per_step` groups per optimizer step, shuffled and cut
    like pairs; slots fixed for the run (`slots_for`), so every micro-batch has one shape."""
    if pack is None or kwise is None:
        raise ValueError("K-wise groups train in packed batches with a KwiseSpec")
    steps, step_ids = _shuffled_steps(len(groups), per_step, seed, "prompts")
    slots = slots_for(groups, per_step)
    lengths = groups.responses.lengths()

    def make_step(index: int, _: int) -> dict[str, np.ndarray]:
        ids = step_ids(index)
        micro, normalizer = pack_groups(groups, ids, pack, kwise, slots)
        tokens = int(sum(lengths[groups.offsets[g] : groups.offsets[g + 1]].sum() for g in ids))
        local = [local_part(x, process_index, process_count) for x in micro]
        return {"micro_batches": local, "normalizer": normalizer, "tokens": tokens}

    return grain.MapDataset.range(steps).repeat(num_epochs).map_with_index(make_step)


def train_iterator(dataset: grain.MapDataset, prefetch: int = 4) -> grain.DatasetIterator:
    """A `train_dataset` as a checkpointable iterator, prefetched by one background thread."""
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))


def eval_batches(
    pairs: Pairs | Groups,
    *,
    global_pairs_per_batch: int,
    process_index: int | None = None,
    process_count: int | None = None,
    buckets: Sequence[int] | None = None,
    pack: PackSpec | None = None,
    kwise: KwiseSpec | None = None,
) -> grain.MapDataset:
    """One pass over all pairs in order (k = 1); the last global batch is completed with filler
    pairs of weight 0, so every real pair counts exactly once. With `pack`: all pairs (or K-wise
    groups, with `kwise`) packed at once, one packed micro-batch per element."""
    process_index, process_count = _process(process_index, process_count)
    if isinstance(pairs, Groups):
        if pack is None or kwise is None:
            raise ValueError("K-wise groups are evaluated in packed batches with a KwiseSpec")
        micro, _ = pack_groups(pairs, np.arange(len(pairs)), pack, kwise)
        return grain.MapDataset.source(micro).map(
            lambda x: local_part(x, process_index, process_count)
        )
    if pack is not None:
        micro = packing.pack(pairs, np.arange(len(pairs)), pack)
        return grain.MapDataset.source(micro).map(
            lambda x: local_part(x, process_index, process_count)
        )
    m = _local_pairs(global_pairs_per_batch, process_count)
    n, g = len(pairs), global_pairs_per_batch
    filler = int(np.argmin(pairs.max_lengths())) if n else 0
    collate = _Collate(pairs, buckets)

    def make_batch(b: int) -> dict[str, np.ndarray]:
        positions = np.arange(b * g, (b + 1) * g)[None, :]
        ids = np.where(positions < n, positions, filler)
        local = slice(process_index * m, (process_index + 1) * m)
        weight = (positions[:, local] < n).astype(np.float32)
        return collate(ids[:, local], weight, collate.bucket(ids))

    return grain.MapDataset.range(-(-n // g)).map(make_batch)


class _Collate:
    """Pads the pairs of index array [k, m] into the batch contract at padded length T."""

    def __init__(self, pairs: Pairs, buckets: Sequence[int] | None):
        self.pairs = pairs
        self.longest = pairs.max_lengths()
        self.buckets = sorted(buckets) if buckets else length_buckets(int(self.longest.max()))

    def bucket(self, ids: np.ndarray) -> int:
        longest = int(self.longest[ids].max())
        for b in self.buckets:
            if b >= longest:
                return b
        raise UserError(f"a pair of {longest} tokens exceeds the largest length bucket {b}")

    def __call__(self, ids: np.ndarray, weight: np.ndarray, t: int) -> dict[str, np.ndarray]:
        k, m = ids.shape
        p = self.pairs
        input_ids = np.full((k, 2 * m, t), p.pad_token_id, dtype=np.int32)
        lengths = np.zeros((k, 2 * m), dtype=np.int32)
        for a in range(k):
            for j in range(m):
                for row, seq in ((j, p.chosen[ids[a, j]]), (m + j, p.rejected[ids[a, j]])):
                    input_ids[a, row, : len(seq)] = seq
                    lengths[a, row] = len(seq)
        return {
            "input_ids": input_ids,
            "attention_mask": (np.arange(t) < lengths[..., None]).astype(np.int32),
            "lengths": lengths,
            "margin": p.margin[ids].astype(np.float32),
            "weight": weight,
        }


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    return index, count


def _local_pairs(global_pairs: int, process_count: int) -> int:
    if global_pairs <= 0 or global_pairs % process_count:
        raise UserError(
            f"{global_pairs} pairs per global batch do not split evenly over "
            f"{process_count} processes"
        )
    return global_pairs // process_count
