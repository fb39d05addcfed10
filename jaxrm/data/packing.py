"""Packed, prefix-shared micro-batches: rows of a fixed token budget holding whole pairs.

A pair is laid out as one *group* of tokens in a row:

    shared (prefix sharing):  [prefix][chosen rest][rejected rest]   branch ids 0 | 1 | 2
    separate:                 [chosen][rejected]                     two segments, branch 0

The prefix is the longest common prefix of the two token sequences (exact whatever the tokenizer
did at the prompt's boundary), capped so that each rest keeps at least one token. Positions
restart at 0 for each group (and for each sequence when separate); both rests continue from the
prefix's end, so each rest sees exactly the tokens and positions of its own full sequence
(jaxrm/models/attention.py masks the other rest). The reward of a sequence is read at its last
token.

Groups are placed into rows of `length` tokens by first-fit decreasing; rows are dealt to devices
`rows` at a time, `devices x rows` rows per micro-batch. Every micro-batch has the same shape, so
the number of micro-batches of an optimizer step varies with its pairs' lengths while the pairs
per step stay as configured. Per device and micro-batch, `slots` pair slots say where each pair's
two rewards are (flat token indices into that device's rows) plus its margin and weight (0 for
empty slots).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from jaxrm.data.pairs import Pairs
from jaxrm.errors import UserError

ROW_MULTIPLE = 128  # the attention kernel's block size divides every packed length


@dataclasses.dataclass(frozen=True)
class PackSpec:
    length: int  # tokens per row
    rows: int  # rows per device per micro-batch
    devices: int  # data-parallel devices (global)
    slots: int  # pair slots per device per micro-batch (0: as many as the packing needs)
    share_prefix: bool = True

    @property
    def micro_rows(self) -> int:
        return self.rows * self.devices


def shared_prefix_lengths(pairs: Pairs, ids: np.ndarray | None = None) -> np.ndarray:
    """Per pair, the tokens chosen and rejected share at the start, capped so that each keeps at
    least one token of its own."""
    ids = np.arange(len(pairs)) if ids is None else np.asarray(ids)
    out = np.zeros(len(ids), np.int32)
    for n, i in enumerate(ids):
        out[n] = common_prefix_length([pairs.chosen[i], pairs.rejected[i]])
    return out


def group_lengths(pairs: Pairs, ids: np.ndarray, share_prefix: bool) -> np.ndarray:
    """Tokens each pair occupies in a packed row."""
    total = pairs.chosen.lengths()[ids] + pairs.rejected.lengths()[ids]
    if not share_prefix:
        return total.astype(np.int64)
    return (total - shared_prefix_lengths(pairs, ids)).astype(np.int64)


def default_length(max_token_length: int) -> int:
    """Room for one pair of two sequences of `max_token_length` (rounded up to whole blocks)."""
    return -(-2 * max_token_length // ROW_MULTIPLE) * ROW_MULTIPLE


MIN_MICRO_TOKENS = 1024  # per device: below this a micro-batch costs more in overhead than it saves


def default_rows(length: int) -> int:
    """Rows per device and micro-batch: one, or as few as hold `MIN_MICRO_TOKENS`. Fewer rows
    waste less: an optimizer step takes as many micro-batches as its pairs fill, and only the
    last one's unused rows are computed for nothing."""
    return max(1, MIN_MICRO_TOKENS // length)


def row_shape(
    max_token_length: int, pack_length: int = 0, rows_per_device: int = 0
) -> tuple[int, int]:
    """(row length, rows per device) of a micro-batch: the config's values, 0 = the default."""
    length = pack_length or default_length(max_token_length)
    return length, rows_per_device or default_rows(length)


def check_fits(longest_group: int, spec: PackSpec) -> None:
    if longest_group > spec.length:
        raise UserError(
            f"a pair needs {longest_group} tokens in a packed row, more than pack_length="
            f"{spec.length}; raise pack_length or lower max_token_length"
        )


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Items (indices into `lengths`) per bin, longest first; deterministic. Each item goes to the
    first bin (in opening order) with room for it, else to a new bin: O(n log n) by a max tree
    over the bins' free space (bins not opened yet have `capacity`), so the first leaf with room
    is found in one descent."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    leaves = 1 << max(0, len(order) - 1).bit_length()
    tree = [capacity] * (2 * leaves)  # tree[k] = max(tree[2k], tree[2k + 1]); leaves at [leaves:]
    bins: list[list[int]] = []
    for item, size in zip(order.tolist(), np.asarray(lengths)[order].tolist(), strict=True):
        if tree[1] < size:  # only an item longer than `capacity`: a bin of its own
            b = len(bins)
        else:
            k = 1
            while k < leaves:
                k = 2 * k if tree[2 * k] >= size else 2 * k + 1
            b = k - leaves
        if b == len(bins):
            bins.append([item])
        else:
            bins[b].append(item)
        k = b + leaves
        tree[k] -= size
        k //= 2
        while k:
            tree[k] = max(tree[2 * k], tree[2 * k + 1])
            k //= 2
    return bins


def pack(
    pairs: Pairs,
    ids: np.ndarray,
    spec: PackSpec,
    weight: np.ndarray | None = None,
) -> list[dict[str, np.ndarray]]:
    """The global micro-batches (numpy, see `jaxrm/data/batch.py`) holding pairs `ids`; pairs of
    `weight` 0 are left out. Every process computes the same packing."""
    ids = np.asarray(ids, np.int64)
    if weight is not None:
        ids = ids[np.asarray(weight) > 0]
    prefix = (
        shared_prefix_lengths(pairs, ids) if spec.share_prefix else np.zeros(len(ids), np.int32)
    )
    lengths = pairs.chosen.lengths()[ids] + pairs.rejected.lengths()[ids] - prefix
    if len(ids):
        check_fits(int(lengths.max()), spec)
    rows = first_fit_decreasing(lengths, spec.length)
    count = max(1, math.ceil(len(rows) / spec.micro_rows))
    if not spec.slots:
        per_device = [len(sum(rows[r : r + spec.rows], [])) for r in range(0, len(rows), spec.rows)]
        spec = dataclasses.replace(spec, slots=max([1, *per_device]))
    return [
        _micro_batch(
            pairs, ids, prefix, rows[m * spec.micro_rows : (m + 1) * spec.micro_rows], spec
        )
        for m in range(count)
    ]


def _zero_rows(spec: PackSpec, *names: str) -> dict[str, np.ndarray]:
    """int32 zeros of one micro-batch's rows ([devices * rows, length]) for each name."""
    return {name: np.zeros((spec.micro_rows, spec.length), np.int32) for name in names}


def _micro_batch(
    pairs: Pairs, ids: np.ndarray, prefix: np.ndarray, rows: list[list[int]], spec: PackSpec
) -> dict[str, np.ndarray]:
    t, s = spec.length, spec.slots
    batch = _zero_rows(spec, "input_ids", "positions", "segment_ids", "branch_ids")
    batch.update(
        chosen_index=np.zeros((spec.devices, s), np.int32),
        rejected_index=np.zeros((spec.devices, s), np.int32),
        margin=np.zeros((spec.devices, s), np.float32),
        weight=np.zeros((spec.devices, s), np.float32),
    )
    for r, members in enumerate(rows):
        device, local_row = divmod(r, spec.rows)
        offset = local_row * t  # flat index of the row's first token on its device
        start = 0
        for segment, item in enumerate(members, start=1):
            slot = int(np.count_nonzero(batch["weight"][device]))
            if slot >= s:
                raise ValueError(f"more than {s} pairs on one device of a micro-batch")
            pair = ids[item]
            chosen, rejected = pairs.chosen[pair], pairs.rejected[pair]
            ends = _place(batch, r, start, segment, chosen, rejected, int(prefix[item]), spec)
            batch["chosen_index"][device, slot] = offset + ends[0]
            batch["rejected_index"][device, slot] = offset + ends[1]
            batch["margin"][device, slot] = pairs.margin[pair]
            batch["weight"][device, slot] = 1.0
            start = ends[2]
    return batch


def _place(batch, row, start, segment, chosen, rejected, p, spec) -> tuple[int, int, int]:
    """Writes one pair at `start` of `row`; (chosen's last index, rejected's last index, end)."""
    ids, pos, seg, branch = (
        batch["input_ids"][row],
        batch["positions"][row],
        batch["segment_ids"][row],
        batch["branch_ids"][row],
    )
    if not spec.share_prefix:
        c_end, r_end = start + len(chosen), start + len(chosen) + len(rejected)
        ids[start:c_end], ids[c_end:r_end] = chosen, rejected
        pos[start:c_end], pos[c_end:r_end] = np.arange(len(chosen)), np.arange(len(rejected))
        seg[start:c_end], seg[c_end:r_end] = 2 * segment - 1, 2 * segment
        return c_end - 1, r_end - 1, r_end
    (c_last, r_last), end = place_tree(ids, pos, seg, branch, start, segment, [chosen, rejected], p)
    return c_last, r_last, end


def common_prefix_length(sequences: list[np.ndarray]) -> int:
    """The tokens all `sequences` share at the start, capped so that each keeps at least one
    token of its own (0 for a single sequence)."""
    if len(sequences) < 2:
        return 0
    m = min(len(s) for s in sequences) - 1
    if m <= 0:
        return 0
    first = sequences[0][:m]
    same = np.ones(m, bool)
    for s in sequences[1:]:
        same &= s[:m] == first
    differ = np.flatnonzero(~same)
    return int(differ[0]) if len(differ) else m


def place_tree(
    ids: np.ndarray,
    pos: np.ndarray,
    seg: np.ndarray,
    branch: np.ndarray,
    start: int,
    segment: int,
    sequences: list[np.ndarray],
    prefix: int,
) -> tuple[list[int], int]:
    """Writes one group at `start` of a row (its `input_ids`, `positions`, `segment_ids` and
    `branch_ids` arrays): the sequences' first `prefix` tokens once (branch 0), then each
    sequence's rest as branch 1, 2, ... with positions continuing from the prefix. Returns each
    sequence's last index in the row, and the group's end."""
    ids[start : start + prefix] = sequences[0][:prefix]
    pos[start : start + prefix] = np.arange(prefix)
    cursor, last = start + prefix, []
    for b, sequence in enumerate(sequences, start=1):
        rest = sequence[prefix:]
        ids[cursor : cursor + len(rest)] = rest
        pos[cursor : cursor + len(rest)] = np.arange(prefix, len(sequence))
        branch[cursor : cursor + len(rest)] = b
        cursor += len(rest)
        last.append(cursor - 1)
    seg[start:cursor] = segment
    return last, cursor


class _ScoringRows:
    """Micro-batches built one at a time from `rows` (host memory holds one, not all), each with
    per device and slot the flat `index` of a sequence's last token, the sequence (`order`) and
    `weight` (`_slot_fields`)."""

    rows: list[list[int]]
    spec: PackSpec

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.rows) / self.spec.micro_rows))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        g = self.spec.micro_rows
        for m in range(len(self)):
            yield self._micro_batch(self.rows[m * g : (m + 1) * g])

    def _micro_batch(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _slot_fields(spec: PackSpec) -> dict[str, np.ndarray]:
    return {
        "index": np.zeros((spec.devices, spec.slots), np.int32),
        "order": np.zeros((spec.devices, spec.slots), np.int64),
        "weight": np.zeros((spec.devices, spec.slots), np.float32),
    }


def _resolve_slots(spec: PackSpec, rows: list[list[int]], sizes: np.ndarray) -> PackSpec:
    """`spec` with `slots` (0: as many as the fullest device of a micro-batch needs), where item
    i of a row holds `sizes[i]` sequences."""
    per_device = [
        int(sum(sizes[i] for row in rows[r : r + spec.rows] for i in row))
        for r in range(0, len(rows), spec.rows)
    ]
    return dataclasses.replace(spec, slots=spec.slots or max([1, *per_device]))


@dataclasses.dataclass(frozen=True)
class SequencePacking(_ScoringRows):
    """Single sequences (to score, not pairs) packed one segment each. Per micro-batch: the rows'
    `positions`, `segment_ids` and `branch_ids` (0), the slots (`_ScoringRows`), and
    `placements` (row, start, sequence) for `fill_tokens`."""

    lengths: np.ndarray
    rows: list[list[int]]  # sequences per row, from `first_fit_decreasing`
    spec: PackSpec  # `slots` resolved

    def _micro_batch(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        spec, t = self.spec, self.spec.length
        batch = _zero_rows(spec, "positions", "segment_ids", "branch_ids")
        batch.update(_slot_fields(spec))
        placements = []
        used = [0] * spec.devices  # slots filled per device
        for r, members in enumerate(rows):
            device, local_row = divmod(r, spec.rows)
            start = 0
            for slot_in_row, item in enumerate(members):
                n, slot = int(self.lengths[item]), used[device]
                batch["positions"][r, start : start + n] = np.arange(n)
                batch["segment_ids"][r, start : start + n] = slot_in_row + 1
                batch["index"][device, slot] = local_row * t + start + n - 1
                batch["order"][device, slot] = item
                batch["weight"][device, slot] = 1.0
                placements.append((r, start, item))
                used[device] += 1
                start += n
        batch["placements"] = np.array(placements, np.int64).reshape(-1, 3)
        return batch


def pack_sequences(lengths: np.ndarray, spec: PackSpec) -> SequencePacking:
    """Single sequences of `lengths` packed by `first_fit_decreasing` (see `SequencePacking`)."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths):
        check_fits(int(lengths.max()), spec)
    rows = first_fit_decreasing(lengths, spec.length)
    return SequencePacking(lengths, rows, _resolve_slots(spec, rows, np.ones(len(lengths), int)))


def fill_tokens(batch: dict[str, np.ndarray], sequences: list) -> np.ndarray:
    """The `input_ids` of a `pack_sequences` micro-batch: each sequence's tokens at its place."""
    ids = np.zeros(batch["positions"].shape, np.int32)
    for row, start, item in batch["placements"]:
        tokens = sequences[item]
        ids[row, start : start + len(tokens)] = tokens
    return ids


@dataclasses.dataclass(frozen=True)
class GroupPacking(_ScoringRows):
    """Sequences to score that share a prefix (a prompt's responses), packed one tree group each
    (`place_tree`: the prefix once, each sequence's rest a branch). Per micro-batch: the rows'
    `input_ids`, `positions`, `segment_ids` and `branch_ids`, and the slots (`_ScoringRows`)."""

    sequences: list[np.ndarray]
    groups: list[tuple[list[int], int]]  # (sequences, shared prefix length) after splitting
    rows: list[list[int]]  # groups per row, from `first_fit_decreasing`
    spec: PackSpec  # `slots` resolved
    split: int  # groups longer than a row, split into sub-groups that each repeat the prefix

    @property
    def tokens(self) -> int:
        """Tokens placed in rows (each prefix once per sub-group)."""
        return sum(_group_length(self.sequences, g) for g in self.groups)

    def _micro_batch(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        spec, t = self.spec, self.spec.length
        batch = _zero_rows(spec, "input_ids", "positions", "segment_ids", "branch_ids")
        batch.update(_slot_fields(spec))
        fields = [batch[k] for k in ("input_ids", "positions", "segment_ids", "branch_ids")]
        used = [0] * spec.devices  # slots filled per device
        for r, items in enumerate(rows):
            device, local_row = divmod(r, spec.rows)
            start = 0
            for segment, item in enumerate(items, start=1):
                members, prefix = self.groups[item]
                sequences = [self.sequences[i] for i in members]
                row = [f[r] for f in fields]
                last, start = place_tree(*row, start, segment, sequences, prefix)
                for i, end in zip(members, last, strict=True):
                    slot = used[device]
                    batch["index"][device, slot] = local_row * t + end
                    batch["order"][device, slot] = i
                    batch["weight"][device, slot] = 1.0
                    used[device] += 1
        return batch


def _group_length(sequences: list[np.ndarray], group: tuple[list[int], int]) -> int:
    members, prefix = group
    return prefix + sum(len(sequences[i]) - prefix for i in members)


def chunk_group(lengths: list[int], prefix: int, capacity: int) -> list[list[int]]:
    """Positions of a group's sequences (of `lengths`, sharing `prefix` tokens) in sub-groups of
    at most `capacity` tokens each, the prefix repeated in each; in order, greedily."""
    out: list[list[int]] = []
    size = capacity + 1
    for k, n in enumerate(lengths):
        if size + n - prefix > capacity:
            out.append([])
            size = prefix
        out[-1].append(k)
        size += n - prefix
    return out


def pack_sequence_groups(sequences: list, groups: list[list[int]], spec: PackSpec) -> GroupPacking:
    """`groups` (indices into `sequences`, in placing order) packed as tree groups sharing their
    common prefix (`common_prefix_length`) by `first_fit_decreasing`; a group longer than a row
    is split into sub-groups that each repeat the prefix (see `GroupPacking`). Every sequence
    must fit a row alone."""
    sequences = [np.asarray(s, np.int32) for s in sequences]
    placed, split = [], 0
    for members in groups:
        prefix = common_prefix_length([sequences[i] for i in members])
        parts = chunk_group([len(sequences[i]) for i in members], prefix, spec.length)
        split += len(parts) > 1
        placed += [([members[k] for k in part], prefix) for part in parts]
    lengths = np.array([_group_length(sequences, g) for g in placed], np.int64)
    if len(lengths):
        check_fits(int(lengths.max()), spec)
    rows = first_fit_decreasing(lengths, spec.length)
    sizes = np.array([len(m) for m, _ in placed], np.int64)
    return GroupPacking(sequences, placed, rows, _resolve_slots(spec, rows, sizes), split)
