"""Packed micro-batches of K-wise groups: each prompt once, each of its responses a branch.

A group of K responses is laid out like a pair, with K rests instead of two:

    shared (prefix sharing):  [prefix][rest 1][rest 2]...[rest K]   branch ids 0 | 1 | ... | K
    separate:                 [response 1][response 2]...           one segment per response

The prefix is the longest common prefix of the K token sequences (`packing.common_prefix_length`),
so on a group of two this is exactly the pair layout of `jaxrm.data.packing`, and each response sees
exactly the tokens and positions of its own full sequence.

The loss reads rewards through two kinds of slots per device and micro-batch:
- pair slots, as for pairs (`chosen_index`, `rejected_index`, `margin`, `weight`) plus a
  `loss_weight`: one slot per pair the group's scores imply (`Groups.implied_pairs`), the margin
  `margin_scale` x the score difference, the loss weight 1 (`average="pair"`) or one over the
  group's pairs (`average="prompt"`, so every prompt weighs the same);
- group slots (`group_index`, `group_score`, `group_mask`, [devices, groups, responses]): every
  response of a group, for Plackett-Luce and top-1 accuracy.

A group too long for a row is split into sub-groups that each repeat the prefix, chosen greedily so
that every implied pair lies in exactly one of them (a response may be computed more than once).
A split group has pair slots only: no group slot, so it has no top-1 accuracy, and Plackett-Luce
refuses it (`jaxrm.data.checks`: whole groups must fit a row).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxrm.data.groups import Groups
from jaxrm.data.packing import (
    PackSpec,
    _zero_rows,
    check_fits,
    common_prefix_length,
    first_fit_decreasing,
    place_tree,
)

BRADLEY_TERRY = "bradley_terry"
PLACKETT_LUCE = "plackett_luce"
OBJECTIVES = (BRADLEY_TERRY, PLACKETT_LUCE)
AVERAGES = ("pair", "prompt")


@dataclasses.dataclass(frozen=True)
class KwiseSpec:
    """How a K-wise group becomes loss terms (see the module docstring)."""

    objective: str = BRADLEY_TERRY
    average: str = "pair"  # BT: each pair weighs 1, or each prompt weighs 1
    margin_scale: float = 0.0  # margin = margin_scale x (score chosen - score rejected)


@dataclasses.dataclass(frozen=True)
class GroupSlots:
    """Slots per device and micro-batch (0: as many as the packing needs, for eval)."""

    pairs: int = 0
    groups: int = 0
    responses: int = 0


@dataclasses.dataclass(frozen=True)
class SubGroup:
    """Responses of one group laid out together, and the pairs whose loss they carry."""

    group: int  # index into the packed ids
    members: list[int]  # positions within the group, in response order
    pairs: list[tuple[int, int]]  # (chosen, rejected) positions within the group
    whole: bool  # all of the group's responses
    loss_weight: float  # of each of its pairs: 1, or 1 / the group's pairs (average="prompt")


def slots_for(groups: Groups, groups_per_step: int) -> GroupSlots:
    """Fixed slots for training steps of `groups_per_step` groups: enough if one device held all
    of them (the packing decides where groups go), so every micro-batch has the same shape."""
    most_pairs = int(groups.pair_counts().max()) if len(groups) else 1
    most_responses = int(groups.sizes().max()) if len(groups) else 2
    return GroupSlots(groups_per_step * most_pairs, groups_per_step, most_responses)


def layout_tokens(sequences: list[np.ndarray], share_prefix: bool) -> int:
    """Tokens `sequences` take as one group in a row: with a shared prefix, the prefix once and
    every sequence's rest."""
    total = sum(len(s) for s in sequences)
    if not share_prefix:
        return total
    return total - (len(sequences) - 1) * common_prefix_length(sequences)


def group_lengths(groups: Groups, ids: np.ndarray, share_prefix: bool) -> np.ndarray:
    """Tokens each group `ids` takes whole in a packed row."""
    return np.array([layout_tokens(groups.sequences(g), share_prefix) for g in ids], np.int64)


def pair_layout_lengths(groups: Groups, ids: np.ndarray, share_prefix: bool) -> np.ndarray:
    """Tokens each group `ids` would take cut into its implied pairs, each packed as a pair."""
    out = np.zeros(len(ids), np.int64)
    for n, g in enumerate(ids):
        sequences = groups.sequences(g)
        out[n] = sum(
            layout_tokens([sequences[a], sequences[b]], share_prefix)
            for a, b in groups.implied_pairs(g)
        )
    return out


def split_group(
    sequences: list[np.ndarray], pairs: list[tuple[int, int]], capacity: int, share_prefix: bool
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """The group whole if it fits `capacity` tokens, else sub-groups (members, pairs) covering
    each pair exactly once: each starts from the first uncovered pair and takes, in response order,
    every response that adds an uncovered pair and still fits."""
    everyone = list(range(len(sequences)))
    if layout_tokens(sequences, share_prefix) <= capacity:
        return [(everyone, pairs)]
    uncovered, out = list(pairs), []
    while uncovered:
        members = sorted(uncovered[0])
        for c in everyone:
            adds = any(c in p and (set(p) - {c}) <= set(members) for p in uncovered)
            trial = sorted([*members, c])
            if c not in members and adds:
                if layout_tokens([sequences[i] for i in trial], share_prefix) <= capacity:
                    members = trial
        inside = [p for p in uncovered if set(p) <= set(members)]
        uncovered = [p for p in uncovered if not set(p) <= set(members)]
        out.append((members, inside))
    return out


def pack_groups(
    groups: Groups,
    ids: np.ndarray,
    spec: PackSpec,
    kwise: KwiseSpec,
    slots: GroupSlots | None = None,
) -> tuple[list[dict[str, np.ndarray]], float]:
    """The global micro-batches holding groups `ids` (numpy, `KWISE_FIELDS` of
    jaxrm/data/batch.py), and the number their loss sum is divided by: their pairs
    (`average="pair"`) or their groups (`average="prompt"`, Plackett-Luce). Every process computes
    the same packing."""
    ids = np.asarray(ids, np.int64)
    subgroups, lengths = [], []
    normalizer = 0.0
    for item, g in enumerate(ids.tolist()):
        sequences = groups.sequences(g)
        pairs = groups.implied_pairs(g)
        per_pair = kwise.objective == BRADLEY_TERRY and kwise.average == "pair"
        normalizer += len(pairs) if per_pair else 1.0
        parts = split_group(sequences, pairs, spec.length, spec.share_prefix)
        if kwise.objective == PLACKETT_LUCE and len(parts) > 1:
            raise ValueError(f"group {g} does not fit one row: Plackett-Luce needs whole groups")
        weight = 1.0 if kwise.average == "pair" else 1.0 / len(pairs)
        for members, inside in parts:
            subgroups.append(SubGroup(item, members, inside, len(parts) == 1, weight))
            tokens = layout_tokens([sequences[i] for i in members], spec.share_prefix)
            lengths.append(tokens)
    lengths = np.asarray(lengths, np.int64)
    if len(lengths):
        check_fits(int(lengths.max()), spec)
    rows = first_fit_decreasing(lengths, spec.length)
    slots = slots or GroupSlots()
    if not (slots.pairs and slots.groups and slots.responses):
        slots = _needed_slots(groups, ids, subgroups, rows, spec, slots)
    count = max(1, math.ceil(len(rows) / spec.micro_rows))
    g = spec.micro_rows
    micro = [
        _micro_batch(groups, ids, subgroups, rows[m * g : (m + 1) * g], spec, kwise, slots)
        for m in range(count)
    ]
    return micro, normalizer


def _needed_slots(groups, ids, subgroups, rows, spec, slots) -> GroupSlots:
    """The slots this packing needs on its fullest device (for `slots` left 0)."""
    pairs, whole = [1], [1]
    for r in range(0, len(rows), spec.rows):
        members = [subgroups[i] for row in rows[r : r + spec.rows] for i in row]
        pairs.append(sum(len(s.pairs) for s in members))
        whole.append(sum(s.whole for s in members))
    sizes = groups.sizes()[ids] if len(ids) else np.array([2])
    return GroupSlots(
        slots.pairs or max(pairs), slots.groups or max(whole), slots.responses or int(sizes.max())
    )


def _micro_batch(groups, ids, subgroups, rows, spec, kwise, slots) -> dict[str, np.ndarray]:
    t, d = spec.length, spec.devices
    batch = _zero_rows(spec, "input_ids", "positions", "segment_ids", "branch_ids")
    batch.update(
        chosen_index=np.zeros((d, slots.pairs), np.int32),
        rejected_index=np.zeros((d, slots.pairs), np.int32),
        margin=np.zeros((d, slots.pairs), np.float32),
        weight=np.zeros((d, slots.pairs), np.float32),
        loss_weight=np.zeros((d, slots.pairs), np.float32),
        group_index=np.zeros((d, slots.groups, slots.responses), np.int32),
        group_score=np.zeros((d, slots.groups, slots.responses), np.float32),
        group_mask=np.zeros((d, slots.groups, slots.responses), np.float32),
    )
    used_pairs, used_groups = [0] * d, [0] * d
    for r, members in enumerate(rows):
        device, local_row = divmod(r, spec.rows)
        offset = local_row * t
        start, segment = 0, 0
        for item in members:
            sub = subgroups[item]
            g = int(ids[sub.group])
            sequences = groups.sequences(g)
            placed = [sequences[i] for i in sub.members]
            row = [batch[k][r] for k in ("input_ids", "positions", "segment_ids", "branch_ids")]
            if spec.share_prefix:
                segment += 1
                prefix = common_prefix_length(placed)
                last, start = place_tree(*row, start, segment, placed, prefix)
            else:
                last = []
                for sequence in placed:
                    segment += 1
                    ends, end = place_tree(*row, start, segment, [sequence], 0)
                    row[3][start:end] = 0  # separate sequences: no branches
                    last.append(ends[0])
                    start = end
            end_of = dict(zip(sub.members, last, strict=True))
            scores = groups.scores[groups.offsets[g] : groups.offsets[g + 1]]
            for a, b in sub.pairs:
                slot = used_pairs[device]
                if slot >= slots.pairs:
                    raise ValueError(f"more than {slots.pairs} pairs on one device")
                batch["chosen_index"][device, slot] = offset + end_of[a]
                batch["rejected_index"][device, slot] = offset + end_of[b]
                batch["margin"][device, slot] = kwise.margin_scale * (scores[a] - scores[b])
                batch["weight"][device, slot] = 1.0
                batch["loss_weight"][device, slot] = sub.loss_weight
                used_pairs[device] += 1
            if sub.whole:
                slot = used_groups[device]
                if slot >= slots.groups or len(placed) > slots.responses:
                    raise ValueError(f"more than {slots.groups} groups on one device")
                k = len(placed)
                batch["group_index"][device, slot, :k] = [offset + e for e in last]
                batch["group_score"][device, slot, :k] = scores[sub.members]
                batch["group_mask"][device, slot, :k] = 1.0
                used_groups[device] += 1
    return batch
