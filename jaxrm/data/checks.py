"""Checks of tokenized pairs (and K-wise groups) that can be made right after tokenization, so that
a run refuses (or warns) before its first step instead of failing hours in: pairs or groups too
long for a packed row, token ids outside the model's vocabulary, pairs whose chosen and rejected
are the same tokens (for groups: implied pairs whose two responses are).

All of them are vectorized over the ragged arrays (a 300K-pair set takes a fraction of a second);
only pairs whose unshared length exceeds a row are measured with the shared prefix.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from jaxrm.data import packing
from jaxrm.data.groups import Groups
from jaxrm.data.pairs import Pairs, Ragged
from jaxrm.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PackFit:
    """The packed row every pair must fit in one piece: `length` tokens, with the common prefix
    of chosen and rejected stored once when `share_prefix`. A pair that does not fit is refused,
    or dropped and counted when `drop`. For K-wise groups every implied pair must fit, and with
    `whole_groups` (Plackett-Luce reads all of a group at once) the whole group: the common
    prefix of all its responses once (when `share_prefix`) plus every rest."""

    length: int
    share_prefix: bool
    drop: bool = False
    whole_groups: bool = False


def smallest_pack_length(tokens: int) -> int:
    """The smallest valid pack_length (a multiple of `packing.ROW_MULTIPLE`) holding `tokens`."""
    return -(-tokens // packing.ROW_MULTIPLE) * packing.ROW_MULTIPLE


def oversized_pairs(pairs: Pairs, fit: PackFit) -> tuple[np.ndarray, np.ndarray]:
    """(pair indices, tokens each needs in a packed row) of the pairs longer than a row."""
    total = pairs.chosen.lengths().astype(np.int64) + pairs.rejected.lengths()
    ids = np.flatnonzero(total > fit.length)
    if not len(ids) or not fit.share_prefix:
        return ids, total[ids]
    groups = packing.group_lengths(pairs, ids, share_prefix=True)
    over = groups > fit.length
    return ids[over], groups[over]


def fit_pack_length(pairs: Pairs, fit: PackFit, what: str) -> tuple[Pairs, int]:
    """The pairs that fit a packed row and how many were dropped; refuses pairs that do not fit
    unless `fit.drop` (one line: how many, the longest, the smallest pack_length that fits)."""
    ids, tokens = oversized_pairs(pairs, fit)
    if not len(ids):
        return pairs, 0
    _refuse_or_warn(len(ids), len(pairs), f"{what} pairs", int(tokens.max()), fit)
    keep = np.ones(len(pairs), dtype=bool)
    keep[ids] = False
    return pairs.take(np.flatnonzero(keep)), len(ids)


def oversized_groups(groups: Groups, fit: PackFit) -> tuple[np.ndarray, np.ndarray]:
    """(group indices, tokens each needs in a packed row) of the groups longer than a row: the
    longest implied pair, or with `fit.whole_groups` the whole group, if that is longer."""
    lengths = groups.responses.lengths().astype(np.int64)
    chosen, rejected, owner = groups.pair_index()
    need = np.zeros(len(groups), np.int64)
    total = lengths[chosen] + lengths[rejected]
    over = np.flatnonzero(total > fit.length)
    if fit.share_prefix:
        for i in over:
            pair = [groups.responses[chosen[i]], groups.responses[rejected[i]]]
            total[i] -= packing.common_prefix_length(pair)
    np.maximum.at(need, owner, total)
    if fit.whole_groups:
        whole = np.bincount(groups.owners(), lengths, minlength=len(groups)).astype(np.int64)
        for g in np.flatnonzero(whole > fit.length) if fit.share_prefix else ():
            prefix = packing.common_prefix_length(groups.sequences(g))
            whole[g] -= prefix * (len(groups.members(g)) - 1)
        need = np.maximum(need, whole)
    ids = np.flatnonzero(need > fit.length)
    return ids, need[ids]


def fit_groups_pack_length(groups: Groups, fit: PackFit, what: str) -> tuple[Groups, int]:
    """The groups that fit a packed row (see `oversized_groups`) and how many were dropped;
    refuses groups that do not fit unless `fit.drop` (one line, as `fit_pack_length`)."""
    ids, tokens = oversized_groups(groups, fit)
    if not len(ids):
        return groups, 0
    kind = f"{what} groups" + ("" if fit.whole_groups else " (their longest implied pair)")
    _refuse_or_warn(len(ids), len(groups), kind, int(tokens.max()), fit)
    keep = np.ones(len(groups), dtype=bool)
    keep[ids] = False
    return groups.take(np.flatnonzero(keep)), len(ids)


def _refuse_or_warn(count: int, total: int, kind: str, longest: int, fit: PackFit) -> None:
    counted = f"{count} of {total} {kind} need more than pack_length={fit.length}"
    if not fit.drop:
        raise UserError(
            f"{counted} tokens in a packed row (the longest {longest}); set pack_length to at "
            f"least {smallest_pack_length(longest)}, or pass "
            "--config.drop_pairs_longer_than_pack_length=true to leave them out"
        )
    log.warning("%s tokens in a packed row (the longest %d): dropped", counted, longest)


def first_out_of_vocab_groups(groups: Groups, vocab_size: int) -> tuple[int, int, int] | None:
    """(group index, response position in the group, token id) of the first response holding
    an id >= `vocab_size`, or None."""
    values = groups.responses.values
    if not len(values) or int(values.max()) < vocab_size:
        return None
    position = int(np.argmax(np.asarray(values) >= vocab_size))
    response = int(np.searchsorted(groups.responses.offsets, position, side="right")) - 1
    group = int(np.searchsorted(groups.offsets, response, side="right")) - 1
    return group, response - int(groups.offsets[group]), int(values[position])


def first_out_of_vocab(pairs: Pairs, vocab_size: int) -> tuple[int, str, int] | None:
    """(pair index, 'chosen' or 'rejected', token id) of the first pair holding an id >=
    `vocab_size`, or None."""
    found = []
    for side, ragged in (("chosen", pairs.chosen), ("rejected", pairs.rejected)):
        if not len(ragged.values) or int(ragged.values.max()) < vocab_size:
            continue
        position = int(np.argmax(np.asarray(ragged.values) >= vocab_size))
        pair = int(np.searchsorted(ragged.offsets, position, side="right")) - 1
        found.append((pair, side, int(ragged.values[position])))
    return min(found) if found else None


def identical_pairs(pairs: Pairs) -> np.ndarray:
    """Per pair, whether chosen and rejected are the same token ids."""
    same = np.flatnonzero(pairs.chosen.lengths() == pairs.rejected.lengths())
    out = np.zeros(len(pairs), dtype=bool)
    if len(same):
        chosen, rejected = pairs.chosen.take(same), pairs.rejected.take(same)
        out[same] = _differences_per_row(chosen, rejected) == 0
    return out


def _differences_per_row(a: Ragged, b: Ragged) -> np.ndarray:
    """Per row of two Raggeds with equal offsets, the number of positions that differ."""
    differ = np.concatenate([[0], np.cumsum(a.values != b.values)])
    return differ[a.offsets[1:]] - differ[a.offsets[:-1]]


def check_identical_groups(groups: Groups, what: str) -> int:
    """How many implied pairs (responses with different scores) have the same token ids: a
    warning with the count, a refusal when every implied pair is one (as `check_identical`)."""
    chosen, rejected, _ = groups.pair_index()
    lengths = groups.responses.lengths()
    same = np.flatnonzero(lengths[chosen] == lengths[rejected])
    count = 0
    if len(same):
        a, b = groups.responses.take(chosen[same]), groups.responses.take(rejected[same])
        count = int((_differences_per_row(a, b) == 0).sum())
    return _report_identical(count, len(chosen), what, "implied pairs", "groups")


def check_identical(pairs: Pairs, what: str) -> int:
    """How many pairs have chosen == rejected: a warning with the count, a refusal when every
    pair is one (the loss would be log 2 for every pair and nothing could be learned)."""
    count = int(identical_pairs(pairs).sum())
    return _report_identical(count, len(pairs), what, "pairs", "pairs")


def _report_identical(count: int, total: int, what: str, noun: str, kind: str) -> int:
    """`kind`: "pairs" (chosen == rejected) or "groups" (two responses of an implied pair)."""
    have, hint = {
        "pairs": (
            "have identical chosen and rejected token ids",
            "check that 'chosen' and 'rejected' name different columns",
        ),
        "groups": (
            "join two responses with identical token ids",
            "check that the responses of a row differ",
        ),
    }[kind]
    if count and count == total:
        raise UserError(f"all {count} {what} {noun} {have}, so there is nothing to learn; {hint}")
    if count:
        log.warning(
            "%s: %d of %d %s (%.2f%%) %s; they add log 2 to the loss, count as wrong for "
            "accuracy and teach nothing",
            what,
            count,
            total,
            noun,
            100 * count / total,
            have,
        )
    return count
