"""scripts/gpu_check.sh --cpu-dry-run: the GPU validation's steps, tiny, on this CPU (install into a
side folder, devices, attention against the reference, the attention and train-step benchmarks,
the tiny config end to end), and its summary files."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.test_score import assert_one_line_error

STEPS = ["install", "devices", "attention", "bench_attention", "bench", "train"]
FILES = {"gpu_check.md", "gpu_check.json", "gpu_check.log", "devices.txt",
         "attention_check.json", "bench_attention.json", "bench.json"}  # fmt: skip


@pytest.mark.slow
def test_cpu_dry_run_passes_and_writes_its_figures(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        ["scripts/gpu_check.sh", str(out), "--cpu-dry-run"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert result.returncode == 0, result.stderr + log[-4000:]
    assert {p.name for p in out.iterdir()} == FILES  # at most 8 files: the GPU tool returns them
    summary = json.loads((out / "gpu_check.json").read_text())
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in summary["steps"])
    check = summary["attention_check"]
    assert check["failed"] == 0 and check["backend"] == "cpu"
    tested = {(c["kind"], c["implementation"]) for c in check["checks"]}
    assert {("causal", "xla"), ("segments", "flash"), ("tree", "flash"), ("tree", "xla")} <= tested
    runs = summary["bench_attention"]["runs"]
    assert {r["kind"] for r in runs} == {"tree", "segments", "causal"}
    assert all(r["tflops_per_s"] > 0 and r["live_pairs"] > 0 for r in runs)
    assert summary["bench"]["jaxrm_vs_reference"] > 0
    assert summary["train_eval"]["step"] > 0
    markdown = (out / "gpu_check.md").read_text()
    assert "| attention | ok |" in markdown and "| tree | flash |" in markdown


def test_usage_errors_are_one_line(tmp_path):
    assert_one_line_error(subprocess.run(["scripts/gpu_check.sh"], capture_output=True,
                                         text=True, check=False), "usage")  # fmt: skip
    unknown = subprocess.run(
        ["scripts/gpu_check.sh", str(tmp_path), "--gpu"], capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert_one_line_error(unknown, "unknown option '--gpu'")
    missing = subprocess.run(
        ["scripts/gpu_check.sh", str(tmp_path)], capture_output=True, text=True, check=False,
        env={"PATH": "/usr/bin:/bin", "JAXRM_GPU_WHEELS": str(tmp_path / "none")},
    )  # fmt: skip
    assert_one_line_error(missing, "no wheels folder", "scripts/gpu_wheels.sh")


def test_flex_attention_tree_mask_is_jaxrms_rule():
    """bench.py's reference_flex side (a GPU's: FlexAttention has no backward on CPU) masks as
    `allowed_pairs` does for real queries; a padding query reads only itself."""
    import sys

    import numpy as np
    import torch
    from torch.nn.attention.flex_attention import create_mask

    sys.path.insert(0, "scripts")
    from attention_inputs import chat_rows, make_mask
    from bench import tree_mask_mod

    from jaxrm.models.attention import allowed_pairs

    ids = chat_rows("tree", 2, 512, seed=3)
    seg, branch = (torch.as_tensor(ids[k]) for k in ("segment_ids", "branch_ids"))
    dense = create_mask(tree_mask_mod(seg, branch), 2, None, 512, 512, device="cpu")[:, 0].numpy()
    expected = np.asarray(allowed_pairs(make_mask("tree", ids), (2, 512)))
    real = ids["segment_ids"] > 0
    assert 0.5 < real.mean() < 1  # rows with real tokens and padding
    assert (dense[real] == expected[real]).all()
    assert (dense[~real] == np.eye(512, dtype=bool)[None].repeat(2, 0)[~real]).all()


def test_attention_check_fails_a_kernel_that_breaks_the_rule(monkeypatch):
    """attention_check.py's comparison catches a kernel that reads another rest (a tree mask run
    as segments), and passes flash on the same inputs."""
    import sys

    import jax.numpy as jnp

    sys.path.insert(0, "scripts")
    from attention_check import check_one
    from attention_inputs import chat_rows, random_inputs

    from jaxrm.models.attention import (
        IMPLEMENTATIONS,
        KERNELS,
        Implementation,
        Mask,
        reference_attention,
    )

    def broken(q, k, v, mask, logits, *_):
        return reference_attention(q, k, v, Mask(mask.segment_ids, None, mask.positions), logits)

    monkeypatch.setitem(IMPLEMENTATIONS, "broken", Implementation("broken", {"tree": broken}))
    monkeypatch.setitem(KERNELS["tree"], "broken", broken)
    ids = chat_rows("tree", 2, 128, seed=0)
    args = type("Args", (), {"rows": 2, "length": 128, "heads": 2, "kv_heads": 1, "head_dim": 16,
                             "seed": 0})()  # fmt: skip
    inputs = random_inputs(args, jnp.float32)
    rows = {
        name: check_one("tree", name, "float32", "plain", inputs, ids, 16, {})
        for name in ("broken", "flash")
    }
    assert rows["broken"]["status"] == "FAILED" and rows["broken"]["max_error"] > 0.1
    assert rows["flash"]["status"] == "ok" and rows["flash"]["max_error"] < 1e-5
