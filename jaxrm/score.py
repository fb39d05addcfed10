"""`python -m jaxrm.score`: reward every conversation of a data file with an HF reward model.

    python -m jaxrm.score --model DIR_OR_HUB_ID_OR_RUN_DIR [--step N] --data FILE --output FILE
        [--batch_size 16] [--dtype float32|bfloat16] [--tokenizer DIR]

`--model` is an HF reward-model directory or hub id, or a jaxrm training output directory (its
orbax checkpoint `--step`, default the latest, read directly; the tokenizer saved by training).

A row with `chosen` and `rejected` message lists gets `chosen_reward` and `rejected_reward`; a row
with `messages` gets `reward`; a K-wise row, `prompt` (a string or a message list) or `messages`
(the conversation so far) with `responses` (each a string or an assistant-only message list) and
optionally `scores` (higher is better) or a `ranking` (1 = best), gets `rewards`, one per
response. Rows are written in input order (jsonl, json or parquet, by the output's suffix) with
all their fields plus the rewards (a non-finite reward as null, with a warning). Printed at the
end: pair rows' accuracy and mean margin; for K-wise rows with scores or a ranking, the pairwise
accuracy over the pairs they imply (ties skipped) and the top-1 accuracy (a best-scored response
gets the strictly highest reward).

Conversations are packed into rows of one shape, like training, so the forward pass compiles
once; the responses of a row (a pair's chosen and rejected, a K-wise row's responses) share
their prompt, computed once per row (`jaxrm.scoring.score_token_ids` with `groups`). Each
distinct token sequence is scored once and every copy gets its reward, so identical
conversations tie exactly, and a file's row order or repeated rows change no reward.

Refused up front, in one line, before any scoring: an `--output` that is a directory or cannot be
written; a message role the chat template drops (as training refuses it); a conversation longer
than the model's context (`max_position_embeddings`); a model holding a non-finite weight.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrm.data.formats import (
    CONVERSATIONAL,
    Messages,
    detect_format,
    normalize,
    validate_conversation,
)
from jaxrm.data.sources import SourceSpec, load_source, read_json_rows
from jaxrm.dtypes import EXPORT_DTYPES
from jaxrm.errors import UserError, exit_on_user_error, run_cli
from jaxrm.logs import setup_logging
from jaxrm.rundir import check_output_file
from jaxrm.scoring import ModelSource, load_model, locate_model, score_token_ids
from jaxrm.sharding import make_mesh
from jaxrm.tokenizer import check_roles, encode_conversation, load_tokenizer

Key = str | int  # the column of a conversation ("messages", "chosen", "rejected"), or response j


def reward_field(key: Key) -> str:
    """The field a conversation's reward is written to: `reward` for `messages`,
    `chosen_reward` / `rejected_reward`, and `rewards` (a list) for a K-wise row's responses."""
    if isinstance(key, int):
        return "rewards"
    return "reward" if key == "messages" else f"{key}_reward"


def key_name(key: Key) -> str:
    return f"responses[{key}]" if isinstance(key, int) else key


def conversations_of(rows: Sequence[dict[str, Any]], name: str) -> list[tuple[int, Key, list]]:
    """(row, key, messages) for every conversation to score, validated; key is the column
    (`messages`, `chosen` or `rejected`) or a K-wise row's response number."""
    columns = list(rows[0]) if rows else []
    if "responses" in columns:
        return [
            (i, j, messages)
            for i, row in enumerate(rows)
            for j, messages in enumerate(kwise_conversations(row, f"{name} row {i}"))
        ]
    if "messages" in columns and "chosen" not in columns:
        out: list[tuple[int, Key, list]] = []
        for i, row in enumerate(rows):
            if "messages" not in row:
                raise UserError(f"{name} row {i}: missing key 'messages'")
            messages = validate_conversation(row["messages"], f"{name} row {i}", "messages")
            out.append((i, "messages", messages))
        return out
    try:
        fmt = detect_format(name, columns, rows[0] if rows else None)
    except UserError:
        raise UserError(
            f"{name}: rows need 'chosen' and 'rejected' message lists, 'messages', or "
            f"'responses' (columns: {', '.join(columns) or 'none'})"
        ) from None
    if fmt != CONVERSATIONAL:
        raise UserError(
            f"{name}: jaxrm.score reads 'chosen'/'rejected' message lists, 'messages', or "
            "'responses'"
        )
    out = []
    for i, row in enumerate(rows):
        example = normalize(name, fmt, row, i)
        out += [(i, "chosen", example.chosen), (i, "rejected", example.rejected)]
    return out


def kwise_conversations(row: dict[str, Any], where: str) -> list[Messages]:
    """A K-wise row's conversations, one per response: its prompt (`prompt`: a string is one
    user message; or `messages`) followed by the response (a string is one assistant message);
    `scores` or `ranking`, when present, are checked (`kwise_scores`)."""
    context = [k for k in ("prompt", "messages") if row.get(k) is not None]
    if len(context) != 1:
        given = "it has both" if context else "it has neither"
        raise UserError(f"{where}: a 'responses' row needs one of 'prompt' or 'messages' ({given})")
    key = context[0]
    value = row[key]
    prompt = [{"role": "user", "content": value}] if isinstance(value, str) else value
    prompt = validate_messages(prompt, where, key)
    responses = row.get("responses")
    if not isinstance(responses, list) or not responses:
        raise UserError(f"{where}: 'responses' must be a non-empty list of responses")
    out = []
    for j, response in enumerate(responses):
        label = f"responses[{j}]"
        if isinstance(response, str):
            response = [{"role": "assistant", "content": response}]
        turns = validate_messages(response, where, label)
        if any(m["role"] != "assistant" for m in turns):
            raise UserError(f"{where}: {label} must be a string or assistant-only messages")
        out.append(prompt + turns)
    kwise_scores(row, where)
    return out


def kwise_scores(row: dict[str, Any], where: str) -> list[float] | None:
    """A K-wise row's scores (higher is better; a ranking's as -rank), None without either."""
    given = [k for k in ("scores", "ranking") if row.get(k) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise UserError(f"{where}: give 'scores' or 'ranking', not both")
    key, values, count = given[0], row[given[0]], len(row["responses"])
    if not isinstance(values, list) or len(values) != count:
        raise UserError(f"{where}: {key!r} must be a list of {count} numbers, one per response")
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise UserError(f"{where}: {key}[{j}] must be a finite number, got {v!r}")
    return [float(v) for v in values] if key == "scores" else [-float(v) for v in values]


def validate_messages(value: Any, where: str, key: str) -> Messages:
    """A non-empty `{role, content}` string message list ending with any turn (checked as a
    conversation ending with an assistant turn after it)."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: {key!r} must be a string or a non-empty list of messages")
    return validate_conversation([*value, {"role": "assistant", "content": ""}], where, key)[:-1]


def check_context(
    token_ids: list[list[int]],
    conversations: list[tuple[int, Key, list]],
    source: ModelSource,
    data: str,
) -> None:
    """Refuses conversations longer than the model's context (`max_position_embeddings`): their
    rewards would come from positions the model never saw. Names how many rows, the first one,
    its length and the limit."""
    limit = source.hf_config.get("max_position_embeddings")
    if not isinstance(limit, int):
        return
    lengths = zip(conversations, map(len, token_ids), strict=True)
    long = [(i, key, n) for (i, key, _), n in lengths if n > limit]
    if long:
        row, key, n = long[0]
        count = len({i for i, _, _ in long})
        raise UserError(
            f"{data}: {count} rows hold conversations longer than the {limit} tokens of "
            f"{source.describe()}'s context (max_position_embeddings), the first row {row} "
            f"({key_name(key)!r}: {n} tokens); shorten or remove them"
        )


def read_rows(data: str) -> list[dict[str, Any]]:
    """The rows of a file (or hub dataset). Local JSON K-wise rows are kept as written: arrow
    cannot type `responses` that mix strings and message lists."""
    path = Path(os.path.expanduser(data))
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        rows = read_json_rows(path)
        if rows and "responses" in rows[0]:
            return rows
    return load_source(SourceSpec(data, "1.0", "train")).to_list()


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float as None: JSON has no NaN (json.dumps would write a bare
    `NaN` that strict readers refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, **kwargs)
    except ValueError:  # a non-finite float somewhere: rare, so cleaned only then
        return json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False, **kwargs)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Writes rows atomically (temporary file, then rename) as jsonl, json or parquet; a
    non-finite number is written as null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        elif path.suffix == ".json":
            tmp.write_text(to_json(rows, indent=1))
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(to_json(row) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def set_rewards(
    rows: list[dict[str, Any]], conversations: list[tuple[int, Key, list]], rewards: np.ndarray
) -> list[dict[str, Any]]:
    """Copies of `rows` with each conversation's reward (None where not finite, with a warning);
    a K-wise row's `rewards` in the order of its `responses`."""
    scored = [dict(row) for row in rows]
    for (i, key, _), reward in zip(conversations, rewards, strict=True):
        value = float(reward) if np.isfinite(reward) else None
        if isinstance(key, int):
            if key == 0:  # a fresh list, even where the input row has `rewards`
                scored[i]["rewards"] = [None] * len(rows[i]["responses"])
            scored[i]["rewards"][key] = value
        else:
            scored[i][reward_field(key)] = value
    bad = int(np.count_nonzero(~np.isfinite(rewards)))
    if bad:
        print(
            f"warning: {bad} conversations got a non-finite reward, written as null",
            file=sys.stderr,
        )
    return scored


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jaxrm.score", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model", required=True, help="HF reward-model directory or hub id, or a training run"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint of a training run")
    parser.add_argument("--data", required=True, help="jsonl, json or parquet file")
    parser.add_argument("--output", required=True, help="where to write the scored rows")
    parser.add_argument("--tokenizer", default=None, help="defaults to the model's tokenizer")
    parser.add_argument("--batch_size", type=int, default=16, help="conversations per forward")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32")
    parser.add_argument("--no_progress", action="store_true")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    setup_logging()
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    output = Path(os.path.expanduser(args.output))
    check_output_file(output)
    rows = read_rows(args.data)
    conversations = conversations_of(rows, args.data)
    source = locate_model(args.model, step=args.step, tokenizer=args.tokenizer)
    tokenizer = load_tokenizer(source.tokenizer)
    rendered: set[str] = set()
    for i, key, messages in conversations:
        check_roles(tokenizer, messages, f"{args.data} row {i}", key_name(key), rendered)
    token_ids = [
        encode_conversation(tokenizer, messages, f"{args.data} row {i}")
        for i, _, messages in conversations
    ]
    check_context(token_ids, conversations, source, args.data)
    mesh = make_mesh(1, -1, 1)
    model, source = load_model(source, mesh, dtype=args.dtype, vocab_size=len(tokenizer))
    rows_of = [i for i, _, _ in conversations]  # a row's conversations share its prompt
    progress = not args.no_progress
    rewards = score_token_ids(model, token_ids, args.batch_size, mesh, progress, groups=rows_of)
    scored = set_rewards(rows, conversations, rewards)
    write_rows(output, scored)
    summary = pair_summary(scored) | kwise_summary(scored, args.data)
    if "pairs" in summary:
        print(
            f"{summary['pairs']} pairs: accuracy {summary['accuracy']:.4f}, "
            f"mean margin {summary['mean_margin']:.4f} -> {output}"
        )
    elif "kwise_rows" in summary:
        print(
            f"{summary['kwise_rows']} rows with scores, {summary['kwise_pairs']} implied pairs: "
            f"pairwise accuracy {summary['pairwise_accuracy']:.4f}, top-1 accuracy "
            f"{summary['top1_accuracy']:.4f} -> {output}"
        )
    else:
        print(f"{len(conversations)} conversations scored -> {output}")
    return summary


def pair_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    pairs = [
        (r["chosen_reward"], r["rejected_reward"])
        for r in rows
        if r.get("chosen_reward") is not None and r.get("rejected_reward") is not None
    ]
    if not pairs:
        return {}
    margins = np.array([c - r for c, r in pairs], np.float64)
    return {
        "pairs": len(pairs),
        "accuracy": float(np.mean(margins > 0)),
        "mean_margin": float(np.mean(margins)),
    }


def kwise_summary(rows: list[dict[str, Any]], data: str) -> dict[str, float]:
    """Over K-wise rows with scores (or a ranking) and finite rewards: the pairwise accuracy over
    the pairs the scores imply (ties skipped) and the top-1 accuracy (a best-scored response gets
    the strictly highest reward); rows whose scores all tie imply nothing and are left out."""
    correct = pairs = top1 = counted = 0
    for i, row in enumerate(rows):
        kwise = "responses" in row and "rewards" in row
        scores = kwise_scores(row, f"{data} row {i}") if kwise else None
        rewards = row.get("rewards")
        if scores is None or rewards is None or None in rewards or len(set(scores)) < 2:
            continue
        s, r = np.array(scores), np.array(rewards, np.float64)
        higher = s[:, None] > s[None, :]  # [a, b]: a is scored above b
        pairs += int(higher.sum())
        correct += int((higher & (r[:, None] > r[None, :])).sum())
        best = np.flatnonzero(r == r.max())
        top1 += int(len(best) == 1 and s[best[0]] == s.max())
        counted += 1
    if not counted:
        return {}
    return {
        "kwise_rows": counted,
        "kwise_pairs": pairs,
        "pairwise_accuracy": correct / pairs,
        "top1_accuracy": top1 / counted,
    }


if __name__ == "__main__":
    run_cli(main)
