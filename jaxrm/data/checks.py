"""Checks of tokenized pairs that can be made right after tokenization, so that a run refuses (or
warns) before its first step instead of failing hours in: pairs too long for a packed row, token
ids outside the model's vocabulary, pairs whose chosen and rejected are the same tokens.

All of them are vectorized over the ragged arrays (a 300K-pair set takes a fraction of a second);
only pairs whose unshared length exceeds a row are measured with the shared prefix.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from jaxrm.data import packing
from jaxrm.data.pairs import Pairs, Ragged
from jaxrm.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PackFit:
    """The packed row every pair must fit in one piece: `length` tokens, with the common prefix
    of chosen and rejected stored once when `share_prefix`. A pair that does not fit is refused,
    or dropped and counted when `drop`."""

    length: int
    share_prefix: bool
    drop: bool = False


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
    longest = int(tokens.max())
    counted = f"{len(ids)} of {len(pairs)} {what} pairs need more than pack_length={fit.length}"
    if not fit.drop:
        raise UserError(
            f"{counted} tokens in a packed row (the longest {longest}); set pack_length to at "
            f"least {smallest_pack_length(longest)}, or pass "
            "--config.drop_pairs_longer_than_pack_length=true to leave them out"
        )
    log.warning("%s tokens in a packed row (the longest %d): dropped", counted, longest)
    keep = np.ones(len(pairs), dtype=bool)
    keep[ids] = False
    return pairs.take(np.flatnonzero(keep)), len(ids)


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


def check_identical(pairs: Pairs, what: str) -> int:
    """How many pairs have chosen == rejected: a warning with the count, a refusal when every
    pair is one (the loss would be log 2 for every pair and nothing could be learned)."""
    count = int(identical_pairs(pairs).sum())
    if count and count == len(pairs):
        raise UserError(
            f"all {count} {what} pairs have identical chosen and rejected token ids, so there is "
            "nothing to learn; check that 'chosen' and 'rejected' name different columns"
        )
    if count:
        log.warning(
            "%s: %d of %d pairs (%.2f%%) have identical chosen and rejected token ids; they add "
            "log 2 to the loss, count as wrong for accuracy and teach nothing",
            what,
            count,
            len(pairs),
            100 * count / len(pairs),
        )
    return count
