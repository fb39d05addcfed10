"""Tensor files of an HF model directory: safetensors (single or sharded with an index) read lazily,
`pytorch_model.bin` when torch is installed, and safetensors shards written one tensor at a time.

Reading parses the safetensors header itself and memory-maps each tensor, so bf16 needs no torch
and a caller that slices a tensor reads only that slice. Writing plans every shard's header from
the shapes first, then streams tensors in, so no shard is ever held whole in memory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxrm.dtypes import FROM_SAFETENSORS, TO_SAFETENSORS
from jaxrm.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

# ----------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are in a safetensors file."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """name -> location, from a safetensors file's header (the data is not read). A file shorter
    than its header says (cut off by a failed download or copy) is a one-line error here, not a
    memory-map failure when the tensor is read."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        size = path.stat().st_size
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)")
    entries = {}
    data_end = 8 + header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = FROM_SAFETENSORS.get(info["dtype"])
            begin, end = (8 + header_len + int(x) for x in info["data_offsets"])
            shape = tuple(int(n) for n in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name} has a malformed header entry") from None
        if dtype is None:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        entries[name] = StoredTensor(path, dtype, shape, begin)
        data_end = max(data_end, end)
    if size < data_end:
        raise UserError(
            f"{path}: truncated safetensors file ({size:,} bytes, its header needs {data_end:,}); "
            "download or copy it again"
        )
    return entries


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model directory: an index's shards, or the single file."""
    d = Path(model_dir)
    for index_name, single in ((INDEX_FILE, SINGLE_FILE), (TORCH_INDEX_FILE, TORCH_FILE)):
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise UserError(f"{index}: not a valid checkpoint index ({e})") from None
            files = [d / f for f in sorted(set(weight_map.values()))]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{index} names {missing[0].name}, which is missing")
            return files
        if (d / single).is_file():
            return [d / single]
    raise UserError(f"{d}: no model weights ({SINGLE_FILE} or {TORCH_FILE}) found")


class WeightFiles:
    """Lazy access by name to the tensors of a model directory (safetensors, or .bin with torch)."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._safetensors: dict[str, StoredTensor] = {}
        self._torch: dict[str, Any] = {}
        for f in weight_files(self.model_dir):
            if f.suffix == ".safetensors":
                self._safetensors.update(read_safetensors_header(f))
            else:
                self._torch.update(_torch_load(f))

    def names(self) -> set[str]:
        return set(self._safetensors) | set(self._torch)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._safetensors:
            return self._safetensors[name].shape
        return tuple(self._torch[name].shape)

    def tensor(self, name: str) -> np.ndarray:
        """A memory-mapped (lazily read) view of the tensor."""
        if name in self._torch:
            return _torch_to_numpy(self._torch[name])
        stored = self._safetensors[name]
        if 0 in stored.shape:
            return np.zeros(stored.shape, stored.dtype)
        return np.memmap(
            stored.path, dtype=stored.dtype, mode="r", offset=stored.offset, shape=stored.shape
        )


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path}: reading {TORCH_FILE} needs torch; convert the checkpoint to "
            "safetensors or install torch"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({e})") from None


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# ----------------------------------------------------------------------------------------------
# Writing


def parse_size(size: str | int) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '100KB', '2GiB' (transformers' units)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = match.group(2).lower() if match else None
        if unit not in _SIZE_UNITS:
            raise UserError(f"--max_shard_size {size!r}: expected a size like 5GB, 500MB or 100KB")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise UserError(f"--max_shard_size {size!r} must be positive")
    return value


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def split_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most `max_shard_size` bytes (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(tensors: list[PlannedTensor]) -> bytes:
    """The length-prefixed JSON header (padded to 8 bytes) for tensors stored in this order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_tensor(f: Any, planned: PlannedTensor, value: np.ndarray) -> None:
    """Appends one tensor's bytes after checking it is the planned, whole tensor."""
    if value.shape != planned.shape or value.dtype != planned.dtype:
        raise RuntimeError(
            f"export: {planned.name} is {value.dtype}{list(value.shape)}, expected "
            f"{planned.dtype}{list(planned.shape)}"
        )
    np.ascontiguousarray(value).tofile(f)


def write_safetensors(
    directory: Path,
    tensors: Iterator[tuple[str, np.ndarray]],
    plan: list[PlannedTensor],
    max_shard_size: int,
    writer: bool,
) -> None:
    """Streams `tensors` (in plan order) into shard files (plus an index when there are several);
    a non-writer (another process of a multi-host export) only drains the iterator."""
    shards = split_shards(plan, max_shard_size)
    names = shard_names(len(shards))
    for shard, file_name in zip(shards, names, strict=True):
        f = open(directory / file_name, "wb") if writer else None
        try:
            if f is not None:
                f.write(safetensors_header(shard))
            for planned in shard:
                name, value = next(tensors)
                if name != planned.name:
                    raise RuntimeError(f"export: got {name}, expected {planned.name}")
                if f is not None:
                    write_tensor(f, planned, value)
        finally:
            if f is not None:
                f.close()
    if writer and len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in plan)},
            "weight_map": {t.name: n for s, n in zip(shards, names, strict=True) for t in s},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
