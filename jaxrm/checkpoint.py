"""Training checkpoints: orbax `CheckpointManager` steps under `OUTPUT/checkpoints/<step>/`.

Each step is a composite of three items:

    state/  {"params": ..., "opt_state": ...} (sharded arrays, written by every process for its
            own shards, asynchronously); every `nnx.State` in them is stored as its pure dict, so
            the layout on disk does not depend on flax's Variable classes
    data/   data.json: the data-iterator state (grain), or null. Every process's iterator is at
            the same step, so one file serves any process count (a 2-process run resumes a
            1-process checkpoint)
    meta/   meta.json: resolved training config, the source model's HF config.json with the
            trained vocab size, the tokenizer directory, reward stats, skipped-step count

Orbax writes a step into a temporary directory and renames it once every item is complete, so a
step cut short by a crash or preemption is never listed. A listed step that cannot be read (a
truncated or damaged file) is skipped with a warning: restoring "the latest" falls back to the
newest step that reads, and a training run that resumes that way moves the unreadable newer steps
to `OUTPUT/checkpoints.corrupt/` (so their step numbers can be saved again). A reader of a live
run (export, evaluate, score) may see a step removed by the run's rotation (max_to_keep) while it
reads it: without a step asked for, it reads the newest step listed then; an asked-for step is a
one-line error. `save` returns once the arrays are copied off the devices (the caller may then
donate or overwrite them); the files are written in the background until the next `save`, `wait`
or `close`. Every process must call `save`/`restore` (orbax coordinates them).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxrm.errors import UserError, first_line

log = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "checkpoints.corrupt"
TOKENIZER_SUBDIR = "tokenizer"
ITEMS = ("state", "data", "meta")
MAX_ROTATIONS = 10  # steps removed under a reader before it gives up
T = TypeVar("T")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(os.path.expanduser(str(output_dir))).absolute() / CHECKPOINTS_SUBDIR


def training_output_dir(path: str | Path) -> Path | None:
    """The training output directory `path` names (itself, or the parent of the `checkpoints/`
    directory it names); None when it is not one."""
    path = Path(os.path.expanduser(str(path))).absolute()
    if (path / CHECKPOINTS_SUBDIR).is_dir():
        return path
    if path.name == CHECKPOINTS_SUBDIR and path.is_dir():
        return path.parent
    return None


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    return {
        "state": ocp.PyTreeCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler("data.json"),
        "meta": ocp.JsonCheckpointHandler("meta.json"),
    }


def _manager(
    directory: Path, *, max_to_keep: int | None = None, async_save: bool = True, read_only: bool
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(
        directory, item_names=ITEMS, item_handlers=_item_handlers(), options=options
    )


def _is_state(x: Any) -> bool:
    return isinstance(x, nnx.State)


def to_storage(tree: Any) -> Any:
    """`tree` with every nnx.State replaced by its pure dict (plain nested dicts of arrays)."""
    return jax.tree.map(
        lambda x: nnx.to_pure_dict(x) if _is_state(x) else x, tree, is_leaf=_is_state
    )


def from_storage(template: Any, stored: Any) -> Any:
    """Undoes `to_storage`: the nnx.State nodes of `template` refilled from `stored`."""

    def one(t: Any, s: Any) -> Any:
        if not _is_state(t):
            return s
        out = jax.tree.map(lambda x: x, t)
        nnx.replace_by_pure_dict(out, s)
        return out

    return jax.tree.map(one, template, stored, is_leaf=_is_state)


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) of a tree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _restore_args(abstract: Any) -> Any:
    """Per-leaf restore arguments that place each array into its abstract leaf's sharding."""
    return ocp.checkpoint_utils.construct_restore_args(abstract)


class Checkpointer:
    """Saves and restores train state, data-iterator state and run metadata by step."""

    def __init__(
        self, output_dir: str | Path, *, max_to_keep: int | None = 3, async_save: bool = True
    ):
        self.directory = checkpoints_dir(output_dir)
        self._quiet = quiet_orbax()
        self._quiet.__enter__()  # for the manager's lifetime: its background saves log too
        self._manager = _manager(
            self.directory, max_to_keep=max_to_keep, async_save=async_save, read_only=False
        )

    def save(
        self,
        step: int,
        *,
        params: Any,
        opt_state: Any,
        data_state: dict[str, Any] | None,
        meta: dict[str, Any],
        force: bool = False,
    ) -> bool:
        """Starts saving `step`. False when skipped: that step already exists (orbax never
        overwrites one, even with `force`) or, without `force`, the manager's policy declines."""
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(to_storage({"params": params, "opt_state": opt_state})),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        return self._manager.save(step, args=args, force=force)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(
        self, step: int | None, *, abstract_params: Any, abstract_opt_state: Any
    ) -> tuple[int, Any, Any, dict[str, Any] | None, dict[str, Any]]:
        """(step, params, opt_state, data_state, meta) of `step` (None: the newest that reads),
        arrays placed in the shardings of the abstract trees (`jax.ShapeDtypeStruct`s with
        `.sharding`)."""
        return _restore_state(
            self._manager, self.directory, step, abstract_params, abstract_opt_state
        )

    def set_aside_newer_than(self, step: int) -> list[int]:
        """Moves the steps after `step` (unreadable ones that a resume skipped) to
        `checkpoints.corrupt/`, so those step numbers can be saved again; process 0 moves."""
        newer = [s for s in self._manager.all_steps() if s > step]
        if newer and jax.process_index() == 0:
            corrupt = self.directory.parent / CORRUPT_SUBDIR
            corrupt.mkdir(exist_ok=True)
            for s in newer:
                target = corrupt / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(str(self.directory / str(s)), str(target))
                log.warning("moved unreadable checkpoint step %d to %s", s, target)
        sync_processes("jaxrm.checkpoint.set_aside")
        self._manager.reload()
        return newer

    def update_meta(self, step: int, updates: dict[str, Any]) -> None:
        """Adds `updates` to the metadata of the saved `step` (process 0 rewrites its meta.json
        atomically): what is known only after that step's checkpoint, e.g. the final eval's."""
        if jax.process_index() == 0:
            path = self.directory / str(step) / "meta" / "meta.json"
            meta = {**json.loads(path.read_text()), **updates}
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                tmp.write_text(json.dumps(meta))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        sync_processes("jaxrm.checkpoint.update_meta")

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        finally:
            self._quiet.__exit__(None, None, None)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: still finish a pending save, but keep the first error
            self.close()
        except Exception:  # noqa: BLE001
            log.warning("a pending checkpoint save did not complete")


def _restore_state(
    manager: ocp.CheckpointManager,
    directory: Path,
    step: int | None,
    abstract_params: Any,
    abstract_opt_state: Any,
) -> tuple[int, Any, Any, dict[str, Any] | None, dict[str, Any]]:
    """(step, params, opt_state, data_state, meta), all of one step (see `Checkpointer.restore`)."""
    template = {"params": abstract_params, "opt_state": abstract_opt_state}
    abstract = to_storage(template)

    def read(at: int) -> dict[str, Any]:
        return manager.restore(
            at,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(abstract, restore_args=_restore_args(abstract)),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )

    step, restored = _read_step(manager, directory, step, read)
    state = from_storage(template, restored["state"])
    return step, state["params"], state["opt_state"], restored["data"], restored["meta"]


def _read_step(
    manager: ocp.CheckpointManager, directory: Path, step: int | None, read: Callable[[int], T]
) -> tuple[int, T]:
    """(step, read(step)); for `step=None` the newest step that reads (see `_read_newest`). An
    explicitly requested step that does not read, or that a live run's checkpoint rotation
    removes while it is read, is a one-line error."""
    if step is None:
        return _read_newest(manager, directory, read)
    steps = sorted(manager.all_steps())
    if step not in steps:
        raise UserError(
            f"{directory}: no checkpoint for step {step} (available: {', '.join(map(str, steps))})"
            if steps
            else f"{directory}: no complete checkpoint found"
        )
    try:
        return step, read(step)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint is reported, not raised
        if _removed(manager, directory, step):
            raise UserError(
                f"{directory}: step {step} was removed while it was being read (checkpoint "
                "rotation of a live run: max_checkpoints_to_keep); pass a newer --step, or none "
                "for the newest"
            ) from None
        raise UserError(f"{directory}: step {step} cannot be read ({first_line(e)})") from None


def _read_newest(
    manager: ocp.CheckpointManager, directory: Path, read: Callable[[int], T]
) -> tuple[int, T]:
    """(step, read(step)) of the newest step that reads. A step that a live run's checkpoint
    rotation removes while it is read gives way to the newest step listed then; a damaged one
    (still there) is skipped with a warning."""
    damaged: dict[int, str] = {}
    rotated = 0
    while True:
        steps = [s for s in manager.all_steps() if s not in damaged]
        if not steps:
            if not damaged:
                raise UserError(f"{directory}: no complete checkpoint found")
            newest, error = next(iter(damaged.items()))
            raise UserError(f"{directory}: no checkpoint can be read (step {newest}: {error})")
        candidate = max(steps)
        try:
            return candidate, read(candidate)
        except Exception as e:  # noqa: BLE001 - fall back to another complete step
            if _removed(manager, directory, candidate):
                rotated += 1
                if rotated == MAX_ROTATIONS:
                    raise UserError(
                        f"{directory}: {rotated} checkpoints were removed by a live run's "
                        "rotation while they were read; copy the newest step elsewhere and read "
                        "the copy"
                    ) from None
                log.info(
                    "%s: step %d was removed by checkpoint rotation while it was read; reading "
                    "the newest step",
                    directory,
                    candidate,
                )
                continue
            damaged[candidate] = first_line(e)
            log.warning(
                "%s: checkpoint step %d cannot be read (%s); trying the previous one",
                directory,
                candidate,
                first_line(e),
            )


def _removed(manager: ocp.CheckpointManager, directory: Path, step: int) -> bool:
    """Whether `step` is gone (a live run's rotation removed it); refreshes the step listing."""
    _retry_vanishing(manager.reload)
    return step not in manager.all_steps() or not (directory / str(step)).is_dir()


def _retry_vanishing(call: Callable[[], T]) -> T:
    """`call()`, tried again when a step directory vanished while orbax listed the steps."""
    for _ in range(MAX_ROTATIONS - 1):
        try:
            return call()
        except FileNotFoundError:
            continue
    return call()


def sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-host run (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Silences orbax's own log lines (absl, asyncio), which repeat every failure with a
    traceback (and warn that a read-only manager will not save): jaxrm reports each failure
    itself, as one line (a one-line error, or a warning when it falls back to an older step).

    A failed read leaves orbax's coroutines and tasks in reference cycles with the exception;
    when they are collected they print it again ("Exception ignored in: <coroutine ...>", "Task
    exception was never retrieved", hundreds of lines each), so they are collected here, while
    still silenced, not at some later point (or at exit) when they would print."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels, hook = [x.level for x in loggers], sys.unraisablehook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = _drop_orbax_leftovers(hook)
    try:
        yield
    finally:
        gc.collect()
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        sys.unraisablehook = hook


def _drop_orbax_leftovers(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable hook that drops what orbax's failed saves and reads leave behind: after a
    failed save, tensorstore's callbacks into orbax's closed event loop raise "Event loop is
    closed"; a failed read's unfinished coroutines raise its error again when collected. Both
    only repeat a failure jaxrm reports."""

    def unraisablehook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        if inspect.iscoroutine(unraisable.object):
            return
        hook(unraisable)

    return unraisablehook


@contextlib.contextmanager
def _open_read_only(output_dir: str | Path) -> Iterator[tuple[ocp.CheckpointManager, Path]]:
    directory = checkpoints_dir(output_dir)
    if not directory.is_dir():
        raise UserError(f"{directory} does not exist: not a jaxrm training output directory")
    with quiet_orbax():
        manager = _retry_vanishing(lambda: _manager(directory, read_only=True))
        try:
            yield manager, directory
        finally:
            manager.close()


def read_meta(output_dir: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, meta) of `step` (None: the newest that reads), without touching any array."""
    with _open_read_only(output_dir) as (manager, directory):

        def read(at: int) -> dict[str, Any]:
            composite = ocp.args.Composite(meta=ocp.args.JsonRestore())
            return manager.restore(at, args=composite)["meta"]

        return _read_step(manager, directory, step, read)


def restore_train_state(
    output_dir: str | Path, abstract_params: Any, abstract_opt_state: Any, step: int | None = None
) -> tuple[int, Any, Any, dict[str, Any] | None, dict[str, Any]]:
    """`Checkpointer.restore` without a writer: (step, params, opt_state, data_state, meta) of
    `step` (None: the newest that reads), all of that one step."""
    with _open_read_only(output_dir) as (manager, directory):
        return _restore_state(manager, directory, step, abstract_params, abstract_opt_state)


def restore_params(
    output_dir: str | Path, step: int | None, abstract_params: Any
) -> tuple[int, Any]:
    """(step, params) of `step` (None: the newest that reads), in the abstract tree's shardings;
    the optimizer state is not read."""
    step, params, _ = restore_params_and_meta(output_dir, step, abstract_params)
    return step, params


def restore_params_and_meta(
    output_dir: str | Path, step: int | None, abstract_params: Any
) -> tuple[int, Any, dict[str, Any]]:
    """(step, params, meta), both of one step (None: the newest that reads, which may be newer
    than an earlier `read_meta` found when a live run saved meanwhile)."""
    abstract = {"params": to_storage(abstract_params)}
    with _open_read_only(output_dir) as (manager, directory):

        def read(at: int) -> tuple[Any, dict[str, Any]]:
            restored = manager.restore(
                at,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        abstract, restore_args=_restore_args(abstract), partial_restore=True
                    ),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            return from_storage(abstract_params, restored["state"]["params"]), restored["meta"]

        step, (params, meta) = _read_step(manager, directory, step, read)
        return step, params, meta


def tokenizer_dir(output_dir: str | Path, meta: dict[str, Any]) -> Path:
    """The tokenizer saved by training: meta's `tokenizer_dir` (a relative one is tried against
    `output_dir`, then the working directory), else `OUTPUT/tokenizer` (e.g. a moved run)."""
    root = Path(os.path.expanduser(str(output_dir))).absolute()
    candidates = []
    if meta.get("tokenizer_dir"):
        path = Path(os.path.expanduser(str(meta["tokenizer_dir"])))
        candidates += [path] if path.is_absolute() else [root / path, path.absolute()]
    candidates.append(root / TOKENIZER_SUBDIR)
    return next((c for c in candidates if c.is_dir()), candidates[0])
