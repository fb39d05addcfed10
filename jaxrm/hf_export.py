"""Export a training checkpoint as an HF `*ForSequenceClassification` directory (the library
behind `python -m jaxrm.export`, also called by training's final export).

The result loads with `AutoModelForSequenceClassification.from_pretrained(DIR)` (PyTorch PPO):
- `config.json`: the source model's config (every field, vocab size as trained) with
  `architectures` its family's class (e.g. `LlamaForSequenceClassification`), one label
  (`id2label {0: LABEL_0}`, so `num_labels == 1`), the tokenizer's `pad_token_id`, and `dtype`
  (transformers 5) plus `torch_dtype` (older readers).
- Reward statistics over the eval set, when training computed them (checkpoint meta
  `reward_stats`): `mean` and `std` at the top level of config.json, the keys OpenRLHF's reward
  model reads from its config (`get_llm_for_sequence_regression`), plus `normalize_reward: false`
  (OpenRLHF overwrites it from its own `--normalize_reward` flag; transformers ignores all three),
  so loading never changes rewards unless the user opts in. The full {mean, std, count} is kept as
  `reward_stats`. (OpenRLHF names its head `value_head` by default: pass it
  `--value_head_prefix score`.)
- Weights: safetensors (metadata `{"format": "pt"}`) named as transformers expects, score head
  `score.weight` [1, hidden], no `lm_head`; one `model.safetensors`, or `--max_shard_size` shards
  with `model.safetensors.index.json`. Every tensor is written whole (full shape).
- The tokenizer files saved by training (with the chat template used in training).

Memory: the parameters are restored sharded over all local devices; tensors are then gathered and
written one at a time (stacked layers one layer at a time), so host memory holds about one tensor
beyond what the devices hold (on a CPU-only host the devices *are* host memory). Each shard's header
is planned from the shapes before any data is fetched, so no shard is ever held whole in memory.
With several processes every process takes part in the gathers and only process 0 writes.

Safety: the export is written to a hidden sibling directory and renamed to `--output` once
complete. An `--output` that is, or lies inside, a training run (except the run's own `hf/`) is
refused, whatever `--overwrite` says. An existing non-empty `--output` is replaced only with
`--overwrite`, only when jaxrm wrote it as an export (marked by `.jaxrm-export.json`, a folder of
files only; a run's `hf/` from before the marker counts too), and only after the new export is
complete: a folder of the user's is never deleted. While an export writes `--output` it holds a
lock (`.NAME.jaxrm-export.lock` next to it), so a second export into the same target is refused with
the first one's host and pid. An interrupted export leaves the target as it was (and the next export
removes what a killed one left behind). A parameter holding a non-finite value refuses the export:
no NaN ever reaches PyTorch, nor config.json. Without `--step`, the newest checkpoint that reads is
exported (a damaged newer one is skipped with a warning, and a step that a live run's checkpoint
rotation removes while it is read gives way to the newest one); the step is printed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxrm.checkpoint import (
    read_meta,
    restore_params_and_meta,
    tokenizer_dir,
    training_output_dir,
)
from jaxrm.dtypes import EXPORT_DTYPES, dtype_named
from jaxrm.errors import UserError, write_failure
from jaxrm.hf import (
    abstract_reward_model,
    hf_shape,
    hf_tensor_groups,
    iter_hf_tensors,
    state_leaves,
    tensor_map,
)
from jaxrm.models.families import family_of, model_config_from_hf
from jaxrm.models.family import ModelConfig
from jaxrm.plan import abstract_state
from jaxrm.rundir import (
    TargetLock,
    enclosing_run_dir,
    is_run_dir,
    remove_stale_temporaries,
    temporary_sibling,
)
from jaxrm.sharding import gather_to_host, make_mesh
from jaxrm.tensorfiles import PlannedTensor, parse_size, write_safetensors

TEMPORARIES = ("export-tmp", "old")
HF_SUBDIR = "hf"  # a training run's own export: OUTPUT/hf
EXPORT_MARKER = ".jaxrm-export.json"  # what marks a directory as an export jaxrm wrote

# ----------------------------------------------------------------------------------------------
# Planning the tensors


def plan_tensors(config: ModelConfig, dtype: np.dtype) -> list[PlannedTensor]:
    """Every HF tensor of the export in `iter_hf_tensors` order, with its full HF shape."""
    _, abstract = abstract_reward_model(config)
    leaves = state_leaves(abstract)
    planned = []
    for group in hf_tensor_groups(tensor_map(config)):
        shapes = []
        for entry in group:
            shape = tuple(leaves[entry.path].shape)
            shapes.append(hf_shape(entry.layout, shape[1:] if entry.stacked else shape))
        shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]
        for name in group[0].hf_names(config.num_hidden_layers):
            planned.append(PlannedTensor(name, shape, dtype))
    return planned


# ----------------------------------------------------------------------------------------------
# Parameters: restore sharded, gather one tensor at a time


def abstract_params(config: ModelConfig, mesh: Mesh) -> dict:
    """The pure-dict params tree as `jax.ShapeDtypeStruct`s in the training layout on `mesh`."""
    _, abstract = abstract_reward_model(config)
    return nnx.to_pure_dict(abstract_state(abstract, mesh))


def tensor_fetchers(params: dict, dtype: Any, where: str) -> dict[tuple[str, ...], Callable]:
    """For each param path, `fetch(layer)`: that layer's slice (or the whole param) on the host,
    cast to `dtype` on the devices first; a non-finite value is a one-line error naming `where`."""

    def fetcher(path: tuple[str, ...], value: jax.Array) -> Callable[[int | None], np.ndarray]:
        def fetch(layer: int | None) -> np.ndarray:
            part = value if layer is None else value[layer]
            host = gather_to_host(part.astype(dtype))
            if not np.isfinite(host.astype(np.float32)).all():
                name = ".".join(path) + ("" if layer is None else f"[layer {layer}]")
                raise UserError(f"{where}: parameter {name} holds non-finite values; not exported")
            return host

        return fetch

    flat: dict[tuple[str, ...], Callable] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, str(k)))
        else:
            flat[path] = fetcher(path, node)

    walk(params, ())
    return flat


# ----------------------------------------------------------------------------------------------
# Config, tokenizer, target directory


def export_config(
    hf_config: dict[str, Any], pad_token_id: int, dtype: str, reward_stats: dict | None
) -> dict[str, Any]:
    config = dict(hf_config)
    for key in ("num_labels", "_num_labels"):
        config.pop(key, None)
    config.update(
        architectures=[family_of(hf_config).exported_class],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=int(pad_token_id),
        dtype=dtype,
        torch_dtype=dtype,
    )
    if reward_stats and all(math.isfinite(reward_stats[k]) for k in ("mean", "std")):
        config.update(
            mean=float(reward_stats["mean"]),
            std=float(reward_stats["std"]),
            normalize_reward=False,
            reward_stats=dict(reward_stats),
        )
    return config


def _pad_token_id(tokenizer_path: Path) -> int:
    from jaxrm.tokenizer import load_tokenizer

    return int(load_tokenizer(str(tokenizer_path)).pad_token_id)


def _copy_tokenizer(source: Path, target: Path) -> None:
    for path in sorted(source.iterdir()):
        if path.is_file():
            shutil.copy2(path, target / path.name)


def _check_target(output: Path, overwrite: bool) -> None:
    """Refuses an `--output` that is, or lies inside, a training run (but its own `hf/`), and
    an existing non-empty one unless `--overwrite` is given and it is an export jaxrm wrote."""
    run, resolved = enclosing_run_dir(output), Path(os.path.realpath(output))
    if run is not None and resolved != run / HF_SUBDIR:
        where = "is" if resolved == run else "lies inside"
        raise UserError(
            f"--output {output} {where} the training run {run}, which an export must not "
            f"replace; export to {run / HF_SUBDIR} or outside the run"
        )
    if not (output.exists() or output.is_symlink()) or _empty_dir(output):
        return
    if not _written_by_jaxrm(output, own_run_export=run is not None):
        raise UserError(
            f"--output {output} exists and is not an export written by jaxrm "
            f"({_why_not_export(output)}); --overwrite replaces only those: pick another --output"
        )
    if not overwrite:
        raise UserError(f"--output {output} holds an export; pass --overwrite to replace it")


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _written_by_jaxrm(path: Path, own_run_export: bool) -> bool:
    """Whether `path` is an export directory: files only (so deleting it deletes no run or
    folder of the user's), with jaxrm's marker, or a run's own `hf/` from before the marker."""
    if not path.is_dir() or any(p.is_dir() for p in path.iterdir()):
        return False
    return (path / EXPORT_MARKER).is_file() or (own_run_export and (path / "config.json").is_file())


def _why_not_export(path: Path) -> str:
    if not path.is_dir():
        return "a file"
    runs = [p for p in path.iterdir() if is_run_dir(p)]
    if runs:
        return f"it holds the training run {runs[0]}"
    if any(p.is_dir() for p in path.iterdir()):
        return "it holds folders"
    return f"no {EXPORT_MARKER} in it"


@contextlib.contextmanager
def _claimed(output: Path, overwrite: bool) -> Iterator[None]:
    """Process 0 holds the lock on writing `output` inside the block, and checks `output` again
    under it (another export may have just finished there); every process learns whether it may
    go on (the export's gathers are collectives)."""
    lock, refusal = None, None
    if jax.process_index() == 0:
        try:
            lock = TargetLock(output, "export").acquire()
            _check_target(output, overwrite)
        except UserError as e:
            refusal = e
        except OSError as e:
            refusal = UserError(f"could not lock --output {output} ({write_failure(e)})")
    if jax.process_count() > 1:
        taken = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
        if not taken and refusal is None:
            refusal = UserError(f"--output {output} was refused by process 0")
    try:
        if refusal is not None:
            raise refusal
        yield
    finally:
        if lock is not None:
            lock.release()


def _write_export(
    output: Path,
    tensors: Iterator[tuple[str, np.ndarray]],
    plan: list[PlannedTensor],
    shard_bytes: int,
    files: dict[str, str],
    tokenizer_path: Path,
) -> None:
    """Writes the weights, `files` and the tokenizer into a temporary sibling of `output`, then
    installs it there; only process 0 writes (the others take part in the gathers)."""
    writer = jax.process_index() == 0
    tmp = temporary_sibling(output, "export-tmp")
    try:
        if writer:
            remove_stale_temporaries(output, TEMPORARIES)
            tmp.mkdir()
        write_safetensors(tmp, tensors, plan, shard_bytes, writer)
        if writer:
            for name, text in files.items():
                (tmp / name).write_text(text + "\n")
            _copy_tokenizer(tokenizer_path, tmp)
            _install(tmp, output)
    finally:
        if writer and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, output: Path) -> None:
    """Moves the finished export to `output`; an old `output` is removed only after that."""
    old = None
    if output.exists() or output.is_symlink():
        old = temporary_sibling(output, "old")
        os.replace(output, old)
    try:
        os.replace(tmp, output)
    except BaseException:
        if old is not None:
            os.replace(old, output)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def _training_output_dir(checkpoint: str | Path) -> Path:
    """The training output directory, also when given its `checkpoints/` subdirectory."""
    path = Path(os.path.expanduser(str(checkpoint))).absolute()
    if not path.is_dir():
        raise UserError(f"checkpoint directory {checkpoint} does not exist")
    return training_output_dir(path) or path


# ----------------------------------------------------------------------------------------------
# The export


def export_checkpoint(
    checkpoint_dir: str | Path,
    output: str | Path,
    *,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    mesh: Mesh | None = None,
) -> tuple[Path, int]:
    """Writes the HF export of `step` (default: the newest that reads) of a training output dir
    to `output`; returns `(output, step)`.

    Every process must call it (the gathers are collectives); only process 0 writes.
    """
    weight_dtype = dtype_named(dtype, EXPORT_DTYPES, "--dtype")
    shard_bytes = parse_size(max_shard_size)
    output = Path(os.path.expanduser(str(output))).absolute()
    _check_target(output, overwrite)
    run_dir = _training_output_dir(checkpoint_dir)
    meta_step, meta = read_meta(run_dir, step)  # the model's config, before restoring anything
    if not isinstance(meta.get("hf_config"), dict):
        raise UserError(f"{run_dir} step {meta_step}: checkpoint metadata has no hf_config")
    tokenizer_path = tokenizer_dir(run_dir, meta)
    if not tokenizer_path.is_dir():
        raise UserError(f"tokenizer directory {tokenizer_path} (saved by training) does not exist")
    hf_config = meta["hf_config"]
    config = model_config_from_hf(hf_config)
    pad_id = _pad_token_id(tokenizer_path)
    plan = plan_tensors(config, weight_dtype)

    mesh = mesh if mesh is not None else make_mesh(1, -1, 1)
    with _claimed(output, overwrite):
        # meta and params of one step: a live run may have saved a newer one meanwhile
        step, params, meta = restore_params_and_meta(run_dir, step, abstract_params(config, mesh))
        fetchers = tensor_fetchers(params, weight_dtype, f"{run_dir} step {step}")
        config_json = export_config(hf_config, pad_id, dtype, meta.get("reward_stats"))
        files = {
            "config.json": json.dumps(config_json, indent=2, sort_keys=True),
            EXPORT_MARKER: json.dumps({"checkpoint": str(run_dir), "step": step, "dtype": dtype}),
        }
        try:
            _write_export(
                output, iter_hf_tensors(fetchers, config), plan, shard_bytes, files, tokenizer_path
            )
        except OSError as e:
            raise UserError(
                f"could not write the export to {output} ({write_failure(e)}); nothing there "
                f"was changed, and {run_dir} step {step} is intact"
            ) from None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxrm.export done")
    return output, step
