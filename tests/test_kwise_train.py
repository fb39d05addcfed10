"""K-wise training end to end: `preference_format=kwise` through `python -m jaxrm.train`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jaxrm.assets import TINY_TRAIN_FILE
from jaxrm.train import main as train_main
from tests.test_score import assert_one_line_error
from tests.test_train_cli import SHORT_RUN, run_train


def kwise_file(path, groups: int = 96, k: int = 4, seed: int = 0):
    """K-wise rows made from the shipped tiny pairs: each prompt's chosen response scored 2, its
    rejected 0, and K - 2 responses borrowed from other rows (scored 0 or 1: ties included)."""
    rows = [json.loads(x) for x in TINY_TRAIN_FILE.read_text().splitlines()[: groups + k]]
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(groups):
            chosen, rejected = rows[i]["chosen"], rows[i]["rejected"]
            others = [rows[(i + j) % len(rows)]["rejected"][-1]["content"] for j in range(1, k - 1)]
            responses = [chosen[-1]["content"], rejected[-1]["content"], *others]
            scores = [2.0, 0.0, *rng.integers(0, 2, k - 2).astype(float).tolist()]
            f.write(json.dumps({"messages": chosen[:-1], "responses": responses,
                                "scores": scores}) + "\n")  # fmt: skip
    return path


def _losses(output) -> list[float]:
    records = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["train/rm/loss"] for r in records if "train/rm/loss" in r]


def test_pairs_as_groups_of_two_train_exactly_like_pairs(tmp_path):
    """The same pair data through preference_format=kwise (groups of two): every step's loss
    bit for bit (each depends on all the updates before it)."""
    common = [*SHORT_RUN, "--config.max_train_steps=6"]
    pairs, kwise = tmp_path / "pairs", tmp_path / "kwise"
    train_main([*common, f"--config.output_dir={pairs}"])
    train_main([*common, "--config.preference_format=kwise", f"--config.output_dir={kwise}"])
    assert len(_losses(pairs)) == 6
    assert _losses(pairs) == _losses(kwise)


def test_kwise_run_resumes_exactly_and_evaluates_top1(tmp_path):
    """A K-wise run (4 responses per prompt, eval on K-wise data) killed after its step-4
    checkpoint and resumed logs the losses of a straight run, and its eval reports pairwise and
    top-1 accuracy."""
    data = kwise_file(tmp_path / "kwise.jsonl")
    common = [
        *SHORT_RUN,
        "--config.preference_format=kwise",
        f"--config.dataset_mixer_list=[{str(data)!r},'1.0']",
        f"--config.dataset_mixer_eval_list=[{str(data)!r},'0.25']",
        "--config.max_train_steps=8",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_main([*common, f"--config.output_dir={straight}"])
    train_main([*common, "--config.checkpointing_steps=4", f"--config.output_dir={resumed}"])
    shutil.rmtree(resumed / "checkpoints" / "8")
    metrics = resumed / "metrics.jsonl"
    kept = [x for x in metrics.read_text().splitlines() if json.loads(x)["step"] <= 4]
    metrics.write_text("".join(x + "\n" for x in kept))
    train_main([*common, f"--config.output_dir={resumed}"])
    assert len(_losses(resumed)) == 8
    np.testing.assert_allclose(_losses(resumed), _losses(straight), rtol=1e-5)
    records = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/rm/accuracy" in r]
    assert evals and 0.0 <= evals[-1]["eval/rm/top1_accuracy"] <= 1.0, evals
    assert "train/rm/top1_accuracy" in records[-2]


def test_padded_kwise_trains_the_implied_pairs(tmp_path):
    """batch_layout=padded with K-wise data is the pair path on the pairs the scores imply, the
    score margin included: the same losses as those pairs written out as a pair file."""
    data = kwise_file(tmp_path / "kwise.jsonl", groups=24)
    pairs_file = tmp_path / "pairs.jsonl"
    with pairs_file.open("w") as f:
        for line in data.read_text().splitlines():
            row = json.loads(line)
            s = row["scores"]
            for a in range(len(s)):
                for b in range(a + 1, len(s)):
                    if s[a] == s[b]:
                        continue
                    hi, lo = (a, b) if s[a] > s[b] else (b, a)
                    turn = [{"role": "assistant", "content": row["responses"][i]} for i in (hi, lo)]
                    f.write(json.dumps({"chosen": row["messages"] + turn[:1],
                                        "rejected": row["messages"] + turn[1:],
                                        "margin": 0.5 * (s[hi] - s[lo])}) + "\n")  # fmt: skip
    common = [*SHORT_RUN, "--config.batch_layout=padded", "--config.max_train_steps=3"]
    kwise, pairs = tmp_path / "kwise", tmp_path / "pairs"
    train_main([
        *common, "--config.preference_format=kwise", "--config.kwise_margin_scale=0.5",
        f"--config.dataset_mixer_list=[{str(data)!r},'1.0']", f"--config.output_dir={kwise}",
    ])  # fmt: skip
    train_main([
        *common, "--config.use_margin=true",
        f"--config.dataset_mixer_list=[{str(pairs_file)!r},'1.0']", f"--config.output_dir={pairs}",
    ])  # fmt: skip
    assert len(_losses(kwise)) == 3
    assert _losses(kwise) == _losses(pairs)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.use_margin=true", "set kwise_margin_scale instead"),
        ("--config.kwise_objective=listwise", "'kwise_objective' must be one of"),
    ],
)
def test_kwise_config_errors_are_one_line(override, message):
    result = run_train("--config.preference_format=kwise", override)
    assert_one_line_error(result, message)
