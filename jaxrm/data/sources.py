"""Dataset sources and the open-instruct dataset mixer.

A mixer list alternates names and amounts: `["a.jsonl", "1.0", "org/hub-set", "5000"]`. An amount
with a "." is a fraction of the source (`3.0` = three full copies, `0.5` = half), without a "." an
absolute row count; either way the whole copies come first and the remainder is sampled without
replacement under the given seed (open-instruct `DatasetConfig.update_range`). The split list gives
one split per source or one for all (default `train`).

A name is a local file (`.json`, `.jsonl`, `.parquet`), a directory written by
`datasets.Dataset.save_to_disk` (a saved `DatasetDict` is indexed by the split), or else a Hugging
Face hub dataset loaded with `datasets.load_dataset(name, split=split)`. A single local file has no
splits: the split is ignored for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxrm.data.formats import detect_format, validate_rows
from jaxrm.errors import UserError, first_line

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One mixer entry: where the data is, how much of it, which split."""

    name: str
    amount: str
    split: str


def parse_mixer(
    mixer_list: Sequence[Any], splits: Sequence[str] = (), key: str = "dataset_mixer_list"
) -> list[SourceSpec]:
    """`[name, amount, ...]` plus a split list (empty, one for all, or one each) -> specs."""
    items = list(mixer_list)
    if len(items) % 2:
        raise UserError(f"{key}: expected alternating [name, amount, ...], got {len(items)} items")
    names, amounts = [str(x) for x in items[0::2]], items[1::2]
    splits = list(splits) or ["train"]
    if len(splits) == 1:
        splits = splits * len(names)
    if len(splits) != len(names):
        raise UserError(
            f"{key}_splits: {len(splits)} splits for {len(names)} datasets (give one or one each)"
        )
    specs = []
    for name, amount, split in zip(names, amounts, splits, strict=True):
        amount = repr(float(amount)) if isinstance(amount, float) else str(amount)
        row_count(1, amount, f"{key} entry {name!r}")
        specs.append(SourceSpec(name, amount, str(split)))
    return specs


def row_count(n_rows: int, amount: str, where: str) -> int:
    """Rows an amount asks for: `int(float(amount) * n_rows)` with a ".", else `int(amount)`."""
    try:
        count = int(float(amount) * n_rows) if "." in amount else int(amount)
    except ValueError:
        raise UserError(f"{where}: amount {amount!r} is not a number") from None
    if count < 0:
        raise UserError(f"{where}: amount {amount!r} is negative")
    return count


def mix_indices(n_rows: int, amount: str, seed: int, where: str) -> np.ndarray:
    """Row indices for one source: whole copies in order, then a seeded sample (no replacement)."""
    count = row_count(n_rows, amount, where)
    if count and not n_rows:
        raise UserError(f"{where}: the dataset has no rows")
    repeats, remainder = divmod(count, n_rows) if n_rows else (0, 0)
    rest = np.random.default_rng(seed).choice(n_rows, size=remainder, replace=False)
    return np.concatenate([np.tile(np.arange(n_rows), repeats), np.sort(rest)]).astype(np.int64)


def is_local(name: str) -> bool:
    """A path that exists, or looks like a file path (so a typo is 'missing file', not 'hub')."""
    return os.path.exists(name) or name.endswith(FILE_SUFFIXES) or name.startswith(("/", ".", "~"))


def fingerprint(spec: SourceSpec, loaded: datasets.Dataset | None = None) -> dict[str, Any]:
    """What identifies the source's content: path, sizes and mtimes, or the hub fingerprint."""
    if not is_local(spec.name):
        return {"hub": spec.name, "split": spec.split, "fingerprint": loaded._fingerprint}
    path = Path(spec.name).expanduser()
    if not path.exists():
        raise UserError(f"{spec.name}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(str(p.relative_to(path) if path.is_dir() else p.name), p.stat()) for p in files]
    return {
        "path": str(path.resolve()),
        "split": spec.split if path.is_dir() else None,
        "files": [(name, st.st_size, st.st_mtime_ns) for name, st in stats],
    }


def load_source(spec: SourceSpec) -> datasets.Dataset:
    """Loads one source as a `datasets.Dataset`; every failure is a one-line UserError."""
    if not is_local(spec.name):
        return _load_hub(spec)
    path = Path(spec.name).expanduser()
    if not path.exists():
        raise UserError(f"{spec.name}: no such file or directory")
    if path.is_dir():
        return _load_saved(path, spec.split)
    if path.suffix == ".parquet":
        try:
            return datasets.Dataset(pq.read_table(path))
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: unreadable parquet file ({first_line(e)})") from None
    if path.suffix in (".json", ".jsonl"):
        return _from_rows(path, read_json_rows(path))
    kinds = ", ".join(FILE_SUFFIXES)
    raise UserError(f"{path}: unsupported file type (use {kinds} or a save_to_disk directory)")


def _load_hub(spec: SourceSpec) -> datasets.Dataset:
    try:
        return datasets.load_dataset(spec.name, split=spec.split)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all are user-facing here
        raise UserError(
            f"cannot load dataset {spec.name!r} split {spec.split!r} ({first_line(e)})"
        ) from None


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(
            f"{path}: not a dataset directory written by save_to_disk ({first_line(e)})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{path}: no split {split!r} (has {', '.join(loaded)})")
        return loaded[split]
    return loaded


def read_json_rows(path: Path) -> list[dict]:
    """A JSON array of objects, or JSON lines (one object per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable file ({first_line(e)})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise UserError(f"{path} row {i}: expected a JSON object")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {lineno}: expected a JSON object")
        rows.append(row)
    return rows


def _from_rows(path: Path, rows: list[dict]) -> datasets.Dataset:
    """Rows -> Dataset with the columns of every row (a key first seen in a later row is kept;
    rows without it hold None); when arrow cannot type a column, name the offending row instead."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    try:
        return datasets.Dataset.from_dict({k: [row.get(k) for row in rows] for k in keys})
    except (pa.ArrowException, TypeError, ValueError) as e:
        fmt = detect_format(str(path), list(rows[0]) if rows else [], rows[0] if rows else None)
        validate_rows(str(path), fmt, rows)
        raise UserError(f"{path}: columns with mixed types ({first_line(e)})") from None
