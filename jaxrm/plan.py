"""One run plan: what a config and the devices decide before any weight is read. The mesh, the
named batch sizes, the packed layout's shapes (or none), the resolved execution (compute dtype and
the attention per mask kind the run meets), the model config, the abstract sharded train state
and the optimizer's arguments. Training, `jaxrm.devices` and `jaxrm.memory_plan` take what they
need from it; none rebuilds it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxrm.backends import Execution, resolve_execution
from jaxrm.data import packing
from jaxrm.distributed import batch_sizes
from jaxrm.dtypes import BY_NAME
from jaxrm.hf import abstract_reward_model
from jaxrm.models.attention import Features
from jaxrm.models.families import model_config_from_hf
from jaxrm.models.family import ModelConfig
from jaxrm.optimizer import make_optimizer, make_schedule
from jaxrm.sharding import (
    MAX_REPLICATED_SHARE,
    ReplicatedParam,
    check_replication,
    data_parallel_size,
    make_mesh,
    variable_sharding,
)
from jaxrm.step import optimizer_state_shardings


@dataclasses.dataclass(frozen=True)
class BatchSizes:
    """Global pair counts of one run (see `jaxrm.distributed.batch_sizes`)."""

    micro_pairs: int  # pairs per micro-batch, all devices
    step_pairs: int  # pairs per optimizer step
    eval_pairs: int  # pairs per eval batch, all devices


@dataclasses.dataclass(frozen=True)
class OptimizerArgs:
    """AdamW with clipping and a schedule: everything but the run's length, known from data."""

    learning_rate: float
    lr_scheduler_type: str
    warmup_ratio: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    max_grad_norm: float

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> OptimizerArgs:
        return cls(
            cfg.learning_rate,
            cfg.lr_scheduler_type,
            cfg.warmup_ratio,
            cfg.weight_decay,
            cfg.adam_beta1,
            cfg.adam_beta2,
            cfg.adam_epsilon,
            cfg.max_grad_norm,
        )

    def schedule(self, total_steps: int) -> optax.Schedule:
        return make_schedule(
            self.learning_rate, total_steps, self.lr_scheduler_type, warmup_ratio=self.warmup_ratio
        )

    def optimizer(
        self, schedule: optax.Schedule | float | None = None
    ) -> optax.GradientTransformation:
        """The optimizer following `schedule` (None: a constant schedule, whose state is the
        training state's; a float: no schedule state at all)."""
        return make_optimizer(
            optax.constant_schedule(self.learning_rate) if schedule is None else schedule,
            weight_decay=self.weight_decay,
            b1=self.b1,
            b2=self.b2,
            eps=self.eps,
            max_grad_norm=self.max_grad_norm,
        )


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run is, decided from its config, its model's config.json and the devices."""

    mesh: Mesh
    batch: BatchSizes
    pack: packing.PackSpec | None  # None: padded batches
    execution: Execution
    remat_policy: str
    hf_config: dict[str, Any]  # the model's config.json (vocab_size: the trained embedding's)
    model_config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State  # jax.ShapeDtypeStructs with the training shardings
    opt_state: Any  # jax.ShapeDtypeStructs with shardings, of `optimizer_args.optimizer`
    optimizer_args: OptimizerArgs
    replicated: tuple[ReplicatedParam, ...]  # parameters the mesh leaves replicated

    @property
    def data_parallel(self) -> int:
        return data_parallel_size(self.mesh)


def model_config(hf_config: dict[str, Any], **runtime: Any) -> ModelConfig:
    """The model config of a config.json: the one place the model family is chosen."""
    return model_config_from_hf(hf_config, **runtime)


def plan_batch(cfg: ml_collections.ConfigDict, mesh: Mesh) -> BatchSizes:
    return BatchSizes(*batch_sizes(cfg, data_parallel_size(mesh)))


def plan_pack(
    cfg: ml_collections.ConfigDict, batch: BatchSizes, dp: int
) -> packing.PackSpec | None:
    """The packed layout's shapes (None: padded batches)."""
    if cfg.batch_layout != "packed":
        return None
    length, rows = packing.row_shape(
        cfg.max_token_length, cfg.pack_length, cfg.pack_rows_per_device
    )
    return packing.PackSpec(length, rows, dp, batch.step_pairs, cfg.prefix_sharing)


def resolve(
    cfg: ml_collections.ConfigDict, hf_config: dict[str, Any] | None, backend: str
) -> Execution:
    """The compute dtype and attention per mask kind `cfg` runs with on `backend` for the model
    of `hf_config` (None: its head_dim and features unknown, not checked)."""
    return resolve_for(
        hf_config,
        cfg.dtype,
        cfg.attention,
        backend,
        cfg.batch_layout,
        cfg.prefix_sharing,
    )


def resolve_for(
    hf_config: dict[str, Any] | None,
    dtype: str,
    attention: str,
    backend: str,
    layout: str,
    prefix_sharing: bool = False,
) -> Execution:
    """`resolve` for a model and a layout without a training config (scoring: packed, no
    prefix sharing)."""
    head_dim, features = None, Features()
    if hf_config is not None:
        config = model_config(hf_config)
        head_dim, features = config.head_dim, Features.of(config)
    return resolve_execution(
        dtype,
        attention,
        backend,
        head_dim,
        layout,
        prefix_sharing=prefix_sharing,
        features=features,
    )


def abstract_state(graph_state: nnx.State, mesh: Mesh) -> nnx.State:
    """An abstract model state as `jax.ShapeDtypeStruct`s placed by the sharding rules."""
    return jax.tree.map(
        lambda v: v.replace(
            jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=variable_sharding(v, mesh))
        ),
        graph_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def abstract_opt_state(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(optimizer.init, params),
        optimizer_state_shardings(optimizer, params, mesh),
    )


def make_plan(
    cfg: ml_collections.ConfigDict,
    devices: Sequence[jax.Device],
    hf_config: dict[str, Any],
    *,
    backend: str | None = None,
    execution: Execution | None = None,
    replication_limit: float | None = MAX_REPLICATED_SHARE,
    report: bool = False,
) -> RunPlan:
    """The plan of `cfg` on `devices` for the model of `hf_config` (its config.json, read once
    by the caller). The model is traced once and the mesh's replication checked once (refused
    beyond `replication_limit`); `execution` overrides the backend's resolution (memory plans)."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
    batch = plan_batch(cfg, mesh)
    if execution is None:
        execution = resolve(cfg, hf_config, backend or jax.default_backend())
    remat = cfg.remat_policy if cfg.gradient_checkpointing else "none"
    config = model_config(
        hf_config,
        dtype=BY_NAME[execution.dtype],
        param_dtype=BY_NAME[cfg.param_dtype],
        remat_policy=remat,
        attention=execution.kernels,
    )
    graphdef, graph_state = abstract_reward_model(config)
    replicated = check_replication(graph_state, mesh, replication_limit, report=report)
    params = abstract_state(graph_state, mesh)
    args = OptimizerArgs.from_config(cfg)
    return RunPlan(
        mesh=mesh,
        batch=batch,
        pack=plan_pack(cfg, batch, data_parallel_size(mesh)),
        execution=execution,
        remat_policy=remat,
        hf_config=dict(hf_config),
        model_config=config,
        graphdef=graphdef,
        params=params,
        opt_state=abstract_opt_state(args.optimizer(), params, mesh),
        optimizer_args=args,
        replicated=tuple(replicated),
    )


def with_vocab_size(plan: RunPlan, vocab_size: int) -> RunPlan:
    """`plan` for an embedding of `vocab_size` rows (a tokenizer's added tokens; a checkpoint's
    trained embedding); the same plan when it already has them."""
    if vocab_size == plan.model_config.vocab_size:
        return plan
    config = plan.model_config.replace(vocab_size=vocab_size)
    graphdef, graph_state = abstract_reward_model(config)
    params = abstract_state(graph_state, plan.mesh)
    args = plan.optimizer_args
    return dataclasses.replace(
        plan,
        hf_config=dict(plan.hf_config, vocab_size=vocab_size),
        model_config=config,
        graphdef=graphdef,
        params=params,
        opt_state=abstract_opt_state(args.optimizer(), params, plan.mesh),
    )
