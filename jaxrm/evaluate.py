"""`python -m jaxrm.evaluate`: RewardBench and RewardBench 2 scores of a reward model.

    python -m jaxrm.evaluate --model M --benchmark rewardbench|rewardbench2 [--step N]
        [--data PATH_OR_HUB_ID] [--split S] [--output results.json] [--batch_size 16]
        [--dtype float32|bfloat16] [--max_length 4096] [--tokenizer DIR] [--ties_formula 0.1.4|main]

`M` is an HF reward-model directory or hub id (any Llama reward model, e.g. a jaxrm export) or a
jaxrm training output directory (`--step`: its checkpoint, default the latest, read straight from
orbax with the tokenizer saved by training). `--data` defaults to the benchmark's hub dataset
(`allenai/reward-bench` split `filtered`, `allenai/reward-bench-2` split `test`); a local
parquet/jsonl/json file in the same schema works too (the package ships tiny ones:
`jaxrm.assets.BENCHMARK_FIXTURES`).

The scoring is the benchmarks' own (see `jaxrm.benchmarks` for the definitions and where in
allenai's code each comes from). Every completion becomes a single-turn conversation (user
prompt, assistant completion) rendered and tokenized once by the tokenizer's chat template, as in
training; rewards come from `jaxrm.score.score_token_ids` (the training model code and sharding,
length-bucketed batches, one compiled shape per bucket).

Rows longer than `--max_length` tokens (any of their conversations) are never truncated: they
are left out of the scores and counted per subset (`too_long`). Subset names a benchmark does not
have are warned about and reported apart, outside the sections and the overall score.

RewardBench 2's Ties subset follows the released `rewardbench` 0.1.4 by default;
`--ties_formula main` uses allenai's main instead (they differ only for a tied prompt whose
correct answers all get the same reward; see `jaxrm.benchmarks`). The results name the one used.

Output: a table (sections, then subsets with counts), `--output` JSON (written atomically) with a
bar chart PNG beside it (`r.json` -> `r.png`; a `.png` output is refused so that the chart never
replaces the results). Where the output cannot be written is a one-line error before any work.
During training, `--config.eval_benchmarks=['rewardbench']` scores the benchmarks at each eval
and at the end (`BenchmarkHook`; `--config.eval_benchmark_ties_formula` as `--ties_formula`).

Where jaxrm differs from the reference scripts on purpose: they render the template to text and
let the classification pipeline tokenize it again with special tokens (a second BOS with
templates that already start with one), and they truncate long inputs; jaxrm tokenizes once and
excludes long rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxrm.benchmark_report import (
    fmt_score,
    format_table,
    output_paths,
    write_results,
)
from jaxrm.benchmarks import (
    DEFAULT_TIES_FORMULA,
    REWARDBENCH,
    TIES,
    TIES_FORMULAS,
    Benchmark,
    BenchmarkResult,
    ScoredRow,
    benchmark_named,
    parse_ties_id,
    score_benchmark,
    ties_formula_named,
)
from jaxrm.data.sources import SourceSpec, load_source, read_json_rows
from jaxrm.dtypes import EXPORT_DTYPES
from jaxrm.errors import UserError, exit_on_user_error
from jaxrm.rundir import check_output_file
from jaxrm.score import load_model, locate_model, score_token_ids
from jaxrm.sharding import make_mesh
from jaxrm.tokenizer import encode_conversation, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 4096
Messages = list[dict[str, str]]


# ----------------------------------------------------------------------------------------------
# Data: load, validate, tokenize


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


# ----------------------------------------------------------------------------------------------
# Scoring


def score_prepared(
    prepared: PreparedBenchmark,
    model: nnx.Module,
    mesh,
    batch_size: int,
    progress: bool = True,
    ties_formula: str = DEFAULT_TIES_FORMULA,
) -> BenchmarkResult:
    """Rewards every scorable conversation (`score_token_ids`) and scores the benchmark."""
    flat = [ids for row in prepared.token_ids if row is not None for ids in row]
    rewards = score_token_ids(model, flat, batch_size, mesh, progress) if flat else []
    scored, at = [], 0
    for row, ids in zip(prepared.rows, prepared.token_ids, strict=True):
        values = None
        if ids is not None:
            values = tuple(float(r) for r in rewards[at : at + len(ids)])
            at += len(ids)
        scored.append(ScoredRow(row.subset, row.id, row.num_correct, values))
    return score_benchmark(prepared.benchmark, scored, ties_formula)


def payload_of(prepared: PreparedBenchmark, result: BenchmarkResult, **extra: Any) -> dict:
    counts = {
        "rows": len(prepared.rows),
        "scored": sum(ids is not None for ids in prepared.token_ids),
        "too_long": sum(ids is None for ids in prepared.token_ids),
        "conversations": sum(len(ids) for ids in prepared.token_ids if ids is not None),
    }
    return {
        "benchmark": prepared.benchmark.name,
        **extra,
        "data": prepared.data,
        "split": prepared.split,
        "max_length": prepared.max_length,
        **counts,
        **result.to_dict(),
    }


# ----------------------------------------------------------------------------------------------
# During training


class BenchmarkHook:
    """Benchmarks scored during training (`--config.eval_benchmarks`): the data is loaded and
    tokenized once; each call scores the current params and returns flat `eval/<benchmark>/...`
    metrics (the overall score, sections, subsets, rows too long). Empty when none is asked."""

    def __init__(
        self,
        prepared: Sequence[PreparedBenchmark],
        batch_size: int,
        ties_formula: str = DEFAULT_TIES_FORMULA,
    ):
        self.prepared = list(prepared)
        self.batch_size = batch_size
        self.ties_formula = ties_formula_named(ties_formula)

    @classmethod
    def from_config(cls, cfg, tokenizer, data_parallel: int) -> BenchmarkHook:
        names = list(cfg.eval_benchmarks)
        if names and not cfg.dataset_mixer_eval_list:
            raise UserError(
                "eval_benchmarks are scored with each eval: set dataset_mixer_eval_list too"
            )
        if names and jax.process_count() > 1:
            raise UserError(
                "eval_benchmarks runs on one process for now (jaxrm.score gathers rewards on "
                "one host); run python -m jaxrm.evaluate on a checkpoint instead"
            )
        prepared = []
        for benchmark in [benchmark_named(name) for name in names]:
            name = benchmark.name
            data = cfg.eval_benchmark_data.get(name, "") or None
            prepared.append(
                prepare_benchmark(benchmark, tokenizer, data=data, max_length=cfg.max_token_length)
            )
            for subset in prepared[-1].unknown_subsets:
                log.warning("%s: subset %r is not in %s", prepared[-1].data, subset, name)
        batch = cfg.per_device_eval_batch_size * 2 * data_parallel
        return cls(prepared, batch, cfg.eval_benchmark_ties_formula)

    def __call__(self, graphdef: nnx.GraphDef, params: nnx.State, mesh) -> dict[str, float]:
        if not self.prepared:
            return {}
        model = nnx.merge(graphdef, params)
        metrics: dict[str, float] = {}
        for prepared in self.prepared:
            started = time.time()
            result = score_prepared(
                prepared, model, mesh, self.batch_size, False, self.ties_formula
            )
            prefix = f"eval/{prepared.benchmark.name}/"
            values = {"score": result.score, **result.sections}
            values.update({s.name: s.score for s in result.subsets + result.unknown_subsets})
            metrics.update({prefix + k: v for k, v in values.items() if v is not None})
            metrics[prefix + "too_long"] = sum(ids is None for ids in prepared.token_ids)
            log.info(
                "%s: score %s (%.1fs)",
                prepared.benchmark.title,
                fmt_score(result.score),
                time.time() - started,
            )
        return metrics


# ----------------------------------------------------------------------------------------------
# The command


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jaxrm.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", required=True, help="HF directory or hub id, or a training run")
    parser.add_argument("--benchmark", required=True, help="rewardbench or rewardbench2")
    parser.add_argument("--step", type=int, default=None, help="checkpoint of a training run")
    parser.add_argument("--data", default=None, help="local file or hub id (default: the hub set)")
    parser.add_argument("--split", default=None, help="hub split (default: the benchmark's)")
    parser.add_argument("--output", default=None, help="results JSON (a .png chart beside it)")
    parser.add_argument("--tokenizer", default=None, help="defaults to the model's tokenizer")
    parser.add_argument("--batch_size", type=int, default=16, help="conversations per forward")
    parser.add_argument("--dtype", default="float32", help=" or ".join(EXPORT_DTYPES))
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens")
    parser.add_argument(
        "--ties_formula",
        default=DEFAULT_TIES_FORMULA,
        help=f"RewardBench 2 Ties as allenai's {' or '.join(TIES_FORMULAS)} (default 0.1.4)",
    )
    parser.add_argument("--no_progress", action="store_true")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    benchmark = benchmark_named(args.benchmark)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {args.dtype!r}")
    ties_formula_named(args.ties_formula)
    outputs = output_paths(args.output) if args.output else None
    if outputs:
        check_output_file(outputs[0])
        check_output_file(outputs[1], "the chart beside --output")
    source = locate_model(args.model, step=args.step, tokenizer=args.tokenizer)
    tokenizer = load_tokenizer(source.tokenizer)
    prepared = prepare_benchmark(
        benchmark, tokenizer, data=args.data, split=args.split, max_length=args.max_length
    )
    for subset in prepared.unknown_subsets:
        count = sum(r.subset == subset for r in prepared.rows)
        print(
            f"warning: {prepared.data}: {count} rows in subset {subset!r}, which "
            f"{benchmark.title} does not have: reported apart, not in the score",
            file=sys.stderr,
        )
    mesh = make_mesh(1, -1, 1)
    model, source = load_model(source, mesh, dtype=args.dtype, vocab_size=len(tokenizer))
    started = time.time()
    result = score_prepared(
        prepared, model, mesh, args.batch_size, not args.no_progress, args.ties_formula
    )
    seconds = round(time.time() - started, 1)
    payload = payload_of(
        prepared, result, model=source.describe(), step=source.step, dtype=args.dtype
    )
    payload["seconds"] = seconds
    where = prepared.data + (f" split {prepared.split}" if prepared.split else "")
    title = (
        f"{benchmark.title}: {source.describe()} on {where} ({payload['rows']} rows, "
        f"{payload['too_long']} longer than {args.max_length} tokens left out)"
    )
    print(format_table(result, title))
    print(f"\n{payload['conversations']} conversations scored in {seconds:.1f}s")
    if outputs:
        output, chart = outputs
        write_results(output, chart, payload, result, f"{benchmark.title}: {source.describe()}")
        print(f"\n-> {output}, {chart}")
    return payload


if __name__ == "__main__":
    main()
