"""`python -m jaxrm.train --config configs/tiny.py [--config.key=value ...]`: train a reward model.

Phases: config (every key validated) -> distributed + mesh -> output directory (lock, fresh or
resumed, config drift, free space) -> tokenizer + data -> model (HF import into the sharded
layout) -> optimizer -> restore -> train with periodic eval and checkpoints (divergence guard,
preemption) -> the last step's checkpoint -> final eval (recorded in that checkpoint) -> HF
export to OUTPUT/hf -> metrics.png.

Exit codes: 0 done; 2 a user error (one line, nothing written; a refused run leaves its output
directory as it found it); 3 diverged (the last good checkpoint is kept); 75 stopped by
SIGTERM/SIGINT with a checkpoint on disk (rerun to resume, or to finish what the last step left).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxrm import data
from jaxrm.backends import with_execution
from jaxrm.checkpoint import (
    Checkpointer,
    read_meta,
    restore_train_state,
    sync_processes,
    tokenizer_dir,
)
from jaxrm.config import check_context_length, config_drift, get_config, to_dict
from jaxrm.data import packing
from jaxrm.data.group_packing import KwiseSpec, group_lengths, pair_layout_lengths
from jaxrm.data.groups import Groups
from jaxrm.distributed import initialize_distributed
from jaxrm.dtypes import BY_NAME
from jaxrm.errors import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    RunStopped,
    UserError,
    exit_on_user_error,
    run_cli,
    write_failure,
)
from jaxrm.hf import (
    grown_vocab_size,
    model_architecture,
    read_hf_config,
    read_hf_weights,
    resolve_model_dir,
)
from jaxrm.logs import setup_logging
from jaxrm.objective import BRADLEY_TERRY, METRIC_SUM_KEYS, Objective, finalize_metrics
from jaxrm.optimizer import current_lr
from jaxrm.plan import RunPlan, make_plan, with_vocab_size
from jaxrm.preemption import StopRequest
from jaxrm.rewardbench.run import BenchmarkHook
from jaxrm.rundir import (
    RunLock,
    check_free_space,
    check_writable,
    clear_run_outputs,
    previous_outputs,
)
from jaxrm.sharding import data_parallel_size, dispatch_sync_interval
from jaxrm.step import (
    init_optimizer_state,
    make_eval_step,
    make_train_step,
    stop_votes,
)
from jaxrm.tokenizer import check_pad_token, load_tokenizer
from jaxrm.tracking import MetricsWriter, keep_metrics_until, plot_metrics, read_metrics

log = logging.getLogger("jaxrm")

# Architecture fields a resumed run's model must share with its checkpoint.
MODEL_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def due(step: int, every: int) -> bool:
    """Whether a cadence of `every` steps (0: never) falls on `step`."""
    return every > 0 and step % every == 0


# ----------------------------------------------------------------------------------------------
# The output directory: refuse, don't mix


@dataclasses.dataclass
class Restored:
    """One checkpoint step read whole: its train state, data position and metadata."""

    step: int
    params: Any
    opt_state: Any
    data_state: dict[str, Any] | None
    meta: dict[str, Any]


@dataclasses.dataclass
class RunStart:
    """What the output directory says about this run before any work is done."""

    model_dir: Path | None  # the HF model's files: a fresh start's weights (None on a resume)
    tokenizer: str  # where the tokenizer is loaded from
    plan: RunPlan  # on a resume, with the checkpoint's embedding size
    restored: Restored | None  # the newest readable checkpoint (None: a fresh start)

    @property
    def resume_step(self) -> int | None:
        return None if self.restored is None else self.restored.step


def layout_fields(micro_pairs: int, step_pairs: int) -> dict[str, int]:
    return {"pairs_per_micro_batch": micro_pairs, "pairs_per_step": step_pairs}


def prepare_output_dir(
    cfg: ml_collections.ConfigDict, plan: RunPlan, layout: dict[str, int], is_main: bool
) -> RunStart:
    """Fresh start or resume, decided and checked before tokenizing anything: a used directory
    is refused without resume or overwrite, a resume must match its checkpoint's settings (those
    of the step it restores) and is restored into the plan's abstract state (no HF weights read,
    no optimizer initialized), and the disk must hold a checkpoint and an export. Call with the
    run lock held."""
    output_dir = Path(cfg.output_dir)
    previous = previous_outputs(output_dir)
    if previous and not cfg.resume:
        if not cfg.overwrite_output_dir:
            raise UserError(
                f"output_dir {output_dir} holds {' and '.join(previous)} of an earlier run and "
                "resume=false; pick a new output_dir, or pass "
                "--config.overwrite_output_dir=true to delete them first"
            )
        if is_main:
            clear_run_outputs(output_dir)
        sync_processes("jaxrm.train.cleared")
        previous = []
    newest = None
    if "checkpoints" in previous:
        newest = read_meta(output_dir)
        check_drift(cfg, layout, plan.hf_config, newest[1], f"{output_dir} (step {newest[0]})")
    elif previous:
        raise UserError(
            f"output_dir {output_dir} holds {previous[0]} but no checkpoint to resume from; "
            "pick a new output_dir, or pass --config.overwrite_output_dir=true "
            "--config.resume=false to replace it"
        )
    check_free_space(output_dir, *disk_needed(cfg, plan))
    if newest is None:
        model_dir = resolve_model_dir(cfg.model_name_or_path, cfg.model_revision or None)
        return RunStart(model_dir, cfg.tokenizer_name or str(model_dir), plan, None)
    plan, restored = restore_run(cfg, plan, layout, output_dir, newest)
    tokenizer = cfg.tokenizer_name or str(tokenizer_dir(output_dir, restored.meta))
    return RunStart(None, tokenizer, plan, restored)


def restore_run(
    cfg: ml_collections.ConfigDict,
    plan: RunPlan,
    layout: dict[str, int],
    output_dir: Path,
    newest: tuple[int, dict[str, Any]],
) -> tuple[RunPlan, Restored]:
    """The newest readable checkpoint, restored into `plan`'s abstract state (resized to the
    trained embedding). `newest` is the newest metadata's (step, meta), checked before any
    array is read; the restored step's is checked again when it is an older one (the newest's
    arrays were damaged), so the drift check always covers the step that is restored."""
    newest_step, meta = newest
    trained = with_vocab_size(
        plan, meta.get("hf_config", {}).get("vocab_size", 0) or plan.model_config.vocab_size
    )
    restored = Restored(*restore_train_state(output_dir, trained.params, trained.opt_state))
    if restored.step != newest_step:
        check_drift(
            cfg, layout, plan.hf_config, restored.meta, f"{output_dir} (step {restored.step})"
        )
    return trained, restored


def check_drift(
    cfg: ml_collections.ConfigDict,
    layout: dict[str, int],
    hf_config: dict[str, Any],
    meta: dict[str, Any],
    where: str,
) -> None:
    """A one-line error naming every setting that changes what is trained and differs from the
    checkpoint's (both values), so a resume never silently mixes two runs."""
    derived = {f"derived.{k}": v for k, v in layout.items()}
    stored_layout = {f"derived.{k}": v for k, v in meta.get("layout", {}).items()}
    stored = {**meta.get("config", {}), **stored_layout}
    changes = config_drift(stored, {**to_dict(cfg), **derived})
    trained = meta.get("hf_config", {})
    changes += [
        (f"model {k}", trained.get(k), hf_config.get(k))
        for k in MODEL_SHAPE_KEYS
        if k != "vocab_size" and trained.get(k) != hf_config.get(k)
    ]
    if changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
        raise UserError(
            f"cannot resume {where}: settings differ from the checkpoint's ({listed}); use the "
            "checkpoint's values, or start over with a new output_dir or "
            "--config.overwrite_output_dir=true --config.resume=false"
        )


def disk_needed(cfg: ml_collections.ConfigDict, plan: RunPlan) -> tuple[int, str]:
    """(bytes, what) for one more checkpoint (params + Adam moments) and the HF export."""
    count = sum(math.prod(v.shape) for v in jax.tree.leaves(plan.params))
    needed = 3 * count * BY_NAME[cfg.param_dtype].itemsize
    what = "a checkpoint"
    if cfg.export_hf:
        needed += count * BY_NAME[cfg.export_dtype].itemsize
        what = "a checkpoint and the HF export"
    return int(needed * 1.05), what


# ----------------------------------------------------------------------------------------------
# Model, evaluation, step accounting


def initial_model(
    cfg: ml_collections.ConfigDict, plan: RunPlan, model_dir: Path, tokenizer_size: int
) -> tuple[nnx.GraphDef, nnx.State, dict[str, Any]]:
    """A fresh run's model from the HF weights, into the plan's abstract sharded state (the
    model is not traced again, nor the mesh checked again): (graph, params, the checkpoint's
    config.json as trained: the export's source, which a plan made from jaxrm's shipped
    architecture copy is not). A tokenizer with more tokens than the embedding grows it (new
    rows: the mean)."""
    checkpoint_vocab = plan.model_config.vocab_size
    plan = with_vocab_size(plan, grown_vocab_size(checkpoint_vocab, tokenizer_size))
    model, report = read_hf_weights(
        model_dir,
        plan.model_config,
        plan.graphdef,
        plan.params,
        plan.mesh,
        checkpoint_vocab=checkpoint_vocab,
        reinit_score_head=cfg.reinit_score_head,
        seed=cfg.seed,
    )
    log.info(
        "model %s: %s parameters; score head %s%s",
        cfg.model_name_or_path,
        f"{sum(x.size for x in jax.tree.leaves(nnx.state(model))):,}",
        report.head,
        f"; embedding resized {report.resized_vocab}" if report.resized_vocab else "",
    )
    graphdef, params = nnx.split(model)
    hf_config = dict(read_hf_config(model_dir), vocab_size=plan.model_config.vocab_size)
    return graphdef, params, hf_config


def eval_fields(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"eval/{k}": v for k, v in metrics.items() if k != "reward_stats"}


def pack_fit(cfg: ml_collections.ConfigDict) -> data.PackFit | None:
    """The packed row every train and eval pair must fit (None: padded batches)."""
    if cfg.batch_layout != "packed":
        return None
    length, _ = packing.row_shape(cfg.max_token_length, cfg.pack_length)
    plackett_luce = cfg.preference_format == "kwise" and cfg.kwise_objective == "plackett_luce"
    return data.PackFit(
        length,
        cfg.prefix_sharing,
        cfg.drop_pairs_longer_than_pack_length,
        whole_groups=plackett_luce,
    )


def kwise_spec(cfg: ml_collections.ConfigDict) -> KwiseSpec | None:
    """How K-wise groups become loss terms (None: pairs)."""
    if cfg.preference_format != "kwise":
        return None
    return KwiseSpec(cfg.kwise_objective, cfg.kwise_loss_average, cfg.kwise_margin_scale)


def objective(cfg: ml_collections.ConfigDict, kwise: KwiseSpec | None) -> Objective:
    """The objective's settings; a K-wise margin is the scores' (`kwise_margin_scale`), on
    K-wise groups and on the pairs cut from them (padded batches) alike."""
    score_margin = cfg.preference_format == "kwise" and cfg.kwise_margin_scale > 0
    return Objective(
        jax.process_count(),
        cfg.use_margin or score_margin,
        cfg.center_rewards_coefficient,
        BRADLEY_TERRY if kwise is None else kwise.objective,
    )


def log_pack(
    spec: packing.PackSpec | None,
    pairs: data.Pairs | Groups,
    cfg: ml_collections.ConfigDict,
):
    """Logs the packed layout's shapes and what a pair (a K-wise group) takes, from a fixed
    sample of the training set (nothing for padded batches)."""
    if spec is None:
        return
    length, rows = spec.length, spec.rows
    sample = np.random.default_rng(0).permutation(len(pairs))[:20_000]
    if isinstance(pairs, Groups):
        log_group_pack(spec, pairs, sample, cfg.prefix_sharing)
        return
    groups = packing.group_lengths(pairs, sample, cfg.prefix_sharing)
    unshared = packing.group_lengths(pairs, sample, False)
    log.info(
        "packed batches: %d row(s) of %d tokens per micro-batch (%d per device); a pair takes %.0f "
        "tokens on average%s",
        spec.micro_rows,
        length,
        rows,
        groups.mean(),
        f" ({1 - groups.sum() / unshared.sum():.0%} saved by sharing prompts)"
        if cfg.prefix_sharing
        else "",
    )


def log_group_pack(
    spec: packing.PackSpec, groups: Groups, sample: np.ndarray, share_prefix: bool
) -> None:
    """Logs what a K-wise group takes against the same responses cut into pairs, and how many
    groups are split for not fitting one row (their sub-groups repeat the prompt)."""
    whole = group_lengths(groups, np.arange(len(groups)), share_prefix)
    as_pairs = pair_layout_lengths(groups, sample, share_prefix)
    log.info(
        "packed batches: %d row(s) of %d tokens per micro-batch (%d per device); a prompt's "
        "group (%.1f responses, %.1f pairs) takes %.0f tokens on average, %.0f%% fewer than its "
        "pairs packed as pairs; %d of %d groups do not fit one row and are split",
        spec.micro_rows,
        spec.length,
        spec.rows,
        groups.sizes()[sample].mean(),
        groups.pair_counts()[sample].mean(),
        whole[sample].mean(),
        100 * (1 - whole[sample].sum() / max(1, as_pairs.sum())),
        int((whole > spec.length).sum()),
        len(groups),
    )


def eval_metrics(eval_step, params, batches, mesh) -> dict[str, float]:
    """Exact metrics over every eval pair on all hosts, plus the reward mean/std for export."""
    totals: dict[str, jax.Array] = {}
    sync_every = dispatch_sync_interval()
    for i in range(len(batches)):
        sums = eval_step(params, data.to_global(batches[i], mesh))
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
        if due(i + 1, sync_every):
            jax.block_until_ready(totals)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    metrics = {k: float(v) for k, v in finalize_metrics(totals).items()}
    n = 2 * totals["count"]
    mean = totals["reward_sum"] / n
    std = math.sqrt(max(totals["reward_sq_sum"] / n - mean * mean, 0.0))
    metrics["reward_stats"] = {"mean": mean, "std": std, "count": int(n)}
    return metrics


class StepAccounting:
    """Reads each train step's small outputs on the host (one step late, so the devices stay
    busy): logging windows, skipped (non-finite) steps, the agreed stop vote.

    The step that ends a logging window (`window_ends`) must be read as soon as it is dispatched
    (not one step late): a window's throughput is its steps' non-pad tokens over the wall time
    from the previous window's last step being done to its own last step being done, less the
    time spent `paused` (eval, checkpoints), so tokens and time cover the same steps. The first
    window includes compilation."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        schedule,
        total_steps: int,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.cfg, self.schedule, self.total_steps = cfg, schedule, total_steps
        self.skipped_total = 0
        self.consecutive: list[int] = []  # the current run of skipped steps
        self.stop_voted = False
        self._window: dict[str, float] = {}
        self._grad_norms: list[float] = []
        self._clock = clock
        self._tokens, self._steps, self._paused = 0, 0, 0.0
        self._since = clock()

    def window_ends(self, step: int) -> bool:
        """Whether `step` is a logging step (its record carries the window's train/ fields)."""
        return due(step, self.cfg.logging_steps) or step == self.total_steps

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (eval, a checkpoint) is left out of the window's throughput; use it
        only with no step in flight (after `consume` of the newest step)."""
        started = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - started

    def consume(self, step: int, outputs: dict[str, jax.Array], tokens: int) -> dict[str, Any]:
        """The step's train/ record fields (empty unless `window_ends(step)`). `tokens`: the
        step's non-pad tokens (chosen + rejected)."""
        host = {k: float(v) for k, v in jax.device_get(outputs).items()}
        self._tokens += tokens
        self._steps += 1
        self.stop_voted = self.stop_voted or host["stop"] > 0
        if host["skipped"]:
            self.skipped_total += 1
            self.consecutive.append(step)
            log.warning(
                "step %d skipped: non-finite loss or gradient norm (%d in a row)",
                step,
                len(self.consecutive),
            )
        else:
            self.consecutive = []
            self._grad_norms.append(host["grad_norm"])
            for k, v in host.items():
                self._window[k] = self._window.get(k, 0.0) + v
        if not self.window_ends(step):
            return {}
        with np.errstate(divide="ignore", invalid="ignore"):  # only skipped steps: NaN -> null
            metrics = finalize_metrics(self._sums())
        record = {f"train/{k}": float(v) for k, v in metrics.items()}
        record["train/rm/lr"] = current_lr(self.schedule, step - 1)
        record["train/grad_norm"] = float(np.mean(self._grad_norms)) if self._grad_norms else None
        record["train/skipped_steps"] = self.skipped_total
        now = self._clock()
        seconds = now - self._since - self._paused
        record["train/tokens_per_second"] = self._tokens / seconds
        record["train/seconds_per_step"] = seconds / self._steps
        self._window, self._grad_norms = {}, []
        self._tokens, self._steps, self._paused, self._since = 0, 0, 0.0, now
        return record

    def _sums(self) -> dict[str, float]:
        return {k: np.float64(self._window.get(k, 0.0)) for k in METRIC_SUM_KEYS}

    def diverged(self) -> bool:
        return len(self.consecutive) >= self.cfg.max_consecutive_skipped_steps


# ----------------------------------------------------------------------------------------------
# The run


def acquire_run_lock(output_dir: Path, is_main: bool) -> RunLock:
    """Process 0 takes the output directory's lock for the whole run; the other processes of a
    multi-host run learn whether it did, so that all of them stop when it cannot."""
    lock = RunLock(output_dir)
    refusal = None
    if is_main:
        try:
            lock.acquire()
        except UserError as e:
            refusal = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        taken = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
        if not taken and refusal is None:
            refusal = UserError(f"output_dir {output_dir} is in use by another live run")
    if refusal is not None:
        raise refusal
    return lock


@contextlib.contextmanager
def claim_output_dir(output_dir: Path, is_main: bool) -> Iterator[None]:
    """Creates `output_dir` (checked writable) and holds its run lock while the run lasts. A run
    that fails (a refusal, a stop before anything was saved) leaves the directory as it found
    it: the lock file it created is removed, and so are the directories it created, if empty."""
    absolute = output_dir.absolute()
    created = [p for p in (absolute, *absolute.parents) if not p.exists()]  # deepest first
    lock, done = None, False
    try:
        check_writable(output_dir)
        lock = acquire_run_lock(output_dir, is_main)
        yield
        done = True
    finally:
        if lock is not None:
            lock.release(remove=not done and lock.created)
        if not done and is_main:
            remove_empty_directories(created)


def remove_empty_directories(paths: Sequence[Path]) -> None:
    """Removes `paths` in order while they are empty directories."""
    for path in paths:
        try:
            path.rmdir()
        except OSError:
            return


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    started = time.time()
    # ---- config, devices, mesh, output directory lock
    cfg = get_config(sys.argv[1:] if argv is None else argv)
    setup_logging()
    initialize_distributed(cfg)
    is_main = jax.process_index() == 0
    setup_logging(is_main)
    architecture, architecture_file = model_architecture(cfg.model_name_or_path, cfg.model_revision)
    check_context_length(cfg, architecture, architecture_file)
    plan = make_plan(cfg, jax.devices(), architecture, report=is_main)  # logs what stays replicated
    mesh = plan.mesh
    log.info(
        "mesh %s over %d devices (%s, %d processes)",
        dict(mesh.shape),
        jax.device_count(),
        jax.devices()[0].device_kind,
        jax.process_count(),
    )
    with claim_output_dir(Path(cfg.output_dir), is_main), StopRequest() as stop:
        return run(cfg, plan, stop, started)


def run(
    cfg: ml_collections.ConfigDict, plan: RunPlan, stop: StopRequest, started: float
) -> dict[str, Any]:
    """The run in a claimed output directory: data, model, the training loop, the final eval and
    export; returns the step reached, the seconds taken and the last eval's metrics."""
    is_main = jax.process_index() == 0
    output_dir = Path(cfg.output_dir)
    mesh = plan.mesh
    micro_pairs, step_pairs = plan.batch.micro_pairs, plan.batch.step_pairs
    layout = layout_fields(micro_pairs, step_pairs)
    cfg = with_execution(cfg, plan.execution)  # dtype and attention "auto" resolved: stored
    run_start = prepare_output_dir(cfg, plan, layout, is_main)
    plan = run_start.plan
    if run_start.resume_step is not None:
        stop.kept(
            f"the checkpoints up to step {run_start.resume_step} in {output_dir / 'checkpoints'} "
            "are kept; rerun the same command to resume"
        )

    # ---- tokenizer and data
    tokenizer = load_tokenizer(run_start.tokenizer)
    check_pad_token(tokenizer, cfg.tokenizer_name or cfg.model_name_or_path)
    train_pairs, eval_pairs, stats = data.build_datasets(
        dataset_mixer_list=cfg.dataset_mixer_list,
        dataset_mixer_list_splits=cfg.dataset_mixer_list_splits,
        dataset_mixer_eval_list=cfg.dataset_mixer_eval_list,
        dataset_mixer_eval_list_splits=cfg.dataset_mixer_eval_list_splits,
        tokenizer=tokenizer,
        max_token_length=cfg.max_token_length,
        max_prompt_token_length=cfg.max_prompt_token_length,
        seed=cfg.seed,
        cache_dir=cfg.dataset_cache_dir or None,
        num_proc=cfg.dataset_num_proc or None,
        vocab_size=max(plan.hf_config.get("vocab_size", 0), len(tokenizer)),
        pack=pack_fit(cfg),
        preference_format=cfg.preference_format,
        ultrafeedback_score=cfg.ultrafeedback_score,
    )
    pack = plan.pack
    kwise = kwise_spec(cfg)
    if kwise is not None and pack is None:  # padded: the implied pairs, trained as pairs
        scale = cfg.kwise_margin_scale
        train_pairs = train_pairs.to_pairs(scale)[0]
        eval_pairs = None if eval_pairs is None else eval_pairs.to_pairs(scale)[0]
        kwise = None
    unit = "prompts" if kwise is not None else "pairs"
    benchmarks = BenchmarkHook.from_config(cfg, tokenizer, data_parallel_size(mesh))
    per_epoch = data.steps_per_epoch(len(train_pairs), micro_pairs, cfg.gradient_accumulation_steps)
    if per_epoch == 0:
        raise UserError(
            f"{len(train_pairs)} training {unit} are fewer than one optimizer step of "
            f"{step_pairs} {unit}"
        )
    total_steps = per_epoch * cfg.num_train_epochs
    if cfg.max_train_steps > 0:
        total_steps = min(total_steps, cfg.max_train_steps)
    log.info(
        "%d train %s, %d eval %s; %d %s per step; %d steps (%d per epoch)",
        len(train_pairs),
        unit,
        len(eval_pairs) if eval_pairs else 0,
        unit,
        step_pairs,
        unit,
        total_steps,
        per_epoch,
    )
    log_pack(pack, train_pairs, cfg)
    buckets = data.length_buckets(cfg.max_token_length)
    train_iter = data.train_iterator(
        data.train_dataset(
            train_pairs,
            global_pairs_per_micro_batch=micro_pairs,
            grad_accum_steps=cfg.gradient_accumulation_steps,
            seed=cfg.seed,
            buckets=buckets,
            pack=pack,
            kwise=kwise,
        )
    )
    eval_batches = None
    if eval_pairs is not None:
        eval_pack = None if pack is None else dataclasses.replace(pack, slots=0)
        eval_batches = data.eval_batches(
            eval_pairs,
            global_pairs_per_batch=plan.batch.eval_pairs,
            buckets=buckets,
            pack=eval_pack,
            kwise=kwise,
        )

    # ---- model, optimizer, steps
    schedule = plan.optimizer_args.schedule(total_steps)
    optimizer = plan.optimizer_args.optimizer(schedule)
    if run_start.restored is None:
        graphdef, params, hf_config = initial_model(cfg, plan, run_start.model_dir, len(tokenizer))
        opt_state = init_optimizer_state(optimizer, params, mesh)
    else:
        graphdef, hf_config = plan.graphdef, plan.hf_config
        params, opt_state = run_start.restored.params, run_start.restored.opt_state
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    state_shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    obj = objective(cfg, kwise)
    tokenizer_dir = output_dir / "tokenizer"
    if is_main:
        tokenizer.save_pretrained(tokenizer_dir)
    meta = {
        "config": to_dict(cfg),
        "layout": layout,
        "hf_config": hf_config,
        "tokenizer_dir": str(tokenizer_dir),
        "data_stats": stats,
    }

    # ---- restore, train, save
    wandb = None
    if cfg.with_tracking:
        wandb = {
            "project": cfg.wandb_project_name,
            "entity": cfg.wandb_entity or None,
            "name": cfg.run_name or None,
        }
    with (
        Checkpointer(output_dir, max_to_keep=cfg.max_checkpoints_to_keep) as checkpointer,
        MetricsWriter(output_dir, enabled=is_main, config=to_dict(cfg), wandb=wandb) as writer,
    ):
        loop = Loop(
            cfg=cfg,
            mesh=mesh,
            stop=stop,
            total_steps=total_steps,
            per_epoch=per_epoch,
            step_pairs=step_pairs,
            graphdef=graphdef,
            train_step=make_train_step(
                graphdef,
                optimizer,
                mesh,
                state_shardings,
                obj,
                packed=pack is not None,
                shared_prefix=cfg.prefix_sharing,
                kwise=kwise is not None,
            ),
            eval_step=make_eval_step(
                graphdef,
                mesh,
                param_shardings,
                obj,
                packed=pack is not None,
                shared_prefix=cfg.prefix_sharing,
                kwise=kwise is not None,
            ),
            benchmarks=benchmarks,
            state=(params, opt_state),
            train_iter=train_iter,
            eval_batches=eval_batches,
            checkpointer=checkpointer,
            writer=writer,
            accounting=StepAccounting(cfg, schedule, total_steps),
            meta=meta,
        )
        if run_start.restored is not None:
            loop.restore(run_start.restored)
        if is_main:
            keep_metrics_until(writer.path, loop.step)
        loop.train()
        exported = loop.finish()
    if is_main:
        records = read_metrics(writer.path)
        if records:
            try:
                plot_metrics(records, output_dir / "metrics.png")
            except OSError as e:
                reason = write_failure(e)
                log.warning("could not write metrics.png (%s); the run is complete", reason)
    summary = {"step": loop.step, "seconds": round(time.time() - started, 1)}
    summary.update({k: v for k, v in loop.last_eval.items() if k != "reward_stats"})
    if is_main:
        evals = ""
        if loop.last_eval:
            accuracy, loss = loop.last_eval["rm/accuracy"], loop.last_eval["rm/loss"]
            evals = f"eval accuracy {accuracy:.4f}, eval loss {loss:.4f}, "
        print(
            f"done: {loop.step} steps in {summary['seconds']:.0f}s; {evals}outputs in "
            f"{output_dir}" + (f" (HF export: {exported})" if exported else "")
        )
    return summary


@dataclasses.dataclass
class Loop:
    """The training loop and everything it touches: steps, state, data, checkpoints, metrics."""

    cfg: ml_collections.ConfigDict
    mesh: Any
    stop: StopRequest
    total_steps: int
    per_epoch: int
    step_pairs: int
    graphdef: nnx.GraphDef
    train_step: Callable
    eval_step: Callable
    benchmarks: BenchmarkHook
    state: Any
    train_iter: Any
    eval_batches: Any  # None without an eval set
    checkpointer: Checkpointer
    writer: MetricsWriter
    accounting: StepAccounting
    meta: dict[str, Any]
    step: int = 0
    saved_step: int | None = None  # the newest checkpoint known to be complete on disk
    pending_step: int | None = None  # a checkpoint still being written in the background
    last_eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_eval_step: int | None = None

    def restore(self, restored: Restored) -> None:
        """Continues from a checkpoint read whole (its state is already the loop's): its data
        position and skipped-step count; newer, unreadable steps are set aside."""
        step, meta = restored.step, restored.meta
        self.checkpointer.set_aside_newer_than(step)
        if restored.data_state is not None:
            self.train_iter.set_state(restored.data_state)
        self.step, self.saved_step = step, step
        self.accounting.skipped_total = int(meta.get("skipped_steps", 0))
        if "final_eval" in meta:  # the last step's eval is done (a rerun after its export)
            self.last_eval, self.last_eval_step = meta["final_eval"], step
        log.info("resumed from step %d of %d", step, self.total_steps)

    def train(self) -> None:
        """Steps until `total_steps`; raises RunStopped on a stop vote (after a checkpoint) or
        when the run diverges. A step's outputs are read while the next one runs; the state is
        waited for only when a logging window, an eval, a checkpoint or the end needs it. The
        last step's eval is left to `finish`, after its checkpoint."""
        cfg, accounting = self.cfg, self.accounting
        progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (jax.process_index() == 0 and cfg.progress_bar),
            dynamic_ncols=True,
        )
        pending: tuple[int, dict[str, jax.Array], int] | None = None
        self.stop.graceful = True
        try:
            while self.step < self.total_steps and not accounting.diverged():
                votes = stop_votes(self.mesh, self.stop.requested)
                host = next(self.train_iter)
                batch = data.to_global(host, self.mesh)
                self.state, outputs = self.train_step(self.state, batch, votes)
                self.step += 1
                progress.update(1)
                if pending is not None:
                    self.write(pending[0], accounting.consume(*pending), progress)
                pending = (self.step, outputs, int(host["tokens"]))
                last = self.step == self.total_steps
                eval_due = self.eval_batches is not None and due(self.step, cfg.eval_steps)
                eval_due = eval_due and not last
                save_due = due(self.step, cfg.checkpointing_steps) and not last
                read_now = eval_due or save_due or accounting.stop_voted
                if accounting.diverged() or not (read_now or accounting.window_ends(self.step)):
                    continue
                record = accounting.consume(*pending)
                pending = None
                if accounting.diverged():
                    self.write(self.step, record, progress)
                    break
                if eval_due:
                    with accounting.paused():
                        record.update(self.eval_record())
                self.write(self.step, record, progress)
                if accounting.stop_voted and not last:
                    self.save(wait=True)
                    raise RunStopped(
                        f"interrupted at step {self.step} of {self.total_steps}; checkpoint "
                        f"saved in {self.checkpointer.directory}; rerun the same command to "
                        "resume",
                        EXIT_INTERRUPTED,
                    )
                if save_due:
                    with accounting.paused():
                        self.save()
        finally:
            self.stop.graceful = False
            progress.close()
        if accounting.diverged():
            self.settle_saves()
            steps = accounting.consecutive
            kept = f"step {self.saved_step}" if self.saved_step is not None else "none written"
            raise RunStopped(
                f"training diverged: {len(steps)} consecutive steps ({steps[0]}-{steps[-1]}) "
                "had a non-finite loss or gradient norm, so none was applied; kept the "
                f"last good checkpoint ({kept}); lower the learning_rate "
                f"({cfg.learning_rate:g}) or check the data",
                EXIT_DIVERGED,
            )

    def finish(self) -> Path | None:
        """The last step's checkpoint first, then the final eval and benchmarks (unless that
        checkpoint already records them) and the HF export. A signal from the last step on
        stops with `EXIT_INTERRUPTED` once that checkpoint is on disk; a rerun resumes at the
        last step and does only what is left."""
        with self.stop.deferred():
            if self.step not in (self.saved_step, self.pending_step):
                self.save()
            self.settle_saves()
        final_eval = self.eval_batches is not None and self.last_eval_step != self.step
        self.left_to_do(["the final eval"] * final_eval + ["the HF export"] * self.cfg.export_hf)
        if self.accounting.stop_voted and not self.stop.requested:  # another process's signal
            raise RunStopped(f"another process was stopped; {self.stop.note}", EXIT_INTERRUPTED)
        self.stop.stop_if_requested()
        if final_eval:
            self.log_record({**self.progress_fields(self.step), **self.eval_record()})
            self.record_final_eval()
            self.left_to_do(["the HF export"] * self.cfg.export_hf)
        if not self.cfg.export_hf:
            return None
        from jaxrm.hf_export import export_checkpoint

        output_dir = Path(self.cfg.output_dir)
        exported, _ = export_checkpoint(
            output_dir,
            output_dir / "hf",
            step=self.step,
            dtype=self.cfg.export_dtype,
            overwrite=True,
        )
        dtype = self.cfg.export_dtype
        log.info("exported %s step %d (%s) to %s", output_dir, self.step, dtype, exported)
        self.left_to_do([])
        return exported

    def left_to_do(self, phases: list[str]) -> None:
        """What a stop from now on says: the last step's checkpoint is kept, `phases` are not
        done (a rerun does them)."""
        left = " and ".join(phases) or "metrics.png (the rest is done)"
        self.stop.kept(
            f"stopped after the last step ({self.step} of {self.total_steps}), whose checkpoint "
            f"is saved in {self.checkpointer.directory}; rerun the same command to finish {left}"
        )

    def record_final_eval(self) -> None:
        """Adds the final eval to the last step's checkpoint: its reward stats for the export,
        and the metrics, so that a rerun after a stop in the export does not evaluate again."""
        final = {"reward_stats": self.last_eval["reward_stats"], "final_eval": self.last_eval}
        try:
            self.checkpointer.update_meta(self.step, final)
        except OSError as e:
            meta = self.checkpointer.directory / str(self.step) / "meta"
            raise self._write_error(f"the final eval into {meta}", e) from None

    def eval_record(self) -> dict[str, Any]:
        """eval/ fields: the eval set's metrics and the benchmarks' scores (if any)."""
        record = eval_fields(self.run_eval())
        record.update(self.benchmarks(self.graphdef, self.state[0], self.mesh))
        return record

    def run_eval(self) -> dict[str, Any]:
        """The eval set's metrics at the current step (kept for the export's reward stats)."""
        params = self.state[0]
        self.last_eval = eval_metrics(self.eval_step, params, self.eval_batches, self.mesh)
        self.last_eval_step = self.step
        return self.last_eval

    def save(self, wait: bool = False) -> None:
        """Starts a checkpoint of the current step (written in the background unless `wait`)."""
        self.settle_saves()
        params, opt_state = self.state
        try:
            self.checkpointer.save(
                self.step,
                params=params,
                opt_state=opt_state,
                data_state=self.train_iter.get_state(),
                meta={**self.meta, "skipped_steps": self.accounting.skipped_total},
                force=True,
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise self._write_error(self._checkpoint_name(self.step), e) from None
        self.pending_step = self.step
        if wait:
            self.settle_saves()

    def settle_saves(self) -> None:
        """Waits for the background checkpoint write; a failed one (a full disk) is a one-line
        error naming the last complete checkpoint, which is intact."""
        if self.pending_step is None:
            return
        try:
            self.checkpointer.wait()
        except (OSError, ValueError, RuntimeError) as e:
            raise self._write_error(self._checkpoint_name(self.pending_step), e) from None
        self.saved_step, self.pending_step = self.pending_step, None
        log.info("checkpoint step %d saved to %s", self.saved_step, self.checkpointer.directory)

    def _checkpoint_name(self, step: int) -> str:
        return f"checkpoint step {step} to {self.checkpointer.directory}"

    def _write_error(self, what: str, e: BaseException) -> UserError:
        """A failed write (a full disk) as one line naming the last complete checkpoint."""
        kept = f"step {self.saved_step}" if self.saved_step is not None else "none"
        return UserError(
            f"could not write {what} ({write_failure(e)}); the last complete checkpoint is {kept}"
        )

    def log_record(self, record: dict[str, Any]) -> None:
        try:
            self.writer.write(record)
        except OSError as e:
            raise self._write_error(str(self.writer.path), e) from None

    def progress_fields(self, at: int) -> dict[str, Any]:
        return {"step": at, "episode": at * self.step_pairs, "epoch": at / self.per_epoch}

    def write(self, at: int, record: dict[str, Any], progress: tqdm) -> None:
        if not record:
            return
        self.log_record({**record, **self.progress_fields(at)})
        if record.get("train/rm/loss") is not None:
            progress.set_postfix(
                loss=f"{record['train/rm/loss']:.4f}",
                acc=f"{record['train/rm/accuracy']:.3f}",
                tok_s=f"{record['train/tokens_per_second']:.0f}",
            )


if __name__ == "__main__":
    run_cli(main)
