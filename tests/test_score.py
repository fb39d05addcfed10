"""`python -m jaxrm.score` against transformers, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxrm.assets import TINY_EVAL_FILE, TINY_MODEL_DIR
from jaxrm.data.packing import PackSpec, common_prefix_length, pack_sequence_groups
from jaxrm.score import main as score_main
from jaxrm.score import set_rewards, write_rows
from jaxrm.scoring import distinct_sequences, load_model, locate_model, score_token_ids
from jaxrm.sharding import make_mesh
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


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


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


def score_rows(tmp_path, model_dir, rows, name="d.jsonl", *extra):
    """The scored rows of `rows` (in-process)."""
    data = write_jsonl(tmp_path / name, rows)
    out = tmp_path / f"scored-{name}"
    score_main(["--model", str(model_dir), "--data", str(data), "--output", str(out), *extra])
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_distinct_sequences_are_ordered_by_content_and_mapped_back():
    seqs = [[5, 6], [1], [5, 6], [2, 3, 4], [1]]
    distinct, copies = distinct_sequences(seqs)
    assert sorted(map(list, distinct)) == [[1], [2, 3, 4], [5, 6]]
    assert [list(distinct[c]) for c in copies] == seqs
    again, _ = distinct_sequences([seqs[i] for i in (3, 1, 0, 0)])
    assert [list(x) for x in again] == [list(x) for x in distinct]  # order: contents alone


def test_identical_conversations_tie_exactly_and_duplicates_change_nothing(
    tmp_path, classifier_dir
):
    """Copies of a conversation (chosen == rejected, repeated rows) get bit-identical rewards, and
    a file with repeated and reordered rows scores each row exactly as the file without them."""
    path, _, _ = classifier_dir
    base = [json.loads(line) for line in TINY_EVAL_FILE.read_text().splitlines()[:12]]
    base[3] = dict(base[3], rejected=base[3]["chosen"])  # a tie inside one row
    rng = np.random.default_rng(0)
    repeated = [base[i] for i in rng.permutation(np.repeat(np.arange(12), 3))]
    for batch in ("2", "16"):
        plain = score_rows(tmp_path, path, base, "base.jsonl", "--batch_size", batch)
        dup = score_rows(tmp_path, path, repeated, "dup.jsonl", "--batch_size", batch)
        assert plain[3]["chosen_reward"] == plain[3]["rejected_reward"]
        expected = {json.dumps(r["chosen"]): r["chosen_reward"] for r in plain}
        expected |= {json.dumps(r["rejected"]): r["rejected_reward"] for r in plain}
        for row in dup:
            assert row["chosen_reward"] == expected[json.dumps(row["chosen"])]
            assert row["rejected_reward"] == expected[json.dumps(row["rejected"])]


def test_a_reward_does_not_depend_on_its_neighbours_in_a_packed_row(classifier_dir):
    """One sequence scored alone and after longer sequences in the same packed row (so at
    another start, next to other tokens): the same reward within float32 noise."""
    path, _, _ = classifier_dir
    model, _ = load_model(locate_model(str(path)), make_mesh(1, -1, 1))
    rng = np.random.default_rng(1)
    seq = rng.integers(1, 200, 25).tolist()
    alone = score_token_ids(model, [seq], 64, make_mesh(1, -1, 1), progress=False)[0]
    for lengths in ([40], [90, 60, 30], [120, 120, 120, 120, 100]):  # seq starts at their sum
        others = [rng.integers(1, 200, n).tolist() for n in lengths]
        got = score_token_ids(model, [*others, seq], 64, make_mesh(1, -1, 1), progress=False)
        assert abs(got[-1] - alone) <= 1e-6 * max(1.0, abs(alone)), (lengths, got[-1], alone)


def test_a_model_with_a_nan_weight_is_refused_at_load(tmp_path, capsys):
    rows = [json.loads(line) for line in TINY_EVAL_FILE.read_text().splitlines()[:2]]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name][3, 5] = np.nan

    bad = broken_checkpoint(tmp_path, poison)
    line = user_error(
        capsys, "--model", str(bad), "--data", str(data), "--output", str(tmp_path / "o.jsonl")
    )
    assert name in line and "non-finite" in line, line
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_non_finite_reward_is_written_as_null_never_nan(tmp_path, suffix, capsys):
    rows = [{"messages": [{"role": "assistant", "content": str(i)}]} for i in range(3)]
    conversations = [(i, "messages", r["messages"]) for i, r in enumerate(rows)]
    scored = set_rewards(rows, conversations, np.array([0.5, np.nan, -np.inf], np.float32))
    assert "2 conversations got a non-finite reward" in capsys.readouterr().err
    scored[0]["other"] = float("nan")  # a field of the input, too
    out = tmp_path / f"o{suffix}"
    write_rows(out, scored)
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text) if suffix == ".json" else [json.loads(x) for x in text.splitlines()]
    assert [r["reward"] for r in back] == [0.5, None, None]
    assert back[0]["other"] is None


def user_error(capsys, *args) -> str:
    """The one `error:` line of an in-process `jaxrm.score` that exits 2."""
    with pytest.raises(SystemExit) as stop:
        score_main([*args, "--no_progress"])
    assert stop.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("case", ["directory", "parent_is_a_file", "read_only"])
def test_an_unwritable_output_is_refused_before_anything_is_read(tmp_path, capsys, case):
    """Checked first: the model and the data do not even exist here."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    if case == "directory":
        output, expected = target, "is a directory"
    elif case == "parent_is_a_file":
        output, expected = target / "keep.txt" / "o.jsonl", "is not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes in a read-only directory")
        target.chmod(0o555)
        output, expected = target / "sub" / "o.jsonl", "cannot write in"
    try:
        line = user_error(
            capsys,
            "--model",
            str(tmp_path / "nope"),
            "--data",
            "nope.jsonl",
            "--output",
            str(output),
        )
    finally:
        target.chmod(0o755)
    assert str(output) in line and expected in line, line
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_a_role_the_template_drops_is_refused_as_training_refuses_it(
    tmp_path, capsys, classifier_dir
):
    path, _, _ = classifier_dir
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"messages": good}, {"messages": [{"role": "human", "content": "hi"}, good[1]]}]
    data = write_jsonl(tmp_path / "roles.jsonl", rows)
    line = user_error(
        capsys, "--model", str(path), "--data", str(data), "--output", str(tmp_path / "o.jsonl")
    )
    assert "roles.jsonl row 1: messages[0] has role 'human'" in line, line
    assert "chat template drops" in line
    assert not (tmp_path / "o.jsonl").exists()


def test_a_conversation_longer_than_the_context_is_refused(tmp_path, capsys, classifier_dir):
    """The tiny classifier's context is 128 tokens (max_position_embeddings)."""
    path, _, tokenizer = classifier_dir
    limit = json.loads((path / "config.json").read_text())["max_position_embeddings"]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long = [short[0], {"role": "assistant", "content": "a b c d " * limit}]
    n = len(tokenizer.apply_chat_template(long, tokenize=True, return_dict=False))
    rows = [{"chosen": short, "rejected": short}, {"chosen": short, "rejected": long}]
    rows += [{"chosen": long, "rejected": long}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    line = user_error(
        capsys, "--model", str(path), "--data", str(data), "--output", str(tmp_path / "o.jsonl")
    )
    assert f"2 rows hold conversations longer than the {limit} tokens" in line, line
    assert f"the first row 1 ('rejected': {n} tokens)" in line, line
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# A prompt's responses packed as one group (issue 19)


def kwise_rows(count: int) -> list[dict]:
    """K-wise rows from the tiny eval pairs: per prompt (string) its distinct answers (strings
    or assistant-only message lists), chosen ones scored 1, rejected 0 (a ranking every third)."""
    answers: dict[str, dict[str, float]] = {}
    for line in TINY_EVAL_FILE.read_text().splitlines()[:count]:
        row = json.loads(line)
        scored = answers.setdefault(row["chosen"][0]["content"], {})
        scored.setdefault(row["chosen"][-1]["content"], 1.0)
        scored.setdefault(row["rejected"][-1]["content"], 0.0)
    rows = []
    for n, (prompt, scored) in enumerate(answers.items()):
        texts, scores = list(scored)[:6], list(scored.values())[:6]
        if n % 2:
            texts[0] = [{"role": "assistant", "content": texts[0]}]
        row = {"prompt": prompt, "responses": texts}
        if n % 3 == 1:
            row["ranking"] = [1 if s else 2 for s in scores]
        else:
            row["scores"] = scores
        rows.append(row)
    return rows


def kwise_accuracies(rows):
    """The pairwise and top-1 accuracy by their definitions, from the written rewards."""
    correct = pairs = top1 = counted = 0
    for row in rows:
        scores = row.get("scores") or [-r for r in row["ranking"]]
        if len(set(scores)) < 2:
            continue
        rewards = row["rewards"]
        for a in range(len(scores)):
            for b in range(len(scores)):
                if scores[a] > scores[b]:
                    pairs += 1
                    correct += rewards[a] > rewards[b]
        best = [j for j, r in enumerate(rewards) if r == max(rewards)]
        top1 += len(best) == 1 and scores[best[0]] == max(scores)
        counted += 1
    return correct / pairs, top1 / counted, counted, pairs


def test_score_kwise_rows_match_transformers(tmp_path, classifier_dir, capsys):
    """Every response's reward equals transformers' (one forward per conversation) within 1e-4
    (float32; the tree-masked group computes the prompt once), and the printed accuracies are
    their definitions on the written rewards."""
    import torch

    path, model, tokenizer = classifier_dir
    rows = kwise_rows(60)
    assert max(len(r["responses"]) for r in rows) >= 4
    scored = score_rows(tmp_path, path, rows, "kwise.jsonl", "--batch_size", "4", "--no_progress")
    for row, got in zip(rows, scored, strict=True):
        assert {k: v for k, v in got.items() if k != "rewards"} == row
        assert len(got["rewards"]) == len(row["responses"])
        for response, reward in zip(row["responses"], got["rewards"], strict=True):
            turns = (
                [{"role": "assistant", "content": response}]
                if isinstance(response, str)
                else response
            )
            conv = [{"role": "user", "content": row["prompt"]}, *turns]
            ids = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)
            with torch.no_grad():
                expected = model(torch.tensor([ids])).logits[0, 0].item()
            assert abs(reward - expected) <= 1e-4
    pairwise, top1, counted, pairs = kwise_accuracies(scored)
    out = capsys.readouterr().out
    assert f"{counted} rows with scores, {pairs} implied pairs" in out, out
    assert f"pairwise accuracy {pairwise:.4f}, top-1 accuracy {top1:.4f}" in out, out
    summary = score_main(  # the scored file again: its `rewards` are replaced
        [
            "--model",
            str(path),
            "--data",
            str(tmp_path / "scored-kwise.jsonl"),
            "--output",
            str(tmp_path / "again.jsonl"),
            "--batch_size",
            "4",
            "--no_progress",
        ]
    )
    assert [r["rewards"] for r in read_jsonl(tmp_path / "again.jsonl")] == [
        r["rewards"] for r in scored
    ]
    assert summary["pairwise_accuracy"] == pytest.approx(pairwise, abs=1e-12)
    assert summary["top1_accuracy"] == pytest.approx(top1, abs=1e-12)


def test_kwise_rows_shuffled_and_repeated_score_bit_identical(tmp_path, classifier_dir):
    """A K-wise file and the same rows shuffled, repeated, with responses reordered: each
    conversation gets the very same float32 reward (packing follows the contents alone)."""
    path, _, _ = classifier_dir
    base = kwise_rows(40)
    base[0]["responses"].append(base[0]["responses"][1])  # a tie inside one group
    base[0]["scores"].append(base[0]["scores"][1])
    rng = np.random.default_rng(0)
    repeated = []
    for i in rng.permutation(np.repeat(np.arange(len(base)), 2)):
        order = rng.permutation(len(base[i]["responses"])).tolist()
        row = {"prompt": base[i]["prompt"], "responses": [base[i]["responses"][j] for j in order]}
        repeated.append(row)
    plain = score_rows(tmp_path, path, base, "base.jsonl", "--no_progress")
    dup = score_rows(tmp_path, path, repeated, "dup.jsonl", "--no_progress")
    assert plain[0]["rewards"][1] == plain[0]["rewards"][-1]
    expected = {
        json.dumps([r["prompt"], x]): y
        for r in plain
        for x, y in zip(r["responses"], r["rewards"], strict=True)
    }
    for row in dup:
        for x, y in zip(row["responses"], row["rewards"], strict=True):
            assert y == expected[json.dumps([row["prompt"], x])]


def random_groups(rng, count, responses, prompt_length, response_length):
    """Token sequences of `count` prompts with `responses` each (ids below the tiny vocab)."""
    seqs, keys = [], []
    for g in range(count):
        prompt = rng.integers(1, 96, rng.integers(*prompt_length)).tolist()
        for _ in range(rng.integers(*responses)):
            seqs.append(prompt + rng.integers(1, 96, rng.integers(*response_length)).tolist())
            keys.append(g)
    return seqs, keys


@pytest.mark.parametrize("batch_size", [2, 16])
def test_grouped_rewards_equal_ungrouped(classifier_dir, capsys, batch_size):
    """Groups (the `tree` mask: the prompt once, each response a branch) give each sequence the
    reward it gets alone in its segment within 1e-6 (float32 rounding of another summation
    order), groups split over rows included (and logged)."""
    from jaxrm.logs import setup_logging

    setup_logging()
    path, _, _ = classifier_dir
    mesh = make_mesh(1, -1, 1)
    model, _ = load_model(locate_model(str(path)), mesh)
    rng = np.random.default_rng(2)
    seqs, keys = random_groups(rng, 12, (1, 7), (1, 60), (1, 60))
    long, long_keys = random_groups(rng, 2, (12, 13), (5, 10), (100, 110))  # > 1024 tokens
    seqs, keys = seqs + long, keys + [k + 100 for k in long_keys]
    for g in (100, 101):  # each longer than the 1024-token rows: split
        members = [np.array(s) for s, k in zip(seqs, keys, strict=True) if k == g]
        prefix = common_prefix_length(members)
        assert prefix + sum(len(m) - prefix for m in members) > 1024
    plain = score_token_ids(model, seqs, batch_size, mesh, progress=False)
    grouped = score_token_ids(model, seqs, batch_size, mesh, progress=False, groups=keys)
    assert np.abs(plain).max() > 0.05
    np.testing.assert_allclose(grouped, plain, rtol=0, atol=1e-6)
    assert not np.array_equal(grouped, plain)  # the grouped path ran
    assert (
        "scoring: 2 of 14 prompt groups are longer than a 1024-token row" in capsys.readouterr().err
    )


def test_pack_groups_lays_out_each_sequence_and_splits_long_groups():
    """Every sequence is read back from its row as what its last token attends to (the prefix of
    its segment, then its own branch) with its positions; a group longer than a row is split
    into sub-groups that each repeat the prefix, and every sub-group fits."""
    rng = np.random.default_rng(3)
    prompt = rng.integers(1, 50, 30).tolist()
    seqs = [prompt + rng.integers(1, 50, n).tolist() for n in (40, 70, 20, 90, 60)]
    seqs += [rng.integers(1, 50, n).tolist() for n in (5, 128)]
    groups = [[0, 1, 2, 3, 4], [5], [6]]
    spec = PackSpec(length=128, rows=2, devices=2, slots=0, share_prefix=False)
    packed = pack_sequence_groups(seqs, groups, spec)
    assert packed.split == 1
    assert [m for m, _ in packed.groups] == [[0], [1, 2], [3], [4], [5], [6]]  # in order, greedy
    assert [p for _, p in packed.groups] == [30, 30, 30, 30, 0, 0]
    assert packed.tokens == sum(map(len, seqs)) - 30  # one prefix saved: 5 sequences, 4 groups
    seen = {}
    for batch in packed:
        assert batch["input_ids"].shape == (4, 128)
        for device, slot in zip(*np.nonzero(batch["weight"]), strict=True):
            index = int(batch["index"][device, slot])
            row, end = device * 2 + index // 128, index % 128
            seg, branch = batch["segment_ids"][row], batch["branch_ids"][row]
            visible = (seg[: end + 1] == seg[end]) & (
                (branch[: end + 1] == 0) | (branch[: end + 1] == branch[end])
            )
            item = int(batch["order"][device, slot])
            got = batch["input_ids"][row, : end + 1][visible].tolist()
            assert batch["positions"][row, : end + 1][visible].tolist() == list(range(len(got)))
            seen[item] = got
    assert seen == dict(enumerate(seqs))


@pytest.mark.parametrize(
    "case", ["no_prompt", "both_prompts", "user_response", "empty", "score_count", "both_scores"]
)
def test_kwise_row_errors_are_one_line(tmp_path, capsys, case):
    """Named by row and key before the model is even located (`--model` does not exist)."""
    good = {"prompt": "q", "responses": ["a", "b"], "scores": [1, 0]}
    bad = {
        "no_prompt": {"responses": ["a", "b"]},
        "both_prompts": dict(good, messages=[{"role": "user", "content": "q"}]),
        "user_response": dict(good, responses=["a", [{"role": "user", "content": "b"}]]),
        "empty": dict(good, responses=[]),
        "score_count": dict(good, scores=[1, 0, 2]),
        "both_scores": dict(good, ranking=[1, 2]),
    }[case]
    expected = {
        "no_prompt": "needs one of 'prompt' or 'messages' (it has neither)",
        "both_prompts": "needs one of 'prompt' or 'messages' (it has both)",
        "user_response": "responses[1] must be a string or assistant-only messages",
        "empty": "'responses' must be a non-empty list",
        "score_count": "'scores' must be a list of 2 numbers, one per response",
        "both_scores": "give 'scores' or 'ranking', not both",
    }[case]
    data = write_jsonl(tmp_path / "k.jsonl", [good, bad])
    args = ["--model", str(tmp_path / "nope"), "--data", str(data)]
    line = user_error(capsys, *args, "--output", str(tmp_path / "o.jsonl"))
    assert "k.jsonl row 1: " in line and expected in line, line
