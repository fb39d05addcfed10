"""A reward model's rewards: locate and load a model (an HF directory or hub id, or a jaxrm
training run's checkpoint) and score token sequences with it, packed like training. The library
behind `python -m jaxrm.score`, `python -m jaxrm.evaluate` and training's benchmark evals."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
import os
import sys
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxrm.backends import AUTO
from jaxrm.checkpoint import read_meta, restore_params_and_meta, tokenizer_dir, training_output_dir
from jaxrm.data import packing
from jaxrm.data.batch import PACKED_FIELDS, batch_shardings, local_part
from jaxrm.dtypes import EXPORT_DTYPES, dtype_named
from jaxrm.errors import UserError
from jaxrm.hf import (
    abstract_reward_model,
    load_reward_model,
    read_hf_config,
    resolve_model_dir,
    state_leaves,
    tensor_map,
)
from jaxrm.models.attention import Choice
from jaxrm.models.family import ModelConfig
from jaxrm.plan import abstract_state, model_config, resolve_for
from jaxrm.sharding import activation_sharding, data_parallel_size, gather_to_host

log = logging.getLogger(__name__)


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
    hf_config: dict[str, Any]  # the model's config.json (a run's: from its metadata)
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
        return ModelSource(
            str(name_or_path),
            None,
            run_dir,
            found,
            meta,
            tokenizer,
            meta["hf_config"],
            step is None,
        )
    if step is not None:
        raise UserError(
            f"--step {step}: {name_or_path} is not a jaxrm training output directory "
            "(no checkpoints/ in it)"
        )
    model_dir = resolve_model_dir(name_or_path)
    hf_config = read_hf_config(model_dir)
    tokenizer = tokenizer or str(model_dir)
    return ModelSource(str(name_or_path), model_dir, None, None, None, tokenizer, hf_config)


def load_model(
    source: ModelSource, mesh, *, dtype: str = "float32", vocab_size: int | None = None
) -> tuple[nnx.Module, ModelSource]:
    """The located reward model, sharded on `mesh`, computing in `dtype`, and its source as
    loaded. A training run's params are restored straight into the training layout (its
    optimizer state is not read); without --step from the newest step that reads then (a live
    run may have saved a newer one, or rotated the located one away, since it was located). An
    HF model's embedding grows to `vocab_size` (the tokenizer's length) when that is larger. A
    non-finite weight is refused (`check_finite`)."""
    compute = dtype_named(dtype, EXPORT_DTYPES, "--dtype")
    if source.run_dir is not None:
        attention = scoring_attention(source.meta["hf_config"], dtype)
        config = model_config(source.meta["hf_config"], dtype=compute, attention=attention)
        if vocab_size is not None and vocab_size > config.vocab_size:
            raise UserError(
                f"the tokenizer has {vocab_size} tokens, more than the {config.vocab_size} "
                f"embeddings {source.describe()} was trained with"
            )
        graphdef, state = abstract_reward_model(config)
        step, params, meta = restore_params_and_meta(
            source.run_dir,
            None if source.newest else source.step,
            nnx.to_pure_dict(abstract_state(state, mesh)),
        )
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state)
        loaded = dataclasses.replace(source, step=step, meta=meta)
        check_finite(model, config, loaded.describe())
        return model, loaded
    model, hf_config, report = load_reward_model(
        str(source.model_dir),
        mesh,
        min_vocab_size=vocab_size,
        dtype=compute,
        attention=scoring_attention(source.hf_config, dtype),
    )
    if report.head != "loaded":
        print(
            f"warning: {source.model_dir} has no score head (score.weight); rewards come from a "
            "freshly initialized head",
            file=sys.stderr,
        )
    check_finite(model, model_config(hf_config), source.describe())
    return model, source


def scoring_attention(hf_config: dict[str, Any], dtype: str) -> Choice:
    """The attention per mask kind scoring runs with: the run plan's resolution for packed rows
    with shared prompts (scoring packs a prompt's responses as one tree group, single sequences
    as segments), on this backend."""
    return resolve_for(
        hf_config, dtype, AUTO, jax.default_backend(), "packed", prefix_sharing=True
    ).kernels


def check_finite(model: nnx.Module, config: ModelConfig, where: str) -> None:
    """Refuses a model holding a non-finite weight (every reward would be NaN or meaningless), in
    one line naming the first such tensor by its HF name. Checked on the devices: only one flag
    per tensor (per layer) comes to the host."""
    leaves = state_leaves(nnx.state(model))
    entries = tensor_map(config)

    def flags(values: list[jax.Array]) -> list[jax.Array]:
        return [
            jnp.isfinite(v).reshape(v.shape[0], -1).all(axis=1)
            if e.stacked
            else jnp.isfinite(v).all()
            for e, v in zip(entries, values, strict=True)
        ]

    finite = jax.jit(flags)([leaves[e.path].value for e in entries])
    for entry, ok in zip(entries, finite, strict=True):
        bad = np.flatnonzero(~gather_to_host(ok).reshape(-1))
        if len(bad):
            name = entry.hf_names(config.num_hidden_layers)[int(bad[0])]
            raise UserError(f"{where}: parameter {name} holds non-finite values; not scored")


IN_FLIGHT = 1  # micro-batches computing on the devices while the host prepares the next one


def distinct_sequences(token_ids: Sequence[Sequence[int]]) -> tuple[list, np.ndarray]:
    """The distinct sequences, in an order fixed by their contents alone (so any file holding the
    same sequences packs them alike), and per sequence the index of its distinct copy. Sequences
    are keyed by a 128-bit hash of their ids (a collision is as likely as a cosmic-ray error)."""
    keys = [
        hashlib.blake2b(np.asarray(t, np.int64).tobytes(), digest_size=16).digest()
        for t in token_ids
    ]
    first: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    distinct = sorted(first)
    position = {key: n for n, key in enumerate(distinct)}
    copies = np.fromiter((position[k] for k in keys), np.int64, len(keys))
    return [token_ids[first[k]] for k in distinct], copies


def shared_groups(copies: np.ndarray, keys: Sequence[Hashable], count: int) -> list[list[int]]:
    """The distinct sequences (`count`, `copies` from `distinct_sequences`) joined into groups:
    two are in one group when some key is given to a copy of each (a prompt's responses share
    its row's key), transitively. Members ascend; groups are ordered by their first member. Both
    follow from the contents alone (not from the order or repeats of the keyed sequences)."""
    if len(keys) != len(copies):
        raise ValueError(f"{len(keys)} group keys for {len(copies)} sequences")
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[Hashable, int] = {}
    for copy, key in zip(copies.tolist(), keys, strict=True):
        a, b = root(first.setdefault(key, copy)), root(copy)
        parent[max(a, b)] = min(a, b)  # a group's root is its first member
    members: dict[int, list[int]] = {}
    for i in range(count):
        members.setdefault(root(i), []).append(i)
    return list(members.values())


def score_token_ids(
    model: nnx.Module,
    token_ids: list[list[int]],
    batch_size: int,
    mesh,
    progress: bool = True,
    groups: Sequence[Hashable] | None = None,
) -> np.ndarray:
    """Rewards of token sequences. Each distinct sequence is scored once and every copy gets its
    reward, so equal sequences tie exactly (a benchmark's strict `>` or top-share rule sees a tie,
    not float noise from where a copy landed in a packed row). `groups`: a key per sequence (a
    row's); the sequences of one key (a prompt's responses) are packed as one group, their
    common prefix computed once (`shared_groups`, `jaxrm.data.packing.pack_sequence_groups`)."""
    if not len(token_ids):
        return np.zeros(0, np.float32)
    distinct, copies = distinct_sequences(token_ids)
    shared = None if groups is None else shared_groups(copies, groups, len(distinct))
    if shared is not None and all(len(g) == 1 for g in shared):
        shared = None  # nothing to share: single sequences, as without groups
    return _score_distinct(model, distinct, batch_size, mesh, progress, shared)[copies]


def scoring_spec(lengths: np.ndarray, batch_size: int, devices: int) -> packing.PackSpec:
    """Rows of the longest sequence (rounded up to whole blocks, at least `MIN_MICRO_TOKENS`),
    as many per device as hold `batch_size` sequences of average length."""
    length = -(-max(int(lengths.max()), packing.MIN_MICRO_TOKENS) // packing.ROW_MULTIPLE)
    length *= packing.ROW_MULTIPLE
    rows = max(1, math.ceil(batch_size * float(lengths.mean()) / length))
    return packing.PackSpec(length=length, rows=rows, devices=devices, slots=0, share_prefix=False)


def _score_distinct(
    model: nnx.Module,
    token_ids: list,
    batch_size: int,
    mesh,
    progress: bool,
    groups: list[list[int]] | None,
) -> np.ndarray:
    """Packed like training (jaxrm/data/packing.py: rows holding whole sequences or groups, one
    compiled shape), `batch_size` sequences of average length per device and forward pass; the
    score is read at each sequence's last token. The next micro-batch is prepared and dispatched
    before the previous one's rewards are fetched (`IN_FLIGHT`), so host and devices overlap."""
    graphdef, state = nnx.split(model)
    lengths = np.array([len(t) for t in token_ids], np.int64)
    spec = scoring_spec(lengths, batch_size, data_parallel_size(mesh))
    row_fields: tuple[str, ...] = ("input_ids", "positions", "segment_ids")
    if groups is None:
        micro_batches: packing.SequencePacking | packing.GroupPacking = packing.pack_sequences(
            lengths, spec
        )
    else:
        micro_batches = packing.pack_sequence_groups(token_ids, groups, spec)
        row_fields += ("branch_ids",)  # the `tree` mask kind: branches read their prefix
        if micro_batches.split:
            log.info(
                "scoring: %d of %d prompt groups are longer than a %d-token row, split into "
                "sub-groups that each repeat the prompt",
                micro_batches.split,
                len(groups),
                spec.length,
            )
    shardings = batch_shardings(mesh, {k: PACKED_FIELDS[k] for k in row_fields})
    shardings["index"] = batch_shardings(mesh, {"index": PACKED_FIELDS["chosen_index"]})["index"]

    @jax.jit
    def forward(state, batch):
        with activation_sharding(mesh):
            rows = [batch[k] for k in row_fields]
            branches = rows[3] if len(rows) > 3 else None  # None: no prompt is shared
            scores = nnx.merge(graphdef, state).token_scores(*rows[:3], branches)
        per_device = scores.reshape(batch["index"].shape[0], -1)
        return jnp.take_along_axis(per_device, batch["index"], axis=1)

    def dispatch(micro: dict[str, np.ndarray]) -> jax.Array:
        host = (
            micro
            if groups is not None
            else dict(micro, input_ids=packing.fill_tokens(micro, token_ids))
        )
        local = local_part(
            {k: host[k] for k in shardings}, jax.process_index(), jax.process_count()
        )
        batch = {
            k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()
        }
        return forward(state, batch)

    rewards = np.zeros(len(token_ids), np.float32)

    def collect(micro: dict[str, np.ndarray], values: jax.Array) -> None:
        host = gather_to_host(values)  # a collective: every process fetches in the same order
        real = micro["weight"] > 0
        rewards[micro["order"][real]] = host[real]

    pending: collections.deque = collections.deque()
    for micro in tqdm(micro_batches, desc="scoring", unit="batch", disable=not progress):
        pending.append((micro, dispatch(micro)))
        if len(pending) > IN_FLIGHT:
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())
    return rewards
