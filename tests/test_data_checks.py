"""Checks right after tokenization: pairs too long for a packed row, token ids beyond the model's
vocabulary, identical chosen and rejected; and their refusals in `jaxrm.train` before any step."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxrm.assets import TINY_MODEL_DIR
from jaxrm.data import PackFit, build_datasets
from jaxrm.data.sources import mix_indices
from jaxrm.errors import UserError
from tests.test_score import assert_one_line_error

PROMPT = 7


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


@pytest.fixture(autouse=True)
def jaxrm_logs_reach_caplog(monkeypatch):
    """An in-process `jaxrm.train` run stops the `jaxrm` logger's propagation (jaxrm.logs)."""
    monkeypatch.setattr(logging.getLogger("jaxrm"), "propagate", True)


def pretokenized(prefix, chosen, rejected, chosen_id=8, rejected_id=9):
    """A pre-tokenized pair: `prefix` shared tokens, then `chosen` / `rejected` tokens alone."""
    return {
        "chosen_input_ids": [PROMPT] * prefix + [chosen_id] * chosen,
        "rejected_input_ids": [PROMPT] * prefix + [rejected_id] * rejected,
    }


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build(tok, tmp_path, rows, name="p.jsonl", amount="1.0", **kw):
    kw.setdefault("cache_dir", tmp_path / "cache")
    return build_datasets(
        dataset_mixer_list=[write_jsonl(tmp_path / name, rows), amount],
        tokenizer=tok,
        max_token_length=512,
        max_prompt_token_length=512,
        seed=0,
        **kw,
    )


# A: fits either way (52 shared / 102 separate); B: fits only with its prefix shared (110 / 200);
# C: fits neither way (170 / 270).
PAIRS = [pretokenized(50, 1, 1), pretokenized(90, 10, 10), pretokenized(100, 30, 40)]


@pytest.mark.parametrize(
    "share_prefix, message",
    [
        (
            True,
            "1 of 3 train pairs need more than pack_length=128 tokens in a packed row (the "
            "longest 170); set pack_length to at least 256",
        ),
        (
            False,
            "2 of 3 train pairs need more than pack_length=128 tokens in a packed row (the "
            "longest 270); set pack_length to at least 384",
        ),
    ],
)
def test_pairs_longer_than_a_packed_row_are_refused(tok, tmp_path, share_prefix, message):
    with pytest.raises(UserError) as e:
        build(tok, tmp_path, PAIRS, pack=PackFit(128, share_prefix))
    assert message in str(e.value) and "drop_pairs_longer_than_pack_length" in str(e.value)
    assert "\n" not in str(e.value)
    fits = PackFit(256 if share_prefix else 384, share_prefix)
    assert len(build(tok, tmp_path, PAIRS, pack=fits)[0]) == 3


def test_the_eval_set_is_checked_too(tok, tmp_path):
    with pytest.raises(UserError, match="1 of 1 eval pairs need more than pack_length=128"):
        build(
            tok,
            tmp_path,
            PAIRS[:2],
            pack=PackFit(128, True),
            dataset_mixer_eval_list=[write_jsonl(tmp_path / "e.jsonl", PAIRS[2:]), "1.0"],
        )


def test_dropping_counts_the_pairs_longer_than_a_row(tok, tmp_path, caplog):
    train, evals, stats = build(
        tok,
        tmp_path,
        PAIRS,
        pack=PackFit(128, False, drop=True),
        dataset_mixer_eval_list=[write_jsonl(tmp_path / "e.jsonl", PAIRS[1:] + PAIRS[:1]), "1.0"],
    )
    assert stats["train"]["filtered"]["longer_than_pack_length"] == 2
    assert stats["eval"]["filtered"]["longer_than_pack_length"] == 2
    assert stats["train"]["pairs"] == stats["eval"]["pairs"] == 1
    np.testing.assert_array_equal(train.chosen[0], PAIRS[0]["chosen_input_ids"])
    np.testing.assert_array_equal(evals.chosen[0], PAIRS[0]["chosen_input_ids"])
    assert "2 of 3 train pairs need more than pack_length=128" in caplog.text
    with pytest.raises(UserError, match=r"no train pairs left: .* or pack_length=128"):
        build(tok, tmp_path, PAIRS[1:], pack=PackFit(128, False, drop=True))


def test_pack_length_below_max_token_length_warns(tok, tmp_path, caplog):
    build(tok, tmp_path, PAIRS[:1], pack=PackFit(128, True))
    assert "pack_length=128 is less than max_token_length=512" in caplog.text
    caplog.clear()
    build(tok, tmp_path, PAIRS[:1], pack=PackFit(1024, True))
    assert "pack_length" not in caplog.text


def test_token_ids_beyond_the_vocabulary_name_file_row_and_id(tok, tmp_path):
    """Rows 5-7 hold id 5000; of a half sample of 8 rows, the first of them that was drawn is
    named, whether tokenized now or read from a cache written without the check."""
    rows = [pretokenized(3, 2, 2) for _ in range(8)]
    for r in range(5, 8):
        rows[r] = pretokenized(3, 2, 2, rejected_id=5000)
    drawn = np.unique(mix_indices(8, "0.5", 0, "test"))
    bad = [int(r) for r in drawn if r >= 5]
    assert bad and bad[0] != list(drawn).index(bad[0])  # the row is not the pair's position
    expected = (
        f"f.jsonl row {bad[0]}: 'rejected_input_ids' holds token id 5000, but the model's "
        "vocabulary has 1000 tokens"
    )
    with pytest.raises(UserError, match=expected):
        build(tok, tmp_path, rows, name="f.jsonl", amount="0.5", vocab_size=1000)
    build(tok, tmp_path, rows, name="f.jsonl", amount="0.5")  # cached without a vocabulary
    with pytest.raises(UserError, match=expected):
        build(tok, tmp_path, rows, name="f.jsonl", amount="0.5", vocab_size=1000)
    assert len(build(tok, tmp_path, rows, name="f.jsonl", amount="0.5", vocab_size=5001)[0]) == 4


def test_identical_pairs_are_counted_and_all_identical_refused(tok, tmp_path, caplog):
    same = pretokenized(3, 2, 2, rejected_id=8)
    rows = [same, pretokenized(3, 2, 2), same, pretokenized(3, 2, 3, rejected_id=8), same]
    _, _, stats = build(tok, tmp_path, rows)
    assert stats["train"]["identical"] == 3
    assert "train: 3 of 5 pairs (60.00%) have identical chosen and rejected" in caplog.text
    with pytest.raises(UserError, match="all 2 train pairs have identical chosen and rejected"):
        build(tok, tmp_path, [same, same], name="same.jsonl")


# A process that cannot find torch, as on a JAX-only install (where transformers logs "PyTorch
# was not found" at import). The path finder skips torch rather than `sys.modules["torch"] =
# None`, which `datasets` takes for an imported torch.
WITHOUT_TORCH = """
import importlib.machinery, sys

class PathFinderWithoutTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            return None
        return super().find_spec(name, path, target)

sys.meta_path = [
    PathFinderWithoutTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path
]
"""
TORCH_NOTICE = "PyTorch was not found"


def run_without_torch(code, *args):
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH + code, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_train_without_torch(tmp_path, *overrides):
    """`python -m jaxrm.train` on the tiny config, torch hidden."""
    args = ["--config", "configs/tiny.py", f"--config.output_dir={tmp_path / 'run'}", *overrides]
    main = "from jaxrm.errors import run_cli; from jaxrm.train import main; run_cli(main)"
    return run_without_torch(main, *args)


def test_only_the_torch_notice_is_silenced():
    bare = run_without_torch("import transformers")
    assert bare.returncode == 0 and TORCH_NOTICE in bare.stderr
    jaxrm = run_without_torch(
        "from jaxrm.assets import TINY_MODEL_DIR\n"
        "from jaxrm.tokenizer import load_tokenizer\n"
        "load_tokenizer(TINY_MODEL_DIR)\n"
        "from transformers.utils import logging\n"
        "logging.get_logger('transformers').warning('another transformers warning')\n"
    )
    assert jaxrm.returncode == 0, jaxrm.stderr
    assert TORCH_NOTICE not in jaxrm.stderr and "another transformers warning" in jaxrm.stderr


def test_train_refuses_bad_data_before_any_step_without_the_torch_notice(tmp_path):
    rows = [pretokenized(3, 2, 2) for _ in range(40)]
    rows[17] = pretokenized(3, 2, 2, chosen_id=700)  # the tiny model's vocabulary: 688
    data = write_jsonl(tmp_path / "ids.jsonl", rows)
    result = run_train_without_torch(tmp_path, f"--config.dataset_mixer_list=[{data!r}, '1.0']")
    assert_one_line_error(
        result, "ids.jsonl row 17: 'chosen_input_ids' holds token id 700", "has 688 tokens"
    )
    assert TORCH_NOTICE not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_refuses_a_context_beyond_the_model(tmp_path):
    result = run_train_without_torch(tmp_path, "--config.max_token_length=300")
    assert_one_line_error(
        result, "'max_token_length' is 300, more than the model's max_position_embeddings=256"
    )
    assert not (tmp_path / "run").exists()
