"""The mesh (jax.make_mesh, multi-slice) and no silent replication: on the 8 fake CPU devices, a
mesh whose sizes do not divide the model's dimensions is refused in one line naming sizes that
work, before anything is written; a few small replicated parameters are accepted and logged."""

from __future__ import annotations

import logging
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from jaxrm import devices
from jaxrm.assets import TINY_MODEL_DIR
from jaxrm.errors import UserError
from jaxrm.hf import abstract_reward_model, load_reward_model
from jaxrm.models.llama_hf import llama_config_from_hf
from jaxrm.sharding import (
    MAX_REPLICATED_SHARE,
    check_replication,
    make_mesh,
    multislice_grid,
)
from tests.hf_reference import save_tiny_classifier, tiny_llama_config
from tests.test_score import assert_one_line_error

# hidden 36 does not divide by fsdp 8 (only by 2 and 4 of the sizes that divide 8 devices)
ODD_HIDDEN = dict(hidden_size=36, intermediate_size=48, head_dim=8)
# kv_heads 2 under tensor 4: the k/v projections (2,048 of 81,088 parameters, 2.5%) replicate
SMALL_KV = dict(vocab_size=2048, hidden_size=32, intermediate_size=48)
ODD_HIDDEN_REFUSAL = (
    "mesh data=1 x fsdp=8 x tensor=1 leaves 99.1% of the model's parameters (20,772 of 20,952)",
    "replicated across fsdp (fsdp=8 does not divide embed (36))",
    "more than 5% is refused",
    "fsdp sizes that divide embed (36) and the 8 devices: 2, 4 (the rest on data, e.g. "
    "--config.mesh.fsdp=4 --config.mesh.data=2)",
)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def sharding_warnings():
    logger = logging.getLogger("jaxrm.sharding")
    handler = Records()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def abstract_state(variant: str = "gqa", **overrides):
    hf = tiny_llama_config(variant, **overrides).to_dict()
    return abstract_reward_model(llama_config_from_hf(hf))[1]


def test_make_mesh_is_jax_make_mesh_with_auto_axes():
    mesh = make_mesh(2, -1, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    expected = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), devices=jax.devices())
    assert [d.id for d in mesh.devices.flat] == [d.id for d in expected.devices.flat]
    with pytest.raises(UserError, match=r"needs 16 devices, but there are 8"):
        make_mesh(16, 1, 1)


def fake_devices(slice_of: list[int]) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(id=i, slice_index=s, process_index=s, platform="gpu", device_kind="fake")
        for i, s in enumerate(slice_of)
    ]


@pytest.mark.parametrize(
    "shape, slice_of_grid",
    [
        # data spans the slices when it can: one whole fsdp x tensor group per slice
        ((2, 2, 2), [[[0, 0], [0, 0]], [[1, 1], [1, 1]]]),
        # one data replica (the tulu8b default on 2 hosts x 4 GPUs): fsdp spans the hosts
        ((1, 8, 1), [[[0], [0], [0], [0], [1], [1], [1], [1]]]),
        ((1, 2, 4), [[[0, 0, 0, 0], [1, 1, 1, 1]]]),
    ],
)
def test_multislice_meshes_split_the_first_axis_that_divides(shape, slice_of_grid):
    grid = multislice_grid(shape, fake_devices([0] * 4 + [1] * 4), slices=2)
    assert grid.shape == shape
    assert np.vectorize(lambda d: d.slice_index)(grid).tolist() == slice_of_grid
    assert sorted(d.id for d in grid.flat) == list(range(8))


def test_multislice_meshes_without_a_divisible_axis_keep_slice_order():
    devices = fake_devices([3, 0, 2, 1, 1, 2, 0, 3])[::-1]  # four slices of two
    grid = multislice_grid((2, 2, 2), devices, slices=4)  # no axis of 4
    assert [(d.slice_index, d.id) for d in grid.flat] == sorted(
        (d.slice_index, d.id) for d in devices
    )
    uneven = fake_devices([0, 0, 0, 1, 1, 1, 1, 1])
    grid = multislice_grid((1, 8, 1), uneven, slices=2)
    assert [d.id for d in grid.flat] == list(range(8))


def test_replication_over_the_limit_is_refused_in_one_line(sharding_warnings):
    with pytest.raises(UserError) as refused:
        check_replication(abstract_state(**ODD_HIDDEN), make_mesh(1, 8, 1))
    message = str(refused.value)
    assert "\n" not in message
    for fragment in ODD_HIDDEN_REFUSAL:
        assert fragment in message, message
    # every parameter the rules shard is logged with its size; the norms have no rule
    logged = {m.split()[1]: m for m in sharding_warnings}
    assert "model.layers.input_layernorm.weight" not in logged
    assert logged["model.layers.mlp.up_kernel"] == (
        "parameter model.layers.mlp.up_kernel [2, 36, 48] (3,456 parameters, 13.5 KiB) is "
        "left replicated: fsdp=8 does not divide embed (36)"
    )
    assert len(logged) == 9  # embedding, 7 stacked layer kernels, score head


def test_no_working_size_says_so():
    with pytest.raises(UserError) as refused:
        check_replication(abstract_state("llama3_rope"), make_mesh(1, 1, 8))  # one kv head
    assert str(refused.value).endswith(
        "no tensor size above 1 divides vocab (96), mlp (48), kv_heads (1), heads (4) and the 8 "
        "devices (set --config.mesh.tensor=1)"
    )


def test_small_replication_is_accepted_and_logged(tmp_path, sharding_warnings):
    save_tiny_classifier(tmp_path, "gqa", **SMALL_KV)
    mesh = make_mesh(1, 2, 4)
    model, _, _ = load_reward_model(str(tmp_path), mesh, replication_limit=MAX_REPLICATED_SHARE)
    assert sharding_warnings == [
        f"parameter model.layers.self_attn.{name}_kernel [2, 32, 2, 8] (1,024 parameters, "
        "4.0 KiB) is left replicated: tensor=4 does not divide kv_heads (2)"
        for name in ("k", "v")
    ]
    k_kernel = model.model.layers.self_attn.k_kernel.value
    assert k_kernel.sharding.spec == PartitionSpec(None, "fsdp", None, None)  # where it divides
    q_kernel = model.model.layers.self_attn.q_kernel.value
    assert q_kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    replicated = check_replication(abstract_state(**SMALL_KV), mesh, report=False)
    total = sum(x.size for x in jax.tree.leaves(abstract_state(**SMALL_KV)))
    assert sum(p.count for p in replicated) / total == pytest.approx(2048 / 81088)


def test_the_same_mesh_without_a_limit_loads_for_scoring(tmp_path, sharding_warnings):
    """Scoring (no optimizer state) may replicate; it is logged, not refused."""
    save_tiny_classifier(tmp_path, "gqa", **ODD_HIDDEN)
    model, _, _ = load_reward_model(str(tmp_path), make_mesh(1, 8, 1))
    assert model.model.embed_tokens.value.sharding.spec == PartitionSpec(None, None)
    assert len(sharding_warnings) == 9


def test_train_refuses_before_writing_anything(tmp_path):
    """As users run it: nothing is created, and an old run that overwrite would clear is intact."""
    model = tmp_path / "odd"
    save_tiny_classifier(model, "gqa", **ODD_HIDDEN)
    run = tmp_path / "run"
    (run / "hf").mkdir(parents=True)
    (run / "hf" / "config.json").write_text("{}")
    result = subprocess.run(
        [
            sys.executable, "-m", "jaxrm.train", "--config", "configs/tiny.py",
            f"--config.model_name_or_path={model}", f"--config.tokenizer_name={TINY_MODEL_DIR}",
            f"--config.output_dir={run}", "--config.resume=false",
            "--config.overwrite_output_dir=true", "--config.progress_bar=false",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert_one_line_error(result, *ODD_HIDDEN_REFUSAL)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        "hf",
        "hf/config.json",
    ]


def test_devices_reports_the_same_refusal(tmp_path, capsys):
    save_tiny_classifier(tmp_path, "gqa", **ODD_HIDDEN)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        devices.main(["--config", "configs/tiny.py", f"--config.model_name_or_path={tmp_path}"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "config: mesh: data 1 x fsdp 8 x tensor 1" in captured.out
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: mesh data=1 x fsdp=8"), captured.err
    for fragment in ODD_HIDDEN_REFUSAL:
        assert fragment in errors[0]


def test_devices_lists_small_replication(tmp_path, capsys):
    save_tiny_classifier(tmp_path, "gqa", **SMALL_KV)
    lines = devices.main(
        ["--config", "configs/tiny.py", f"--config.model_name_or_path={tmp_path}"]
        + ["--config.mesh.fsdp=2", "--config.mesh.tensor=4"]
    )
    capsys.readouterr()
    assert (
        "config: sharding: 2,048 parameters left replicated (model.layers.self_attn.k_kernel "
        "[2, 32, 2, 8], model.layers.self_attn.v_kernel [2, 32, 2, 8]), within the 5% allowed "
        f"(architecture: {tmp_path}/config.json)"
    ) in lines
    tiny = devices.main(["--config", "configs/tiny.py"])
    capsys.readouterr()
    assert (
        "config: sharding: no parameter left replicated by a mesh size that does not divide it "
        f"(architecture: {TINY_MODEL_DIR}/config.json)"
    ) in tiny
