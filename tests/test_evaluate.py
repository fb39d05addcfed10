"""`python -m jaxrm.evaluate` against rewards computed by transformers, training runs vs their HF
export, the training hook, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from jaxrm.assets import BENCHMARK_FIXTURES, TINY_EVAL_FILE, TINY_MODEL_DIR
from jaxrm.errors import UserError
from jaxrm.evaluate import main as evaluate_main
from jaxrm.rewardbench.report import output_paths
from jaxrm.rewardbench.rules import EXAMPLE_COUNTS, SUBSET_MAPPING, V2_SUBSETS
from jaxrm.score import main as score_main
from tests.test_benchmarks import ALLENAI_SPREAD_ZERO_TIES, SPREAD_ZERO_TIES, reference_ties
from tests.test_export import exported, trained  # noqa: F401 - fixtures
from tests.test_score import assert_one_line_error, classifier_dir, write_jsonl  # noqa: F401
from tests.test_train_failures import tmpfs  # noqa: F401 - fixture


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def completions(benchmark, row):
    if benchmark == "rewardbench":
        return [row["chosen"], row["rejected"]]
    return row["chosen"] + row["rejected"]


def test_fixtures_are_the_scripts_output():
    """The shipped stand-ins are exactly what scripts/make_benchmark_fixtures.py writes."""
    import importlib.util
    import random
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_benchmark_fixtures.py"
    sys.path.insert(0, str(script.parent))
    try:
        spec = importlib.util.spec_from_file_location("make_benchmark_fixtures", script)
        fixtures = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fixtures)
    finally:
        sys.path.remove(str(script.parent))
    rng = random.Random(fixtures.SEED)
    assert read_jsonl(BENCHMARK_FIXTURES["rewardbench"]) == fixtures.rewardbench_rows(rng)
    v2 = read_jsonl(BENCHMARK_FIXTURES["rewardbench2"])
    assert v2 == fixtures.rewardbench2_rows(rng)
    ties = {r["id"]: r["num_correct"] for r in v2 if r["subset"] == "Ties"}
    assert ties == {"tied:0": 4, "ref:0": 1, "tied:1": 4, "ref:1": 1, "tied:2": 3, "ref:2": 1}


def torch_scores(model, tokenizer, benchmark, rows):
    """Per row: (token lengths, transformers rewards) of its conversations, chosen first."""
    import torch

    out = []
    for row in rows:
        lengths, rewards = [], []
        for completion in completions(benchmark, row):
            conv = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": completion},
            ]
            ids = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)
            with torch.no_grad():
                rewards.append(model(torch.tensor([ids])).logits[0, 0].item())
            lengths.append(len(ids))
        out.append((lengths, rewards))
    return out


def expected_scores(benchmark, rows, scores, max_length, ties_formula="0.1.4"):
    """The benchmarks' scoring re-done from the transformers rewards (rows over `max_length`
    left out): {subset: (score, correct, scored, too long)}, sections, overall."""
    results, too_long, ties = defaultdict(list), defaultdict(int), []
    for row, (lengths, rewards) in zip(rows, scores, strict=True):
        subset = row["subset"]
        if max(lengths) > max_length:
            too_long[subset] += 1
        elif subset == "Ties":
            ties.append((row["id"], row["num_correct"], rewards))
        elif benchmark == "rewardbench":
            results[subset].append(1 if rewards[0] > rewards[1] else 0)
        else:
            top = max(rewards)
            results[subset].append(1 / rewards.count(top) if rewards[0] == top else 0)
    subsets = {s: (sum(r) / len(r), sum(r), len(r), too_long[s]) for s, r in results.items()}
    for s in too_long.keys() - results.keys():
        subsets[s] = (None, None, 0, too_long[s])
    if benchmark == "rewardbench":
        sections = {}
        for section, names in SUBSET_MAPPING.items():
            present = [s for s in names if subsets.get(s, (None,))[0] is not None]
            weighted = sum(subsets[s][0] * EXAMPLE_COUNTS[s] for s in present)
            sections[section] = weighted / sum(EXAMPLE_COUNTS[s] for s in present)
        return subsets, sections, sum(sections.values()) / 4
    subsets["Ties"] = (reference_ties(ties, ties_formula), None, len(ties), too_long["Ties"])
    return subsets, {}, sum(subsets[s][0] for s in V2_SUBSETS) / 6


def margin_to_a_flip(scores):
    """The smallest gap between two different rewards of a row: how far the rewards are from
    changing a comparison. jaxrm and transformers differ by ~5e-8 on this model (float32)."""
    return min(abs(a - b) for _, rewards in scores for a in rewards for b in rewards if a != b)


@pytest.fixture
def group_keys(monkeypatch):
    """The group keys jaxrm.evaluate scores with (the real scoring runs)."""
    from jaxrm.rewardbench import run

    seen, score = [], run.score_token_ids

    def spy(model, token_ids, batch_size, mesh, progress, groups):
        seen.append(list(groups))
        return score(model, token_ids, batch_size, mesh, progress, groups)

    monkeypatch.setattr(run, "score_token_ids", spy)
    return seen


@pytest.mark.parametrize("benchmark", ["rewardbench", "rewardbench2"])
@pytest.mark.parametrize("limit", ["none", "some_too_long"])
def test_scores_match_transformers(
    tmp_path,
    classifier_dir,  # noqa: F811
    capsys,
    group_keys,
    benchmark,
    limit,
):
    path, model, tokenizer = classifier_dir
    fixture = BENCHMARK_FIXTURES[benchmark]
    rows = read_jsonl(fixture)
    assert {r["subset"] for r in rows} == set(
        EXAMPLE_COUNTS if benchmark == "rewardbench" else V2_SUBSETS
    )
    scores = torch_scores(model, tokenizer, benchmark, rows)
    assert margin_to_a_flip(scores) > 1e-5
    longest = sorted(max(lengths) for lengths, _ in scores)
    max_length = longest[-1] if limit == "none" else longest[len(longest) * 3 // 4]
    output = tmp_path / "results.json"
    args = ["--model", str(path), "--benchmark", benchmark, "--data", str(fixture)]
    args += ["--output", str(output), "--max_length", str(max_length), "--batch_size", "8"]
    payload = evaluate_main([*args, "--no_progress"])

    subsets, sections, overall = expected_scores(benchmark, rows, scores, max_length)
    # one group per scored row: its completions share the prompt (computed once)
    sizes = [len(lengths) for lengths, _ in scores if max(lengths) <= max_length]
    (keys,) = group_keys
    assert [keys.count(k) for k in dict.fromkeys(keys)] == sizes
    got = {s["name"]: s for s in payload["subsets"]}
    assert set(got) == set(subsets)
    for name, (score, correct, scored, too_long) in subsets.items():
        assert (got[name]["scored"], got[name]["too_long"]) == (scored, too_long), name
        if name == "Ties":
            assert got[name]["score"] == pytest.approx(score, abs=1e-5)
        else:
            assert (got[name]["score"], got[name]["correct"]) == (score, correct), name
    assert payload["sections"] == pytest.approx(sections, rel=1e-12)
    assert payload["score"] == pytest.approx(overall, abs=1e-5)
    assert payload["too_long"] == sum(v[3] for v in subsets.values())
    assert (payload["too_long"] > 0) == (limit == "some_too_long")
    assert payload["unknown_subsets"] == [] and payload["missing_subsets"] == []
    # the JSON file is the payload; the chart sits beside it; the table has every subset
    assert json.loads(output.read_text()) == payload
    chart = output.with_suffix(".png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    table = capsys.readouterr().out
    for name, (_, _, scored, too_long) in subsets.items():
        line = next(x for x in table.splitlines() if x.startswith(name + " "))
        assert line.split()[-2:] == [str(scored), str(too_long)], line
    for section in sections:
        assert any(x.startswith(section + " ") for x in table.splitlines())


def test_unknown_subsets_are_reported_apart(tmp_path, classifier_dir, capsys):  # noqa: F811
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, model, tokenizer = classifier_dir
    rows = read_jsonl(BENCHMARK_FIXTURES["rewardbench"])
    extra = [dict(rows[i], subset="my-subset", id=1000 + i) for i in range(3)]
    data = tmp_path / "with-extra.parquet"
    pq.write_table(pa.Table.from_pylist(rows + extra), data)
    args = ["--model", str(path), "--benchmark", "rewardbench", "--data", str(data)]
    payload = evaluate_main([*args, "--no_progress"])

    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "'my-subset'" in warnings[0] and "3 rows" in warnings[0]
    (unknown,) = payload["unknown_subsets"]
    scores = torch_scores(model, tokenizer, "rewardbench", extra)
    assert unknown["name"] == "my-subset" and unknown["scored"] == 3
    assert unknown["correct"] == sum(r[0] > r[1] for _, r in scores)
    subsets, sections, overall = expected_scores(
        "rewardbench", rows, torch_scores(model, tokenizer, "rewardbench", rows), 10**6
    )
    assert payload["sections"] == pytest.approx(sections, rel=1e-12)  # unknown rows left out
    assert payload["score"] == pytest.approx(overall, rel=1e-12)


def test_training_run_and_its_export_score_the_same(tmp_path, trained, exported):  # noqa: F811
    """float32: a run's checkpoint read straight from orbax scores like its HF export."""
    run, _, ids, rewards = trained
    payloads = {}
    for name, model in (("run", run), ("export", exported)):
        args = ["--model", str(model), "--benchmark", "rewardbench2", "--no_progress"]
        args += ["--data", str(BENCHMARK_FIXTURES["rewardbench2"])]
        payloads[name] = evaluate_main(args)
    assert payloads["run"]["step"] == 3 and payloads["run"]["model"] == f"{run} step 3"
    for key in ("score", "subsets", "sections"):
        assert payloads["run"][key] == payloads["export"][key], key
    # python -m jaxrm.score reads the run directory too
    rows = read_jsonl(TINY_EVAL_FILE)[:6]
    scored = tmp_path / "scored.jsonl"
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    score_main(["--model", str(run), "--step", "3", "--data", str(data), "--output", str(scored)])
    got = [r[k] for r in read_jsonl(scored) for k in ("chosen_reward", "rejected_reward")]
    np.testing.assert_allclose(got, rewards, atol=1e-5)


def test_training_logs_benchmark_scores(tmp_path):
    """`eval_benchmarks` adds eval/<benchmark>/... at each eval and at the end, equal to
    python -m jaxrm.evaluate on the run's final checkpoint."""
    from jaxrm.train import main as train_main

    output = tmp_path / "run"
    rb, rb2 = BENCHMARK_FIXTURES["rewardbench"], BENCHMARK_FIXTURES["rewardbench2"]
    train_main(
        [
            "--config",
            "configs/tiny.py",
            f"--config.output_dir={output}",
            "--config.progress_bar=False",
            "--config.export_hf=False",
            "--config.total_train_batch_size=8",
            "--config.per_device_eval_batch_size=4",
            "--config.max_train_steps=3",
            "--config.eval_steps=2",
            f"--config.dataset_mixer_eval_list=['{TINY_EVAL_FILE}','32']",
            "--config.eval_benchmarks=['rewardbench','rewardbench2']",  # data: the fixtures
        ]
    )
    records = [r for r in read_jsonl(output / "metrics.jsonl") if "eval/rm/accuracy" in r]
    assert [r["step"] for r in records] == [2, 3]
    for record in records:
        assert {"eval/rewardbench/score", "eval/rewardbench/Chat Hard"} <= record.keys()
        assert {"eval/rewardbench2/score", "eval/rewardbench2/Ties"} <= record.keys()
        assert record["eval/rewardbench/too_long"] == 0
    last = records[-1]
    for benchmark, data in (("rewardbench", rb), ("rewardbench2", rb2)):
        args = ["--model", str(output), "--benchmark", benchmark, "--data", str(data)]
        payload = evaluate_main([*args, "--batch_size", "64", "--max_length", "128"])
        assert payload["step"] == 3
        assert last[f"eval/{benchmark}/score"] == pytest.approx(payload["score"], abs=1e-6)
        for subset in payload["subsets"]:
            assert last[f"eval/{benchmark}/{subset['name']}"] == pytest.approx(
                subset["score"], abs=1e-6
            )


def error_of(main, args, capsys) -> subprocess.CompletedProcess:
    """A CLI main run in-process on bad input: its exit status and what it printed."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exited.value.code, captured.out, captured.err)


def test_unknown_benchmark_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "jaxrm.evaluate", "--model", str(TINY_MODEL_DIR)]
        + ["--benchmark", "rewardbench3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(result, "unknown benchmark 'rewardbench3'", "rewardbench, rewardbench2")


@pytest.mark.parametrize(
    "case",
    ["columns", "empty", "prompt", "ties_id", "num_correct", "step", "config"]
    + ["chosen_string", "rejected_item", "ties_formula", "ties_formula_config"],
)
def test_user_errors(tmp_path, capsys, case):
    from jaxrm.train import main as train_main

    v1 = read_jsonl(BENCHMARK_FIXTURES["rewardbench"])[:3]
    v2 = read_jsonl(BENCHMARK_FIXTURES["rewardbench2"])
    bad = tmp_path / "bad.jsonl"
    benchmark, args = "rewardbench2", ["--data", str(bad)]
    if case == "columns":
        write_jsonl(bad, [{k: v for k, v in r.items() if k != "subset"} for r in v1])
        benchmark, expected = "rewardbench", ("bad.jsonl", "missing column 'subset'")
    elif case == "empty":
        bad.write_text("")
        expected = ("bad.jsonl", "no rows")
    elif case == "prompt":
        write_jsonl(bad, [dict(r, prompt=[{"role": "user", "content": r["prompt"]}]) for r in v1])
        benchmark, expected = "rewardbench", ("bad.jsonl row 0", "'prompt' must be a string")
    elif case == "ties_id":
        write_jsonl(bad, [dict(r, id="tie-3") if r["id"] == "tied:1" else r for r in v2])
        row = [r["id"] for r in v2].index("tied:1")
        expected = (f"bad.jsonl row {row}", "Ties id 'tie-3'")
    elif case == "num_correct":
        write_jsonl(bad, [dict(v2[0], num_correct=4)])
        expected = ("bad.jsonl row 0", "'num_correct' is 4")
    elif case == "step":
        args, expected = ["--step", "3"], ("--step 3", "not a jaxrm training output directory")
    elif case == "chosen_string":  # arrow cannot type the column; the row is named all the same
        rows = [dict(r, chosen=r["chosen"][0]) if i == 7 else r for i, r in enumerate(v2)]
        write_jsonl(bad, rows)
        expected = ("bad.jsonl row 7: 'chosen' must be a list of strings, got a string",)
    elif case == "rejected_item":
        rows = [dict(r, rejected=["no", 3]) if i == 4 else r for i, r in enumerate(v2)]
        write_jsonl(bad, rows)
        expected = ("bad.jsonl row 4: rejected[1] must be a string, got a number",)
    elif case == "ties_formula":
        args += ["--ties_formula", "latest"]
        expected = ("unknown Ties formula 'latest'", "0.1.4, main")
    if case == "ties_formula_config":
        config = ["--config", "configs/tiny.py", f"--config.output_dir={tmp_path / 'run'}"]
        config.append("--config.eval_benchmark_ties_formula=0.1.5")
        result = error_of(train_main, config, capsys)
        expected = ("'eval_benchmark_ties_formula' must be one of 0.1.4, main, got '0.1.5'",)
    elif case == "config":
        config = ["--config", "configs/tiny.py", f"--config.output_dir={tmp_path / 'run'}"]
        config.append("--config.eval_benchmarks=['rewardbench','rewardbench_3']")
        result = error_of(train_main, config, capsys)
        expected = ("unknown benchmark 'rewardbench_3'",)
    else:
        args += ["--model", str(TINY_MODEL_DIR), "--benchmark", benchmark, "--no_progress"]
        result = error_of(evaluate_main, args, capsys)
    assert_one_line_error(result, *expected)


# ----------------------------------------------------------------------------------------------
# Ties formula, ties from identical completions, output paths, row errors (issue 18)


def spread_zero_ties_file(path):
    """tests.test_benchmarks.SPREAD_ZERO_TIES as a RewardBench 2 file (the texts do not matter:
    `given_rewards` hands out its rewards in row order)."""
    rows = []
    for row_id, num_correct, scores in SPREAD_ZERO_TIES:
        texts = [f"answer {j} to {row_id}" for j in range(len(scores))]
        rows.append(
            {"id": row_id, "prompt": f"question {row_id}", "chosen": texts[:num_correct],
             "rejected": texts[num_correct:], "num_correct": num_correct, "subset": "Ties"}
        )  # fmt: skip
    return write_jsonl(path, rows)


@pytest.fixture
def given_rewards(monkeypatch):
    """jaxrm.evaluate scores every conversation with SPREAD_ZERO_TIES' rewards, in order."""
    rewards = [s for _, _, scores in SPREAD_ZERO_TIES for s in scores]

    def score_token_ids(model, token_ids, *args, **kwargs):
        assert len(token_ids) == len(rewards)
        return np.asarray(rewards, np.float32)

    monkeypatch.setattr("jaxrm.rewardbench.run.score_token_ids", score_token_ids)


@pytest.mark.parametrize("formula", ["0.1.4", "main", None])
def test_ties_formula_reaches_the_json_and_table(
    tmp_path,
    classifier_dir,  # noqa: F811
    given_rewards,
    capsys,
    formula,
):
    """--ties_formula picks allenai's 0.1.4 (the default) or main; the JSON and the table say
    which. The scores are allenai's own on these rewards (see tests.test_benchmarks)."""
    data = spread_zero_ties_file(tmp_path / "ties.jsonl")
    output = tmp_path / "new" / "folder" / "r.json"
    args = ["--model", str(classifier_dir[0]), "--benchmark", "rewardbench2", "--data", str(data)]
    args += ["--output", str(output), "--no_progress"]
    payload = evaluate_main(args + (["--ties_formula", formula] if formula else []))
    used = formula or "0.1.4"
    label = {"0.1.4": "rewardbench 0.1.4", "main": "rewardbench main 05a9005"}[used]
    (ties,) = payload["subsets"]
    assert ties["score"] == pytest.approx(ALLENAI_SPREAD_ZERO_TIES[used], abs=1e-7)
    assert payload["ties_formula"] == label
    assert json.loads(output.read_text())["ties_formula"] == label
    assert output.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert f"Ties ({label}): tied_accuracy 0.5, ref_accuracy 0.75" in capsys.readouterr().out


def test_benchmark_hook_takes_the_ties_formula_from_config(tmp_path, classifier_dir, given_rewards):  # noqa: F811
    from flax import nnx

    from jaxrm.config import get_config
    from jaxrm.rewardbench.run import BenchmarkHook
    from jaxrm.scoring import load_model, locate_model
    from jaxrm.sharding import make_mesh
    from jaxrm.tokenizer import load_tokenizer

    data = spread_zero_ties_file(tmp_path / "ties.jsonl")
    cfg = get_config(
        ["--config", "configs/tiny.py", "--config.eval_benchmarks=['rewardbench2']"]
        + [f"--config.eval_benchmark_data.rewardbench2={data}"]
        + ["--config.eval_benchmark_ties_formula=main"]
    )
    source = locate_model(str(classifier_dir[0]))
    tokenizer = load_tokenizer(source.tokenizer)
    hook = BenchmarkHook.from_config(cfg, tokenizer, 1)
    mesh = make_mesh(1, -1, 1)
    graphdef, params = nnx.split(load_model(source, mesh, vocab_size=len(tokenizer))[0])
    metrics = hook(graphdef, params, mesh)
    assert hook.ties_formula == "main"
    assert metrics["eval/rewardbench2/Ties"] == pytest.approx(
        ALLENAI_SPREAD_ZERO_TIES["main"], abs=1e-7
    )


def with_duplicates(benchmark, rows):
    """Every row given identical completions: RewardBench's rejected = chosen (a tie: wrong);
    RewardBench 2's first rejected = chosen (a tie at the top at best), and every correct answer
    of a Ties row the same (spread 0, where the Ties formulas part)."""
    if benchmark == "rewardbench":
        return [dict(r, rejected=r["chosen"]) for r in rows]
    out = []
    for r in rows:
        if r["subset"] == "Ties":
            out.append(dict(r, chosen=[r["chosen"][0]] * len(r["chosen"])))
        else:
            out.append(dict(r, rejected=[r["chosen"][0], *r["rejected"][1:]]))
    return out


@pytest.mark.parametrize(
    "benchmark, formula",
    [("rewardbench", "0.1.4"), ("rewardbench2", "0.1.4"), ("rewardbench2", "main")],
)
def test_identical_completions_tie_exactly(tmp_path, classifier_dir, benchmark, formula):  # noqa: F811
    """The outside check of issue 18: identical completions must get identical rewards, so a
    tie is scored as a tie (RewardBench: wrong; RewardBench 2: a 1/k share; Ties: spread 0),
    as allenai's scoring of transformers' rewards (one forward per conversation) has it: copies
    of a sequence get bit-identical rewards (jaxrm.score scores each distinct sequence once)."""
    path, model, tokenizer = classifier_dir
    rows = with_duplicates(benchmark, read_jsonl(BENCHMARK_FIXTURES[benchmark]))
    data = write_jsonl(tmp_path / "duplicates.jsonl", rows)
    scores = torch_scores(model, tokenizer, benchmark, rows)
    args = ["--model", str(path), "--benchmark", benchmark, "--data", str(data)]
    args += ["--batch_size", "8", "--no_progress", "--ties_formula", formula]
    payload = evaluate_main(args)
    subsets, sections, overall = expected_scores(benchmark, rows, scores, 10**6, formula)
    got = {s["name"]: s for s in payload["subsets"]}
    for name, (score, correct, _, _) in subsets.items():
        if name == "Ties":
            assert got[name]["score"] == pytest.approx(score, abs=1e-5)
        else:
            assert (got[name]["score"], got[name]["correct"]) == (score, correct), name
    if benchmark == "rewardbench":
        assert all(s["correct"] == 0 for s in payload["subsets"])
    else:
        assert all(s["correct"] <= s["scored"] / 2 for s in payload["subsets"][:-1])


def test_output_names_the_json_and_the_chart_is_its_png_sibling():
    assert output_paths("r.json") == (Path("r.json"), Path("r.png"))
    assert output_paths("out/r") == (Path("out/r"), Path("out/r.png"))
    assert output_paths("r.v2.json") == (Path("r.v2.json"), Path("r.v2.png"))
    for name in ("r.png", "r.PNG"):
        with pytest.raises(UserError, match=f"--output {name}: names the results JSON.* r.json"):
            output_paths(name)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if evaluate gets as far as locating the model."""

    def locate_model(*args, **kwargs):
        raise AssertionError("evaluate got past its --output check")

    monkeypatch.setattr("jaxrm.evaluate.locate_model", locate_model)


@pytest.mark.parametrize(
    "case", ["png", "directory", "chart_directory", "file_parent", "read_only"]
)
def test_unwritable_output_is_one_line_before_any_work(tmp_path, capsys, tmpfs, no_model, case):  # noqa: F811
    output = tmp_path / "r.json"
    if case == "png":
        output, expected = tmp_path / "r.png", ("r.png: names the results JSON", "r.json")
    elif case == "directory":
        output.mkdir()
        expected = ("--output", "r.json is a directory")
    elif case == "chart_directory":
        (tmp_path / "r.png").mkdir()
        expected = ("the chart beside --output", "r.png is a directory")
    elif case == "file_parent":
        (tmp_path / "file").write_text("")
        output, expected = tmp_path / "file" / "sub" / "r.json", ("file is not a directory",)
    else:
        output = tmpfs("1m", read_only=True) / "new" / "r.json"
        expected = ("cannot write in", "read-only file system")
    args = ["--model", str(TINY_MODEL_DIR), "--benchmark", "rewardbench", "--output", str(output)]
    result = error_of(evaluate_main, args, capsys)
    assert_one_line_error(result, "--output", str(tmp_path), *expected)
    assert result.returncode == 2
    assert output.is_dir() if case == "directory" else not output.exists()


def test_a_refused_output_check_creates_nothing(tmp_path, capsys):
    """The check probes the nearest existing folder; new folders wait for the results."""
    output = tmp_path / "a" / "b" / "r.json"
    args = ["--model", str(TINY_MODEL_DIR), "--benchmark", "rewardbench", "--output", str(output)]
    args += ["--data", str(tmp_path / "missing.jsonl")]
    assert_one_line_error(error_of(evaluate_main, args, capsys), "missing.jsonl")
    assert list(tmp_path.iterdir()) == []
