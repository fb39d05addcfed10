"""The batch contracts between the data loader and the train and eval steps, defined once.

Two layouts. **Padded** (the reference; `FIELDS`): a batch is a dict of host-local numpy arrays
per optimizer step (k = micro-batches per step, m = pairs per micro-batch on this process = global
pairs per micro-batch / process count):

    input_ids       int32   [k, 2m, T]  per micro-batch: m chosen rows, then the m matching
                                        rejected rows; right-padded with the pad id
    attention_mask  int32   [k, 2m, T]  1 on real tokens (a prefix of each row), 0 on padding
    lengths         int32   [k, 2m]     real tokens per row
    margin          float32 [k, m]      0.0 when the dataset has no margin column
    weight          float32 [k, m]      1.0 for real pairs, 0.0 for filler pairs (eval only)

A train step's dict also carries `tokens`, the step's non-pad tokens (chosen + rejected of every
pair, on all processes), for throughput logs; it stays on the host.

**Packed** (`PACKED_FIELDS`, jaxrm/data/packing.py): an optimizer step is
`{"micro_batches": [micro, ...], "normalizer": P, "tokens": N}` with a varying number of
micro-batches of one fixed shape (G = rows per micro-batch, L = pack length, D = data-parallel
devices, S = pair slots per device) and P real pairs in all (the loss sum is divided by P):

    input_ids       int32   [G, L]      tokens of whole pairs, 0 after the last group
    positions       int32   [G, L]      restart per group (per sequence when not shared)
    segment_ids     int32   [G, L]      one id per group (per sequence), 0 = padding
    branch_ids      int32   [G, L]      0 prefix, 1 chosen rest, 2 rejected rest (K-wise: 1..K)
    chosen_index    int32   [D, S]      a pair's chosen reward: flat index into its device's rows
    rejected_index  int32   [D, S]      ... and its rejected reward
    margin          float32 [D, S]
    weight          float32 [D, S]      1.0 for a pair, 0.0 for an empty slot

K-wise steps (`KWISE_FIELDS`) add a `loss_weight` per pair slot and group slots
`group_index`, `group_score`, `group_mask` [D, groups, responses]; their `normalizer` is the
step's pairs or prompts (see jaxrm/data/group_packing.py).

Dimension names: `micro` (the k micro-batches, scanned by the train step), `rows`, `pairs` and
`devices` (split over the data-parallel mesh axes), `length` (T or L), `slots`. After `to_global`,
a split dimension of a global array holds the processes' blocks in process order: `[chosen_0,
rejected_0, chosen_1, rejected_1, ...]` for padded `input_ids` (one block per process),
`[pairs_0, pairs_1, ...]` for `weight`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrm.sharding import BATCH_AXES

DATA_PARALLEL_DIMS = ("rows", "pairs", "devices")


@dataclass(frozen=True)
class Field:
    dtype: type
    dims: tuple[str, ...]


FIELDS: dict[str, Field] = {
    "input_ids": Field(np.int32, ("micro", "rows", "length")),
    "attention_mask": Field(np.int32, ("micro", "rows", "length")),
    "lengths": Field(np.int32, ("micro", "rows")),
    "margin": Field(np.float32, ("micro", "pairs")),
    "weight": Field(np.float32, ("micro", "pairs")),
}
PACKED_FIELDS: dict[str, Field] = {
    "input_ids": Field(np.int32, ("rows", "length")),
    "positions": Field(np.int32, ("rows", "length")),
    "segment_ids": Field(np.int32, ("rows", "length")),
    "branch_ids": Field(np.int32, ("rows", "length")),
    "chosen_index": Field(np.int32, ("devices", "slots")),
    "rejected_index": Field(np.int32, ("devices", "slots")),
    "margin": Field(np.float32, ("devices", "slots")),
    "weight": Field(np.float32, ("devices", "slots")),
}

# K-wise groups (jaxrm/data/group_packing.py): the pair slots carry a loss weight, and group slots
# [D, groups, responses] say where each response of a whole group is, and its score
KWISE_FIELDS: dict[str, Field] = {
    **PACKED_FIELDS,
    "loss_weight": Field(np.float32, ("devices", "slots")),
    "group_index": Field(np.int32, ("devices", "groups", "responses")),
    "group_score": Field(np.float32, ("devices", "groups", "responses")),
    "group_mask": Field(np.float32, ("devices", "groups", "responses")),
}


def packed_fields(micro: dict[str, Any]) -> dict[str, Field]:
    """The fields of a packed micro-batch: K-wise when it has group slots."""
    return KWISE_FIELDS if "group_index" in micro else PACKED_FIELDS


def field_shapes(fields: dict[str, Field], sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every field's global shape, given the size of each of its dimension names."""
    return {key: tuple(sizes[d] for d in field.dims) for key, field in fields.items()}


def field_spec(field: Field) -> PartitionSpec:
    """The field's PartitionSpec: data-parallel dims over BATCH_AXES (trailing Nones dropped)."""
    spec = [BATCH_AXES if d in DATA_PARALLEL_DIMS else None for d in field.dims]
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def batch_shardings(mesh: Mesh, fields: dict[str, Field] = FIELDS) -> dict[str, NamedSharding]:
    """The sharding of every batch array: its rows / pairs split over ('data', 'fsdp')."""
    return {key: NamedSharding(mesh, field_spec(field)) for key, field in fields.items()}


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array] | dict[str, Any]:
    """Host-local arrays -> global arrays in `batch_shardings` (every process passes its part);
    a packed step's micro-batches one by one."""
    if "micro_batches" in batch:
        micro = [_global(m, mesh, packed_fields(m)) for m in batch["micro_batches"]]
        return {"micro_batches": micro, "normalizer": batch["normalizer"]}
    return _global(batch, mesh, packed_fields(batch) if "segment_ids" in batch else FIELDS)


def _global(batch: dict[str, np.ndarray], mesh: Mesh, fields: dict[str, Field]):
    """The contract's arrays as global arrays (other keys, e.g. `tokens`, stay on the host)."""
    shardings = batch_shardings(mesh, fields)
    return {
        key: jax.make_array_from_process_local_data(shardings[key], value)
        for key, value in batch.items()
        if key in shardings
    }


def local_part(micro: dict[str, np.ndarray], process: int, processes: int) -> dict[str, np.ndarray]:
    """This process's block of a global packed micro-batch (rows and device entries)."""
    return {key: np.split(value, processes)[process] for key, value in micro.items()}
