"""How a run spreads over processes and devices: joining the cluster (`jax.distributed`) and the
global batch sizes for a data-parallel size. Used by training, `jaxrm.devices` and
`jaxrm.memory_plan` alike, so all three agree."""

from __future__ import annotations

import os

import jax
import ml_collections

from jaxrm.errors import UserError


def initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
    """jax.distributed on SLURM / TPU pods / GPU clusters (auto) or with explicit flags."""
    d = cfg.distributed
    explicit = bool(d.coordinator_address)
    cluster = (
        any(
            k in os.environ
            for k in (
                "JAX_COORDINATOR_ADDRESS",
                "MEGASCALE_COORDINATOR_ADDRESS",
                "TPU_WORKER_HOSTNAMES",
            )
        )
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    )
    if d.mode == "off" or (d.mode == "auto" and not (explicit or cluster)):
        return
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=d.coordinator_address,
            num_processes=d.num_processes or None,
            process_id=d.process_id if d.process_id >= 0 else None,
        )
    jax.distributed.initialize(**kwargs)


def batch_sizes(cfg: ml_collections.ConfigDict, dp: int) -> tuple[int, int, int]:
    """(global pairs per micro-batch, pairs per optimizer step, global eval pairs per batch)."""
    accum = cfg.gradient_accumulation_steps
    micro = cfg.per_device_train_batch_size * dp
    if cfg.total_train_batch_size:
        if cfg.total_train_batch_size % (dp * accum):
            raise UserError(
                f"total_train_batch_size {cfg.total_train_batch_size} is not divisible by the "
                f"data-parallel size {dp} x gradient_accumulation_steps {accum}"
            )
        micro = cfg.total_train_batch_size // accum
    return micro, micro * accum, cfg.per_device_eval_batch_size * dp
