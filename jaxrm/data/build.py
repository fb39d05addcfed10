"""`build_datasets`: mixer -> load -> detect format -> tokenize (cached) -> filter -> `Pairs`, or
with `preference_format="kwise"` -> `Groups` (K scored responses per prompt; pair sources become
groups of two).

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

K-wise filtering never truncates either: `prompt_too_long` drops a group, a response longer than
max_token_length is dropped (not its group) and counted in `responses_too_long` (responses), then
a group left with fewer than two distinct scores (nothing to compare) is dropped
(`fewer_than_two_scores`), then, packed, `longer_than_pack_length`: a group with an implied pair
(or, with `PackFit.whole_groups`, all of it) longer than a packed row. Group counts except
`responses_too_long`. The K-wise cache key adds the preference format and the UltraFeedback score
key, so pair entries stay valid.

Checked before any training (`jaxrm.data.checks`): with `vocab_size`, every token id of every
source is below it (an error names the file, row and id); pairs whose chosen and rejected are the
same tokens are counted in a warning (`identical` in the stats), and refused if that is all pairs
(for groups: implied pairs whose two responses are the same tokens).
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

from jaxrm.data.checks import (
    PackFit,
    check_identical,
    check_identical_groups,
    first_out_of_vocab,
    first_out_of_vocab_groups,
    fit_groups_pack_length,
    fit_pack_length,
)
from jaxrm.data.formats import (
    DEFAULT_ULTRAFEEDBACK_SCORE,
    KWISE_ONLY,
    KWISE_PRETOKENIZED,
    PRETOKENIZED,
    check_preference_format,
    detect_format,
)
from jaxrm.data.groups import Groups
from jaxrm.data.pairs import Pairs
from jaxrm.data.sources import (
    SourceSpec,
    fingerprint,
    is_local,
    load_source,
    mix_indices,
    parse_mixer,
)
from jaxrm.data.tokenize import (
    pad_token_id,
    tokenize_groups,
    tokenize_rows,
    tokenizer_fingerprint,
)
from jaxrm.errors import UserError

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: chat roles are checked against the template
PREFERENCE_FORMATS = ("pairs", "kwise")


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
    preference_format: str = "pairs",
    ultrafeedback_score: str = DEFAULT_ULTRAFEEDBACK_SCORE,
) -> tuple[Pairs | Groups, Pairs | Groups | None, dict[str, Any]]:
    """Train pairs, eval pairs (None without an eval mixer) and stats
    `{"train": {...}, "eval": {...} | None}` (per source: name, split, amount, format, rows
    loaded, rows mixed, prompts that differ, cache hit; then rows, filtered counts, identical
    pairs, pairs). `vocab_size`: the model's embedding rows (token ids must be below it);
    `pack`: the packed row every pair must fit (None: padded batches).

    `preference_format="kwise"`: `Groups` instead of `Pairs` (stats add `groups`, `responses`;
    `pairs` counts implied pairs; per source `margins_ignored`); `ultrafeedback_score`: the
    completion field UltraFeedback rows are scored by (`overall_score` or `fine-grained_score`)."""
    if preference_format not in PREFERENCE_FORMATS:
        raise UserError(
            f"preference_format must be one of {', '.join(PREFERENCE_FORMATS)}, "
            f"got {preference_format!r}"
        )
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    tok_fp = tokenizer_fingerprint(tokenizer)
    limits = (max_token_length, max_prompt_token_length)
    common = dict(tokenizer=tokenizer, tok_fp=tok_fp, seed=seed, cache=cache, num_proc=num_proc)
    common.update(vocab_size=vocab_size, pack=pack)
    common.update(preference_format=preference_format, ultrafeedback_score=ultrafeedback_score)
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


def filter_groups(
    groups: Groups, max_token_length: int, max_prompt_token_length: int
) -> tuple[Groups, dict[str, int]]:
    """Drops groups whose prompt is too long, then responses longer than `max_token_length`,
    then groups left with fewer than two distinct scores; counts each (see the module)."""
    long_prompt = groups.prompt_lengths > max_prompt_token_length
    groups = groups.take(np.flatnonzero(~long_prompt))
    long_response = groups.responses.lengths() > max_token_length
    groups = groups.keep_responses(~long_response)
    flat = groups.distinct_scores() < 2
    counts = {
        "prompt_too_long": int(long_prompt.sum()),
        "responses_too_long": int(long_response.sum()),
        "fewer_than_two_scores": int(flat.sum()),
    }
    return groups.take(np.flatnonzero(~flat)), counts


def _build(
    what: str,
    specs: list[SourceSpec],
    limits: tuple[int, int],
    pack: PackFit | None = None,
    **common: Any,
) -> tuple[Pairs | Groups, dict[str, Any]]:
    kwise = common["preference_format"] == "kwise"
    parts, sources = [], []
    for spec in specs:
        data, stats = _source(spec, **common)
        parts.append(data)
        sources.append(stats)
        log.info(
            "%s source %s [%s, amount %s]: %s format, %d rows -> %d %s%s",
            what,
            spec.name,
            spec.split,
            spec.amount,
            stats["format"],
            stats["rows_loaded"],
            stats["rows"],
            "groups" if kwise else "pairs",
            " (cached)" if stats["cache_hit"] else "",
        )
        if stats["prompt_differs"]:
            log.warning(
                "%s source %s: %d pairs have chosen and rejected prompts that differ",
                what,
                spec.name,
                stats["prompt_differs"],
            )
        if stats.get("margins_ignored"):
            log.warning(
                "%s source %s: %d rows carry a non-zero margin, which K-wise training ignores "
                "(a pair is a group of two scored 1 and 0)",
                what,
                spec.name,
                stats["margins_ignored"],
            )
    pad = pad_token_id(common["tokenizer"])
    mixed = Groups.concat(parts, pad) if kwise else Pairs.concat(parts, pad)
    max_len, max_prompt = limits
    if kwise:
        kept, filtered = filter_groups(mixed, max_len, max_prompt)
    else:
        kept, filtered = filter_pairs(mixed, max_len, max_prompt)
    unit = "groups" if kwise else "pairs"
    limits_named = f"max_token_length={max_len} or max_prompt_token_length={max_prompt}"
    if pack is not None and len(kept):
        fit = fit_groups_pack_length if kwise else fit_pack_length
        kept, dropped = fit(kept, pack, what)
        if pack.drop:
            filtered["longer_than_pack_length"] = dropped
            limits_named = f"{limits_named} or pack_length={pack.length}"
    log.info("%s: %d %s, dropped %s, kept %d", what, len(mixed), unit, filtered, len(kept))
    if not len(kept):
        reason = "were dropped by" if kwise else "exceed"
        raise UserError(
            f"no {what} {unit} left: all {len(mixed)} {reason} {limits_named} ({filtered})"
        )
    stats = {"sources": sources, "rows": len(mixed), "filtered": filtered}
    if kwise:
        stats["identical"] = check_identical_groups(kept, what)
        stats.update(groups=len(kept), responses=int(kept.offsets[-1]))
        stats["pairs"] = len(kept.pair_index()[0])
    else:
        stats.update(identical=check_identical(kept, what), pairs=len(kept))
    return kept, stats


def _source(
    spec: SourceSpec,
    *,
    tokenizer: Any,
    tok_fp: str,
    seed: int,
    cache: Path,
    num_proc: int | None,
    vocab_size: int | None,
    preference_format: str,
    ultrafeedback_score: str,
) -> tuple[Pairs | Groups, dict[str, Any]]:
    """One mixer entry, from the cache or tokenized now (and then cached)."""
    kwise = preference_format == "kwise"
    dataset = None if is_local(spec.name) else load_source(spec)
    key_data = {
        "version": CACHE_VERSION,
        "tokenizer": tok_fp,
        "source": fingerprint(spec, dataset),
        "amount": spec.amount,
        "seed": seed,
    }
    if kwise:
        key_data.update(preference_format="kwise", ultrafeedback_score=ultrafeedback_score)
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:32]
    entry = cache / key
    where = f"{spec.name} entry of the dataset mixer"
    if (entry / "meta.json").exists():
        unique, meta = (Groups if kwise else Pairs).load(entry)
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
    check_preference_format(spec.name, fmt, preference_format)
    rows = mix_indices(len(dataset), spec.amount, seed, where)
    distinct, index = np.unique(rows, return_inverse=True)
    extra, how = {}, dict(name=spec.name, fmt=fmt, tokenizer=tokenizer, num_proc=num_proc)
    if kwise:
        how["ultrafeedback_score"] = ultrafeedback_score
        unique, differs, margin = tokenize_groups(dataset, distinct, **how)
        extra["margins_ignored"] = int((margin[index] != 0).sum()) if len(rows) else 0
    else:
        unique, differs = tokenize_rows(dataset, distinct, **how)
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
        **extra,
    }
    _save(entry, unique, index, meta)
    return unique.take(index), {**meta, "cache_hit": False}


def check_vocab(
    data: Pairs | Groups, vocab_size: int, name: str, fmt: str, rows: Callable[[], np.ndarray]
) -> None:
    """Refuses a token id >= `vocab_size` (data tokenized for another model would make every
    step non-finite), naming the file, the row (`rows()[i]`: the dataset row of pair or group
    i), the column and the id."""
    if isinstance(data, Groups):
        found = first_out_of_vocab_groups(data, vocab_size)
        if found is None:
            return
        index, member, token = found
        column = _group_column(fmt, member)
    else:
        found = first_out_of_vocab(data, vocab_size)
        if found is None:
            return
        index, side, token = found
        column = f"{side}_input_ids" if fmt == PRETOKENIZED else side
    raise UserError(
        f"{name} row {int(rows()[index])}: {column!r} holds token id {token}, but the model's "
        f"vocabulary has {vocab_size} tokens (ids 0-{vocab_size - 1}); was the data tokenized "
        "for another model?"
    )


def _group_column(fmt: str, member: int) -> str:
    """Where response `member` of a group came from in a row of format `fmt`."""
    if fmt == KWISE_PRETOKENIZED:
        return f"responses_input_ids[{member}]"
    if fmt not in KWISE_ONLY:
        side = ("chosen", "rejected")[member]
        return f"{side}_input_ids" if fmt == PRETOKENIZED else side
    return f"response {member}"


def _save(entry: Path, unique: Pairs | Groups, index: np.ndarray, meta: dict[str, Any]) -> None:
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
