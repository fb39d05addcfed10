"""scripts/bench.py's K-wise mode, tiny and in process: the groups and the pairs cut from them, the
steps both sides run, the tokens each computes and the loss they share."""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

sys.path.insert(0, "scripts")
import bench  # noqa: E402

from jaxrm.data.group_packing import layout_tokens, split_group  # noqa: E402
from jaxrm.data.packing import common_prefix_length  # noqa: E402

TINY = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=128, max_length=256,
            responses=4, prompts=6, prompts_per_step=3, timed_epochs=1, seed=0, pack_rows=0,
            dtype="auto", attention="auto", remat="none", preset="cpu-kwise")  # fmt: skip


def test_kwise_inputs_are_rated_groups_and_their_pairs_step_by_step(tmp_path):
    args = argparse.Namespace(**TINY)
    pairs, step_ids, groups = bench.write_run_inputs(tmp_path, args)
    assert groups.sizes().tolist() == [4] * 6
    assert (groups.distinct_scores() >= 2).all()
    assert set(groups.scores.tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert groups.pair_counts().max() <= 6
    for g in range(len(groups)):  # one prompt shared by the K responses, each within max_length
        sequences = groups.sequences(g)
        assert common_prefix_length(sequences) >= 5
        assert max(len(s) for s in sequences) <= args.max_length
    cut, owner = groups.to_pairs()
    assert len(pairs) == len(cut) == int(groups.pair_counts().sum())
    assert [sorted(set(owner[ids].tolist())) for ids in step_ids] == [[0, 1, 2], [3, 4, 5]]
    assert sorted(i for ids in step_ids for i in ids) == list(range(len(pairs)))
    back = bench.load_groups(tmp_path / "groups.json")
    np.testing.assert_array_equal(back.responses.values, groups.responses.values)
    np.testing.assert_array_equal(back.scores, groups.scores)
    np.testing.assert_array_equal(back.offsets, groups.offsets)


def test_kwise_side_computes_each_prompt_once_for_the_same_loss(tmp_path):
    """Both sides train the same model on the same pairs per step: their per-step losses agree
    (float32), and each computes exactly the non-pad tokens of its layout."""
    args = argparse.Namespace(**TINY)
    pairs, step_ids, groups = bench.write_run_inputs(tmp_path, args)
    bench.save_model(tmp_path / "model", args)
    make_kwise = functools.partial(bench.kwise_steps, args, groups)
    make_pairs = functools.partial(bench.packed_steps, args, bench.pairs_data(pairs), step_ids)
    results = {
        "jaxrm_kwise": bench.run_jaxrm(args, tmp_path, "kwise", make_kwise),
        "jaxrm": bench.run_jaxrm(args, tmp_path, "packed", make_pairs),
    }
    for r in results.values():
        r["peak_rss_bytes"] = 1
    summary = bench.summarize_kwise(args, groups, pairs, step_ids, results)

    length = summary["row_length"]
    assert length == 512  # two max_length sequences
    kwise_tokens, split = 0, 0
    for g in range(len(groups)):
        sequences = groups.sequences(g)
        prompt = common_prefix_length(sequences)
        assert layout_tokens(sequences, True) == prompt + sum(len(s) - prompt for s in sequences)
        parts = split_group(sequences, groups.implied_pairs(g), length, True)
        split += len(parts) > 1  # sub-groups that each repeat the prompt
        kwise_tokens += sum(layout_tokens([sequences[i] for i in m], True) for m, _ in parts)
    cut, _ = groups.to_pairs()
    pair_tokens = 0
    for i in range(len(cut)):
        c, r = cut.chosen[i], cut.rejected[i]
        pair_tokens += len(c) + len(r) - common_prefix_length([c, r])
    assert summary["split_groups"] == split == 3
    assert summary["jaxrm_kwise_tokens_computed"] == kwise_tokens
    assert summary["jaxrm_tokens_computed"] == pair_tokens
    assert summary["kwise_vs_jaxrm_tokens_computed"] == pytest.approx(
        kwise_tokens / pair_tokens, rel=1e-12
    )
    assert kwise_tokens < 0.7 * pair_tokens  # ~4.8 pairs per prompt of 4: each prompt once
    assert (summary["prompts"], summary["pairs"], summary["steps"]) == (6, len(pairs), 2)
    for side in results:
        seconds = summary[f"{side}_seconds"]
        assert summary[f"{side}_pairs_per_s"] * seconds == pytest.approx(len(pairs), rel=1e-9)
        assert summary[f"{side}_prompts_per_s"] * seconds == pytest.approx(6, rel=1e-9)
        assert len(results[side]["losses"]) == 2
    assert summary["loss_max_rel_diff"] < 1e-5
    assert results["jaxrm"]["losses"][0] == pytest.approx(results["jaxrm_kwise"]["losses"][0])
    # XLA's plan of each step holds at least the float32 parameters, their gradients and Adam's
    # two moments
    with safe_open(tmp_path / "model" / "model.safetensors", "np") as weights:
        parameters = sum(weights.get_tensor(k).size for k in weights.keys())
    for side in results:
        assert summary[f"{side}_planned_peak_bytes"] >= 4 * 4 * parameters


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--responses", "1"], "--responses 1: K-wise needs at least 2"),
        (
            ["--preset", "cpu-kwise", "--prompts", "3", "--prompts_per_step", "4"],
            "1 to --prompts 3",
        ),
        (["--preset", "cpu-kwise", "--sides", "jaxrm_kwise,nope"], "--sides: unknown nope"),
        (["--sides", "jaxrm_kwise"], "--sides: unknown jaxrm_kwise"),  # pairs mode
    ],
)
def test_bad_kwise_flags_are_refused_before_any_work(flags, message):
    done = subprocess.run(
        [sys.executable, "scripts/bench.py", *flags], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and message in done.stderr.splitlines()[-1]
