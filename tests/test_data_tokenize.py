"""Formats, chat-template tokenization, filtering, the tokenization cache, row errors."""

import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxrm.assets import TINY_EVAL_FILE, TINY_MODEL_DIR, TINY_TRAIN_FILE
from jaxrm.data import build_datasets, eval_batches, length_buckets, train_dataset, train_iterator
from jaxrm.errors import UserError

CONV = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Opposite of up?"},
    {"role": "assistant", "content": "down"},
    {"role": "user", "content": "And of left?"},
]
GOOD, BAD = "right", "blue"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build(tok, tmp_path, mixer, max_token_length=256, max_prompt_token_length=128, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("cache_dir", tmp_path / "cache")
    return build_datasets(
        dataset_mixer_list=mixer,
        tokenizer=tok,
        max_token_length=max_token_length,
        max_prompt_token_length=max_prompt_token_length,
        **kw,
    )


def assistant(text):
    return {"role": "assistant", "content": text}


def conversational_row(margin=None):
    row = {"chosen": [*CONV, assistant(GOOD)], "rejected": [*CONV, assistant(BAD)]}
    return row if margin is None else {**row, "margin": margin}


def test_tulu_template_layout(tok):
    ids = tok.apply_chat_template([*CONV, assistant(GOOD)], tokenize=True, return_dict=False)
    text = (
        "<|system|>\nAnswer briefly.\n<|user|>\nOpposite of up?\n<|assistant|>\ndown"
        "<|end_of_text|>\n<|user|>\nAnd of left?\n<|assistant|>\nright<|end_of_text|>"
    )
    assert ids == tok.encode(text, add_special_tokens=False)
    assert tok.bos_token_id not in ids
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 2


def test_formats_give_identical_ids(tok, tmp_path):
    prompt_list = {"prompt": CONV, "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]}
    files = {
        "conversational": [conversational_row(0.5)],
        "explicit_prompt": [{**prompt_list, "margin": 0.5}],
    }
    ref = build(tok, tmp_path, [write_jsonl(tmp_path / "c.jsonl", files["conversational"]), "1"])
    conv = ref[0]
    pre = {
        "chosen_input_ids": conv.chosen[0].tolist(),
        "rejected_input_ids": conv.rejected[0].tolist(),
        "prompt_input_ids": list(range(conv.prompt_lengths[0])),
        "margin": 0.5,
    }
    for fmt, rows in [*files.items(), ("pretokenized", [pre])]:
        pairs, _, stats = build(tok, tmp_path, [write_jsonl(tmp_path / f"{fmt}.jsonl", rows), "1"])
        assert stats["train"]["sources"][0]["format"] == fmt
        np.testing.assert_array_equal(pairs.chosen[0], conv.chosen[0])
        np.testing.assert_array_equal(pairs.rejected[0], conv.rejected[0])
        assert pairs.margin[0] == 0.5 and pairs.prompt_lengths[0] == conv.prompt_lengths[0]
    expected = tok.apply_chat_template([*CONV, assistant(GOOD)], tokenize=True, return_dict=False)
    np.testing.assert_array_equal(conv.chosen[0], expected)
    prompt = tok.apply_chat_template(CONV, add_generation_prompt=True, return_dict=False)
    assert conv.prompt_lengths[0] == len(prompt)


def test_string_prompt_and_completions(tok, tmp_path):
    row = {"prompt": "Opposite of up?", "chosen": "down", "rejected": "sideways"}
    pairs, _, stats = build(tok, tmp_path, [write_jsonl(tmp_path / "s.jsonl", [row]), "1"])
    conv = [{"role": "user", "content": "Opposite of up?"}, assistant("down")]
    expected = tok.apply_chat_template(conv, tokenize=True, return_dict=False)
    np.testing.assert_array_equal(pairs.chosen[0], expected)
    assert pairs.margin[0] == 0.0 and stats["train"]["sources"][0]["format"] == "explicit_prompt"


def test_differing_prompts_are_counted(tok, tmp_path):
    rejected = [{"role": "user", "content": "hm"}, assistant(BAD)]
    other = {**conversational_row(), "rejected": rejected}
    path = write_jsonl(tmp_path / "d.jsonl", [conversational_row(), other])
    _, _, stats = build(tok, tmp_path, [path, "2.0"])
    assert stats["train"]["sources"][0]["prompt_differs"] == 2


def test_filter_counts_exact(tok, tmp_path):
    def pre(prompt, chosen, rejected):
        return {
            "prompt_input_ids": [5] * prompt,
            "chosen_input_ids": [5] * chosen,
            "rejected_input_ids": [6] * rejected,
        }

    rows = (
        [pre(3, 10, 10)] * 5  # kept
        + [pre(4, 10, 10)] * 2  # kept: at both limits
        + [pre(5, 10, 10)] * 3  # prompt too long
        + [pre(5, 11, 11)] * 1  # prompt too long (first reason only)
        + [pre(2, 11, 3)] * 4  # chosen too long
        + [pre(2, 3, 12)] * 6  # rejected too long
    )
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    pairs, _, stats = build(tok, tmp_path, [path, "1.0"], 10, 4)
    assert stats["train"]["filtered"] == {
        "prompt_too_long": 4,
        "chosen_too_long": 4,
        "rejected_too_long": 6,
    }
    assert len(pairs) == stats["train"]["pairs"] == 7 and stats["train"]["rows"] == 21
    with pytest.raises(UserError, match="max_token_length=2 or max_prompt_token_length=1"):
        build(tok, tmp_path, [path, "1.0"], 2, 1)


def test_cache_hit_and_miss(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [conversational_row(), conversational_row(1.0)] * 3)
    first, _, s1 = build(tok, tmp_path, [path, "0.5"])
    second, _, s2 = build(tok, tmp_path, [path, "0.5"], max_token_length=200)
    assert not s1["train"]["sources"][0]["cache_hit"] and s2["train"]["sources"][0]["cache_hit"]
    np.testing.assert_array_equal(first.chosen.values, second.chosen.values)
    np.testing.assert_array_equal(first.margin, second.margin)

    def fail(*args, **kwargs):
        raise AssertionError("tokenized although cached")

    no_tokenizing = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    no_tokenizing.apply_chat_template = fail
    build(no_tokenizing, tmp_path, [path, "0.5"])
    _, _, s3 = build(tok, tmp_path, [path, "0.5"], seed=1)
    assert not s3["train"]["sources"][0]["cache_hit"]
    templated = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    templated.chat_template = tok.chat_template.replace("<|user|>", "<|user|> ")
    assert not build(templated, tmp_path, [path, "0.5"])[2]["train"]["sources"][0]["cache_hit"]
    os.utime(path, ns=(1, 1))
    assert not build(tok, tmp_path, [path, "0.5"])[2]["train"]["sources"][0]["cache_hit"]


def test_a_whole_cached_source_is_read_in_place(tok, tmp_path):
    """Amount 1.0 of one source, nothing filtered: the cached arrays stay memory-mapped (no copy
    of every token on each run); an upsampled source is gathered."""
    path = write_jsonl(tmp_path / "c.jsonl", [conversational_row(), conversational_row(1.0)] * 2)
    fresh, _, _ = build(tok, tmp_path, [path, "1.0"])
    cached, _, stats = build(tok, tmp_path, [path, "1.0"])
    assert stats["train"]["sources"][0]["cache_hit"]
    assert isinstance(cached.chosen.values, np.memmap)
    assert isinstance(cached.rejected.values, np.memmap)
    np.testing.assert_array_equal(cached.chosen.values, fresh.chosen.values)
    upsampled, _, _ = build(tok, tmp_path, [path, "2.0"])
    assert len(upsampled) == 8 and not isinstance(upsampled.chosen.values, np.memmap)
    np.testing.assert_array_equal(upsampled.chosen[5], fresh.chosen[1])


@pytest.mark.parametrize(
    "row, match",
    [
        ({"chosen": [], "rejected": []}, r"row 1: 'chosen' is an empty message list"),
        ({"chosen": [{"content": "x"}], "rejected": []}, r"row 1: chosen\[0\] has no 'role'"),
        (
            {"chosen": [{"role": "user"}, assistant("a")], "rejected": []},
            r"row 1: chosen\[0\] has no 'content'",
        ),
        (
            {"chosen": [{"role": "user", "content": 5}, assistant("a")], "rejected": []},
            r"row 1: chosen\[0\].content must be a string, got int",
        ),
        (
            {"chosen": [assistant("a")], "rejected": [{"role": "user", "content": "q"}]},
            r"row 1: the last message of 'rejected' is from 'user', not 'assistant'",
        ),
        ({"chosen": [assistant("a")]}, r"missing (column|key) 'rejected'"),
        (
            {
                "chosen": [{"role": "human", "content": "q"}, assistant("a")],
                "rejected": [{"role": "human", "content": "q"}, assistant("b")],
            },
            r"row 1: chosen\[0\] has role 'human', which the tokenizer's chat template drops",
        ),
        ({"text": "hello"}, r"unknown preference format"),
    ],
)
def test_row_errors(tok, tmp_path, row, match):
    first = conversational_row() if "chosen" in row else {"text": "first"}
    path = write_jsonl(tmp_path / "bad.jsonl", [first, row])
    with pytest.raises(UserError, match=match) as e:
        build(tok, tmp_path, [path, "1.0"])
    assert "\n" not in str(e.value) and "bad.jsonl" in str(e.value)


def test_dataset_level_errors(tok, tmp_path):
    cases = [
        ([{"chosen": [assistant("a")]}], r"x.jsonl: missing column 'rejected'"),
        ([{"chosen": "a", "rejected": "b"}], r"x.jsonl: column 'chosen' holds strings"),
        ([{"chosen_input_ids": [1]}], r"x.jsonl: missing column 'rejected_input_ids'"),
        ([], r"x.jsonl: the dataset has no rows"),
    ]
    for rows, match in cases:
        path = write_jsonl(tmp_path / "x.jsonl", rows)
        with pytest.raises(UserError, match=match):
            build(tok, tmp_path, [path, "1.0"])


def test_tiny_prefs_end_to_end(tok, tmp_path):
    train, evals, stats = build(
        tok,
        tmp_path,
        [str(TINY_TRAIN_FILE), "1.0"],
        dataset_mixer_eval_list=[str(TINY_EVAL_FILE), "1.0"],
        num_proc=2,  # the train file is just big enough for two tokenizing processes
    )
    assert stats["train"]["sources"][0]["format"] == "conversational"
    serial, _, _ = build(tok, tmp_path, [str(TINY_TRAIN_FILE), "1.0"], cache_dir=tmp_path / "c2")
    for got, want in ((train.chosen, serial.chosen), (train.rejected, serial.rejected)):
        np.testing.assert_array_equal(got.values, want.values)
        np.testing.assert_array_equal(got.offsets, want.offsets)
    assert len(train) == stats["train"]["pairs"] > 0 and len(evals) == stats["eval"]["pairs"] > 0
    buckets = length_buckets(256)
    batch = next(
        train_iterator(
            train_dataset(
                train, global_pairs_per_micro_batch=8, grad_accum_steps=2, seed=0, buckets=buckets
            )
        )
    )
    assert batch["input_ids"].shape[:2] == (2, 16) and batch["input_ids"].shape[2] in buckets
    rows = batch["input_ids"][batch["attention_mask"] == 1]
    assert tok.bos_token_id not in rows and tok.pad_token_id not in rows
    last = batch["input_ids"][0, np.arange(16), batch["lengths"][0] - 1]
    assert (last == tok.eos_token_id).all()
    weights = [b["weight"].sum() for b in eval_batches(evals, global_pairs_per_batch=64)]
    assert sum(weights) == len(evals)
