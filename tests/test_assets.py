"""The shipped tiny assets: tokenizer, checkpoint config and preference data (seconds, offline)."""

import json
import re
import zlib

import numpy as np
import pytest
from transformers import AutoConfig, AutoTokenizer

from jaxrm.assets import TINY_EVAL_FILE, TINY_MODEL_DIR, TINY_PREFS_DIR, TINY_TRAIN_FILE

# open-instruct's "tulu" chat template, verbatim.
TULU_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Repeat the word apple."},
    {"role": "assistant", "content": "apple"},
    {"role": "user", "content": "What is the opposite of hot?"},
    {"role": "assistant", "content": "The answer is cold."},
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR, local_files_only=True)


def _rows(path):
    return [json.loads(line) for line in path.open()]


@pytest.fixture(scope="module")
def train_rows():
    return _rows(TINY_TRAIN_FILE)


@pytest.fixture(scope="module")
def eval_rows():
    return _rows(TINY_EVAL_FILE)


def test_paths_exist():
    assert TINY_MODEL_DIR.is_dir() and TINY_PREFS_DIR.is_dir()
    assert (TINY_MODEL_DIR / "model.safetensors").is_file()
    assert (TINY_MODEL_DIR / "tokenizer.json").is_file()
    assert TINY_TRAIN_FILE.is_file() and TINY_EVAL_FILE.is_file()


def test_special_tokens(tok):
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token == "<|end_of_text|>"
    assert tok.pad_token == "<pad>"
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    # Plain encoding adds no special token at all.
    assert tok("hello world")["input_ids"] == tok.encode("hello world", add_special_tokens=False)
    assert tok.bos_token_id not in tok("hello world")["input_ids"]


def test_chat_template_is_tulu(tok):
    assert tok.chat_template == TULU_TEMPLATE
    text = tok.apply_chat_template(CONVO, tokenize=False)
    assert text == (
        "<|system|>\nBe brief.\n"
        "<|user|>\nRepeat the word apple.\n"
        "<|assistant|>\napple<|end_of_text|>\n"
        "<|user|>\nWhat is the opposite of hot?\n"
        "<|assistant|>\nThe answer is cold.<|end_of_text|>"
    )
    prompt = tok.apply_chat_template(CONVO[:-1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith(
        "<|user|>\nWhat is the opposite of hot?\n<|assistant|>\n"
    )


def test_chat_template_ids(tok):
    ids = tok.apply_chat_template(CONVO, tokenize=True, return_dict=False)
    assert ids[-1] == tok.eos_token_id
    assert tok.bos_token_id not in ids
    assert tok.pad_token_id not in ids
    assert ids.count(tok.eos_token_id) == 2  # one per assistant turn, each a single token
    assert tok.decode(ids) == tok.apply_chat_template(CONVO, tokenize=False)
    # Tokenizing the rendered text again gives the same ids (no BOS slipped in).
    assert tok(tok.decode(ids))["input_ids"] == ids


def test_tiny_llama_config(tok):
    cfg = AutoConfig.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    assert cfg.model_type == "llama"
    assert cfg.vocab_size >= len(tok) and cfg.vocab_size % 8 == 0
    assert cfg.pad_token_id == tok.pad_token_id
    assert cfg.eos_token_id == tok.eos_token_id
    assert cfg.bos_token_id == tok.bos_token_id
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert not cfg.tie_word_embeddings


@pytest.mark.parametrize("split", ["train", "eval"])
def test_rows_valid(split, train_rows, eval_rows, tok):
    rows = train_rows if split == "train" else eval_rows
    assert len(rows) >= (1000 if split == "train" else 100)
    for row in rows:
        chosen, rejected = row["chosen"], row["rejected"]
        assert chosen[:-1] == rejected[:-1]
        assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
        assert chosen[-2]["role"] == "user"
        assert chosen[-1]["content"] != rejected[-1]["content"]
        assert all(m["role"] in ("system", "user", "assistant") for m in chosen)
    # Some rows exercise system messages and multi-turn prompts.
    n_sys = sum(r["chosen"][0]["role"] == "system" for r in rows)
    n_multi = sum(len([m for m in r["chosen"] if m["role"] == "user"]) > 1 for r in rows)
    assert n_sys > 0.03 * len(rows) and n_multi > 0.03 * len(rows)
    # Every pair is short once tokenized.
    for row in rows[:300]:
        for key in ("chosen", "rejected"):
            assert len(tok.apply_chat_template(row[key], return_dict=False)) <= 64


def test_eval_pairs_mostly_unseen(train_rows, eval_rows):
    # Eval is not a copy of train: most eval pairs never occur in train.
    train_pairs = {json.dumps(r) for r in train_rows}
    unseen = sum(json.dumps(r) not in train_pairs for r in eval_rows)
    assert unseen >= 0.8 * len(eval_rows)


# -- a cheap learner: pairwise (Bradley-Terry) logistic regression on hashed features -----------

DIM = 4096


def _words(text):
    return re.findall(r"[a-z]+", text.lower())


def _h(s):
    return zlib.crc32(s.encode()) % DIM


def _response_features(msgs):
    v = np.zeros(DIM, np.float32)
    for w in _words(msgs[-1]["content"]):
        v[_h("r:" + w)] += 1
    return v


def _match_features(msgs):
    v = np.zeros(DIM, np.float32)
    for p in _words(msgs[-2]["content"]):
        for w in _words(msgs[-1]["content"]):
            v[_h(p + "|" + w)] += 1
    return v


def _bt_accuracy(featurize, train_rows, eval_rows):
    def diffs(rows):
        return np.stack([featurize(r["chosen"]) - featurize(r["rejected"]) for r in rows])

    x, xe = diffs(train_rows), diffs(eval_rows)
    w = np.zeros(DIM, np.float32)
    for _ in range(200):  # full-batch gradient descent on mean -log sigmoid(w . x)
        p = 1.0 / (1.0 + np.exp(np.clip(x @ w, -30, 30)))  # sigmoid(-margin)
        w += 0.5 * (x.T @ p) / len(x)
    margin = xe @ w
    return float(np.mean(np.where(margin == 0, 0.5, margin > 0)))


def test_response_only_is_chance_but_prompt_and_response_is_learnable(train_rows, eval_rows):
    acc_resp = _bt_accuracy(_response_features, train_rows, eval_rows)
    acc_match = _bt_accuracy(_match_features, train_rows, eval_rows)
    assert 0.4 <= acc_resp <= 0.6, acc_resp
    assert acc_match >= 0.85, acc_match
