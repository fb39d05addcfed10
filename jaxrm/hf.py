"""The Hugging Face boundary: HF checkpoints <-> jaxrm parameters, for any model family.

The family's name map (`tensor_map`; each family's in jaxrm/models/, found by
jaxrm/models/families.py) says where every HF tensor lives in the jaxrm model and how its layout
differs (the layouts here: transposes, head reshapes). Import reads tensor by tensor, each device's
slice straight into its final sharded layout (`jax.make_array_from_callback` over memory-mapped
safetensors), so an 8B load never holds the whole model on one host. Export (jaxrm/hf_export.py)
walks the same map in reverse.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrm.assets import ARCHITECTURES_DIR
from jaxrm.errors import UserError, first_line
from jaxrm.models.families import family_named, flat_config, model_config_from_hf
from jaxrm.models.family import ModelConfig, TensorMap
from jaxrm.models.reward import RewardModel, score_head_stddev
from jaxrm.sharding import ReplicatedParam, check_replication, variable_sharding
from jaxrm.tensorfiles import WeightFiles

log = logging.getLogger(__name__)

HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]

# ----------------------------------------------------------------------------------------------
# Locating a model and reading its config


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub id downloaded (config, safetensors, tokenizer)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    _check_hub_id(name_or_path, path)
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id=str(name_or_path), revision=revision, allow_patterns=HUB_FILE_PATTERNS
            )
        )
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
        raise _unreachable(name_or_path, e) from None


def _check_hub_id(name_or_path: str, path: Path) -> None:
    looks_local = str(name_or_path).startswith((".", "/", "~")) or path.exists()
    if looks_local or str(name_or_path).count("/") != 1:
        raise UserError(f"model directory {name_or_path} does not exist")


def _unreachable(name_or_path: str, e: BaseException) -> UserError:
    return UserError(
        f"model {name_or_path} is not a local directory and could not be fetched from the "
        f"Hugging Face hub: {first_line(e)}"
    )


def shipped_architecture(hub_id: str) -> Path:
    """Where jaxrm ships a copy of a hub model's config.json (it may not exist)."""
    return ARCHITECTURES_DIR / f"{hub_id.replace('/', '--')}.json"


def model_architecture(name_or_path: str, revision: str | None = None) -> tuple[dict, str]:
    """A model's config.json without its weights, and where it came from: a local directory's,
    else jaxrm's shipped copy for the hub ids it has one for (jaxrm/assets/architectures; not
    when a revision is asked for), else the hub's config.json alone."""
    revision = revision or None
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return read_hf_config(path), str(path / "config.json")
    _check_hub_id(name_or_path, path)
    shipped = shipped_architecture(str(name_or_path))
    if not revision and shipped.is_file():
        where = f"jaxrm/assets/{shipped.relative_to(ARCHITECTURES_DIR.parent).as_posix()}"
        return read_config_file(shipped), f"{where}, jaxrm's copy of the hub's config.json"
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(str(name_or_path), "config.json", revision=revision)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
        raise _unreachable(name_or_path, e) from None
    return read_config_file(Path(file)), f"the hub's config.json of {name_or_path}"


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} not found: not a Hugging Face model directory")
    return read_config_file(path)


def read_config_file(path: Path) -> dict[str, Any]:
    """A Hugging Face config.json of a supported model type, as its family's model reads it (a
    multimodal checkpoint's text model as a flat config)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return flat_config(config, str(path))


# ----------------------------------------------------------------------------------------------
# The name map


def tensor_map(config: ModelConfig, prefix: str = "model.") -> list[TensorMap]:
    """The family's name map of a model config (backbone tensors under `prefix`)."""
    return family_named(config.family).tensor_map(config, prefix)


def hf_tensor_groups(entries: list[TensorMap]) -> list[list[TensorMap]]:
    """The entries by HF tensor, in the map's order: one entry, or a fused tensor's parts in
    row order (Phi-3's q|k|v and gate|up)."""
    groups: dict[str, list[TensorMap]] = {}
    for entry in entries:
        groups.setdefault(entry.hf_name, []).append(entry)
    return [sorted(g, key=lambda e: e.part[0]) if g[0].part else g for g in groups.values()]


def hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of one (per-layer) jaxrm parameter of `shape`."""
    if layout == "copy":
        return shape
    if layout == "linear":
        return (shape[1], shape[0])
    if layout == "heads_in":  # [D, N, H] <- [N*H, D]
        return (shape[1] * shape[2], shape[0])
    if layout == "heads_out":  # [N, H, D] <- [D, N*H]
        return (shape[2], shape[0] * shape[1])
    if layout == "heads_bias":  # [N, H] <- [N*H]
        return (shape[0] * shape[1],)
    raise ValueError(layout)


def to_hf(layout: str, value: np.ndarray) -> np.ndarray:
    """A full (per-layer) jaxrm parameter in HF layout."""
    if layout == "copy":
        return value
    if layout == "linear":
        return value.T
    if layout == "heads_in":
        return value.reshape(value.shape[0], -1).T
    if layout == "heads_out":
        return value.reshape(-1, value.shape[-1]).T
    if layout == "heads_bias":
        return value.reshape(-1)
    raise ValueError(layout)


def _from_hf_slice(
    layout: str, tensor: np.ndarray, index: tuple[slice, ...], shape: tuple[int, ...]
) -> np.ndarray:
    """The `index` slice of a jaxrm parameter of `shape`, reading only that part of `tensor`."""
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]
    s = [slice(a, b) for a, b in bounds]
    if layout == "copy":
        return tensor[tuple(s)]
    if layout == "linear":
        return tensor[s[1], s[0]].T
    if layout == "heads_in":
        (n0, n1), h = bounds[1], shape[2]
        rows = np.asarray(tensor[n0 * h : n1 * h, s[0]]).T
        return rows.reshape(rows.shape[0], n1 - n0, h)[:, :, s[2]]
    if layout == "heads_out":
        (n0, n1), h = bounds[0], shape[1]
        cols = np.asarray(tensor[s[2], n0 * h : n1 * h]).T
        return cols.reshape(n1 - n0, h, -1)[:, s[1], :]
    if layout == "heads_bias":
        (n0, n1), h = bounds[0], shape[1]
        return np.asarray(tensor[n0 * h : n1 * h]).reshape(n1 - n0, h)[:, s[1]]
    raise ValueError(layout)


# ----------------------------------------------------------------------------------------------
# Import


@dataclasses.dataclass
class ImportReport:
    """What the import did, for logs and tests."""

    head: str  # "loaded" or "initialized"
    ignored: list[str]  # HF tensors with no place in a reward model (lm_head, rotary buffers)
    resized_vocab: tuple[int, int] | None = None  # (old, new) when the embedding grew


# Where a checkpoint keeps its backbone: a causal LM or classifier under `model.`, a bare
# backbone at the top, a multimodal model's text model (Gemma 3) under either of its prefixes.
BACKBONE_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
FOREIGN_PARTS = ("vision_tower.", "multi_modal_projector.")  # a multimodal model's other towers


def _detect_prefix(names: set[str]) -> str:
    for prefix in BACKBONE_PREFIXES:
        if prefix + "embed_tokens.weight" in names:
            return prefix
    return "model." if any(n.startswith("model.") for n in names) else ""


def abstract_reward_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and abstract state (shapes, dtypes, sharding names) without allocating weights."""
    abstract = nnx.eval_shape(lambda: RewardModel(config, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def check_model_sharding(
    hf_config: dict[str, Any], mesh: Mesh, report: bool = False
) -> list[ReplicatedParam]:
    """A mesh checked against a model's config.json alone (no weights): refuses, in one line, one
    that leaves more than `MAX_REPLICATED_SHARE` of the parameters replicated; returns those it
    leaves replicated."""
    _, abstract = abstract_reward_model(model_config_from_hf(hf_config))
    return check_replication(abstract, mesh, report=report)


def state_leaves(state: nnx.State) -> dict[tuple[str, ...], nnx.Variable]:
    """The Variables of a state by path (path parts as strings, as in `TensorMap.path`)."""
    return {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def load_reward_model(
    model_name_or_path: str,
    mesh: Mesh,
    *,
    reinit_score_head: bool = False,
    min_vocab_size: int | None = None,
    seed: int = 0,
    revision: str | None = None,
    replication_limit: float | None = None,
    **runtime: Any,
) -> tuple[RewardModel, dict[str, Any], ImportReport]:
    """Loads an HF checkpoint of a supported family as a sharded RewardModel.

    A causal-LM (or bare backbone) checkpoint gives the backbone and a fresh score head; a
    `*ForSequenceClassification` checkpoint keeps its `score.weight` unless
    `reinit_score_head`. When `min_vocab_size` exceeds the embedding (a tokenizer with added
    tokens), the embedding grows to a multiple of 8 with new rows set to the mean of the old ones.
    Parameters that the mesh leaves replicated against the sharding rules are logged; more than
    `replication_limit` of the model (training passes `sharding.MAX_REPLICATED_SHARE`) is refused
    before anything is read. Returns the model, the HF config dict (updated vocab size) and a
    report.
    """
    model_dir = resolve_model_dir(model_name_or_path, revision)
    hf_config = read_hf_config(model_dir)
    config = model_config_from_hf(hf_config, **runtime)
    checkpoint_vocab = config.vocab_size
    config = config.replace(vocab_size=grown_vocab_size(checkpoint_vocab, min_vocab_size))
    graphdef, abstract_state = abstract_reward_model(config)
    check_replication(abstract_state, mesh, replication_limit, report=jax.process_index() == 0)
    model, report = read_hf_weights(
        model_dir,
        config,
        graphdef,
        abstract_state,
        mesh,
        checkpoint_vocab=checkpoint_vocab,
        reinit_score_head=reinit_score_head,
        seed=seed,
    )
    return model, dict(hf_config, vocab_size=config.vocab_size), report


def grown_vocab_size(vocab_size: int, min_vocab_size: int | None) -> int:
    """The embedding's rows for a tokenizer of `min_vocab_size` tokens: the checkpoint's, or more
    rounded up to a multiple of 8 (as open-instruct resizes)."""
    if min_vocab_size is None or min_vocab_size <= vocab_size:
        return vocab_size
    return -(-min_vocab_size // 8) * 8


def read_hf_weights(
    model_dir: Path,
    config: ModelConfig,
    graphdef: nnx.GraphDef,
    abstract_state: nnx.State,
    mesh: Mesh,
    *,
    checkpoint_vocab: int,
    reinit_score_head: bool = False,
    seed: int = 0,
) -> tuple[RewardModel, ImportReport]:
    """The HF checkpoint in `model_dir` as the RewardModel of `config` whose abstract sharded
    state is given (a run plan's: not traced again; it is copied, never filled in place). Every
    tensor is checked against it before any is read, so a checkpoint whose architecture differs
    from the planned one is one clear error. `checkpoint_vocab`: the embedding rows on disk (rows
    beyond are the mean of those)."""
    abstract_state = jax.tree.map(lambda x: x, abstract_state)
    reader = WeightFiles(model_dir)
    names = reader.names()
    prefix = _detect_prefix(names)
    old_vocab = checkpoint_vocab
    entries = tensor_map(config, prefix)
    has_head = "score.weight" in names and not reinit_score_head
    leaves = state_leaves(abstract_state)
    _check_tensors(model_dir, reader, entries, leaves, config, old_vocab, include_head=has_head)
    values: dict[tuple[str, ...], jax.Array] = {}
    for entry in entries:
        variable = leaves[entry.path]
        sharding = variable_sharding(variable, mesh)
        if entry.path == ("score", "kernel") and not has_head:
            values[entry.path] = _init_score_head(variable.shape, sharding, seed)
            continue
        tensors = [reader.tensor(n) for n in entry.hf_names(config.num_hidden_layers)]
        if entry.part is not None:  # its rows of a fused tensor (lazy views)
            tensors = [t[slice(*entry.part)] for t in tensors]
        fill = None
        if entry.path == ("model", "embed_tokens") and config.vocab_size > old_vocab:
            fill = _mean_rows(tensors[0])
        values[entry.path] = _make_sharded(entry, tensors, variable, sharding, fill)

    for path, variable in leaves.items():
        variable.value = values[path]
    model = nnx.merge(graphdef, abstract_state)
    ignored = sorted(names - {n for e in entries for n in e.hf_names(config.num_hidden_layers)})
    resized = (old_vocab, config.vocab_size) if config.vocab_size != old_vocab else None
    report = ImportReport("loaded" if has_head else "initialized", ignored, resized)
    unexpected = [n for n in ignored if not _ignorable(n)]
    if unexpected:
        log.warning(
            "%s: ignoring %d unexpected tensors, e.g. %s",
            model_dir,
            len(unexpected),
            unexpected[:3],
        )
    return model, report


def _ignorable(name: str) -> bool:
    return (
        name.startswith(("lm_head.", "language_model.lm_head."))
        or name.endswith("rotary_emb.inv_freq")
        or name == "score.weight"
        or any(part in name for part in FOREIGN_PARTS)
    )


def _check_tensors(
    model_dir: Path,
    reader: WeightFiles,
    entries: list[TensorMap],
    leaves: dict[tuple[str, ...], nnx.Variable],
    config: ModelConfig,
    old_vocab: int,
    include_head: bool,
) -> None:
    """Every expected tensor present with its full HF shape, before anything is loaded."""
    names = reader.names()
    fused_rows = {g[0].hf_name: g[-1].part[1] for g in hf_tensor_groups(entries) if g[0].part}
    for entry in entries:
        if entry.path == ("score", "kernel") and not include_head:
            continue
        shape = leaves[entry.path].shape[1:] if entry.stacked else leaves[entry.path].shape
        expected = hf_shape(entry.layout, tuple(shape))
        if entry.path == ("model", "embed_tokens"):
            expected = (old_vocab, *expected[1:])
        if entry.part is not None:
            expected = (fused_rows[entry.hf_name], *expected[1:])
        for name in entry.hf_names(config.num_hidden_layers):
            if name not in names:
                raise UserError(f"{model_dir}: tensor {name} is missing from the checkpoint")
            if reader.shape(name) != expected:
                raise UserError(
                    f"{model_dir}: tensor {name} has shape {list(reader.shape(name))}, "
                    f"expected {list(expected)} from config.json"
                )


def _mean_rows(embedding: np.ndarray, chunk: int = 8192) -> np.ndarray:
    total = np.zeros(embedding.shape[1], np.float64)
    for start in range(0, embedding.shape[0], chunk):
        total += np.asarray(embedding[start : start + chunk], np.float64).sum(axis=0)
    return (total / embedding.shape[0]).astype(np.float32)


def _make_sharded(
    entry: TensorMap,
    tensors: list[np.ndarray],
    variable: nnx.Variable,
    sharding: jax.sharding.Sharding,
    fill_rows: np.ndarray | None,
) -> jax.Array:
    """A global array of the parameter, each device's block read straight from the files."""
    shape, dtype = tuple(variable.shape), variable.dtype
    cache: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        if key not in cache:
            cache[key] = np.ascontiguousarray(
                _read_block(entry, tensors, index, shape, fill_rows), dtype=dtype
            )
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, read)


def _read_block(
    entry: TensorMap,
    tensors: list[np.ndarray],
    index: tuple[slice, ...],
    shape: tuple[int, ...],
    fill_rows: np.ndarray | None,
) -> np.ndarray:
    if entry.stacked:
        layers = range(*index[0].indices(shape[0]))
        return np.stack(
            [_from_hf_slice(entry.layout, tensors[i], index[1:], shape[1:]) for i in layers]
        )
    if fill_rows is None:
        return _from_hf_slice(entry.layout, tensors[0], index, shape)
    start, stop = index[0].indices(shape[0])[:2]
    old = tensors[0].shape[0]
    cols = index[1]
    parts = []
    if start < old:
        parts.append(np.asarray(tensors[0][start : min(stop, old), cols], np.float32))
    if stop > old:
        parts.append(
            np.broadcast_to(fill_rows[cols], (stop - max(start, old), len(fill_rows[cols])))
        )
    return np.concatenate(parts, axis=0)


def _init_score_head(
    shape: tuple[int, ...], sharding: jax.sharding.Sharding, seed: int
) -> jax.Array:
    std = score_head_stddev(shape[0])

    def init(key: jax.Array) -> jax.Array:
        return std * jax.random.normal(key, shape, jnp.float32)

    return jax.jit(init, out_shardings=sharding)(jax.random.key(seed))


def iter_hf_tensors(
    params: dict[tuple[str, ...], Callable[[int | None], np.ndarray]],
    config: ModelConfig,
) -> Iterator[tuple[str, np.ndarray]]:
    """(hf name, HF-layout array) one tensor at a time; `params[path](layer)` fetches a block
    (a fused tensor's parts are fetched and joined one layer at a time)."""
    for group in hf_tensor_groups(tensor_map(config)):
        first = group[0]
        layers = range(config.num_hidden_layers) if first.stacked else [None]
        for layer, name in zip(layers, first.hf_names(config.num_hidden_layers), strict=True):
            parts = [to_hf(e.layout, params[e.path](layer)) for e in group]
            yield name, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
