"""Regenerate the shipped tiny offline assets under ``jaxrm/assets/``.

    python scripts/make_tiny_assets.py
    python scripts/make_tiny_assets.py --kwise-only   # only the K-wise set, from the shipped pairs

Writes, deterministically (fixed seeds, no network):

* ``jaxrm/assets/tiny-prefs/{train,eval}.jsonl``: a tiny conversational preference dataset.
* ``jaxrm/assets/tiny-kwise/{train,eval}.jsonl``: the same prompts as K-wise rows (``prompt``,
  ``responses``, ``scores``): each pair's chosen and rejected plus two more wrong answers drawn
  from the rejected answer's pool, in the pair's response template, in a seeded order; the right
  answer scores 1, the three wrong ones 0 (best-of-4, as RewardBench 2).
* ``jaxrm/assets/tiny-llama/``: a byte-level BPE tokenizer trained on that data (Tulu chat
  template, ``<pad>`` distinct from eos, no BOS added) and a randomly initialised 2-layer
  ``LlamaForCausalLM`` (float32 safetensors) standing in for the SFT checkpoint.

Dataset task design. In every pair chosen and rejected responses are drawn from the same marginal
distribution (and share one response template), and only the prompt tells which one is right, so a
model that reads the response alone stays at chance while one that reads both can learn it:

* ``category`` (45%): "Name one fruit." -> chosen an item of that category, rejected an item of
  another category (6 categories x 8 items).
* ``color`` (45%): "The cup is red. What color is the cup?" -> chosen the stated color, rejected
  another of the 8 colors.
* ``opposite`` (10%): "What is the opposite of hot?" -> chosen the antonym, rejected the antonym
  of another item (8 antonym pairs).

About 10% of the rows carry a system message, another ~10% a multi-turn prompt (an earlier,
correctly answered exchange). Eval rows are fresh draws from the same generator (seeded apart from
train): most are new (template, item, object, color, response-form, system/multi-turn) combinations
never seen in train. An earlier version held out whole phrasings and combinations; that measured
compositional generalization of a 2-layer model rather than the trainer, and planted spurious
"this item is never right after this wording" correlations in train, so it was dropped.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "jaxrm" / "assets"
MODEL_DIR = ASSETS / "tiny-llama"
PREFS_DIR = ASSETS / "tiny-prefs"
KWISE_DIR = ASSETS / "tiny-kwise"
KWISE_RESPONSES = 4

SEED = 1234
N_TRAIN = 4000
N_EVAL = 400
VOCAB_TARGET = 1024

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<pad>"

# open-instruct's "tulu" chat template, verbatim.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}"
    "{{ '<|assistant|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
)

CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango peach pear".split(),
    "animal": "tiger rabbit horse zebra otter koala camel mouse".split(),
    "tool": "hammer wrench shovel saw drill chisel ladder rake".split(),
    "vehicle": "car truck bus train boat plane bike tram".split(),
    "instrument": "violin guitar drum flute piano harp cello trumpet".split(),
    "landscape": "beach forest desert river island valley canyon meadow".split(),
}
CATS = list(CATEGORIES)
COLORS = "red blue green yellow purple black white pink".split()
OBJECTS = "ball cup hat door box kite chair lamp".split()
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("happy", "sad"),
    ("wet", "dry"),
    ("full", "empty"),
    ("loud", "quiet"),
]
OPPOSITE = {a: b for a, b in OPPOSITES} | {b: a for a, b in OPPOSITES}
ITEMS = [w for pair in OPPOSITES for w in pair]
WORDS = sorted({w for ws in CATEGORIES.values() for w in ws} | set(COLORS) | set(OBJECTS))
ALL_ANSWERS = {w for ws in CATEGORIES.values() for w in ws} | set(COLORS) | set(ITEMS)

CATEGORY_TEMPLATES = [
    "Name one {c}.",
    "Give me one {c}, please.",
    "Which {c} comes to mind?",
    "Say any {c}.",
    "Tell me the name of some {c}.",
]
COLOR_TEMPLATES = [
    "The {o} is {c}. What color is the {o}?",
    "I painted the {o} {c}. Which color did I use?",
    "My {o} is {c}. What color is my {o}?",
]
OPPOSITE_TEMPLATES = [
    "What is the opposite of {x}?",
    "Give me the opposite of the word {x}.",
    "Opposite of {x}?",
]
# The response template is shared by chosen and rejected, so only the word differs.
RESPONSE_TEMPLATES = ["{r}", "{r}.", "The answer is {r}.", "Sure: {r}"]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "Answer with one word.",
    "Be brief.",
]


def _template(rng: random.Random, templates: list[str], split: str) -> str:
    """Train and eval draw from the same phrasings (see the module docstring)."""
    del split
    return rng.choice(templates)


def _task(rng: random.Random, split: str) -> tuple[str, str, str]:
    """One (user prompt, correct answer, wrong answer); both answers share one marginal."""
    kind = rng.random()
    if kind < 0.45:
        # category: chosen is an item of the asked category, rejected one of another category
        c = rng.choice(CATS)
        prompt = _template(rng, CATEGORY_TEMPLATES, split).format(c=c)
        other = _other(rng, CATS, {c})
        return prompt, rng.choice(CATEGORIES[c]), rng.choice(CATEGORIES[other])
    if kind < 0.9:
        # color recall: chosen repeats the stated color, rejected names another color
        o, c = rng.choice(OBJECTS), rng.choice(COLORS)
        prompt = _template(rng, COLOR_TEMPLATES, split).format(o=o, c=c)
        return prompt, c, _other(rng, COLORS, {c})
    # opposite: chosen is the antonym, rejected the antonym of another item
    x = rng.choice(ITEMS)
    y = _other(rng, ITEMS, {x, OPPOSITE[x]})
    return _template(rng, OPPOSITE_TEMPLATES, split).format(x=x), OPPOSITE[x], OPPOSITE[y]


def _other(rng: random.Random, pool: list[str], exclude: set[str]) -> str:
    while True:
        w = rng.choice(pool)
        if w not in exclude:
            return w


def make_pair(rng: random.Random, split: str) -> dict:
    prompt, good, bad = _task(rng, split)
    rt = rng.choice(RESPONSE_TEMPLATES)
    messages: list[dict] = []
    u = rng.random()
    if u < 0.1:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    elif u < 0.2:
        # A multi-turn prompt: an earlier, correctly answered exchange before the real question.
        p0, g0, _ = _task(rng, "train")
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": p0})
        answer = rng.choice(RESPONSE_TEMPLATES).format(r=g0)
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": prompt})
    return {
        "chosen": messages + [{"role": "assistant", "content": rt.format(r=good)}],
        "rejected": messages + [{"role": "assistant", "content": rt.format(r=bad)}],
    }


def _split_response(text: str) -> tuple[str, str]:
    """(response template, word) of a generated response."""
    for template in sorted(RESPONSE_TEMPLATES, key=len, reverse=True):
        prefix, suffix = template.split("{r}")
        word = text[len(prefix) : len(text) - len(suffix)]
        if text.startswith(prefix) and text.endswith(suffix) and word in ALL_ANSWERS:
            return template, word
    raise ValueError(f"not a generated response: {text!r}")


def _wrong_pool(good: str) -> list[str]:
    """The answers that are wrong where `good` is right, as `_task` draws its rejected one."""
    if good in COLORS:
        return [c for c in COLORS if c != good]
    if good in OPPOSITE:
        return [w for w in ITEMS if w not in (good, OPPOSITE[good])]
    category = next(c for c, items in CATEGORIES.items() if good in items)
    return [w for c in CATS if c != category for w in CATEGORIES[c]]


def make_group(pair: dict, rng: random.Random) -> dict:
    """A K-wise row from a pair (see the module docstring)."""
    template, good = _split_response(pair["chosen"][-1]["content"])
    _, bad = _split_response(pair["rejected"][-1]["content"])
    extra = rng.sample([w for w in _wrong_pool(good) if w != bad], KWISE_RESPONSES - 2)
    answers = [(good, 1), (bad, 0)] + [(w, 0) for w in extra]
    rng.shuffle(answers)
    return {
        "prompt": pair["chosen"][:-1],
        "responses": [template.format(r=w) for w, _ in answers],
        "scores": [score for _, score in answers],
    }


def make_kwise(train: list[dict], evals: list[dict]) -> tuple[list[dict], list[dict]]:
    rng = random.Random(f"{SEED}-kwise")
    return [make_group(p, rng) for p in train], [make_group(p, rng) for p in evals]


def write_kwise() -> None:
    """The K-wise set from the shipped pairs (the tokenizer and model stay as they are)."""
    train, evals = (
        [json.loads(line) for line in (PREFS_DIR / f"{split}.jsonl").open()]
        for split in ("train", "eval")
    )
    KWISE_DIR.mkdir(exist_ok=True)
    for split, rows in zip(("train", "eval"), make_kwise(train, evals), strict=True):
        write_jsonl(KWISE_DIR / f"{split}.jsonl", rows)


def make_dataset() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    train = [make_pair(rng, "train") for _ in range(N_TRAIN)]
    evals = [make_pair(rng, "eval") for _ in range(N_EVAL)]
    return train, evals


def render(messages: list[dict]) -> str:
    """Python mirror of the Tulu template (used only to build the tokenizer's training corpus)."""
    out = []
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "system":
            out.append("<|system|>\n" + m["content"] + "\n")
        elif m["role"] == "user":
            out.append("<|user|>\n" + m["content"] + "\n")
        else:
            out.append("<|assistant|>\n" + m["content"] + EOS + ("" if last else "\n"))
    return "".join(out)


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # No post-processor: encoding never adds BOS/EOS (Tulu adds no BOS).
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=TULU_CHAT_TEMPLATE,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = -(-len(tokenizer) // 8) * 8
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main() -> None:
    if "--kwise-only" in sys.argv[1:]:
        write_kwise()
        return
    train, evals = make_dataset()
    for d in (MODEL_DIR, PREFS_DIR, KWISE_DIR):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    write_jsonl(PREFS_DIR / "train.jsonl", train)
    write_jsonl(PREFS_DIR / "eval.jsonl", evals)
    write_kwise()

    texts = [render(r[k]) for r in train for k in ("chosen", "rejected")]
    tokenizer = build_tokenizer(texts)
    model = build_model(tokenizer)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(MODEL_DIR)
    for f in MODEL_DIR.iterdir():
        f.chmod(0o644)  # save_pretrained may write the weights 0600

    lengths = [
        len(tokenizer.apply_chat_template(r[k], tokenize=True, return_dict=False))
        for r in train + evals
        for k in ("chosen", "rejected")
    ]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"words={len(WORDS)} items={len(ITEMS)} tokenizer={len(tokenizer)} params={n_params}")
    print(f"train={len(train)} eval={len(evals)} max_len={max(lengths)}")
    for p in sorted(ASSETS.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(ROOT)}  {p.stat().st_size}")


if __name__ == "__main__":
    main()
