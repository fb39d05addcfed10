"""Preference-data formats: detect one per dataset, validate and normalize each row.

- `conversational`: `chosen` and `rejected` are full message lists (`{role, content}`); the prompt
  is `chosen[:-1]` (open-instruct). A `prompt` column next to full conversations (as in
  ultrafeedback_binarized) is ignored.
- `explicit_prompt`: a `prompt` column (a string = one user message, or a message list) and
  `chosen`/`rejected` completions (a string = one assistant message, or assistant-only lists);
  the conversation is prompt + completion.
- `pretokenized`: `chosen_input_ids`/`rejected_input_ids` used as is; an optional
  `prompt_input_ids` gives the prompt length for the prompt filter.

Every format may carry a numeric `margin` column (0.0 when absent). A conversational pair whose
chosen and rejected prompts differ is counted (`prompt_differs`) and reported, not rejected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from jaxrm.errors import UserError

CONVERSATIONAL = "conversational"
EXPLICIT_PROMPT = "explicit_prompt"
PRETOKENIZED = "pretokenized"

Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Example:
    """One normalized row: conversations (or token ids for `pretokenized`) and the prompt."""

    chosen: Messages | list[int]
    rejected: Messages | list[int]
    prompt: Messages | list[int] | None
    margin: float
    prompt_differs: bool


def detect_format(name: str, columns: list[str], first_row: dict[str, Any] | None) -> str:
    """The format of a dataset from its columns (and its first row, to tell full conversations
    from completions when there is a `prompt` column)."""
    cols = set(columns)
    if "chosen_input_ids" in cols or "rejected_input_ids" in cols:
        _require(name, cols, ("chosen_input_ids", "rejected_input_ids"))
        return PRETOKENIZED
    if "chosen" in cols or "rejected" in cols:
        _require(name, cols, ("chosen", "rejected"))
        chosen = first_row.get("chosen") if first_row else None
        if "prompt" in cols and _is_completion(chosen):
            return EXPLICIT_PROMPT
        if isinstance(chosen, str):
            raise UserError(f"{name}: column 'chosen' holds strings but no 'prompt' column exists")
        return CONVERSATIONAL
    raise UserError(
        f"{name}: unknown preference format (columns: {', '.join(sorted(cols)) or 'none'}); "
        "expected 'chosen'/'rejected' message lists, a 'prompt' column with 'chosen'/'rejected', "
        "or 'chosen_input_ids'/'rejected_input_ids'"
    )


def normalize(name: str, fmt: str, row: dict[str, Any], index: int) -> Example:
    """Validates one row (errors name the dataset, row and key) and normalizes it."""
    where = f"{name} row {index}"
    for key in _required_columns(fmt):
        if row.get(key) is None:
            raise UserError(f"{where}: missing key {key!r}")
    margin = _margin(row.get("margin", 0.0), where)
    if fmt == PRETOKENIZED:
        prompt = row.get("prompt_input_ids")
        return Example(
            _token_ids(row["chosen_input_ids"], where, "chosen_input_ids"),
            _token_ids(row["rejected_input_ids"], where, "rejected_input_ids"),
            None if prompt is None else _token_ids(prompt, where, "prompt_input_ids", True),
            margin,
            False,
        )
    if fmt == EXPLICIT_PROMPT:
        prompt = _as_messages(row["prompt"], "user", where, "prompt")
        chosen = prompt + _as_messages(row["chosen"], "assistant", where, "chosen")
        rejected = prompt + _as_messages(row["rejected"], "assistant", where, "rejected")
        _check_last_turn(chosen, where, "chosen")
        _check_last_turn(rejected, where, "rejected")
    else:
        chosen = validate_conversation(row["chosen"], where, "chosen")
        rejected = validate_conversation(row["rejected"], where, "rejected")
    return Example(chosen, rejected, chosen[:-1], margin, chosen[:-1] != rejected[:-1])


def validate_conversation(value: Any, where: str, key: str) -> Messages:
    """A non-empty `{role, content}` string message list ending with an assistant turn."""
    return _check_last_turn(_messages(value, where, key), where, key)


def validate_rows(name: str, fmt: str, rows: Iterable[dict[str, Any]]) -> None:
    """Normalizes every row only for its errors."""
    for i, row in enumerate(rows):
        normalize(name, fmt, row, i)


def _check_last_turn(conv: Messages, where: str, key: str) -> Messages:
    if conv[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: the last message of {key!r} is from {conv[-1]['role']!r}, not 'assistant'"
        )
    return conv


def _required_columns(fmt: str) -> tuple[str, ...]:
    if fmt == PRETOKENIZED:
        return ("chosen_input_ids", "rejected_input_ids")
    return ("prompt", "chosen", "rejected") if fmt == EXPLICIT_PROMPT else ("chosen", "rejected")


def _require(name: str, cols: set[str], keys: tuple[str, ...]) -> None:
    for key in keys:
        if key not in cols:
            raise UserError(f"{name}: missing column {key!r} (columns: {', '.join(sorted(cols))})")


def _is_completion(value: Any) -> bool:
    """A string, or a message list with only assistant turns."""
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(m, dict) and m.get("role") == "assistant" for m in value
    )


def _as_messages(value: Any, role: str, where: str, key: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, where, key)


def _messages(value: Any, where: str, key: str) -> Messages:
    if not isinstance(value, list):
        raise UserError(f"{where}: {key!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise UserError(f"{where}: {key!r} is an empty message list")
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise UserError(f"{where}: {key}[{j}] is not a {{role, content}} message")
        for field in ("role", "content"):
            if message.get(field) is None:
                raise UserError(f"{where}: {key}[{j}] has no {field!r}")
            if not isinstance(message[field], str):
                kind = type(message[field]).__name__
                raise UserError(f"{where}: {key}[{j}].{field} must be a string, got {kind}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _token_ids(value: Any, where: str, key: str, allow_empty: bool = False) -> list[int]:
    if not isinstance(value, list | tuple) and not hasattr(value, "tolist"):
        raise UserError(f"{where}: {key!r} must be a list of token ids")
    ids = list(value.tolist() if hasattr(value, "tolist") else value)
    if not ids and not allow_empty:
        raise UserError(f"{where}: {key!r} is empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise UserError(f"{where}: {key!r} must hold non-negative integers")
    return ids


def _margin(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{where}: 'margin' must be a number, got {type(value).__name__}")
    return float(value)
