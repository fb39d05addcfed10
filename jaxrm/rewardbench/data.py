"""A benchmark's rows: read (a local file or the hub dataset), validated row by row (errors name
the file, row and key), turned into single-turn conversations and tokenized once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from jaxrm.data.sources import SourceSpec, load_source, read_json_rows
from jaxrm.errors import UserError
from jaxrm.rewardbench.rules import REWARDBENCH, TIES, Benchmark, parse_ties_id
from jaxrm.tokenizer import encode_conversation

DEFAULT_MAX_LENGTH = 4096
Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class BenchmarkRow:
    """One row: its completions as conversations, chosen first."""

    subset: str
    id: str
    num_correct: int
    conversations: list[Messages]


@dataclasses.dataclass
class PreparedBenchmark:
    """A benchmark's rows tokenized for one tokenizer and length limit, ready to score."""

    benchmark: Benchmark
    data: str
    split: str | None  # None for a local file
    rows: list[BenchmarkRow]
    token_ids: list[list[list[int]] | None]  # per row; None: too long to score
    max_length: int

    @property
    def unknown_subsets(self) -> list[str]:
        return sorted({r.subset for r in self.rows} - set(self.benchmark.subsets))


def _load_rows(data: str, split: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and column names. A local JSON file is read as plain rows, not typed by arrow, so
    that a row of the wrong shape is named by `parse_row` rather than by arrow's cast."""
    path = Path(os.path.expanduser(data))
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        rows = read_json_rows(path)
        return rows, list(dict.fromkeys(key for row in rows for key in row))
    dataset = load_source(SourceSpec(data, "1.0", split))
    return dataset.to_list(), dataset.column_names


def read_rows(benchmark: Benchmark, data: str, split: str) -> list[dict[str, Any]]:
    """The rows of a local file or hub dataset, checked for the benchmark's columns."""
    rows, columns = _load_rows(data, split)
    if not rows:
        raise UserError(f"{data}: no rows")
    missing = [c for c in benchmark.columns if c not in columns]
    if missing:
        raise UserError(
            f"{data}: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(repr, missing))} for {benchmark.title} "
            f"(columns: {', '.join(columns)})"
        )
    return rows


def _kind(value: Any) -> str:
    """What a JSON value is, in words."""
    kinds = {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    kinds |= {int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _string(row: dict[str, Any], key: str, where: str) -> str:
    if key not in row:
        raise UserError(f"{where}: no {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: {key!r} must be a string, got {_kind(value)}")
    return value


def _strings(row: dict[str, Any], key: str, where: str) -> list[str]:
    if key not in row:
        raise UserError(f"{where}: no {key!r}")
    value = row[key]
    if not isinstance(value, list):
        raise UserError(f"{where}: {key!r} must be a list of strings, got {_kind(value)}")
    if not value:
        raise UserError(f"{where}: {key!r} is an empty list; it needs at least one completion")
    for j, item in enumerate(value):
        if not isinstance(item, str):
            raise UserError(f"{where}: {key}[{j}] must be a string, got {_kind(item)}")
    return value


def _turns(prompt: str, completion: str) -> Messages:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def parse_row(benchmark: Benchmark, row: dict[str, Any], where: str) -> BenchmarkRow:
    """Validates one row (errors name the file, row and key) into its conversations."""
    prompt = _string(row, "prompt", where)
    subset = _string(row, "subset", where)
    if benchmark.name == REWARDBENCH:
        pair = [_string(row, "chosen", where), _string(row, "rejected", where)]
        return BenchmarkRow(subset, str(row.get("id", "")), 1, [_turns(prompt, c) for c in pair])
    chosen, rejected = _strings(row, "chosen", where), _strings(row, "rejected", where)
    total = len(chosen) + len(rejected)
    num_correct = row.get("num_correct")
    if isinstance(num_correct, bool) or not isinstance(num_correct, int):
        raise UserError(f"{where}: 'num_correct' must be an integer, got {num_correct!r}")
    if not 1 <= num_correct < total:
        raise UserError(
            f"{where}: 'num_correct' is {num_correct}; it must leave at least one correct and "
            f"one incorrect among the {total} completions"
        )
    if row.get("total_completions") not in (None, total):
        raise UserError(
            f"{where}: 'total_completions' is {row['total_completions']}, but 'chosen' and "
            f"'rejected' hold {total}"
        )
    row_id = row.get("id")
    if subset == TIES and parse_ties_id(row_id) is None:
        raise UserError(f"{where}: Ties id {row_id!r} is not 'ref:<number>' or 'tied:<number>'")
    conversations = [_turns(prompt, c) for c in chosen + rejected]
    return BenchmarkRow(subset, "" if row_id is None else str(row_id), num_correct, conversations)


def prepare_benchmark(
    benchmark: Benchmark,
    tokenizer,
    *,
    data: str | None = None,
    split: str | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> PreparedBenchmark:
    """Loads, validates and tokenizes a benchmark; rows over `max_length` tokens are marked."""
    if max_length < 1:
        raise UserError(f"--max_length must be >= 1, got {max_length}")
    data = data or benchmark.hub_id
    split = split or benchmark.split
    raw = read_rows(benchmark, data, split)
    rows = [parse_row(benchmark, row, f"{data} row {i}") for i, row in enumerate(raw)]
    token_ids: list[list[list[int]] | None] = []
    for i, row in enumerate(rows):
        ids = [encode_conversation(tokenizer, c, f"{data} row {i}") for c in row.conversations]
        token_ids.append(ids if max(map(len, ids)) <= max_length else None)
    local = os.path.exists(os.path.expanduser(data))
    return PreparedBenchmark(benchmark, data, None if local else split, rows, token_ids, max_length)
