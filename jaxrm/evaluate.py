"""`python -m jaxrm.evaluate`: RewardBench and RewardBench 2 scores of a reward model.

    python -m jaxrm.evaluate --model M --benchmark rewardbench|rewardbench2 [--step N]
        [--data PATH_OR_HUB_ID] [--split S] [--output results.json] [--batch_size 16]
        [--dtype float32|bfloat16] [--max_length 4096] [--tokenizer DIR] [--ties_formula 0.1.4|main]

`M` is an HF reward-model directory or hub id (of a supported family, e.g. a jaxrm export) or a
jaxrm training output directory (`--step`: its checkpoint, default the latest, read straight from
orbax with the tokenizer saved by training). `--data` defaults to the benchmark's hub dataset
(`allenai/reward-bench` split `filtered`, `allenai/reward-bench-2` split `test`); a local
parquet/jsonl/json file in the same schema works too (the package ships tiny ones:
`jaxrm.assets.BENCHMARK_FIXTURES`).

The scoring is the benchmarks' own (see `jaxrm.rewardbench.rules` for the definitions and where in
allenai's code each comes from). Every completion becomes a single-turn conversation (user
prompt, assistant completion) rendered and tokenized once by the tokenizer's chat template, as in
training; rewards come from `jaxrm.scoring.score_token_ids` (the training model code and sharding,
packed rows of one compiled shape; a row's completions are one group, their prompt computed once).

Rows longer than `--max_length` tokens (any of their conversations) are never truncated: they
are left out of the scores and counted per subset (`too_long`). Subset names a benchmark does not
have are warned about and reported apart, outside the sections and the overall score.

RewardBench 2's Ties subset follows the released `rewardbench` 0.1.4 by default;
`--ties_formula main` uses allenai's main instead (they differ only for a tied prompt whose
correct answers all get the same reward; see `jaxrm.rewardbench.rules`). The results name the one
used.

Output: a table (sections, then subsets with counts), `--output` JSON (written atomically) with a
bar chart PNG beside it (`r.json` -> `r.png`; a `.png` output is refused so that the chart never
replaces the results). Where the output cannot be written is a one-line error before any work.
During training, `--config.eval_benchmarks=['rewardbench']` scores the benchmarks at each eval
and at the end (`jaxrm.rewardbench.run.BenchmarkHook`; `--config.eval_benchmark_ties_formula` as
`--ties_formula`).

Where jaxrm differs from the reference scripts on purpose: they render the template to text and
let the classification pipeline tokenize it again with special tokens (a second BOS with
templates that already start with one), and they truncate long inputs; jaxrm tokenizes once and
excludes long rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from jaxrm.dtypes import EXPORT_DTYPES
from jaxrm.errors import UserError, exit_on_user_error
from jaxrm.rewardbench.data import DEFAULT_MAX_LENGTH, prepare_benchmark
from jaxrm.rewardbench.report import (
    format_table,
    output_paths,
    write_results,
)
from jaxrm.rewardbench.rules import (
    DEFAULT_TIES_FORMULA,
    TIES_FORMULAS,
    benchmark_named,
    ties_formula_named,
)
from jaxrm.rewardbench.run import payload_of, score_prepared
from jaxrm.rundir import check_output_file
from jaxrm.scoring import load_model, locate_model
from jaxrm.sharding import make_mesh
from jaxrm.tokenizer import load_tokenizer


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
