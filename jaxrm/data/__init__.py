"""Preference data: load and mix sources, detect formats, tokenize once (cached), filter, batch.

    train, evals, stats = build_datasets(
        dataset_mixer_list=["prefs.jsonl", "1.0"], tokenizer=tok,
        max_token_length=4096, max_prompt_token_length=2048, seed=8)
    it = train_iterator(train_dataset(train, global_pairs_per_micro_batch=64, grad_accum_steps=4,
                                      seed=8, buckets=length_buckets(4096)))
    batch = to_global(next(it), mesh)

Modules: `sources` (load + mixer), `formats` (detect + validate), `tokenize` (chat template),
`build` (cache + filter + stats), `pairs` (ragged arrays), `groups` (K-wise: K scored responses
per prompt), `loader` (grain batches), `batch` (the batch contract and its global arrays).
"""

import importlib
from typing import Any

_EXPORTS = {
    "build_datasets": "build",
    "default_cache_dir": "build",
    "filter_groups": "build",
    "filter_pairs": "build",
    "eval_batches": "loader",
    "length_buckets": "loader",
    "steps_per_epoch": "loader",
    "to_global": "batch",
    "train_dataset": "loader",
    "train_iterator": "loader",
    "Groups": "groups",
    "PackFit": "checks",
    "Pairs": "pairs",
    "Ragged": "pairs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Imports lazily, so tokenizing worker processes do not import jax, grain or datasets."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxrm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jaxrm.data.{_EXPORTS[name]}"), name)
