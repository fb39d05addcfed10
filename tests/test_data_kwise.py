"""K-wise preference data (`preference_format="kwise"`): every format parsed into `Groups`, token
ids equal to the pair path's, the filter counts, packed-row fit, one-line errors, the cache."""

import json
import logging

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxrm.assets import (
    BENCHMARK_FIXTURES,
    TINY_EVAL_FILE,
    TINY_KWISE_EVAL_FILE,
    TINY_KWISE_TRAIN_FILE,
    TINY_MODEL_DIR,
    TINY_TRAIN_FILE,
)
from jaxrm.data import PackFit, build_datasets
from jaxrm.data import tokenize as tokenize_module
from jaxrm.data.groups import Groups
from jaxrm.errors import UserError
from tests.test_data_tokenize import write_jsonl

PROMPT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Opposite of up?"},
]
ANSWERS = ["down", "blue", "below", "sideways"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


@pytest.fixture(autouse=True)
def warnings_reach_caplog(monkeypatch):
    """As in test_data_checks: an in-process run may have stopped the logger's propagation."""
    monkeypatch.setattr(logging.getLogger("jaxrm"), "propagate", True)


def build(tok, tmp_path, rows, max_token_length=256, max_prompt_token_length=128, **kw):
    """Builds `rows` (written to a jsonl file) as K-wise groups; (groups, train stats)."""
    kw.setdefault("seed", 0)
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("preference_format", "kwise")
    name = kw.pop("file", "k.jsonl")
    path = rows if isinstance(rows, str) else write_jsonl(tmp_path / name, rows)
    train, _, stats = build_datasets(
        dataset_mixer_list=[path, "1.0"],
        tokenizer=tok,
        max_token_length=max_token_length,
        max_prompt_token_length=max_prompt_token_length,
        **kw,
    )
    return train, stats["train"]


def assert_one_line_error(excinfo, fragment):
    message = str(excinfo.value)
    assert "\n" not in message and fragment in message, message


def render(tok, conversation, generation_prompt=False):
    return tok.apply_chat_template(
        conversation, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt
    )


def assistant(text):
    return {"role": "assistant", "content": text}


def assert_group(tok, groups, g, prompt, answers, scores):
    """Group g holds prompt + each answer rendered as one conversation, scored `scores`."""
    assert len(groups.members(g)) == len(answers)
    for got, answer in zip(groups.sequences(g), answers, strict=True):
        np.testing.assert_array_equal(got, render(tok, [*prompt, assistant(answer)]))
    np.testing.assert_array_equal(groups.scores[groups.members(g)], np.float32(scores))
    assert groups.prompt_lengths[g] == len(render(tok, prompt, generation_prompt=True))


def test_scores_and_ranking_rows(tok, tmp_path):
    rows = [
        # the first row names every column (datasets.Dataset.from_list takes its keys)
        {"prompt": PROMPT, "responses": ANSWERS, "scores": [3.5, 0, 2, 0], "ranking": None},
        {"prompt": PROMPT, "responses": ANSWERS[:2], "ranking": [2, 2]},  # all tied
        {"prompt": PROMPT, "responses": ANSWERS[:3], "ranking": [1, 3, 2]},
    ]
    groups, stats = build(tok, tmp_path, rows)
    assert isinstance(groups, Groups) and stats["sources"][0]["format"] == "kwise"
    assert_group(tok, groups, 0, PROMPT, ANSWERS, [3.5, 0, 2, 0])
    assert_group(tok, groups, 1, PROMPT, ANSWERS[:3], [-1, -3, -2])
    assert stats["filtered"] == {
        "prompt_too_long": 0,
        "responses_too_long": 0,
        "fewer_than_two_scores": 1,
    }
    # 5 implied pairs (the tied 0, 0 skipped) + 3; 7 responses in the 2 groups kept
    assert (stats["rows"], stats["groups"], stats["responses"], stats["pairs"]) == (3, 2, 7, 8)
    # a `messages` prompt and assistant message lists as responses
    listed = {"messages": PROMPT, "responses": [[assistant(a)] for a in ANSWERS[:2]]}
    groups, _ = build(tok, tmp_path, [{**listed, "scores": [0, 1]}], file="m.jsonl")
    assert_group(tok, groups, 0, PROMPT, ANSWERS[:2], [0, 1])


def test_a_response_tokenizes_as_a_pairs_chosen(tok, tmp_path):
    pair = {"prompt": PROMPT, "chosen": [assistant("down")], "rejected": [assistant("blue")]}
    pairs, _, _ = build_datasets(
        dataset_mixer_list=[write_jsonl(tmp_path / "p.jsonl", [pair]), "1"],
        tokenizer=tok,
        max_token_length=256,
        max_prompt_token_length=128,
        seed=0,
        cache_dir=tmp_path / "cache",
    )
    row = {"prompt": PROMPT, "responses": ["blue", "below", "down"], "scores": [0, 1, 2]}
    groups, _ = build(tok, tmp_path, [row])
    np.testing.assert_array_equal(groups.responses[2], pairs.chosen[0])
    np.testing.assert_array_equal(groups.responses[0], pairs.rejected[0])
    assert groups.prompt_lengths[0] == pairs.prompt_lengths[0]


def test_pair_sources_become_groups_of_two_and_their_margin_is_ignored(tok, tmp_path, caplog):
    pair = {"chosen": [*PROMPT, assistant("down")], "rejected": [*PROMPT, assistant("blue")]}
    rows = [{**pair, "margin": 0.5}, {**pair, "margin": 0.0}, {**pair, "margin": 2.0}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs, _, _ = build_datasets(
        dataset_mixer_list=[path, "1.0"],
        tokenizer=tok,
        max_token_length=256,
        max_prompt_token_length=128,
        seed=0,
        cache_dir=tmp_path / "cache",
    )
    with caplog.at_level(logging.WARNING):
        groups, stats = build(tok, tmp_path, path)
    assert stats["sources"][0]["format"] == "conversational"
    assert stats["sources"][0]["margins_ignored"] == 2
    assert "2 rows carry a non-zero margin, which K-wise training ignores" in caplog.text
    np.testing.assert_array_equal(groups.sizes(), [2, 2, 2])
    np.testing.assert_array_equal(groups.scores, np.tile(np.float32([1, 0]), 3))
    np.testing.assert_array_equal(groups.prompt_lengths, pairs.prompt_lengths)
    for g in range(3):
        chosen, rejected = groups.sequences(g)
        np.testing.assert_array_equal(chosen, pairs.chosen[g])
        np.testing.assert_array_equal(rejected, pairs.rejected[g])
    pre = {"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 6, 8], "prompt_input_ids": [5]}
    groups, stats = build(tok, tmp_path, [pre], file="pre.jsonl")
    assert stats["sources"][0]["format"] == "pretokenized"
    assert [s.tolist() for s in groups.sequences(0)] == [[5, 6, 7], [5, 6, 8]]
    assert groups.prompt_lengths.tolist() == [1] and stats["sources"][0]["margins_ignored"] == 0


def ultrafeedback_row(instruction, completions):
    return {
        "source": "evol_instruct",
        "instruction": instruction,
        "models": ["a"] * len(completions),
        "completions": [
            {
                "annotations": {"helpfulness": {"Rating": "4", "Rationale": "ok"}},
                "critique": "fine",
                "custom_system_prompt": "",
                "fine-grained_score": fine,
                "model": "a",
                "overall_score": overall,
                "principle": "helpfulness",
                "response": response,
            }
            for response, overall, fine in completions
        ],
        "correct_answers": ["None"],
        "incorrect_answers": ["None"],
    }


def test_ultrafeedback_scores_by_the_chosen_key(tok, tmp_path):
    rows = [
        ultrafeedback_row("Opposite of up?", [("down", 8.5, 4.75), ("blue", 9.0, 1.5)]),
        ultrafeedback_row("Opposite of hot?", [("cold", 7.0, 4.0)]),  # one completion: dropped
    ]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    groups, stats = build(tok, tmp_path, path)
    assert stats["sources"][0]["format"] == "ultrafeedback"
    prompt = [{"role": "user", "content": "Opposite of up?"}]
    assert_group(tok, groups, 0, prompt, ["down", "blue"], [8.5, 9.0])
    assert len(groups) == 1 and stats["filtered"]["fewer_than_two_scores"] == 1
    fine, stats = build(tok, tmp_path, path, ultrafeedback_score="fine-grained_score")
    assert not stats["sources"][0]["cache_hit"]  # the score key is part of the cache key
    assert_group(tok, fine, 0, prompt, ["down", "blue"], [4.75, 1.5])
    with pytest.raises(UserError) as e:
        build(tok, tmp_path, path, ultrafeedback_score="honesty")
    assert_one_line_error(e, "uf.jsonl row 0: completions[0] has no 'honesty'")


def test_rewardbench2_chosen_score_one_rejected_zero(tok, tmp_path):
    path = str(BENCHMARK_FIXTURES["rewardbench2"])
    rows = [json.loads(line) for line in open(path)]
    groups, stats = build(tok, tmp_path, path)
    assert stats["sources"][0]["format"] == "rewardbench2" and len(groups) == len(rows)
    for g, row in enumerate(rows):
        prompt = [{"role": "user", "content": row["prompt"]}]
        scores = [1] * len(row["chosen"]) + [0] * len(row["rejected"])
        assert_group(tok, groups, g, prompt, row["chosen"] + row["rejected"], scores)
    ties = [len(r["chosen"]) * len(r["rejected"]) for r in rows]  # chosen vs chosen: ties
    assert stats["pairs"] == sum(ties) and max(len(r["chosen"]) for r in rows) > 1
    with pytest.raises(UserError) as e:
        build(tok, tmp_path, path, preference_format="pairs")
    assert_one_line_error(e, "rewardbench2 format")
    assert "--config.preference_format=kwise" in str(e.value)


def test_pretokenized_groups_and_the_filter_counts(tok, tmp_path):
    def row(prompt, lengths, scores):
        ids = [[4] * prompt + [10 + i] * (n - prompt) for i, n in enumerate(lengths)]
        return {"prompt_input_ids": [4] * prompt, "responses_input_ids": ids, "scores": scores}

    rows = (
        [row(2, [6, 8, 9], [1, 0, 2])] * 3  # kept whole: 3 pairs each
        + [row(2, [6, 11, 10], [1, 0, 2])] * 2  # one response too long, 2 left: 1 pair
        + [row(2, [11, 6, 9], [3, 1, 1])] * 4  # too long, the rest tied: fewer than two scores
        + [row(5, [6, 12], [1, 0])] * 5  # prompt too long (its too-long response not counted)
        + [row(1, [3, 3], [2, 2])]  # tied from the start
    )
    groups, stats = build(tok, tmp_path, rows, 10, 4)
    assert stats["sources"][0]["format"] == "kwise_pretokenized"
    assert stats["filtered"] == {
        "prompt_too_long": 5,
        "responses_too_long": 2 + 4,
        "fewer_than_two_scores": 4 + 1,
    }
    assert (stats["rows"], stats["groups"], stats["responses"], stats["pairs"]) == (15, 5, 13, 11)
    assert groups.sequences(3)[1].tolist() == [4, 4, 12, 12, 12, 12, 12, 12, 12, 12]
    np.testing.assert_array_equal(groups.scores[groups.members(3)], [1, 2])
    with pytest.raises(UserError) as e:
        build(tok, tmp_path, rows, 2, 1)
    assert_one_line_error(e, "no train groups left: all 15 were dropped by max_token_length=2")


def test_groups_longer_than_a_packed_row(tok, tmp_path, caplog):
    def row(prompt, rests, scores):
        ids = [[4] * prompt + [10 + i] * n for i, n in enumerate(rests)]
        return {"responses_input_ids": ids, "scores": scores}

    rows = [
        row(100, [20, 20, 20], [2, 1, 0]),  # pairs 140 shared / 240 not; whole 160 / 360
        row(100, [20, 20, 20], [1, 1, 1]),  # all tied: dropped before the pack check
        row(10, [100, 150, 10], [0, 1, 0]),  # its longest implied pair: 10 + 150 + 100 = 260
        row(1, [5, 5], [1, 0]),
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    fits = {
        (256, True, False): [0, 3],
        (256, False, False): [0, 3],  # 240: every pair of group 0 fits unshared
        (128, True, False): [3],
        (256, True, True): [0, 3],  # whole: 100 + 3 x 20 = 160
        (256, False, True): [3],  # whole unshared: 360
    }
    for (length, share, whole), kept_rows in fits.items():
        fit = PackFit(length, share, drop=True, whole_groups=whole)
        groups, stats = build(tok, tmp_path, path, 512, 512, pack=fit)
        assert stats["filtered"]["longer_than_pack_length"] == 3 - len(kept_rows), (fit, stats)
        assert stats["groups"] == len(kept_rows)
        lengths = [len(groups.sequences(g)[0]) for g in range(len(groups))]
        assert lengths == [[120, 120, 110, 6][r] for r in kept_rows]
    with pytest.raises(UserError) as e:
        build(tok, tmp_path, path, 512, 512, pack=PackFit(256, True))
    assert_one_line_error(
        e,
        "1 of 3 train groups (their longest implied pair) need more than pack_length=256 tokens "
        "in a packed row (the longest 260); set pack_length to at least 384",
    )
    with pytest.raises(UserError) as e:
        build(tok, tmp_path, path, 512, 512, pack=PackFit(128, True, whole_groups=True))
    assert_one_line_error(e, "2 of 3 train groups need more than pack_length=128")
    assert "(the longest 270)" in str(e.value)  # group 2 whole, shared: 10 + 100 + 150 + 10


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "responses": ["a", "b"], "scores": [1]}, "row 1: 'scores' must hold one"),
        ({"prompt": "q", "responses": ["a", "b"]}, "row 1: neither of 'scores' and 'ranking'"),
        (
            {"prompt": "q", "responses": ["a", "b"], "scores": [1, 0], "ranking": [1, 2]},
            "row 1: both 'scores' and 'ranking' given; give exactly one",
        ),
        ({"prompt": "q", "responses": ["a", "b"], "scores": [1, float("nan")]}, "scores\\[1\\]"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [1, 0]}, "ranking\\[1\\] must be"),
        ({"prompt": "q", "responses": ["a"], "scores": [1]}, "at least two responses"),
        ({"responses": ["a", "b"], "scores": [1, 0]}, "row 1: missing key 'prompt'"),
        ({"prompt": "q", "responses": ["a", 3], "scores": [1, 0]}, "a string or a list of"),
        ({"prompt": "q", "responses": ["a", "b"], "scores": [1, "x"]}, "scores\\[1\\] must be"),
    ],
)
def test_bad_rows_are_one_line_errors(tok, tmp_path, row, message):
    good = {"prompt": "q", "responses": ["a", "b"], "scores": [1, 0], "ranking": None}
    with pytest.raises(UserError, match=message) as e:
        build(tok, tmp_path, [good, row])
    assert_one_line_error(e, "k.jsonl")


def test_pairs_mode_refuses_a_kwise_source(tok, tmp_path):
    rows = [{"prompt": "q", "responses": ["a", "b"], "scores": [1, 0]}]
    with pytest.raises(UserError) as e:
        build(tok, tmp_path, rows, preference_format="pairs")
    assert_one_line_error(e, "k.jsonl: a K-wise dataset (kwise format")
    with pytest.raises(UserError, match="preference_format must be one of pairs, kwise"):
        build(tok, tmp_path, rows, preference_format="lists")


def test_cache_hit_returns_equal_groups(tok, tmp_path):
    rows = [{"prompt": PROMPT, "responses": ANSWERS, "scores": [3, 0, 2, 1]}] * 2 + [
        {"prompt": PROMPT[1:], "responses": ["a", "b", "c"], "scores": [2, 1, 3]}
    ]
    first, s1 = build(tok, tmp_path, rows, seed=3, file="c.jsonl")
    second, s2 = build(tok, tmp_path, str(tmp_path / "c.jsonl"), seed=3)
    assert not s1["sources"][0]["cache_hit"] and s2["sources"][0]["cache_hit"]
    for name in ("offsets", "scores", "prompt_lengths"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    np.testing.assert_array_equal(first.responses.values, second.responses.values)
    np.testing.assert_array_equal(first.responses.offsets, second.responses.offsets)
    assert len(second) == 3 and second.pad_token_id == tok.pad_token_id


def test_vocabulary_and_identical_responses(tok, tmp_path, caplog):
    rows = [
        {"responses_input_ids": [[1, 2], [1, 3], [1, 2]], "scores": [2, 1, 0]},
        {"responses_input_ids": [[1, 2], [1, 99]], "scores": [1, 0]},
    ]
    with pytest.raises(UserError) as e:
        build(tok, tmp_path, rows, vocab_size=50)
    assert_one_line_error(e, "k.jsonl row 1: 'responses_input_ids[1]' holds token id 99")
    rows[1]["responses_input_ids"][1] = [1, 9]
    with caplog.at_level(logging.WARNING):
        _, stats = build(tok, tmp_path, rows, vocab_size=50, file="v.jsonl")
    assert stats["identical"] == 1 and stats["pairs"] == 4
    assert "train: 1 of 4 implied pairs (25.00%) join two responses with identical" in caplog.text
    with pytest.raises(UserError, match="all 1 train implied pairs join two responses"):
        build(tok, tmp_path, [{"responses_input_ids": [[1, 2], [1, 2]], "scores": [1, 0]}])


def test_worker_processes_give_the_serial_groups(tok, tmp_path, monkeypatch):
    rows = [
        {
            "prompt": f"Opposite of {w}?",
            "responses": ANSWERS[: 2 + i % 3],
            "ranking": [2, 1, 3, 4][: 2 + i % 3],
        }
        for i, w in enumerate(["up", "hot", "big", "left", "old", "wet"])
    ]
    serial, _ = build(tok, tmp_path, rows)
    prompt = [{"role": "user", "content": "Opposite of up?"}]  # a string prompt: one user turn
    assert_group(tok, serial, 0, prompt, ANSWERS[:2], [-2, -1])
    monkeypatch.setattr(tokenize_module, "ROWS_PER_PROCESS", 1)
    spawned, _ = build(tok, tmp_path, rows, num_proc=2, cache_dir=tmp_path / "c2")
    np.testing.assert_array_equal(spawned.responses.values, serial.responses.values)
    np.testing.assert_array_equal(spawned.offsets, serial.offsets)
    np.testing.assert_array_equal(spawned.scores, serial.scores)
    np.testing.assert_array_equal(spawned.prompt_lengths, serial.prompt_lengths)


def test_the_shipped_kwise_set_extends_the_shipped_pairs(tok, tmp_path):
    for kwise_file, pairs_file in (
        (TINY_KWISE_TRAIN_FILE, TINY_TRAIN_FILE),
        (TINY_KWISE_EVAL_FILE, TINY_EVAL_FILE),
    ):
        groups = [json.loads(line) for line in kwise_file.open()]
        pairs = [json.loads(line) for line in pairs_file.open()]
        assert len(groups) == len(pairs)
        for group, pair in zip(groups, pairs, strict=True):
            assert group["prompt"] == pair["chosen"][:-1] and sorted(group["scores"]) == [
                0,
                0,
                0,
                1,
            ]
            best = group["responses"][group["scores"].index(1)]
            assert best == pair["chosen"][-1]["content"]
            assert pair["rejected"][-1]["content"] in group["responses"]
            assert len(set(group["responses"])) == 4
    groups, stats = build(tok, tmp_path, str(TINY_KWISE_EVAL_FILE))
    assert (stats["groups"], stats["responses"], stats["pairs"]) == (400, 1600, 1200)
    assert stats["identical"] == 0 and sum(stats["filtered"].values()) == 0


def test_vectorized_pair_index_and_distinct_scores_match_the_loops():
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 6, size=200)
    groups = Groups.from_lists(
        [
            [[int(t) for t in rng.integers(0, 9, rng.integers(1, 5))] for _ in range(k)]
            for k in sizes
        ],
        [rng.integers(0, 3, k).astype(float).tolist() for k in sizes],
    )
    chosen, rejected, owner = groups.pair_index()
    loops = [
        (groups.offsets[g] + a, groups.offsets[g] + b, g)
        for g in range(len(groups))
        for a, b in groups.implied_pairs(g)
    ]
    assert len(loops) > 300
    np.testing.assert_array_equal(np.stack([chosen, rejected, owner], 1), np.array(loops))
    distinct = [len(set(groups.scores[groups.members(g)])) for g in range(len(groups))]
    np.testing.assert_array_equal(groups.distinct_scores(), distinct)
    np.testing.assert_array_equal(groups.pair_counts(), np.bincount(owner, minlength=200))
