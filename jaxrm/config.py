"""Training configs: `configs/*.py` files with `get_config()`, plus `--config.key=value` overrides.

Every key lives in `base_config()` with its default and type; a config file changes values, and
an override for a key that does not exist, or of the wrong type, is a one-line error (the
ConfigDict is locked and type-safe). `CHECKS`, next to the defaults, bounds every enumerated or
numeric key; `get_config` applies them before any work starts. Key names follow open-instruct's
`reward_modeling.py` where the concept is the same.

`TRAINING_KEYS` lists the settings that change what is trained: a resumed run must match its
checkpoint's values (`config_drift`); everything else (logging, eval and checkpoint cadence,
progress bar, tracking, mesh, kernels) may change between runs.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxrm.data.group_packing import AVERAGES as KWISE_AVERAGES
from jaxrm.data.group_packing import OBJECTIVES as KWISE_OBJECTIVES
from jaxrm.data.packing import ROW_MULTIPLE
from jaxrm.dtypes import COMPUTE_DTYPES, EXPORT_DTYPES
from jaxrm.errors import UserError
from jaxrm.models.attention import ATTENTION_IMPLEMENTATIONS
from jaxrm.models.remat import REMAT_POLICIES
from jaxrm.optimizer import SCHEDULER_TYPES
from jaxrm.rewardbench.rules import TIES_FORMULAS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # model and tokenizer
    c.model_name_or_path = ""
    c.model_revision = ""
    c.tokenizer_name = ""  # empty: the model's tokenizer
    c.reinit_score_head = False
    # data (open-instruct names)
    c.dataset_mixer_list = []
    c.dataset_mixer_list_splits = ["train"]
    c.dataset_mixer_eval_list = []
    c.dataset_mixer_eval_list_splits = ["test"]
    c.max_token_length = 512
    c.max_prompt_token_length = 256
    c.dataset_cache_dir = ""  # empty: ~/.cache/jaxrm/tokenized (or $JAXRM_CACHE_DIR)
    c.dataset_num_proc = 0  # 0: single process tokenization
    # objective
    c.use_margin = False  # -log_sigmoid(rc - rr - margin) with the dataset's `margin` column
    c.center_rewards_coefficient = 0.0  # + coef * mean((rc + rr)^2) (TRL)
    # K-wise data (K >= 2 scored responses per prompt, jaxrm/data/group_packing.py): "kwise" packs
    # each prompt once with all its responses; batch sizes then count prompts, not pairs
    c.preference_format = "pairs"  # pairs | kwise
    c.kwise_objective = "bradley_terry"  # bradley_terry (every implied pair) | plackett_luce
    c.kwise_loss_average = "pair"  # bradley_terry: each pair weighs 1 | each prompt weighs 1
    c.kwise_margin_scale = 0.0  # margin = scale x (score chosen - score rejected); 0: none
    c.ultrafeedback_score = "overall_score"  # UltraFeedback's rating used as the score
    # optimization (open-instruct / DeepSpeed defaults)
    c.learning_rate = 3e-6
    c.lr_scheduler_type = "linear"
    c.warmup_ratio = 0.0
    c.weight_decay = 0.01
    c.adam_beta1 = 0.9
    c.adam_beta2 = 0.999
    c.adam_epsilon = 1e-5
    c.max_grad_norm = 1.0
    c.num_train_epochs = 1
    c.max_train_steps = 0  # > 0 caps the run (and the schedule horizon)
    c.per_device_train_batch_size = 1
    c.per_device_eval_batch_size = 1
    c.gradient_accumulation_steps = 1
    # pairs per optimizer step (K-wise, packed: prompts); 0: derived from the per-device size
    c.total_train_batch_size = 0
    c.seed = 1
    # model execution
    c.dtype = "auto"  # auto (bf16 on GPU/TPU, float32 on CPU) | float32 | bfloat16 | float16
    c.param_dtype = "float32"
    c.gradient_checkpointing = False
    c.remat_policy = "full"  # used when gradient_checkpointing (see jaxrm.models.remat)
    c.attention = "auto"  # auto (per mask kind: jaxrm.backends) | flash | xla | cudnn | splash
    # batches: packed rows of whole pairs (prompt shared by chosen and rejected), or right-padded
    # rows (the reference); see jaxrm/data/packing.py
    c.batch_layout = "packed"  # packed | padded
    c.pack_length = 0  # tokens per packed row; 0: room for two max_token_length sequences
    c.pack_rows_per_device = 0  # rows per device per micro-batch; 0: 1 (more for short rows)
    c.prefix_sharing = True  # chosen and rejected share their common prefix in one group
    # a pair too long for one packed row: refused before training (False) or dropped and counted
    c.drop_pairs_longer_than_pack_length = False
    # mesh: data x fsdp x tensor; -1 = the rest of the devices
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # multi-host: auto initializes jax.distributed on SLURM / TPU pods / with a coordinator
    c.distributed = ml_collections.ConfigDict(
        {"mode": "auto", "coordinator_address": "", "num_processes": 0, "process_id": -1}
    )
    # output, logging, evaluation, checkpoints
    c.output_dir = "runs/default"
    c.logging_steps = 10
    c.eval_steps = 0  # 0: evaluate only at the end
    c.eval_benchmarks = []  # scored with each eval (jaxrm.evaluate): rewardbench, rewardbench2
    # per benchmark, a local file in its schema (offline); empty: the benchmark's hub dataset
    c.eval_benchmark_data = ml_collections.ConfigDict({"rewardbench": "", "rewardbench2": ""})
    # RewardBench 2 Ties as allenai's released rewardbench "0.1.4" or main (rewardbench/rules.py)
    c.eval_benchmark_ties_formula = "0.1.4"
    c.checkpointing_steps = 0  # 0: checkpoint only at the end
    c.max_checkpoints_to_keep = 2
    c.resume = True  # continue from the latest checkpoint in output_dir
    c.overwrite_output_dir = False  # resume=False into a used output_dir: clear it first
    c.max_consecutive_skipped_steps = 10  # non-finite steps in a row before the run stops
    c.export_hf = True  # write output_dir/hf at the end
    c.export_dtype = "bfloat16"
    c.with_tracking = False  # wandb
    c.wandb_project_name = "jaxrm"
    c.wandb_entity = ""
    c.run_name = ""
    c.progress_bar = True
    return c


def recipe_config() -> ml_collections.ConfigDict:
    """`base_config` with what every published recipe in configs/ shares (open-instruct's at
    scale): 1 epoch at lr 3e-6 linear to 0, no warmup, seed 8; eval on
    ultrafeedback_binarized_cleaned (test_prefs); bf16 compute, float32 weights and Adam sharded
    over every device (`fsdp`), full remat; a log line per step, eval and checkpoint every 100
    steps, a bf16 export."""
    c = base_config()
    c.dataset_mixer_list_splits = ["train"]
    c.dataset_mixer_eval_list = ["allenai/ultrafeedback_binarized_cleaned", "1.0"]
    c.dataset_mixer_eval_list_splits = ["test_prefs"]
    c.learning_rate = 3e-6
    c.lr_scheduler_type = "linear"
    c.warmup_ratio = 0.0
    c.num_train_epochs = 1
    c.per_device_eval_batch_size = 4
    c.seed = 8
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    c.gradient_checkpointing = True
    c.remat_policy = "full"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.logging_steps = 1
    c.eval_steps = 100
    c.checkpointing_steps = 100
    c.export_dtype = "bfloat16"
    c.dataset_num_proc = 16
    return c


@dataclasses.dataclass(frozen=True)
class OneOf:
    choices: tuple[Any, ...]

    def problem(self, value: Any) -> str | None:
        if value in self.choices:
            return None
        return f"must be one of {', '.join(map(str, self.choices))}"


@dataclasses.dataclass(frozen=True)
class Between:
    """lo <= value <= hi (an open end when `lo_open` / `hi_open`); None: unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[Any, ...] = ()  # further allowed values (e.g. -1 = "the rest")
    multiple_of: int = 1

    def problem(self, value: Any) -> str | None:
        if value in self.also:
            return None
        ok = isinstance(value, int | float) and math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if ok and self.multiple_of > 1 and value % self.multiple_of:
            return f"must be a multiple of {self.multiple_of}"
        if ok:
            return None
        low = f"{'>' if self.lo_open else '>='} {self.lo}" if self.lo is not None else ""
        high = f"{'<' if self.hi_open else '<='} {self.hi}" if self.hi is not None else ""
        extra = f" (or {', '.join(map(str, self.also))})" if self.also else ""
        return f"must be {' and '.join(x for x in (low, high) if x)}{extra}"


POSITIVE = Between(0, lo_open=True)
AT_LEAST_ONE = Between(1)
NON_NEGATIVE = Between(0)
MESH_SIZE = Between(1, also=(-1,))

CHECKS: dict[str, OneOf | Between] = {
    "max_token_length": AT_LEAST_ONE,
    "max_prompt_token_length": AT_LEAST_ONE,
    "dataset_num_proc": NON_NEGATIVE,
    "center_rewards_coefficient": NON_NEGATIVE,
    "preference_format": OneOf(("pairs", "kwise")),
    "kwise_objective": OneOf(KWISE_OBJECTIVES),
    "kwise_loss_average": OneOf(KWISE_AVERAGES),
    "kwise_margin_scale": NON_NEGATIVE,
    "ultrafeedback_score": OneOf(("overall_score", "fine-grained_score")),
    "learning_rate": POSITIVE,
    "lr_scheduler_type": OneOf(SCHEDULER_TYPES),
    "warmup_ratio": Between(0, 1),
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": Between(0, 1, hi_open=True),
    "adam_beta2": Between(0, 1, hi_open=True),
    "adam_epsilon": POSITIVE,
    "max_grad_norm": NON_NEGATIVE,
    "num_train_epochs": AT_LEAST_ONE,
    "max_train_steps": NON_NEGATIVE,
    "per_device_train_batch_size": AT_LEAST_ONE,
    "per_device_eval_batch_size": AT_LEAST_ONE,
    "gradient_accumulation_steps": AT_LEAST_ONE,
    "total_train_batch_size": NON_NEGATIVE,
    "dtype": OneOf(("auto", *COMPUTE_DTYPES)),
    "param_dtype": OneOf(COMPUTE_DTYPES),
    "remat_policy": OneOf(tuple(REMAT_POLICIES)),
    "batch_layout": OneOf(("packed", "padded")),
    "pack_length": Between(0, multiple_of=ROW_MULTIPLE),  # 0: default_length
    "pack_rows_per_device": NON_NEGATIVE,
    "attention": OneOf(("auto", *ATTENTION_IMPLEMENTATIONS)),
    "mesh.data": MESH_SIZE,
    "mesh.fsdp": MESH_SIZE,
    "mesh.tensor": MESH_SIZE,
    "distributed.mode": OneOf(("auto", "on", "off")),
    "distributed.num_processes": NON_NEGATIVE,
    "distributed.process_id": Between(0, also=(-1,)),
    "logging_steps": AT_LEAST_ONE,
    "eval_steps": NON_NEGATIVE,
    "checkpointing_steps": NON_NEGATIVE,
    "max_checkpoints_to_keep": AT_LEAST_ONE,
    "max_consecutive_skipped_steps": AT_LEAST_ONE,
    "export_dtype": OneOf(EXPORT_DTYPES),
    "eval_benchmark_ties_formula": OneOf(tuple(TIES_FORMULAS)),
}
REQUIRED = ("model_name_or_path", "output_dir")

# What a resumed run must share with its checkpoint. The batch layout is compared as derived
# numbers (pairs per optimizer step and per micro-batch, see jaxrm.train), so the mesh and the
# process count may change.
TRAINING_KEYS = (
    "model_name_or_path",
    "model_revision",
    "tokenizer_name",
    "reinit_score_head",
    "dataset_mixer_list",
    "dataset_mixer_list_splits",
    "max_token_length",
    "max_prompt_token_length",
    "use_margin",
    "center_rewards_coefficient",
    "preference_format",
    "kwise_objective",
    "kwise_loss_average",
    "kwise_margin_scale",
    "ultrafeedback_score",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "num_train_epochs",
    "max_train_steps",
    "seed",
    "dtype",
    "param_dtype",
    "drop_pairs_longer_than_pack_length",
)


def _get(config: ml_collections.ConfigDict | dict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate_values(config: ml_collections.ConfigDict) -> None:
    """Every key of `CHECKS` within its bounds and every `REQUIRED` key set, or a one-line error."""
    for key in REQUIRED:
        if not _get(config, key):
            raise UserError(f"config key {key!r} is empty")
    for key, check in CHECKS.items():
        value = _get(config, key)
        problem = check.problem(value)
        if problem:
            raise UserError(f"config key {key!r} {problem}, got {value!r}")
    if not config.dataset_mixer_list:
        raise UserError("config key 'dataset_mixer_list' is empty: name at least one dataset")
    if config.preference_format == "kwise":
        check_kwise(config)


def check_kwise(config: ml_collections.ConfigDict) -> None:
    """The K-wise settings that cannot go together, each refused in one line."""
    if config.use_margin:
        raise UserError(
            "config key 'use_margin' reads the margin column of pairs; with preference_format "
            "kwise the margin comes from the scores: set kwise_margin_scale instead"
        )
    plackett_luce = config.kwise_objective == "plackett_luce"
    if plackett_luce and config.center_rewards_coefficient:
        raise UserError(
            "config key 'center_rewards_coefficient' applies to Bradley-Terry pairs, not "
            "kwise_objective plackett_luce"
        )
    if plackett_luce and config.kwise_margin_scale:
        raise UserError("config key 'kwise_margin_scale' has no meaning for plackett_luce")
    if config.batch_layout == "padded" and (plackett_luce or config.kwise_loss_average != "pair"):
        raise UserError(
            "batch_layout padded trains K-wise data as its implied pairs (Bradley-Terry, "
            "kwise_loss_average pair); plackett_luce and per-prompt averaging need batch_layout "
            "packed"
        )


def check_context_length(
    config: ml_collections.ConfigDict, hf_config: dict[str, Any], where: str
) -> None:
    """Refuses a `max_token_length` beyond the model's `max_position_embeddings` (positions it
    was never trained on); `where` names the model's config.json."""
    limit = hf_config.get("max_position_embeddings")
    if limit and config.max_token_length > limit:
        raise UserError(
            f"config key 'max_token_length' is {config.max_token_length}, more than the model's "
            f"max_position_embeddings={limit} ({where}); lower max_token_length to at most {limit}"
        )


def config_drift(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) for every `TRAINING_KEYS` key (and any derived key
    present in both) whose value changed. A training key that a checkpoint predates counts as
    its default, so adding a key does not refuse every older run's resume."""
    defaults = to_dict(base_config())
    stored = {**{k: defaults[k] for k in TRAINING_KEYS if k not in stored}, **stored}
    keys = [*TRAINING_KEYS, *(k for k in current if k.startswith("derived."))]
    return [
        (key, stored.get(key), current.get(key))
        for key in keys
        if _normalize(stored.get(key)) != _normalize(current.get(key))
    ]


def _normalize(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def load_config_file(path: str) -> ml_collections.ConfigDict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"jaxrm_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken config file is the user's to fix
        raise UserError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: defines no get_config()")
    config = module.get_config()
    validate_keys(config, base_config(), path)
    return config


def validate_keys(
    config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, where: str
) -> None:
    for key, value in config.items():
        if key not in reference:
            raise UserError(f"{where}: unknown config key {key!r}{did_you_mean(key, reference)}")
        if isinstance(value, ml_collections.ConfigDict):
            validate_keys(value, reference[key], f"{where}: {key}")


def did_you_mean(key: str, node: ml_collections.ConfigDict, parents: Sequence[str] = ()) -> str:
    """`; did you mean 'a.b'?` naming the closest key of `node` (under `parents`), or nothing
    when none is close."""
    close = difflib.get_close_matches(key, list(node.keys()), n=1)
    return f"; did you mean {'.'.join([*parents, close[0]])!r}?" if close else ""


def parse_value(text: str) -> Any:
    """A Python literal (number, bool, list, ...) or, failing that, the string itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            unknown = ".".join(parents[: i + 1])
            hint = did_you_mean(part, node, parents[:i])
            raise UserError(f"unknown config key {unknown!r}{hint}")
        node = node[part]
    if leaf not in node:
        raise UserError(f"unknown config key {dotted!r}{did_you_mean(leaf, node, parents)}")
    current = node[leaf]
    value = parse_value(text)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, list | tuple) and not isinstance(value, list | tuple):
        value = [v.strip() for v in str(value).split(",")] if str(value) else []
    if isinstance(current, str) and not isinstance(value, str):
        value = text
    expected = type(current)
    if isinstance(current, list | tuple):
        expected = list | tuple
    if not isinstance(value, expected) or (isinstance(value, bool) != isinstance(current, bool)):
        raise UserError(f"config key {dotted!r} expects {type(current).__name__}, got {text!r}")
    node[leaf] = list(value) if isinstance(value, tuple) else value


def get_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """`--config FILE [--config.key=value ...]` -> a locked, resolved config."""
    config_path, overrides = None, []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                config_path, i = args[i + 1], i + 1
        elif arg.startswith("--config."):
            key, sep, value = arg[len("--config.") :].partition("=")
            if not sep:
                if i + 1 >= len(args):
                    raise UserError(f"{arg} needs a value")
                value, i = args[i + 1], i + 1
            overrides.append((key, value))
        else:
            raise UserError(f"unknown argument {arg!r} (use --config FILE and --config.key=value)")
        i += 1
    if config_path is None:
        raise UserError("missing --config FILE (e.g. --config configs/tiny.py)")
    config = base_config()
    file_config = load_config_file(config_path)
    config.update(file_config)
    config.lock()
    for key, value in overrides:
        apply_override(config, key, value)
    validate_values(config)
    return config


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-friendly plain dict of the resolved config."""
    return json.loads(config.to_json())
