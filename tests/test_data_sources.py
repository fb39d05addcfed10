"""Sources and the dataset mixer: arithmetic, splits, local file kinds, loading errors."""

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from jaxrm.assets import TINY_MODEL_DIR
from jaxrm.data import build_datasets
from jaxrm.data.formats import normalize
from jaxrm.data.sources import SourceSpec, load_source, mix_indices, parse_mixer
from jaxrm.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def pretokenized_rows(n, offset=0):
    """Row i has chosen ids [offset + i + 1]: which rows were mixed in is readable from the ids."""
    return [{"chosen_input_ids": [offset + i + 1], "rejected_input_ids": [7, 7]} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def first_ids(pairs):
    return np.asarray([pairs.chosen[i][0] for i in range(len(pairs))])


def build(tok, tmp_path, mixer, splits=(), **kw):
    kw.setdefault("seed", 3)
    return build_datasets(
        dataset_mixer_list=mixer,
        dataset_mixer_list_splits=splits,
        tokenizer=tok,
        max_token_length=64,
        max_prompt_token_length=64,
        cache_dir=tmp_path / "cache",
        **kw,
    )


def test_mixer_arithmetic():
    assert len(mix_indices(10, "3.0", 0, "x")) == 30
    np.testing.assert_array_equal(np.bincount(mix_indices(10, "3.0", 0, "x")), [3] * 10)
    half = mix_indices(10, "0.5", 0, "x")
    assert len(half) == 5 and len(set(half)) == 5
    np.testing.assert_array_equal(half, mix_indices(10, "0.5", 0, "x"))
    assert not np.array_equal(half, mix_indices(10, "0.5", 1, "x"))
    counts = np.bincount(mix_indices(10, "12", 0, "x"), minlength=10)
    assert counts.sum() == 12 and set(counts) == {1, 2}
    assert len(mix_indices(10, "2.25", 0, "x")) == 22
    assert len(mix_indices(10, "7", 0, "x")) == 7
    for bad in ("abc", "-1", "-0.5"):
        with pytest.raises(UserError, match="amount"):
            mix_indices(10, bad, 0, "x")


def test_parse_mixer_splits():
    specs = parse_mixer(["a", "1.0", "b", "5"], [])
    assert specs == [SourceSpec("a", "1.0", "train"), SourceSpec("b", "5", "train")]
    assert [s.split for s in parse_mixer(["a", "1.0", "b", "5"], ["test"])] == ["test", "test"]
    assert [s.split for s in parse_mixer(["a", "1.0", "b", "5"], ["x", "y"])] == ["x", "y"]
    assert parse_mixer(["a", 0.5, "b", 3], [])[0].amount == "0.5"
    with pytest.raises(UserError, match="dataset_mixer_list: expected alternating"):
        parse_mixer(["a", "1.0", "b"], [])
    with pytest.raises(UserError, match="dataset_mixer_list_splits: 3 splits for 2"):
        parse_mixer(["a", "1.0", "b", "5"], ["x", "y", "z"])
    with pytest.raises(UserError, match="'a'.*not a number"):
        parse_mixer(["a", "lots"], [])


def test_mix_of_local_files(tok, tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", pretokenized_rows(10))
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(pretokenized_rows(4, offset=100)), parquet)
    train, evals, stats = build(tok, tmp_path, [jsonl, "3.0", str(parquet), "0.5"])
    ids = first_ids(train)
    assert len(train) == 32 and evals is None
    np.testing.assert_array_equal(np.bincount(ids[:30])[1:], [3] * 10)
    assert len(set(ids[30:])) == 2 and set(ids[30:]) <= {101, 102, 103, 104}
    rows = [(s["format"], s["rows_loaded"], s["rows"]) for s in stats["train"]["sources"]]
    assert rows == [("pretokenized", 10, 30), ("pretokenized", 4, 2)]


def test_saved_dataset_dict_splits(tok, tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(pretokenized_rows(6)),
            "test": datasets.Dataset.from_list(pretokenized_rows(3, offset=50)),
        }
    ).save_to_disk(str(saved))
    train, evals, stats = build(
        tok,
        tmp_path,
        [str(saved), "4"],
        dataset_mixer_eval_list=[str(saved), "1.0"],
        dataset_mixer_eval_list_splits=["test"],
    )
    assert len(train) == 4 and set(first_ids(train)) <= set(range(1, 7))
    np.testing.assert_array_equal(sorted(first_ids(evals)), [51, 52, 53])
    assert stats["eval"]["sources"][0]["split"] == "test"
    with pytest.raises(UserError, match="no split 'dev'"):
        load_source(SourceSpec(str(saved), "1.0", "dev"))


def one_line_error(spec_name, match):
    with pytest.raises(UserError, match=match) as e:
        load_source(SourceSpec(spec_name, "1.0", "train"))
    assert "\n" not in str(e.value)


def test_load_errors(tmp_path):
    one_line_error(str(tmp_path / "nope.jsonl"), "nope.jsonl: no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": []}\n{"chosen": [\n')
    one_line_error(str(bad), r"bad.jsonl line 2: invalid JSON")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    one_line_error(str(tmp_path / "bad.parquet"), "bad.parquet: unreadable parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    one_line_error(str(tmp_path / "x.csv"), "x.csv: unsupported file type")
    (tmp_path / "emptydir").mkdir()
    one_line_error(str(tmp_path / "emptydir"), "emptydir: not a dataset directory")


def test_a_key_first_seen_in_a_later_row_is_kept(tmp_path):
    """`datasets.Dataset.from_list` takes its columns from the first row only: a `margin` that
    only later rows carry must still reach the pairs (rows without it: 0.0)."""
    path = tmp_path / "late.jsonl"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = [{"chosen": chat, "rejected": chat}, {"chosen": chat, "rejected": chat, "margin": 2.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_source(SourceSpec(str(path), "1.0", "train"))
    assert dataset.column_names == ["chosen", "rejected", "margin"]
    assert dataset["margin"] == [None, 2.5]
    margins = [normalize("late", "conversational", r, i).margin for i, r in enumerate(dataset)]
    assert margins == [0.0, 2.5]
