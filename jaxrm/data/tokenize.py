"""Tokenization with the tokenizer's chat template, exactly once per conversation.

`apply_chat_template(conversations, tokenize=True)` renders and tokenizes in one call with
`add_special_tokens=False`, so a template that adds no BOS (Tulu) gets none, and one that writes
its own BOS gets exactly one: template text is never re-tokenized with special tokens added. The
prompt is tokenized once more with `add_generation_prompt=True`, only for its length (the prompt
filter). Every message role is checked once against the template: a role that the template drops
without a trace (e.g. 'human' or 'tool' in a template that only knows system/user/assistant) is an
error naming the row, not silently missing text.

Big datasets are tokenized by `num_proc` *spawned* worker processes (forking a process that runs
JAX or gRPC threads can deadlock), each given contiguous row blocks as arrow tables; a tqdm bar
counts rows. Workers re-import this module, so a calling script needs the usual
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from jaxrm.data.formats import (
    DEFAULT_ULTRAFEEDBACK_SCORE,
    PRETOKENIZED,
    TOKEN_ID_FORMATS,
    Example,
    Group,
    normalize,
    normalize_group,
)
from jaxrm.data.groups import Groups
from jaxrm.data.pairs import Pairs, Ragged
from jaxrm.errors import UserError
from jaxrm.tokenizer import check_roles

if TYPE_CHECKING:
    import datasets

ROWS_PER_PROCESS = 2000  # below this many rows per worker, spawning workers costs more
BATCH_ROWS = 256  # rows rendered and tokenized per call (the Rust tokenizer batches internally)

Columns = tuple[Ragged, Ragged, np.ndarray, np.ndarray, np.ndarray]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that changes token ids: vocab/merges/added tokens, chat template,
    special tokens and the tokenizer class."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "class": type(tokenizer).__name__,
        "chat_template": tokenizer.chat_template,
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "pad_token_id": tokenizer.pad_token_id,
    }
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def pad_token_id(tokenizer: Any) -> int:
    """The padding value (only ever masked out; 0 if the tokenizer has no pad token)."""
    return 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)


def tokenize_rows(
    dataset: datasets.Dataset,
    rows: np.ndarray,
    *,
    name: str,
    fmt: str,
    tokenizer: Any,
    num_proc: int | None,
) -> tuple[Pairs, np.ndarray]:
    """Tokenizes `dataset` rows `rows` -> (pairs in that order, per pair: prompts differ)."""
    parts = _map_blocks(dataset, rows, _Tokenize(name, fmt, tokenizer), num_proc, "pairs")
    chosen, rejected, margin, prompt_lengths, differs = zip(*parts, strict=True)
    pairs = Pairs(
        Ragged.concat(list(chosen)),
        Ragged.concat(list(rejected)),
        np.concatenate(margin),
        np.concatenate(prompt_lengths),
        pad_token_id(tokenizer),
    )
    return pairs, np.concatenate(differs)


def tokenize_groups(
    dataset: datasets.Dataset,
    rows: np.ndarray,
    *,
    name: str,
    fmt: str,
    tokenizer: Any,
    num_proc: int | None,
    ultrafeedback_score: str = DEFAULT_ULTRAFEEDBACK_SCORE,
) -> tuple[Groups, np.ndarray, np.ndarray]:
    """Tokenizes `dataset` rows `rows` of any format as K-wise groups -> (groups in that order,
    per group: prompts differ, per group: the margin a pair row carried)."""
    tokenize = _TokenizeGroups(name, fmt, tokenizer, ultrafeedback_score)
    parts = _map_blocks(dataset, rows, tokenize, num_proc, "groups")
    responses, sizes, scores, prompt_lengths, differs, margin = zip(*parts, strict=True)
    sizes = np.concatenate(sizes)
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    groups = Groups(
        Ragged.concat(list(responses)),
        offsets,
        np.concatenate(scores),
        np.concatenate(prompt_lengths),
        pad_token_id(tokenizer),
    )
    return groups, np.concatenate(differs), np.concatenate(margin)


def _map_blocks(
    dataset: datasets.Dataset, rows: np.ndarray, tokenize: Any, num_proc: int | None, unit: str
) -> list[tuple]:
    """`tokenize(table, rows)` over blocks of the selected rows, in `num_proc` spawned workers
    when there are enough rows; the blocks' results in order."""
    name = tokenize.name
    if tokenize.fmt not in TOKEN_ID_FORMATS and not tokenize.tokenizer.chat_template:
        raise UserError(f"{name}: the tokenizer has no chat template to render conversations")
    table = dataset.select(rows).with_format("arrow")[:]
    procs = num_proc if num_proc and len(rows) >= ROWS_PER_PROCESS * num_proc else 1
    with tqdm(total=len(rows), desc=f"tokenizing {name}", unit=f" {unit}") as bar:
        if procs == 1:
            return [tokenize(table, rows, bar.update)]
        bounds = np.linspace(0, len(rows), 4 * procs + 1).astype(int)
        blocks = list(zip(bounds[:-1], bounds[1:], strict=True))
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(procs, context, _init_worker, (tokenize,)) as pool:
            futures = [pool.submit(_in_worker, table.slice(a, b - a), rows[a:b]) for a, b in blocks]
            parts = []
            for future, (a, b) in zip(futures, blocks, strict=True):
                parts.append(future.result())
                bar.update(b - a)
    return parts


_worker_tokenize: Any = None


def _init_worker(tokenize: Any) -> None:
    global _worker_tokenize
    _worker_tokenize = tokenize


def _in_worker(table: pa.Table, rows: np.ndarray) -> tuple:
    return _worker_tokenize(table, rows)


class _Tokenize:
    """Normalizes and tokenizes a block of rows (a class so that it pickles to workers)."""

    def __init__(self, name: str, fmt: str, tokenizer: Any):
        self.name, self.fmt, self.tokenizer = name, fmt, tokenizer
        self.rendered_roles: set[str] = set()

    def __call__(self, table: pa.Table, rows: np.ndarray, progress: Any = None) -> Columns:
        """Each block of `BATCH_ROWS` rows becomes numpy at once: Python lists of every token of
        a big set would take several times the memory of its int32 arrays."""
        chosen, rejected, margin, prompt_lengths, differs = [], [], [], [], []
        for start in range(0, len(table), BATCH_ROWS):
            batch = table.slice(start, BATCH_ROWS).to_pylist()
            examples = [
                normalize(self.name, self.fmt, row, int(rows[start + i]))
                for i, row in enumerate(batch)
            ]
            if self.fmt == PRETOKENIZED:
                chosen_ids = [e.chosen for e in examples]
                rejected_ids = [e.rejected for e in examples]
                prompt_lengths += [-1 if e.prompt is None else len(e.prompt) for e in examples]
            else:
                for i, e in enumerate(examples):
                    self._check_roles(e, int(rows[start + i]))
                chosen_ids = self._render([e.chosen for e in examples])
                rejected_ids = self._render([e.rejected for e in examples])
                prompt_lengths += self._prompt_lengths(examples)
            chosen.append(Ragged.from_lists(chosen_ids))
            rejected.append(Ragged.from_lists(rejected_ids))
            margin += [e.margin for e in examples]
            differs += [e.prompt_differs for e in examples]
            if progress is not None:
                progress(len(batch))
        return (
            Ragged.concat(chosen or [Ragged.from_lists([])]),
            Ragged.concat(rejected or [Ragged.from_lists([])]),
            np.asarray(margin, dtype=np.float32),
            np.asarray(prompt_lengths, dtype=np.int32),
            np.asarray(differs, dtype=bool),
        )

    def _render(self, conversations: list, generation_prompt: bool = False) -> list[list[int]]:
        if not conversations:
            return []
        return self.tokenizer.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=False,
            add_generation_prompt=generation_prompt,
        )

    def _check_roles(self, example: Example, row: int) -> None:
        for key, conversation in (("chosen", example.chosen), ("rejected", example.rejected)):
            where = f"{self.name} row {row}"
            check_roles(self.tokenizer, conversation, where, key, self.rendered_roles)

    def _prompt_lengths(self, examples: list[Example] | list[Group]) -> list[int]:
        """Tokens of the prompt with the generation prompt; 0 for a pair without a prompt."""
        with_prompt = [i for i, e in enumerate(examples) if e.prompt]
        ids = self._render([examples[i].prompt for i in with_prompt], generation_prompt=True)
        lengths = [0] * len(examples)
        for i, row in zip(with_prompt, ids, strict=True):
            lengths[i] = len(row)
        return lengths


GroupColumns = tuple[Ragged, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class _TokenizeGroups(_Tokenize):
    """Normalizes rows of any format as groups and renders every response of a block in one
    `apply_chat_template` call (each response conversation exactly as a pair's chosen is)."""

    def __init__(self, name: str, fmt: str, tokenizer: Any, ultrafeedback_score: str):
        super().__init__(name, fmt, tokenizer)
        self.ultrafeedback_score = ultrafeedback_score

    def __call__(self, table: pa.Table, rows: np.ndarray, progress: Any = None) -> GroupColumns:
        responses, sizes, scores, prompt_lengths, differs, margin = [], [], [], [], [], []
        for start in range(0, len(table), BATCH_ROWS):
            batch = table.slice(start, BATCH_ROWS).to_pylist()
            groups = [
                normalize_group(
                    self.name, self.fmt, row, int(rows[start + i]), self.ultrafeedback_score
                )
                for i, row in enumerate(batch)
            ]
            flat = [r for g in groups for r in g.responses]
            if self.fmt in TOKEN_ID_FORMATS:
                ids = flat
                prompt_lengths += [-1 if g.prompt is None else len(g.prompt) for g in groups]
            else:
                for i, g in enumerate(groups):
                    self._check_group_roles(g, int(rows[start + i]))
                ids = self._render(flat)
                prompt_lengths += self._prompt_lengths(groups)
            responses.append(Ragged.from_lists(ids))
            sizes += [len(g.responses) for g in groups]
            scores += [s for g in groups for s in g.scores]
            differs += [g.prompt_differs for g in groups]
            margin += [g.margin for g in groups]
            if progress is not None:
                progress(len(batch))
        return (
            Ragged.concat(responses or [Ragged.from_lists([])]),
            np.asarray(sizes, np.int64),
            np.asarray(scores, np.float32),
            np.asarray(prompt_lengths, np.int32),
            np.asarray(differs, bool),
            np.asarray(margin, np.float32),
        )

    def _check_group_roles(self, group: Group, row: int) -> None:
        for i, conversation in enumerate(group.responses):
            where = f"{self.name} row {row}"
            check_roles(self.tokenizer, conversation, where, f"responses[{i}]", self.rendered_roles)
