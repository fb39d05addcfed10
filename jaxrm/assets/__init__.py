"""Shipped tiny offline assets (regenerate with ``python scripts/make_tiny_assets.py``).

* ``TINY_MODEL_DIR``: a random-init 2-layer ``LlamaForCausalLM`` (float32 safetensors) with its
  byte-level BPE tokenizer (Tulu chat template, ``<pad>`` != eos, no BOS added).
* ``TINY_PREFS_DIR``: a conversational preference set (``train.jsonl``, ``eval.jsonl``) that is
  learnable only by reading both the prompt and the response.
* ``TINY_KWISE_DIR``: the same prompts as K-wise rows (``prompt``, ``responses``, ``scores``):
  the pair's chosen and rejected plus two more wrong answers, the right one scored 1.
* ``ARCHITECTURES_DIR``: copies of the config.json of hub models the shipped configs name (no
  weights), so that ``scripts/memory_plan.py`` and ``jaxrm.devices`` can plan them offline.
* ``BENCHMARK_FIXTURES``: tiny stand-ins for RewardBench and RewardBench 2 in their exact schemas,
  every subset covered (regenerate with ``python scripts/make_benchmark_fixtures.py``).
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
ARCHITECTURES_DIR = ASSETS_DIR / "architectures"
TINY_MODEL_DIR = ASSETS_DIR / "tiny-llama"
TINY_PREFS_DIR = ASSETS_DIR / "tiny-prefs"
TINY_TRAIN_FILE = TINY_PREFS_DIR / "train.jsonl"
TINY_EVAL_FILE = TINY_PREFS_DIR / "eval.jsonl"
TINY_KWISE_DIR = ASSETS_DIR / "tiny-kwise"
TINY_KWISE_TRAIN_FILE = TINY_KWISE_DIR / "train.jsonl"
TINY_KWISE_EVAL_FILE = TINY_KWISE_DIR / "eval.jsonl"
BENCHMARK_FIXTURES = {
    "rewardbench": ASSETS_DIR / "benchmarks" / "rewardbench.jsonl",
    "rewardbench2": ASSETS_DIR / "benchmarks" / "rewardbench2.jsonl",
}

__all__ = [
    "ARCHITECTURES_DIR",
    "ASSETS_DIR",
    "BENCHMARK_FIXTURES",
    "TINY_EVAL_FILE",
    "TINY_KWISE_DIR",
    "TINY_KWISE_EVAL_FILE",
    "TINY_KWISE_TRAIN_FILE",
    "TINY_MODEL_DIR",
    "TINY_PREFS_DIR",
    "TINY_TRAIN_FILE",
]
