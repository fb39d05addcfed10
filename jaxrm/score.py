"""`python -m jaxrm.score`: reward every conversation of a data file with a Llama reward model.

    python -m jaxrm.score --model DIR_OR_HUB_ID_OR_RUN_DIR [--step N] --data FILE --output FILE
        [--batch_size 16] [--dtype float32|bfloat16] [--tokenizer DIR]

`--model` is an HF reward-model directory or hub id, or a jaxrm training output directory (its
orbax checkpoint `--step`, default the latest, read directly; the tokenizer saved by training).

A row with `chosen` and `rejected` message lists gets `chosen_reward` and `rejected_reward`; a row
with `messages` gets `reward`. Rows are written in input order (jsonl, json or parquet, by the
output's suffix) with all their fields plus the rewards; pair rows' accuracy and mean margin are
printed at the end. Conversations are sorted by length and padded to a few length buckets, so the
forward pass compiles once per bucket, not once per length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxrm.checkpoint import read_meta, restore_params_and_meta, tokenizer_dir, training_output_dir
from jaxrm.data import packing
from jaxrm.data.batch import PACKED_FIELDS, batch_shardings, local_part
from jaxrm.data.formats import CONVERSATIONAL, detect_format, normalize, validate_conversation
from jaxrm.data.sources import SourceSpec, load_source
from jaxrm.dtypes import EXPORT_DTYPES, dtype_named
from jaxrm.errors import UserError, exit_on_user_error, run_cli
from jaxrm.export import abstract_params
from jaxrm.hf import (
    abstract_reward_model,
    llama_config_from_hf,
    load_reward_model,
    read_hf_config,
    resolve_model_dir,
)
from jaxrm.logs import setup_logging
from jaxrm.sharding import activation_sharding, data_parallel_size, gather_to_host, make_mesh
from jaxrm.tokenizer import encode_conversation, load_tokenizer


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a reward model comes from: an HF directory (a hub id is downloaded) or a jaxrm
    training output directory at a checkpoint step. Locating it reads only metadata."""

    name: str  # as the user gave it
    model_dir: Path | None  # an HF model directory
    run_dir: Path | None  # a training output directory
    step: int | None  # the run's checkpoint step
    meta: dict[str, Any] | None  # the run's checkpoint metadata
    tokenizer: str  # the tokenizer to use
    newest: bool = False  # no --step given: loading takes the newest step then (see load_model)

    def describe(self) -> str:
        return self.name if self.run_dir is None else f"{self.name} step {self.step}"


def locate_model(
    name_or_path: str, *, step: int | None = None, tokenizer: str | None = None
) -> ModelSource:
    """An HF reward model (directory or hub id) or a jaxrm training output directory (`step`:
    its checkpoint, default the latest); the tokenizer is the model's (training's) unless given."""
    path = Path(os.path.expanduser(str(name_or_path)))
    run_dir = None if (path / "config.json").is_file() else training_output_dir(path)
    if run_dir is not None:
        found, meta = read_meta(run_dir, step)
        if not isinstance(meta.get("hf_config"), dict):
            raise UserError(f"{run_dir} step {found}: checkpoint metadata has no hf_config")
        tokenizer = tokenizer or str(tokenizer_dir(run_dir, meta))
        return ModelSource(str(name_or_path), None, run_dir, found, meta, tokenizer, step is None)
    if step is not None:
        raise UserError(
            f"--step {step}: {name_or_path} is not a jaxrm training output directory "
            "(no checkpoints/ in it)"
        )
    model_dir = resolve_model_dir(name_or_path)
    read_hf_config(model_dir)
    return ModelSource(str(name_or_path), model_dir, None, None, None, tokenizer or str(model_dir))


def load_model(
    source: ModelSource, mesh, *, dtype: str = "float32", vocab_size: int | None = None
) -> tuple[nnx.Module, ModelSource]:
    """The located reward model, sharded on `mesh`, computing in `dtype`, and its source as
    loaded. A training run's params are restored straight into the training layout (its
    optimizer state is not read); without --step from the newest step that reads then (a live
    run may have saved a newer one, or rotated the located one away, since it was located). An
    HF model's embedding grows to `vocab_size` (the tokenizer's length) when that is larger."""
    compute = dtype_named(dtype, EXPORT_DTYPES, "--dtype")
    if source.run_dir is not None:
        config = llama_config_from_hf(source.meta["hf_config"], dtype=compute, attention="flash")
        if vocab_size is not None and vocab_size > config.vocab_size:
            raise UserError(
                f"the tokenizer has {vocab_size} tokens, more than the {config.vocab_size} "
                f"embeddings {source.describe()} was trained with"
            )
        step, params, meta = restore_params_and_meta(
            source.run_dir, None if source.newest else source.step, abstract_params(config, mesh)
        )
        graphdef, state = abstract_reward_model(config)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state), dataclasses.replace(source, step=step, meta=meta)
    model, _, report = load_reward_model(
        str(source.model_dir), mesh, min_vocab_size=vocab_size, dtype=compute, attention="flash"
    )
    if report.head != "loaded":
        print(
            f"warning: {source.model_dir} has no score head (score.weight); rewards come from a "
            "freshly initialized head",
            file=sys.stderr,
        )
    return model, source


def conversations_of(rows: Sequence[dict[str, Any]], name: str) -> list[tuple[int, str, list]]:
    """(row, field, messages) for every conversation to score, validated."""
    columns = list(rows[0]) if rows else []
    if "messages" in columns and "chosen" not in columns:
        out = []
        for i, row in enumerate(rows):
            if "messages" not in row:
                raise UserError(f"{name} row {i}: missing key 'messages'")
            messages = validate_conversation(row["messages"], f"{name} row {i}", "messages")
            out.append((i, "reward", messages))
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
        out += [(i, "chosen_reward", example.chosen), (i, "rejected_reward", example.rejected)]
    return out


def score_token_ids(
    model: nnx.Module, token_ids: list[list[int]], batch_size: int, mesh, progress: bool = True
) -> np.ndarray:
    """Rewards of token sequences: packed like training (jaxrm/data/packing.py: rows holding whole
    sequences, one compiled shape), `batch_size` sequences of average length per device and
    forward pass; the score is read at each sequence's last token."""
    graphdef, state = nnx.split(model)
    dp = data_parallel_size(mesh)
    lengths = np.array([len(t) for t in token_ids], np.int64)
    length = -(-max(int(lengths.max()), packing.MIN_MICRO_TOKENS) // packing.ROW_MULTIPLE)
    length *= packing.ROW_MULTIPLE
    rows = max(1, math.ceil(batch_size * float(lengths.mean()) / length))
    spec = packing.PackSpec(length=length, rows=rows, devices=dp, slots=0, share_prefix=False)
    micro_batches = packing.pack_sequences(lengths, spec)
    row_fields = ("input_ids", "positions", "segment_ids", "branch_ids")
    slot_fields = ("index",)
    shardings = batch_shardings(mesh, {k: PACKED_FIELDS[k] for k in row_fields})
    slot_sharding = batch_shardings(mesh, {"index": PACKED_FIELDS["chosen_index"]})["index"]

    @jax.jit
    def forward(state, batch):
        with activation_sharding(mesh):
            scores = nnx.merge(graphdef, state).token_scores(*(batch[k] for k in row_fields))
        per_device = scores.reshape(batch["index"].shape[0], -1)
        return jnp.take_along_axis(per_device, batch["index"], axis=1)

    rewards = np.zeros(len(token_ids), np.float32)
    process, processes = jax.process_index(), jax.process_count()
    for micro in tqdm(micro_batches, desc="scoring", unit="batch", disable=not progress):
        host = dict(micro, input_ids=packing.fill_tokens(micro, token_ids))
        local = local_part({k: host[k] for k in (*row_fields, *slot_fields)}, process, processes)
        batch = {
            k: jax.make_array_from_process_local_data(
                shardings[k] if k in shardings else slot_sharding, v
            )
            for k, v in local.items()
        }
        values = gather_to_host(forward(state, batch))
        real = micro["weight"] > 0
        rewards[micro["order"][real]] = values[real]
    return rewards


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Writes rows atomically (temporary file, then rename) as jsonl, json or parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        elif path.suffix == ".json":
            tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    output = Path(args.output)
    rows = load_source(SourceSpec(args.data, "1.0", "train")).to_list()
    conversations = conversations_of(rows, args.data)
    source = locate_model(args.model, step=args.step, tokenizer=args.tokenizer)
    tokenizer = load_tokenizer(source.tokenizer)
    token_ids = [
        encode_conversation(tokenizer, messages, f"{args.data} row {i}")
        for i, _, messages in conversations
    ]
    mesh = make_mesh(1, -1, 1)
    model, source = load_model(source, mesh, dtype=args.dtype, vocab_size=len(tokenizer))
    rewards = score_token_ids(model, token_ids, args.batch_size, mesh, not args.no_progress)
    scored = [dict(row) for row in rows]
    for (i, field, _), reward in zip(conversations, rewards, strict=True):
        scored[i][field] = float(reward)
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
    pairs = [(r["chosen_reward"], r["rejected_reward"]) for r in rows if "chosen_reward" in r]
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
