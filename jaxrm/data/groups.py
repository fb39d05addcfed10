"""K-wise preference data: per prompt, K >= 2 tokenized responses with scores (higher is better).

A `Groups` holds every response of every group in one `Ragged` (group g's responses are rows
`offsets[g]:offsets[g + 1]`, each the full token sequence prompt + response, as a pair's chosen
is), a float32 score per response, and per group the prompt length (-1: unknown). A ranking is
stored as scores (`-rank`), and a pair as a group of two scored 1 and 0.

The pairs a group implies are its ordered pairs of responses with different scores (ties are
skipped), enumerated in response order: `(a, b)` for a < b, oriented so the higher score is
chosen. `to_pairs` cuts groups into those pairs: the pair path on them is the reference the
K-wise path is tested against.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxrm.data.pairs import Pairs, Ragged, is_identity


@dataclasses.dataclass(frozen=True)
class Groups:
    """Tokenized K-wise groups (see the module docstring)."""

    responses: Ragged  # every response's full token sequence, group after group
    offsets: np.ndarray  # int64 [G + 1]: group g's responses are responses[offsets[g]:offsets[g+1]]
    scores: np.ndarray  # float32 [N responses]: higher is better
    prompt_lengths: np.ndarray  # int32 [G]: prompt tokens with the generation prompt; -1 unknown
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        """Responses per group."""
        return np.diff(self.offsets).astype(np.int64)

    def members(self, g: int) -> range:
        """The response indices of group g."""
        return range(int(self.offsets[g]), int(self.offsets[g + 1]))

    def sequences(self, g: int) -> list[np.ndarray]:
        return [self.responses[i] for i in self.members(g)]

    def take(self, idx: np.ndarray) -> Groups:
        """Groups `idx` (repeats allowed), in that order."""
        idx = np.asarray(idx, np.int64)
        if is_identity(idx, len(self)):
            return self
        sizes = self.sizes()[idx]
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        rows = np.repeat(self.offsets[idx] - offsets[:-1], sizes) + np.arange(offsets[-1])
        return Groups(
            self.responses.take(rows),
            offsets,
            self.scores[rows],
            self.prompt_lengths[idx],
            self.pad_token_id,
        )

    def keep_responses(self, keep: np.ndarray) -> Groups:
        """Only the responses where `keep` (bool per response); groups keep their order (a group
        may be left with fewer than two responses: see `jaxrm.data.build`)."""
        keep = np.asarray(keep, bool)
        if keep.all():
            return self
        owner = np.repeat(np.arange(len(self)), self.sizes())
        counts = np.bincount(owner[keep], minlength=len(self))
        offsets = np.zeros(len(self) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        rows = np.flatnonzero(keep)
        return Groups(
            self.responses.take(rows),
            offsets,
            self.scores[rows],
            self.prompt_lengths,
            self.pad_token_id,
        )

    def distinct_scores(self) -> np.ndarray:
        """Per group, how many different scores its responses have (vectorized: sorted by
        group, then score, a response starts a new score where either changes)."""
        owner = self.owners()
        order = np.lexsort((self.scores, owner))
        s, o = self.scores[order], owner[order]
        new = np.ones(len(s), bool)
        new[1:] = (s[1:] != s[:-1]) | (o[1:] != o[:-1])
        return np.bincount(o[new], minlength=len(self)).astype(np.int64)

    def implied_pairs(self, g: int) -> list[tuple[int, int]]:
        """Group g's pairs as (chosen, rejected) positions within the group (see the module)."""
        s = self.scores[self.offsets[g] : self.offsets[g + 1]]
        out = []
        for a in range(len(s)):
            for b in range(a + 1, len(s)):
                if s[a] > s[b]:
                    out.append((a, b))
                elif s[b] > s[a]:
                    out.append((b, a))
        return out

    def pair_counts(self) -> np.ndarray:
        """Implied pairs per group."""
        return np.bincount(self.pair_index()[2], minlength=len(self)).astype(np.int64)

    def owners(self) -> np.ndarray:
        """Per response, the group it belongs to."""
        return np.repeat(np.arange(len(self)), self.sizes())

    def pair_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every implied pair at once, vectorized per group size: (chosen, rejected) response
        indices and the group, in the order of `implied_pairs` group after group."""
        sizes = self.sizes()
        chosen, rejected, group, order = [], [], [], []
        for k in np.unique(sizes[sizes >= 2]):
            a, b = np.triu_indices(int(k), 1)
            gs = np.flatnonzero(sizes == k)
            ia = self.offsets[gs][:, None] + a[None, :]
            ib = self.offsets[gs][:, None] + b[None, :]
            sa, sb = self.scores[ia], self.scores[ib]
            keep = sa != sb
            first = sa > sb
            chosen.append(np.where(first, ia, ib)[keep])
            rejected.append(np.where(first, ib, ia)[keep])
            group.append(np.broadcast_to(gs[:, None], ia.shape)[keep])
            order.append(np.broadcast_to(np.arange(len(a))[None, :], ia.shape)[keep])
        if not chosen:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        group, order = np.concatenate(group), np.concatenate(order)
        sort = np.lexsort((order, group))
        return np.concatenate(chosen)[sort], np.concatenate(rejected)[sort], group[sort]

    def to_pairs(self, margin_scale: float = 0.0) -> tuple[Pairs, np.ndarray]:
        """Every implied pair as a `Pairs` (margin `margin_scale` x the score difference), and
        per pair the group it came from."""
        chosen, rejected, margin, group = [], [], [], []
        for g in range(len(self)):
            base = int(self.offsets[g])
            for a, b in self.implied_pairs(g):
                chosen.append(base + a)
                rejected.append(base + b)
                margin.append(margin_scale * (self.scores[base + a] - self.scores[base + b]))
                group.append(g)
        group = np.asarray(group, np.int64)
        pairs = Pairs(
            self.responses.take(np.asarray(chosen, np.int64)),
            self.responses.take(np.asarray(rejected, np.int64)),
            np.asarray(margin, np.float32),
            self.prompt_lengths[group].astype(np.int32),
            self.pad_token_id,
        )
        return pairs, group

    @staticmethod
    def from_pairs(pairs: Pairs) -> Groups:
        """Each pair as a group of two: chosen (score 1) then rejected (score 0)."""
        n = len(pairs)
        order = np.stack([np.arange(n), np.arange(n) + n], axis=1).reshape(-1)
        both = Ragged.concat([pairs.chosen, pairs.rejected]).take(order)
        return Groups(
            both,
            np.arange(n + 1, dtype=np.int64) * 2,
            np.tile(np.array([1.0, 0.0], np.float32), n),
            np.asarray(pairs.prompt_lengths, np.int32),
            pairs.pad_token_id,
        )

    @staticmethod
    def from_lists(
        groups: list[list[list[int]]],
        scores: list[list[float]],
        prompt_lengths: list[int] | None = None,
        pad_token_id: int = 0,
    ) -> Groups:
        """Groups from Python lists (token ids per response, scores per response)."""
        sizes = np.array([len(g) for g in groups], np.int64)
        offsets = np.zeros(len(groups) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = [r for g in groups for r in g]
        lengths = [-1] * len(groups) if prompt_lengths is None else prompt_lengths
        return Groups(
            Ragged.from_lists(flat),
            offsets,
            np.asarray([s for row in scores for s in row], np.float32).reshape(-1),
            np.asarray(lengths, np.int32),
            pad_token_id,
        )

    @staticmethod
    def concat(parts: list[Groups], pad_token_id: int) -> Groups:
        if len(parts) == 1:
            return dataclasses.replace(parts[0], pad_token_id=pad_token_id)
        offsets, start = [np.zeros(1, np.int64)], 0
        for p in parts:
            offsets.append(p.offsets[1:] + start)
            start += int(p.offsets[-1])
        return Groups(
            Ragged.concat([p.responses for p in parts]),
            np.concatenate(offsets),
            np.concatenate([p.scores for p in parts] or [np.zeros(0, np.float32)]),
            np.concatenate([p.prompt_lengths for p in parts] or [np.zeros(0, np.int32)]),
            pad_token_id,
        )

    def save(self, path: Path, meta: dict) -> None:
        """Writes the arrays as .npy files plus `meta.json` into the directory `path`."""
        path.mkdir(parents=True, exist_ok=True)
        arrays = {
            "response_values": self.responses.values,
            "response_offsets": self.responses.offsets,
            "group_offsets": self.offsets,
            "scores": self.scores,
            "prompt_lengths": self.prompt_lengths,
        }
        for name, array in arrays.items():
            np.save(path / f"{name}.npy", array)
        (path / "meta.json").write_text(json.dumps({**meta, "pad_token_id": self.pad_token_id}))

    @staticmethod
    def load(path: Path) -> tuple[Groups, dict]:
        """Reads what `save` wrote; token arrays are memory-mapped."""

        def arr(name: str, mmap: bool = False) -> np.ndarray:
            return np.load(path / f"{name}.npy", mmap_mode="r" if mmap else None)

        meta = json.loads((path / "meta.json").read_text())
        groups = Groups(
            Ragged(arr("response_values", True), arr("response_offsets")),
            arr("group_offsets"),
            arr("scores"),
            arr("prompt_lengths"),
            int(meta.pop("pad_token_id")),
        )
        return groups, meta
