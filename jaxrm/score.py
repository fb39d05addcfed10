"""`python -m jaxrm.score`: reward every conversation of a data file with an HF reward model.

    python -m jaxrm.score --model DIR_OR_HUB_ID_OR_RUN_DIR [--step N] --data FILE --output FILE
        [--batch_size 16] [--dtype float32|bfloat16] [--tokenizer DIR]

`--model` is an HF reward-model directory or hub id, or a jaxrm training output directory (its
orbax checkpoint `--step`, default the latest, read directly; the tokenizer saved by training).

A row with `chosen` and `rejected` message lists gets `chosen_reward` and `rejected_reward`; a row
with `messages` gets `reward`. Rows are written in input order (jsonl, json or parquet, by the
output's suffix) with all their fields plus the rewards (a non-finite reward as null, with a
warning); pair rows' accuracy and mean margin are printed at the end. Conversations are packed
into rows of one shape, like training, so the forward pass compiles once; each distinct token
sequence is scored once and every copy gets its reward, so identical conversations tie exactly.

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

from jaxrm.data.formats import CONVERSATIONAL, detect_format, normalize, validate_conversation
from jaxrm.data.sources import SourceSpec, load_source
from jaxrm.dtypes import EXPORT_DTYPES
from jaxrm.errors import UserError, exit_on_user_error, run_cli
from jaxrm.logs import setup_logging
from jaxrm.rundir import check_output_file
from jaxrm.scoring import ModelSource, load_model, locate_model, score_token_ids
from jaxrm.sharding import make_mesh
from jaxrm.tokenizer import check_roles, encode_conversation, load_tokenizer


def reward_field(key: str) -> str:
    """The field a conversation's reward is written to: `reward` for `messages`, else
    `chosen_reward` / `rejected_reward`."""
    return "reward" if key == "messages" else f"{key}_reward"


def conversations_of(rows: Sequence[dict[str, Any]], name: str) -> list[tuple[int, str, list]]:
    """(row, key, messages) for every conversation to score, validated; key is the column
    (`messages`, `chosen` or `rejected`)."""
    columns = list(rows[0]) if rows else []
    if "messages" in columns and "chosen" not in columns:
        out = []
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
            f"{name}: rows need 'chosen' and 'rejected' message lists or 'messages' "
            f"(columns: {', '.join(columns) or 'none'})"
        ) from None
    if fmt != CONVERSATIONAL:
        raise UserError(
            f"{name}: jaxrm.score reads 'chosen'/'rejected' message lists or 'messages'"
        )
    out = []
    for i, row in enumerate(rows):
        example = normalize(name, fmt, row, i)
        out += [(i, "chosen", example.chosen), (i, "rejected", example.rejected)]
    return out


def check_context(
    token_ids: list[list[int]],
    conversations: list[tuple[int, str, list]],
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
            f"({key!r}: {n} tokens); shorten or remove them"
        )


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
    rows: list[dict[str, Any]], conversations: list[tuple[int, str, list]], rewards: np.ndarray
) -> list[dict[str, Any]]:
    """Copies of `rows` with each conversation's reward (None where not finite, with a warning)."""
    scored = [dict(row) for row in rows]
    for (i, key, _), reward in zip(conversations, rewards, strict=True):
        scored[i][reward_field(key)] = float(reward) if np.isfinite(reward) else None
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
    rows = load_source(SourceSpec(args.data, "1.0", "train")).to_list()
    conversations = conversations_of(rows, args.data)
    source = locate_model(args.model, step=args.step, tokenizer=args.tokenizer)
    tokenizer = load_tokenizer(source.tokenizer)
    rendered: set[str] = set()
    for i, key, messages in conversations:
        check_roles(tokenizer, messages, f"{args.data} row {i}", key, rendered)
    token_ids = [
        encode_conversation(tokenizer, messages, f"{args.data} row {i}")
        for i, _, messages in conversations
    ]
    check_context(token_ids, conversations, source, args.data)
    mesh = make_mesh(1, -1, 1)
    model, source = load_model(source, mesh, dtype=args.dtype, vocab_size=len(tokenizer))
    rewards = score_token_ids(model, token_ids, args.batch_size, mesh, not args.no_progress)
    scored = set_rewards(rows, conversations, rewards)
    write_rows(output, scored)
    summary = pair_summary(scored)
    if summary:
        print(
            f"{summary['pairs']} pairs: accuracy {summary['accuracy']:.4f}, "
            f"mean margin {summary['mean_margin']:.4f} -> {output}"
        )
    else:
        print(f"{len(scored)} conversations scored -> {output}")
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


if __name__ == "__main__":
    run_cli(main)
