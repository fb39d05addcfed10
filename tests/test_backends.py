"""What `auto` resolves to per backend, explicit values winning, and one-line errors."""

from __future__ import annotations

import itertools

import pytest

from jaxrm.backends import (
    BACKEND_DEFAULTS,
    resolve_execution,
    with_execution,
)
from jaxrm.config import load_config_file
from jaxrm.dtypes import COMPUTE_DTYPES
from jaxrm.errors import UserError
from jaxrm.hf import model_architecture
from jaxrm.models.attention import ATTENTION_IMPLEMENTATIONS
from jaxrm.models.attention.table import MASK_KINDS, candidates_for
from jaxrm.plan import resolve
from tests.test_score import assert_one_line_error
from tests.test_train_cli import run_train

TINY_HEAD_DIM = 16
LLAMA_8B_HEAD_DIM = 128


@pytest.mark.parametrize(
    "backend, head_dim, expected",
    [
        ("cpu", TINY_HEAD_DIM, ("float32", "flash")),
        ("gpu", TINY_HEAD_DIM, ("bfloat16", "cudnn")),
        ("gpu", LLAMA_8B_HEAD_DIM, ("bfloat16", "cudnn")),
        ("gpu", None, ("bfloat16", "cudnn")),
        ("tpu", LLAMA_8B_HEAD_DIM, ("bfloat16", "splash")),
        ("METAL", LLAMA_8B_HEAD_DIM, ("float32", "flash")),  # a backend the table does not name
    ],
)
def test_auto_per_backend(backend, head_dim, expected):
    run = resolve_execution("auto", "auto", backend, head_dim)
    assert (run.dtype, run.attention) == expected
    assert run.reason == f"dtype auto on {backend}, attention auto on {backend}"


@pytest.mark.parametrize(
    "dtype, head_dim, reason",
    [
        ("float32", 128, "cudnn attention needs dtype bfloat16 or float16, not float32"),
        ("auto", 12, "needs head_dim a multiple of 8 and at most 128; the model's is 12"),
        ("auto", 256, "the model's is 256"),
    ],
)
def test_auto_on_gpu_falls_back_when_cudnn_cannot_run(dtype, head_dim, reason):
    run = resolve_execution(dtype, "auto", "gpu", head_dim)
    assert run.attention == "pallas"  # the next fastest measured on an H100
    assert run.dtype == ("float32" if dtype == "float32" else "bfloat16")
    assert reason in run.reason


@pytest.mark.parametrize(
    "dtype, attention, backend, expected",
    [
        ("bfloat16", "auto", "cpu", ("bfloat16", "flash")),
        ("float32", "flash", "gpu", ("float32", "flash")),
        ("auto", "xla", "cpu", ("float32", "xla")),
        ("float16", "auto", "gpu", ("float16", "cudnn")),
        ("auto", "xla", "gpu", ("bfloat16", "xla")),
    ],
)
def test_explicit_values_win(dtype, attention, backend, expected):
    run = resolve_execution(dtype, attention, backend, 64)
    assert (run.dtype, run.attention) == expected


@pytest.mark.parametrize(
    "dtype, attention, backend, head_dim, message",
    [
        ("auto", "cudnn", "cpu", 64, "'attention': cudnn attention needs a gpu backend, not cpu"),
        ("float32", "cudnn", "gpu", 64, "needs dtype bfloat16 or float16, not float32"),
        ("auto", "cudnn", "gpu", 20, "head_dim a multiple of 8 and at most 128; the model's is 20"),
        ("fp32", "auto", "cpu", 64, "'dtype' must be one of auto, float32, bfloat16, float16"),
        ("auto", "blocked", "cpu", 64, "'attention' must be one of auto, flash, xla, cudnn"),
    ],
)
def test_impossible_choices_are_one_line_errors(dtype, attention, backend, head_dim, message):
    with pytest.raises(UserError) as error:
        resolve_execution(dtype, attention, backend, head_dim)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_table_names_only_known_dtypes_and_kernels_and_auto_always_finds_one():
    for dtype, candidates in BACKEND_DEFAULTS.values():
        assert dtype in COMPUTE_DTYPES
        for kind in MASK_KINDS:
            assert set(candidates_for(candidates, kind)) <= set(ATTENTION_IMPLEMENTATIONS)
    for backend, dtype, head_dim in itertools.product(
        BACKEND_DEFAULTS, ("auto", *COMPUTE_DTYPES), (8, 12, 64, 128, 256, None)
    ):
        assert resolve_execution(dtype, "auto", backend, head_dim).attention in (
            ATTENTION_IMPLEMENTATIONS
        )


def test_tiny_config_resolves_on_every_backend():
    """The offline default leaves both at auto: float32 + flash on CPU."""
    tiny = load_config_file("configs/tiny.py")
    assert (tiny.dtype, tiny.attention, tiny.param_dtype) == ("auto", "auto", "float32")
    resolved = {
        backend: resolve_execution(tiny.dtype, tiny.attention, backend, TINY_HEAD_DIM)
        for backend in ("cpu", "gpu", "tpu")
    }
    assert {b: (r.dtype, r.attention) for b, r in resolved.items()} == {
        "cpu": ("float32", "flash"),
        "gpu": ("bfloat16", "cudnn"),
        "tpu": ("bfloat16", "flash"),
    }


def test_the_plan_resolves_from_the_model_and_leaves_the_config_alone():
    tiny = load_config_file("configs/tiny.py")
    tiny.lock()
    hf_config, _ = model_architecture(tiny.model_name_or_path)
    run = resolve(tiny, hf_config, "cpu")
    resolved = with_execution(tiny, run)
    assert (resolved.dtype, resolved.attention) == ("float32", "flash")
    assert (tiny.dtype, tiny.attention) == ("auto", "auto")
    assert resolved.to_dict() == {**tiny.to_dict(), "dtype": "float32", "attention": "flash"}
    # cuDNN cannot soft-cap: a Gemma 2 gets pallas even for right-padded rows
    gemma = dict(hf_config, model_type="gemma2", attn_logit_softcapping=50.0)
    assert resolve(tiny, gemma, "gpu").kernels.for_kind("causal") == "pallas"


def test_train_rejects_cudnn_on_cpu_in_one_line(tmp_path):
    result = run_train(f"--config.output_dir={tmp_path / 'run'}", "--config.attention=cudnn")
    assert_one_line_error(result, "config key 'attention'", "needs a gpu backend, not cpu")


@pytest.mark.parametrize(
    "family, softcap, window",
    [("gemma2", True, True), ("mistral", False, True), ("olmo2", False, False)],
)
def test_the_attention_choice_reads_the_familys_soft_cap_and_window(family, softcap, window):
    """Gemma 2's soft-capped logits and windows, Mistral's window, as their config.json says:
    cuDNN takes no soft-cap, so `auto` skips it for Gemma 2 on a GPU and `cudnn` set is one line."""
    from jaxrm.models.attention.table import Features
    from jaxrm.models.families import model_config_from_hf
    from jaxrm.plan import resolve_for
    from tests.hf_reference import tiny_config

    hf = tiny_config(family, head_dim=64).to_dict()
    assert Features.of(model_config_from_hf(hf)) == (softcap, window)
    run = resolve_for(hf, "bfloat16", "auto", "gpu", "padded")
    assert (run.attention == "cudnn") is not softcap
    if softcap:
        with pytest.raises(UserError, match="cudnn"):
            resolve_for(hf, "bfloat16", "cudnn", "gpu", "padded")
