"""`build_datasets`: mixer -> load -> detect format -> tokenize (cached) -> filter -> `Pairs`.

Cache: one entry per mixer source at `<cache_dir>/<key>/` (default `$JAXRM_CACHE_DIR` or
`~/.cache/jaxrm/tokenized`), keyed by a SHA-256 of the pipeline version, the tokenizer
(`tokenizer_fingerprint`: vocab, merges, added tokens, chat template, special tokens), the source
(local: resolved path, file sizes and mtimes; hub: name, split, `datasets` fingerprint), its amount
and split, and the mixer seed. A hit skips loading local files and all tokenization. Each entry
holds the distinct selected rows once plus the mixer's index into them (upsampled copies are not
stored twice). The length filter runs after the cache (it is cheap), so changing
`max_token_length` or `max_prompt_token_length` re-filters without re-tokenizing.

Filtering never truncates. Reasons are checked in order and each dropped pair counts once:
`prompt_too_long` (prompt with generation prompt > max_prompt_token_length; not checked for
pre-tokenized rows without `prompt_input_ids`), `chosen_too_long`, `rejected_too_long`
(> max_token_length), then, for packed batches (`pack`), `longer_than_pack_length` when the user
asked to drop such pairs (otherwise they are refused: `jaxrm.data.checks`).

Checked before any training (`jaxrm.data.checks`): with `vocab_size`, every token id of every
source is below it (an error names the file, row and id); pairs whose chosen and rejected are the
same tokens are counted in a warning (`identical` in the stats), and refused if that is all pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrm.data.checks import PackFit, check_identical, first_out_of_vocab, fit_pack_length
from jaxrm.data.formats import PRETOKENIZED, detect_format
from jaxrm.data.pairs import Pairs
from jaxrm.data.sources import (
    SourceSpec,
    fingerprint,
    is_local,
    load_source,
    mix_indices,
    parse_mixer,
)
from jaxrm.data.tokenize import pad_token_id, tokenize_rows, tokenizer_fingerprint
from jaxrm.errors import UserError

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: chat roles are checked against the template


def default_cache_dir() -> Path:
    return Path(os.environ.get("JAXRM_CACHE_DIR", "~/.cache/jaxrm/tokenized")).expanduser()


def build_datasets(
    *,
    dataset_mixer_list: Sequence[Any],
    dataset_mixer_list_splits: Sequence[str] = (),
    dataset_mixer_eval_list: Sequence[Any] = (),
    dataset_mixer_eval_list_splits: Sequence[str] = (),
    tokenizer: Any,
    max_token_length: int,
    max_prompt_token_length: int,
    seed: int,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    vocab_size: int | None = None,
    pack: PackFit | None = None,
) -> tuple[Pairs, Pairs | None, dict[str, Any]]:
    """Train pairs, eval pairs (None without an eval mixer) and stats
    `{"train": {...}, "eval": {...} | None}` (per source: name, split, amount, format, rows
    loaded, rows mixed, prompts that differ, cache hit; then rows, filtered counts, identical
    pairs, pairs). `vocab_size`: the model's embedding rows (token ids must be below it);
    `pack`: the packed row every pair must fit (None: padded batches)."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    tok_fp = tokenizer_fingerprint(tokenizer)
    limits = (max_token_length, max_prompt_token_length)
    common = dict(tokenizer=tokenizer, tok_fp=tok_fp, seed=seed, cache=cache, num_proc=num_proc)
    common.update(vocab_size=vocab_size, pack=pack)
    if pack is not None and pack.length < max_token_length:
        log.warning(
            "pack_length=%d is less than max_token_length=%d: a pair longer than one packed row "
            "is %s",
            pack.length,
            max_token_length,
            "dropped" if pack.drop else "refused before training",
        )
    train_specs = parse_mixer(dataset_mixer_list, dataset_mixer_list_splits, "dataset_mixer_list")
    if not train_specs:
        raise UserError("dataset_mixer_list is empty: name at least one training dataset")
    train, train_stats = _build("train", train_specs, limits, **common)
    eval_specs = parse_mixer(
        dataset_mixer_eval_list, dataset_mixer_eval_list_splits, "dataset_mixer_eval_list"
    )
    if not eval_specs:
        return train, None, {"train": train_stats, "eval": None}
    evals, eval_stats = _build("eval", eval_specs, limits, **common)
    return train, evals, {"train": train_stats, "eval": eval_stats}


def filter_pairs(
    pairs: Pairs, max_token_length: int, max_prompt_token_length: int
) -> tuple[Pairs, dict[str, int]]:
    """Drops pairs over the limits; counts per reason (first failing reason, in order)."""
    checks = {
        "prompt_too_long": pairs.prompt_lengths > max_prompt_token_length,
        "chosen_too_long": pairs.chosen.lengths() > max_token_length,
        "rejected_too_long": pairs.rejected.lengths() > max_token_length,
    }
    dropped = np.zeros(len(pairs), dtype=bool)
    counts = {}
    for reason, bad in checks.items():
        counts[reason] = int((bad & ~dropped).sum())
        dropped |= bad
    return pairs.take(np.flatnonzero(~dropped)), counts


def _build(
    what: str,
    specs: list[SourceSpec],
    limits: tuple[int, int],
    pack: PackFit | None = None,
    **common: Any,
) -> tuple[Pairs, dict[str, Any]]:
    parts, sources = [], []
    for spec in specs:
        pairs, stats = _source_pairs(spec, **common)
        parts.append(pairs)
        sources.append(stats)
        log.info(
            "%s source %s [%s, amount %s]: %s format, %d rows -> %d pairs%s",
            what,
            spec.name,
            spec.split,
            spec.amount,
            stats["format"],
            stats["rows_loaded"],
            stats["rows"],
            " (cached)" if stats["cache_hit"] else "",
        )
        if stats["prompt_differs"]:
            log.warning(
                "%s source %s: %d pairs have chosen and rejected prompts that differ",
                what,
                spec.name,
                stats["prompt_differs"],
            )
    mixed = Pairs.concat(parts, pad_token_id(common["tokenizer"]))
    max_len, max_prompt = limits
    kept, filtered = filter_pairs(mixed, max_len, max_prompt)
    limits_named = f"max_token_length={max_len} or max_prompt_token_length={max_prompt}"
    if pack is not None and len(kept):
        kept, dropped = fit_pack_length(kept, pack, what)
        if pack.drop:
            filtered["longer_than_pack_length"] = dropped
            limits_named = f"{limits_named} or pack_length={pack.length}"
    log.info("%s: %d pairs, dropped %s, kept %d", what, len(mixed), filtered, len(kept))
    if not len(kept):
        raise UserError(
            f"no {what} pairs left: all {len(mixed)} exceed {limits_named} ({filtered})"
        )
    identical = check_identical(kept, what)
    stats = {
        "sources": sources,
        "rows": len(mixed),
        "filtered": filtered,
        "identical": identical,
        "pairs": len(kept),
    }
    return kept, stats


def _source_pairs(
    spec: SourceSpec,
    *,
    tokenizer: Any,
    tok_fp: str,
    seed: int,
    cache: Path,
    num_proc: int | None,
    vocab_size: int | None,
) -> tuple[Pairs, dict[str, Any]]:
    """One mixer entry, from the cache or tokenized now (and then cached)."""
    dataset = None if is_local(spec.name) else load_source(spec)
    key_data = {
        "version": CACHE_VERSION,
        "tokenizer": tok_fp,
        "source": fingerprint(spec, dataset),
        "amount": spec.amount,
        "seed": seed,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:32]
    entry = cache / key
    where = f"{spec.name} entry of the dataset mixer"
    if (entry / "meta.json").exists():
        unique, meta = Pairs.load(entry)
        if vocab_size is not None:
            check_vocab(
                unique,
                vocab_size,
                spec.name,
                meta["format"],
                lambda: np.unique(mix_indices(meta["rows_loaded"], spec.amount, seed, where)),
            )
        index = np.load(entry / "index.npy")
        return unique.take(index), {**meta, "cache_hit": True}
    if dataset is None:
        dataset = load_source(spec)
    if not len(dataset):
        raise UserError(f"{spec.name}: the dataset has no rows")
    fmt = detect_format(spec.name, dataset.column_names, dataset[0])
    rows = mix_indices(len(dataset), spec.amount, seed, where)
    distinct, index = np.unique(rows, return_inverse=True)
    unique, differs = tokenize_rows(
        dataset,
        distinct,
        name=spec.name,
        fmt=fmt,
        tokenizer=tokenizer,
        num_proc=num_proc,
    )
    if vocab_size is not None:
        check_vocab(unique, vocab_size, spec.name, fmt, lambda: distinct)
    meta = {
        "name": spec.name,
        "split": spec.split,
        "amount": spec.amount,
        "format": fmt,
        "rows_loaded": len(dataset),
        "rows": len(rows),
        "prompt_differs": int(differs[index].sum()) if len(rows) else 0,
    }
    _save(entry, unique, index, meta)
    return unique.take(index), {**meta, "cache_hit": False}


def check_vocab(
    pairs: Pairs, vocab_size: int, name: str, fmt: str, rows: Callable[[], np.ndarray]
) -> None:
    """Refuses a token id >= `vocab_size` (data tokenized for another model would make every
    step non-finite), naming the file, the row (`rows()[pair]`: the dataset row of each pair)
    and the id."""
    found = first_out_of_vocab(pairs, vocab_size)
    if found is None:
        return
    pair, side, token = found
    column = f"{side}_input_ids" if fmt == PRETOKENIZED else side
    raise UserError(
        f"{name} row {int(rows()[pair])}: {column!r} holds token id {token}, but the model's "
        f"vocabulary has {vocab_size} tokens (ids 0-{vocab_size - 1}); was the data tokenized "
        "for another model?"
    )


def _save(entry: Path, unique: Pairs, index: np.ndarray, meta: dict[str, Any]) -> None:
    """Writes to a temporary directory and renames it, so a crash never leaves half an entry."""
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "index.npy", index)
    unique.save(tmp, meta)
    try:
        os.replace(tmp, entry)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
