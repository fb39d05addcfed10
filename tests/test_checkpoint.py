"""Orbax checkpoints: sharded round trip, resharding on restore, half-written steps, meta."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxrm.checkpoint import (
    Checkpointer,
    abstract_like,
    read_meta,
    restore_params,
    restore_params_and_meta,
)
from jaxrm.errors import UserError
from jaxrm.optimizer import make_optimizer
from jaxrm.sharding import make_mesh

META = {"config": {"learning_rate": 3e-6, "seed": 8}, "hf_config": {"vocab_size": 96}}


def sharded_params(mesh, seed=0):
    """A small params tree laid out like the model's: fsdp x tensor, fsdp only, replicated."""
    rng = np.random.default_rng(seed)
    specs = {
        "dense": {"kernel": ((16, 8), PartitionSpec("fsdp", "tensor"))},
        "norm": ((16,), PartitionSpec("fsdp")),
        "head": ((4, 1), PartitionSpec()),
    }

    def make(leaf):
        shape, spec = leaf
        value = rng.standard_normal(shape).astype(np.float32)
        return jax.device_put(value, NamedSharding(mesh, spec))

    return jax.tree.map(make, specs, is_leaf=lambda x: isinstance(x, tuple))


def adam_state(params):
    tx = make_optimizer(1e-3)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params)  # non-trivial moments and count
    return state


def assert_trees_equal(got, expected):
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def save_steps(ckpt, mesh, steps):
    """Saves each step: params of seed `step`, their Adam state, data and meta naming the step;
    returns the last step's params."""
    for step in steps:
        params = sharded_params(mesh, seed=step)
        ckpt.save(
            step,
            params=params,
            opt_state=adam_state(params),
            data_state={"step": step},
            meta=dict(META, step=step),
        )
    return params


def test_round_trip_into_requested_shardings(tmp_path):
    mesh = make_mesh(1, 4, 2)
    params = sharded_params(mesh)
    opt_state = adam_state(params)
    expected = jax.tree.map(np.asarray, (params, opt_state))
    data_state = {"epoch": 1, "next_index": 12, "order": [3, 1, 2]}
    meta = dict(META, reward_stats={"mean": 0.25, "std": 1.5, "count": 40})
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.save(10, params=params, opt_state=opt_state, data_state=data_state, meta=meta)
        # the arrays are copied off the devices before save returns: donating them is safe
        for leaf in jax.tree.leaves((params, opt_state)):
            leaf.delete()
        assert ckpt.latest_step() == 10
    assert (tmp_path / "checkpoints" / "10" / "state").is_dir()

    # restore onto another layout: the arrays land in exactly the requested shardings
    other = make_mesh(2, 2, 2)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(other, PartitionSpec(*["fsdp"][: x.ndim]))
        ),
        expected,
    )
    with Checkpointer(tmp_path) as ckpt:
        _, got_params, got_opt, got_data, got_meta = ckpt.restore(
            None, abstract_params=abstract[0], abstract_opt_state=abstract[1]
        )
    assert_trees_equal((got_params, got_opt), expected)
    for got, want in zip(
        jax.tree.leaves((got_params, got_opt)), jax.tree.leaves(abstract), strict=True
    ):
        assert got.sharding == want.sharding
    assert got_data == data_state
    assert got_meta == meta


def test_nnx_state_params_stored_as_pure_dict(tmp_path):
    """An nnx.State (what `nnx.split` gives the trainer) round-trips and is readable as a dict."""
    mesh = make_mesh(1, 4, 2)
    model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    opt_state = adam_state(state)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, params=state, opt_state=opt_state, data_state=None, meta=META)
        _, params, opt, data, _ = ckpt.restore(
            1, abstract_params=abstract_like(state), abstract_opt_state=abstract_like(opt_state)
        )
    assert isinstance(params, nnx.State) and data is None
    assert_trees_equal((params, opt), (state, opt_state))
    _, pure = restore_params(tmp_path, 1, abstract_like(nnx.to_pure_dict(state)))
    assert_trees_equal(pure, nnx.to_pure_dict(state))


def test_steps_half_written_steps_and_params_only(tmp_path):
    mesh = make_mesh(1, 4, 2)
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        params = save_steps(ckpt, mesh, (1, 2, 3))
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]  # max_to_keep
        assert not ckpt.save(3, params=params, opt_state={}, data_state=None, meta={}, force=True)
    # a step cut short (orbax's temporary directory, never renamed) is not a checkpoint
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "3", root / "4.orbax-checkpoint-tmp-1700000000")
    (root / "5.orbax-checkpoint-tmp-1700000001" / "state").mkdir(parents=True)
    assert read_meta(tmp_path) == (3, dict(META, step=3))
    assert read_meta(tmp_path, 2)[1]["step"] == 2
    params = sharded_params(mesh, seed=3)
    _, got = restore_params(tmp_path, None, abstract_like(params))
    assert_trees_equal(got, params)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 3
        opt_state = adam_state(params)
        _, _, got_opt, data, meta = ckpt.restore(
            None, abstract_params=abstract_like(params), abstract_opt_state=abstract_like(opt_state)
        )
    assert data == {"step": 3} and meta["step"] == 3
    assert_trees_equal(got_opt, opt_state)


def test_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_meta(tmp_path / "nope")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="no complete checkpoint"):
        read_meta(tmp_path)
    mesh = make_mesh(1, 8, 1)
    params = sharded_params(mesh)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(4, params=params, opt_state=adam_state(params), data_state=None, meta=META)
    with pytest.raises(UserError, match="no checkpoint for step 7 .available: 4"):
        read_meta(tmp_path, 7)


def three_steps(tmp_path, mesh):
    """Steps 1, 2, 3 (those not saved yet); returns step 3's params."""
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        return save_steps(ckpt, mesh, (1, 2, 3))


def rotate_while_reading(monkeypatch, root, step, saved=None, item="meta"):
    """Makes the first read of `step`'s `item` (meta: any read; state: a read of the params)
    find the step removed, as a live run's rotation does right after it saves a newer step
    (`saved`: a copy of `step` appears under that number)."""
    real = ocp.CheckpointManager.restore

    def restore(self, at, *args, **kwargs):
        if at == step and item in kwargs["args"] and (root / str(step)).is_dir():
            if saved is not None:
                shutil.copytree(root / str(step), root / str(saved))
            shutil.rmtree(root / str(step))
        return real(self, at, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)


def test_step_rotated_away_while_read(tmp_path, monkeypatch, caplog):
    mesh = make_mesh(1, 4, 2)
    newest = three_steps(tmp_path, mesh)
    root = tmp_path / "checkpoints"
    # no step asked for: the newest step listed after the rotation is read, not an older one,
    # and nothing is reported as damaged
    rotate_while_reading(monkeypatch, root, 3, saved=5)
    step, params, meta = restore_params_and_meta(tmp_path, None, abstract_like(newest))
    assert (step, meta["step"]) == (5, 3)
    assert_trees_equal(params, newest)
    assert "cannot be read" not in caplog.text
    # the only newer step removed: the newest remaining one
    rotate_while_reading(monkeypatch, root, 5)
    assert read_meta(tmp_path) == (2, dict(META, step=2))
    # an explicitly asked step that rotation removes mid-read: one line saying so
    three_steps(tmp_path, mesh)
    rotate_while_reading(monkeypatch, root, 3)
    with pytest.raises(UserError, match=r"step 3 was removed while it was being read .*--step"):
        restore_params(tmp_path, 3, abstract_like(newest))
    assert "cannot be read" not in caplog.text


def test_step_removed_while_steps_are_listed(tmp_path, monkeypatch):
    """Orbax reads each step's commit time when it lists the steps; a step that rotation removes
    meanwhile raised a bare FileNotFoundError (a traceback) before the read even began."""
    from orbax.checkpoint._src.path import step as orbax_step

    mesh = make_mesh(1, 4, 2)
    three_steps(tmp_path, mesh)
    real = orbax_step.Metadata.commit_timestamp

    def vanishing(metadata):
        if metadata.step == 3 and metadata.path.exists():
            shutil.rmtree(metadata.path)
        return real.fget(metadata)

    monkeypatch.setattr(orbax_step.Metadata, "commit_timestamp", property(vanishing))
    step, params = restore_params(tmp_path, None, abstract_like(sharded_params(mesh, seed=2)))
    assert step == 2
    assert_trees_equal(params, sharded_params(mesh, seed=2))


def test_a_reader_outpaced_by_rotation_stops_with_one_line(tmp_path, monkeypatch):
    three_steps(tmp_path, make_mesh(1, 4, 2))
    root = tmp_path / "checkpoints"

    def restore(self, at, *args, **kwargs):  # every step is rotated away as it is read
        shutil.move(root / str(at), root / str(at + 100))
        raise FileNotFoundError(root / str(at))

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    with pytest.raises(UserError, match=r"10 checkpoints were removed by a live run's rotation"):
        read_meta(tmp_path)
