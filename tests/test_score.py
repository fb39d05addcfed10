"""`python -m jaxrm.score` against transformers, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxrm.assets import TINY_EVAL_FILE, TINY_MODEL_DIR
from jaxrm.score import main as score_main
from tests.hf_reference import save_tiny_classifier


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A random transformers LlamaForSequenceClassification with the tiny Tulu tokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("classifier")
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    vocab = -(-len(tokenizer) // 8) * 8
    model = save_tiny_classifier(path, "gqa", vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_matches_transformers(tmp_path, classifier_dir):
    import torch

    path, model, tokenizer = classifier_dir
    rows = [json.loads(line) for line in TINY_EVAL_FILE.read_text().splitlines()[:21]]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    summary = score_main(
        [
            "--model",
            str(path),
            "--data",
            str(data),
            "--output",
            str(out),
            "--batch_size",
            "4",
            "--no_progress",
        ]
    )
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == len(rows)
    for row, got in zip(rows, scored, strict=True):
        assert got["chosen"] == row["chosen"]  # input order and fields kept
        for key in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(row[key], tokenize=True, return_dict=False)
            with torch.no_grad():
                expected = model(torch.tensor([ids])).logits[0, 0].item()
            assert abs(got[f"{key}_reward"] - expected) <= 1e-4
    margins = np.array([r["chosen_reward"] - r["rejected_reward"] for r in scored])
    assert summary["accuracy"] == pytest.approx(np.mean(margins > 0))
    assert summary["mean_margin"] == pytest.approx(margins.mean(), abs=1e-6)


def test_score_messages_rows(tmp_path, classifier_dir):
    path, _, _ = classifier_dir
    rows = [json.loads(line) for line in TINY_EVAL_FILE.read_text().splitlines()[:3]]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    convs = write_jsonl(tmp_path / "convs.jsonl", [{"messages": r["chosen"]} for r in rows])
    score_main(
        [
            "--model",
            str(path),
            "--data",
            str(pairs),
            "--output",
            str(tmp_path / "a.jsonl"),
            "--no_progress",
        ]
    )
    score_main(
        [
            "--model",
            str(path),
            "--data",
            str(convs),
            "--output",
            str(tmp_path / "b.parquet"),
            "--no_progress",
        ]
    )
    import pyarrow.parquet as pq

    a = [json.loads(x)["chosen_reward"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = pq.read_table(tmp_path / "b.parquet").column("reward").to_pylist()
    np.testing.assert_allclose(a, b, atol=1e-5)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jaxrm.score", *args, "--no_progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def broken_checkpoint(tmp_path, edit):
    """The tiny classifier with one tensor removed or reshaped."""
    from safetensors.numpy import load_file, save_file
    from transformers import AutoTokenizer

    path = tmp_path / "broken"
    save_tiny_classifier(path, "gqa")
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    "case",
    ["missing_dir", "model_type", "missing_tensor", "wrong_shape", "no_columns", "not_assistant"],
)
def test_user_errors(tmp_path, case):
    rows = [json.loads(line) for line in TINY_EVAL_FILE.read_text().splitlines()[:2]]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    model = str(TINY_MODEL_DIR)
    out = str(tmp_path / "o.jsonl")
    if case == "missing_dir":
        result = run_cli("--model", str(tmp_path / "nope"), "--data", str(data), "--output", out)
        expected = ("nope", "does not exist")
    elif case == "model_type":
        bad = tmp_path / "gpt"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        result = run_cli("--model", str(bad), "--data", str(data), "--output", out)
        expected = ("config.json", "unsupported model_type 'gpt2'")
    elif case == "missing_tensor":
        name = "model.layers.1.mlp.up_proj.weight"
        bad = broken_checkpoint(tmp_path, lambda t: t.pop(name))
        result = run_cli("--model", str(bad), "--data", str(data), "--output", out)
        expected = (name, "missing")
    elif case == "wrong_shape":
        name = "model.layers.0.self_attn.k_proj.weight"
        bad = broken_checkpoint(tmp_path, lambda t: t.__setitem__(name, t[name][:8]))
        result = run_cli("--model", str(bad), "--data", str(data), "--output", out)
        expected = (name, "shape [8, 32]", "expected [16, 32]")
    elif case == "no_columns":
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello"}])
        result = run_cli("--model", model, "--data", str(bad), "--output", out)
        expected = ("bad.jsonl", "'chosen'", "'messages'")
    else:
        conv = rows[0]["chosen"][:-1]
        bad = write_jsonl(
            tmp_path / "bad.jsonl", [{"messages": rows[1]["chosen"]}, {"messages": conv}]
        )
        result = run_cli("--model", model, "--data", str(bad), "--output", out)
        expected = ("bad.jsonl row 1", "not 'assistant'")
    assert_one_line_error(result, *expected)
    assert not (tmp_path / "o.jsonl").exists()
