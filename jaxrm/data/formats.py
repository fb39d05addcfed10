"""Preference-data formats: detect one per dataset, validate and normalize each row.

- `conversational`: `chosen` and `rejected` are full message lists (`{role, content}`); the prompt
  is `chosen[:-1]` (open-instruct). A `prompt` column next to full conversations (as in
  ultrafeedback_binarized) is ignored.
- `explicit_prompt`: a `prompt` column (a string = one user message, or a message list) and
  `chosen`/`rejected` completions (a string = one assistant message, or assistant-only lists);
  the conversation is prompt + completion.
- `pretokenized`: `chosen_input_ids`/`rejected_input_ids` used as is; an optional
  `prompt_input_ids` gives the prompt length for the prompt filter.

Every format may carry a numeric `margin` column (0.0 when absent or null). A conversational pair
whose chosen and rejected prompts differ is counted (`prompt_differs`) and reported, not rejected.

K-wise formats (`preference_format="kwise"`: one prompt, K scored responses; see `Group`):

- `kwise`: a `prompt` (a string = one user message, or a message list) or `messages` (a message
  list, the prompt), `responses` (K >= 2 completions: a string = one assistant message, or an
  assistant-only message list) and exactly one of `scores` (K numbers, higher is better) or
  `ranking` (K ints, 1 = best, equal ranks = ties; stored as score -rank).
- `kwise_pretokenized`: `responses_input_ids` (K token-id lists, each the full sequence) with
  `scores` or `ranking`, and an optional `prompt_input_ids` (the prompt length).
- `ultrafeedback` (openbmb/UltraFeedback): `instruction` and `completions`, each a dict with the
  `response` and its ratings; the score is one numeric field of each completion, `overall_score`
  by default (as in HuggingFaceH4/ultrafeedback_binarized's create_dataset.py, which ranks
  completions by `c["overall_score"]` of the UltraFeedback revision with the fixed scores,
  https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized/blob/main/create_dataset.py;
  `fine-grained_score`, the mean of the four aspect ratings, is the alternative that Argilla's
  binarized sets use). A row may hold fewer than two completions; the filter drops it and counts it.
- `rewardbench2` (allenai/reward-bench-2): a `prompt` string with `chosen` and `rejected` lists of
  completion strings; each chosen scores 1, each rejected 0 (chosen against chosen are ties).
- every pair format: a group of two, chosen (score 1) then rejected (score 0); a `margin` column is
  ignored (counted, so that a warning can say so).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from jaxrm.errors import UserError

CONVERSATIONAL = "conversational"
EXPLICIT_PROMPT = "explicit_prompt"
PRETOKENIZED = "pretokenized"
KWISE = "kwise"
KWISE_PRETOKENIZED = "kwise_pretokenized"
ULTRAFEEDBACK = "ultrafeedback"
REWARDBENCH2 = "rewardbench2"
KWISE_ONLY = (KWISE, KWISE_PRETOKENIZED, ULTRAFEEDBACK, REWARDBENCH2)
TOKEN_ID_FORMATS = (PRETOKENIZED, KWISE_PRETOKENIZED)
DEFAULT_ULTRAFEEDBACK_SCORE = "overall_score"

Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Example:
    """One normalized row: conversations (or token ids for `pretokenized`) and the prompt."""

    chosen: Messages | list[int]
    rejected: Messages | list[int]
    prompt: Messages | list[int] | None
    margin: float
    prompt_differs: bool


@dataclasses.dataclass(frozen=True)
class Group:
    """One normalized K-wise row: K conversations (or token-id lists for the pre-tokenized
    formats), their scores, the prompt, and what a pair source carried that a group drops."""

    responses: list[Messages] | list[list[int]]
    scores: list[float]
    prompt: Messages | list[int] | None
    margin: float = 0.0  # a pair row's margin (ignored in a group)
    prompt_differs: bool = False


def detect_format(name: str, columns: list[str], first_row: dict[str, Any] | None) -> str:
    """The format of a dataset from its columns (and its first row, to tell full conversations
    from completions when there is a `prompt` column, and completions from RewardBench 2's lists
    of strings). Pair columns come first, so a pair set with extra columns stays a pair set."""
    cols = set(columns)
    if "chosen_input_ids" in cols or "rejected_input_ids" in cols:
        _require(name, cols, ("chosen_input_ids", "rejected_input_ids"))
        return PRETOKENIZED
    if "chosen" in cols or "rejected" in cols:
        _require(name, cols, ("chosen", "rejected"))
        chosen = first_row.get("chosen") if first_row else None
        if "prompt" in cols and _is_string_list(chosen):
            return REWARDBENCH2
        if "prompt" in cols and _is_completion(chosen):
            return EXPLICIT_PROMPT
        if isinstance(chosen, str):
            raise UserError(f"{name}: column 'chosen' holds strings but no 'prompt' column exists")
        return CONVERSATIONAL
    if "responses_input_ids" in cols:
        return KWISE_PRETOKENIZED
    if "responses" in cols:
        if "prompt" not in cols and "messages" not in cols:
            raise UserError(f"{name}: column 'responses' needs a 'prompt' or 'messages' column")
        return KWISE
    if "completions" in cols and "instruction" in cols:
        return ULTRAFEEDBACK
    raise UserError(
        f"{name}: unknown preference format (columns: {', '.join(sorted(cols)) or 'none'}); "
        "expected 'chosen'/'rejected' message lists, a 'prompt' column with 'chosen'/'rejected', "
        "or 'chosen_input_ids'/'rejected_input_ids'; K-wise: 'responses' with 'scores' or "
        "'ranking', 'responses_input_ids', or UltraFeedback's 'instruction'/'completions'"
    )


def check_preference_format(name: str, fmt: str, preference_format: str) -> None:
    """Refuses a K-wise-only source when training on pairs."""
    if preference_format == "pairs" and fmt in KWISE_ONLY:
        raise UserError(
            f"{name}: a K-wise dataset ({fmt} format: several scored responses per prompt); set "
            "--config.preference_format=kwise to train on it"
        )


def normalize(name: str, fmt: str, row: dict[str, Any], index: int) -> Example:
    """Validates one row (errors name the dataset, row and key) and normalizes it."""
    where = f"{name} row {index}"
    for key in _required_columns(fmt):
        if row.get(key) is None:
            raise UserError(f"{where}: missing key {key!r}")
    margin = row.get("margin")  # absent or null: 0.0
    margin = _margin(0.0 if margin is None else margin, where)
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


def normalize_group(
    name: str, fmt: str, row: dict[str, Any], index: int, ultrafeedback_score: str
) -> Group:
    """Validates one row of any format (errors name the dataset, row and key) as a `Group`."""
    where = f"{name} row {index}"
    if fmt not in KWISE_ONLY:
        e = normalize(name, fmt, row, index)
        return Group([e.chosen, e.rejected], [1.0, 0.0], e.prompt, e.margin, e.prompt_differs)
    if fmt == ULTRAFEEDBACK:
        return _ultrafeedback(row, where, ultrafeedback_score)
    if fmt == REWARDBENCH2:
        return _rewardbench2(row, where)
    key = "responses_input_ids" if fmt == KWISE_PRETOKENIZED else "responses"
    values = row.get(key)
    if values is None:
        raise UserError(f"{where}: missing key {key!r}")
    if not isinstance(values, list) or len(values) < 2:
        raise UserError(f"{where}: {key!r} must be a list of at least two responses")
    scores = _group_scores(row, len(values), where)
    if fmt == KWISE_PRETOKENIZED:
        ids = [_token_ids(v, where, f"{key}[{i}]") for i, v in enumerate(values)]
        prompt = row.get("prompt_input_ids")
        prompt = None if prompt is None else _token_ids(prompt, where, "prompt_input_ids", True)
        return Group(ids, scores, prompt)
    if row.get("prompt") is not None and row.get("messages") is not None:
        raise UserError(f"{where}: both 'prompt' and 'messages' given; keep one")
    if row.get("prompt") is not None:
        prompt = _as_messages(row["prompt"], "user", where, "prompt")
    elif row.get("messages") is not None:
        prompt = _messages(row["messages"], where, "messages")
    else:
        raise UserError(f"{where}: missing key 'prompt' (or 'messages')")
    return Group(_completions(prompt, values, where, key), scores, prompt)


def validate_rows(
    name: str,
    fmt: str,
    rows: Iterable[dict[str, Any]],
    ultrafeedback_score: str = DEFAULT_ULTRAFEEDBACK_SCORE,
) -> None:
    """Normalizes every row only for its errors."""
    for i, row in enumerate(rows):
        if fmt in KWISE_ONLY:
            normalize_group(name, fmt, row, i, ultrafeedback_score)
        else:
            normalize(name, fmt, row, i)


def _completions(prompt: Messages, values: list, where: str, key: str) -> list[Messages]:
    out = []
    for i, value in enumerate(values):
        if not _is_completion(value):
            raise UserError(f"{where}: {key}[{i}] must be a string or a list of assistant messages")
        conv = prompt + _as_messages(value, "assistant", where, f"{key}[{i}]")
        out.append(_check_last_turn(conv, where, f"{key}[{i}]"))
    return out


def _group_scores(row: dict[str, Any], k: int, where: str) -> list[float]:
    """`scores`, or `ranking` as -rank: exactly one, K finite numbers."""
    has_scores, has_ranking = row.get("scores") is not None, row.get("ranking") is not None
    if has_scores == has_ranking:
        which = "both" if has_scores else "neither of"
        raise UserError(f"{where}: {which} 'scores' and 'ranking' given; give exactly one")
    key = "scores" if has_scores else "ranking"
    values = row[key]
    if not isinstance(values, list) or len(values) != k:
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise UserError(f"{where}: {key!r} must hold one number per response ({k}), got {got}")
    out = [_number(v, where, f"{key}[{i}]") for i, v in enumerate(values)]
    if key == "ranking":
        for i, (v, r) in enumerate(zip(values, out, strict=True)):
            if not r.is_integer() or r < 1:
                raise UserError(f"{where}: ranking[{i}] must be an integer rank >= 1, got {v!r}")
        out = [-r for r in out]
    return out


def _ultrafeedback(row: dict[str, Any], where: str, score_key: str) -> Group:
    for key in ("instruction", "completions"):
        if row.get(key) is None:
            raise UserError(f"{where}: missing key {key!r}")
    if not isinstance(row["instruction"], str):
        raise UserError(f"{where}: 'instruction' must be a string")
    if not isinstance(row["completions"], list):
        raise UserError(f"{where}: 'completions' must be a list of completions")
    prompt = [{"role": "user", "content": row["instruction"]}]
    responses, scores = [], []
    for i, completion in enumerate(row["completions"]):
        key = f"completions[{i}]"
        if not isinstance(completion, dict):
            raise UserError(f"{where}: {key} must be a dict with 'response' and its ratings")
        if not isinstance(completion.get("response"), str):
            raise UserError(f"{where}: {key} has no 'response' string")
        if completion.get(score_key) is None:
            raise UserError(
                f"{where}: {key} has no {score_key!r} (the UltraFeedback score key; see "
                "ultrafeedback_score)"
            )
        scores.append(_number(completion[score_key], where, f"{key}.{score_key}"))
        responses.append(prompt + [{"role": "assistant", "content": completion["response"]}])
    return Group(responses, scores, prompt)


def _rewardbench2(row: dict[str, Any], where: str) -> Group:
    if not isinstance(row.get("prompt"), str):
        raise UserError(f"{where}: 'prompt' must be a string")
    prompt = [{"role": "user", "content": row["prompt"]}]
    responses, scores = [], []
    for key, score in (("chosen", 1.0), ("rejected", 0.0)):
        values = row.get(key)
        if not _is_string_list(values):
            raise UserError(f"{where}: {key!r} must be a list of completion strings")
        responses += _completions(prompt, values, where, key)
        scores += [score] * len(values)
    return Group(responses, scores, prompt)


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


def _is_string_list(value: Any) -> bool:
    """A non-empty list of strings (RewardBench 2's `chosen` and `rejected`)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


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


def _number(value: Any, where: str, key: str) -> float:
    """A finite number (a score or a rank)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _margin(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{where}: 'margin' must be a number, got {type(value).__name__}")
    return float(value)
