"""Tokenized preference pairs held as flat numpy arrays (ragged rows), cheap to slice and cache.

A `Ragged` stores variable-length int32 rows as one `values` array plus `offsets` (row i is
`values[offsets[i]:offsets[i + 1]]`), so a 300K-pair dataset is a handful of arrays instead of
millions of Python lists, can be memory-mapped from the cache and gathered with one numpy index.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np


def is_identity(idx: np.ndarray, n: int) -> bool:
    """Whether `idx` is 0, 1, ..., n - 1."""
    return len(idx) == n and bool((idx == np.arange(n)).all())


@dataclasses.dataclass(frozen=True)
class Ragged:
    """Variable-length int32 rows: row i is `values[offsets[i]:offsets[i + 1]]`."""

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def take(self, idx: np.ndarray) -> Ragged:
        """Rows `idx` (repeats allowed), gathered with one vectorized index; all rows in order
        are this Ragged itself (no copy: a cached set stays memory-mapped)."""
        idx = np.asarray(idx, dtype=np.int64)
        if is_identity(idx, len(self)):
            return self
        lens = np.diff(self.offsets)[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        shift = np.repeat(self.offsets[idx] - offsets[:-1], lens)
        return Ragged(self.values[np.arange(offsets[-1]) + shift], offsets)

    @staticmethod
    def from_lists(rows: list[list[int]]) -> Ragged:
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, rows), np.int64, len(rows)), out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(rows), np.int32, int(offsets[-1]))
        return Ragged(values, offsets)

    @staticmethod
    def concat(parts: list[Ragged]) -> Ragged:
        if len(parts) == 1:
            return parts[0]
        offsets, start = [np.zeros(1, np.int64)], 0
        for p in parts:
            offsets.append(p.offsets[1:] + start)
            start += int(p.offsets[-1])
        values = [p.values for p in parts] or [np.zeros(0, np.int32)]
        return Ragged(np.concatenate(values).astype(np.int32, copy=False), np.concatenate(offsets))


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Tokenized pairs: chosen/rejected token ids, margin, prompt length (-1: unknown), pad id."""

    chosen: Ragged
    rejected: Ragged
    margin: np.ndarray
    prompt_lengths: np.ndarray
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.margin)

    def max_lengths(self) -> np.ndarray:
        """Per pair, the longer of its chosen and rejected rows."""
        return np.maximum(self.chosen.lengths(), self.rejected.lengths())

    def take(self, idx: np.ndarray) -> Pairs:
        if is_identity(np.asarray(idx), len(self)):
            return self
        return Pairs(
            self.chosen.take(idx),
            self.rejected.take(idx),
            self.margin[idx],
            self.prompt_lengths[idx],
            self.pad_token_id,
        )

    @staticmethod
    def concat(parts: list[Pairs], pad_token_id: int) -> Pairs:
        if len(parts) == 1:
            return dataclasses.replace(parts[0], pad_token_id=pad_token_id)
        return Pairs(
            Ragged.concat([p.chosen for p in parts]),
            Ragged.concat([p.rejected for p in parts]),
            np.concatenate([p.margin for p in parts] or [np.zeros(0, np.float32)]),
            np.concatenate([p.prompt_lengths for p in parts] or [np.zeros(0, np.int32)]),
            pad_token_id,
        )

    def save(self, path: Path, meta: dict) -> None:
        """Writes the arrays as .npy files plus `meta.json` into the directory `path`."""
        path.mkdir(parents=True, exist_ok=True)
        arrays = {
            "chosen_values": self.chosen.values,
            "chosen_offsets": self.chosen.offsets,
            "rejected_values": self.rejected.values,
            "rejected_offsets": self.rejected.offsets,
            "margin": self.margin,
            "prompt_lengths": self.prompt_lengths,
        }
        for name, array in arrays.items():
            np.save(path / f"{name}.npy", array)
        (path / "meta.json").write_text(json.dumps({**meta, "pad_token_id": self.pad_token_id}))

    @staticmethod
    def load(path: Path) -> tuple[Pairs, dict]:
        """Reads what `save` wrote; token arrays are memory-mapped."""

        def arr(name: str, mmap: bool = False) -> np.ndarray:
            return np.load(path / f"{name}.npy", mmap_mode="r" if mmap else None)

        meta = json.loads((path / "meta.json").read_text())
        pairs = Pairs(
            Ragged(arr("chosen_values", True), arr("chosen_offsets")),
            Ragged(arr("rejected_values", True), arr("rejected_offsets")),
            arr("margin"),
            arr("prompt_lengths"),
            int(meta.pop("pad_token_id")),
        )
        return pairs, meta
