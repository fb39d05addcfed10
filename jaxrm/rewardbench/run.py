"""Scoring a prepared benchmark with a model: the rewards (`jaxrm.scoring.score_token_ids`), the
benchmark's score, the results payload, and `BenchmarkHook`, the benchmarks scored during
training."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from jaxrm.errors import UserError
from jaxrm.rewardbench.data import PreparedBenchmark, prepare_benchmark
from jaxrm.rewardbench.report import fmt_score
from jaxrm.rewardbench.rules import (
    DEFAULT_TIES_FORMULA,
    BenchmarkResult,
    ScoredRow,
    benchmark_named,
    score_benchmark,
    ties_formula_named,
)
from jaxrm.scoring import score_token_ids

log = logging.getLogger(__name__)


def score_prepared(
    prepared: PreparedBenchmark,
    model: nnx.Module,
    mesh,
    batch_size: int,
    progress: bool = True,
    ties_formula: str = DEFAULT_TIES_FORMULA,
) -> BenchmarkResult:
    """Rewards every scorable conversation (`score_token_ids`, a row's completions packed as one
    group sharing its prompt) and scores the benchmark."""
    scorable = [(i, row) for i, row in enumerate(prepared.token_ids) if row is not None]
    flat = [ids for _, row in scorable for ids in row]
    groups = [i for i, row in scorable for _ in row]
    rewards = score_token_ids(model, flat, batch_size, mesh, progress, groups) if flat else []
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
                "eval_benchmarks runs on one process for now (jaxrm.scoring gathers rewards on "
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
