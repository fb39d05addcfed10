"""HF export: transformers loads it cleanly and computes jaxrm's rewards; shards; atomicity."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrm import hf_export, tensorfiles
from jaxrm.assets import TINY_EVAL_FILE, TINY_MODEL_DIR
from jaxrm.checkpoint import Checkpointer
from jaxrm.errors import EXIT_USER_ERROR, UserError
from jaxrm.hf import load_reward_model
from jaxrm.hf_export import export_checkpoint
from jaxrm.models.llama_hf import LLAMA
from jaxrm.optimizer import make_optimizer
from jaxrm.score import main as score_main
from jaxrm.scoring import load_model, locate_model, score_token_ids
from jaxrm.sharding import make_mesh
from tests.test_score import assert_one_line_error, write_jsonl

REWARD_STATS = {"mean": 0.125, "std": 1.75, "count": 40}


def conversations(n=6):
    rows = [json.loads(line) for line in TINY_EVAL_FILE.read_text().splitlines()[:n]]
    return [r[k] for r in rows for k in ("chosen", "rejected")]


def save_trained_run(run, model_dir, mesh):
    """A "trained" run dir of `model_dir`'s model: perturbed sharded params + AdamW state saved at
    step 3, with meta; returns (run, tokenizer, token ids, jaxrm's rewards of them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.save_pretrained(run / "tokenizer")
    model, hf_config, _ = load_reward_model(str(model_dir), mesh, min_vocab_size=len(tokenizer))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda x: jax.device_put(
            np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32), x.sharding
        ),
        state,
    )
    params = nnx.to_pure_dict(state)
    opt_state = make_optimizer(1e-3).init(params)
    meta = {
        "config": {"learning_rate": 1e-3},
        "hf_config": hf_config,
        "tokenizer_dir": "tokenizer",
        "reward_stats": REWARD_STATS,
    }
    with Checkpointer(run) as ckpt:
        ckpt.save(3, params=params, opt_state=opt_state, data_state=None, meta=meta)
    ids = [
        tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in conversations()
    ]
    rewards = score_token_ids(nnx.merge(graphdef, state), ids, 4, mesh, progress=False)
    return run, tokenizer, ids, rewards


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return save_trained_run(tmp_path_factory.mktemp("run"), TINY_MODEL_DIR, make_mesh(1, 4, 2))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    run = trained[0]
    return export_checkpoint(run, tmp_path_factory.mktemp("out") / "hf", dtype="float32")[0]


def torch_rewards(path, ids, pad_id, exported_class=LLAMA.exported_class, **kwargs):
    """transformers' rewards: logits[:, 0] of right-padded rows (it reads the last non-pad)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, output_loading_info=True, **kwargs
    )
    assert all(not v for v in info.values()), info  # no missing/unexpected/mismatched keys
    assert model.config.num_labels == 1 and type(model).__name__ == exported_class
    width = max(map(len, ids))
    batch = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, t in enumerate(ids):
        batch[row, : len(t)] = torch.tensor(t)
        mask[row, : len(t)] = 1
    with torch.no_grad():
        logits = model.eval()(input_ids=batch, attention_mask=mask).logits
    assert logits.shape == (len(ids), 1)
    return model, logits[:, 0].float().numpy()


def safetensors_headers(path):
    headers = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        assert header.pop("__metadata__") == {"format": "pt"}
        headers.update({name: (f.name, info) for name, info in header.items()})
    return headers


def test_float32_export_matches_jaxrm_and_loads_cleanly(trained, exported):
    from transformers import AutoTokenizer

    _, tokenizer, ids, rewards = trained
    model, got = torch_rewards(exported, ids, tokenizer.pad_token_id)
    np.testing.assert_allclose(got, rewards, atol=1e-4)
    assert sorted(p.name for p in exported.glob("*.safetensors")) == ["model.safetensors"]
    # every tensor whole, named and shaped as transformers expects, no lm_head
    headers = safetensors_headers(exported)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert {k: info["shape"] for k, (_, info) in headers.items()} == expected
    assert all(
        np.prod(info["shape"]) > 0 and info["dtype"] == "F32" for _, info in headers.values()
    )
    assert headers["score.weight"][1]["shape"] == [1, 64]
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] == tokenizer.pad_token_id != config["eos_token_id"]
    assert config["vocab_size"] == model.config.vocab_size >= len(tokenizer)
    assert (config["dtype"], config["torch_dtype"]) == ("float32", "float32")
    assert (config["mean"], config["std"], config["normalize_reward"]) == (0.125, 1.75, False)
    assert model.config.mean == 0.125  # reaches the loaded config (OpenRLHF reads it there)
    # the tokenizer and its chat template travel with the model
    again = AutoTokenizer.from_pretrained(exported)
    assert again.chat_template == tokenizer.chat_template
    assert again.pad_token_id == tokenizer.pad_token_id
    for conv, expected_ids in zip(conversations(), ids, strict=True):
        assert again.apply_chat_template(conv, tokenize=True, return_dict=False) == expected_ids


def test_score_cli_on_export(trained, exported, tmp_path):
    rewards = trained[3]
    rows = [{"messages": c} for c in conversations()]
    data = write_jsonl(tmp_path / "convs.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    score_main(
        ["--model", str(exported), "--data", str(data), "--output", str(out), "--no_progress"]
    )
    got = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    np.testing.assert_allclose(got, rewards, atol=1e-4)


def test_bf16_sharded_export(trained, tmp_path):
    import torch

    run, tokenizer, ids, rewards = trained
    out, _ = export_checkpoint(
        run, tmp_path / "bf16", step=3, dtype="bfloat16", max_shard_size="100KB"
    )
    index = json.loads((out / tensorfiles.INDEX_FILE).read_text())
    headers = safetensors_headers(out)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and "model.safetensors" not in files
    assert index["weight_map"] == {name: f for name, (f, _) in headers.items()}
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(
        2 * int(np.prod(info["shape"])) for _, info in headers.values()
    )
    assert all(info["dtype"] == "BF16" for _, info in headers.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # bf16 weights computed in float32: only the weights' rounding differs (measured ~5e-3 on
    # rewards ~1); computed in bf16 too (what PPO does): measured ~1e-2
    _, got = torch_rewards(out, ids, tokenizer.pad_token_id, dtype=torch.float32)
    np.testing.assert_allclose(got, rewards, atol=0.015 * max(1.0, np.abs(rewards).max()))
    model, got_bf16 = torch_rewards(out, ids, tokenizer.pad_token_id)
    assert model.dtype == torch.bfloat16
    np.testing.assert_allclose(got_bf16, rewards, atol=0.05 * max(1.0, np.abs(rewards).max()))


def test_interrupted_export_leaves_target_untouched(trained, exported, tmp_path, monkeypatch):
    run = trained[0]
    calls = {"n": 0}
    real = tensorfiles.write_tensor

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(tensorfiles, "write_tensor", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(run, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # no half directory, no temporary sibling left

    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(run, exported, overwrite=True)
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before
    assert sorted(p.name for p in exported.parent.iterdir()) == [exported.name]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorfiles, "write_tensor", disk_full)  # a user's problem: one line
    with pytest.raises(UserError, match=r"could not write the export to .* \(no space left on "):
        export_checkpoint(run, exported, overwrite=True)
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before

    monkeypatch.setattr(tensorfiles, "write_tensor", real)
    (exported / "stale.txt").write_text("old")
    assert export_checkpoint(run, exported, overwrite=True)[0] == exported
    assert not (exported / "stale.txt").exists()
    assert (exported / "model.safetensors").read_bytes() == before["model.safetensors"]


def test_user_errors(trained, exported, tmp_path):
    run = trained[0]
    with pytest.raises(UserError, match="does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "a")
    with pytest.raises(UserError, match="no checkpoint for step 9"):
        export_checkpoint(run, tmp_path / "a", step=9)
    with pytest.raises(UserError, match="max_shard_size"):
        export_checkpoint(run, tmp_path / "a", max_shard_size="5 parsecs")
    assert tensorfiles.parse_size("100KB") == 100_000
    assert tensorfiles.parse_size("2GiB") == 2 * 2**30
    # a non-empty target is refused without --overwrite: one line, no traceback, non-zero exit
    result = subprocess.run(
        [sys.executable, "-m", "jaxrm.export", "--checkpoint", str(run), "--output", str(exported)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result, str(exported), "--overwrite")


def test_non_finite_weights_and_stats_are_never_exported(trained, tmp_path):
    from jaxrm.checkpoint import read_meta, restore_params

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    _, meta = read_meta(run)
    abstract = hf_export.abstract_params(
        hf_export.model_config_from_hf(meta["hf_config"]), make_mesh(1, -1, 1)
    )
    _, params = restore_params(run, 3, abstract)
    params["model"]["norm"]["weight"] = params["model"]["norm"]["weight"].at[5].set(np.nan)
    with Checkpointer(run) as ckpt:
        ckpt.save(
            4,
            params=params,
            opt_state=make_optimizer(1e-3).init(params),
            data_state=None,
            meta=meta,
        )
    with pytest.raises(UserError, match=r"step 4: parameter model.norm.weight holds non-finite"):
        export_checkpoint(run, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written
    stats = {"mean": float("nan"), "std": float("nan"), "count": 0}
    config = hf_export.export_config(meta["hf_config"], 2, "float32", stats)
    assert "mean" not in config and "std" not in config
    json.dumps(config, allow_nan=False)

    # a killed export's temporary directory (dead pid, this host) is removed by the next one
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".hf.export-tmp-{socket.gethostname()}-{dead.pid}"
    (stale / "part").mkdir(parents=True)
    path, step = export_checkpoint(run, tmp_path / "hf", step=3)
    assert step == 3 and path.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


def copy_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    return run


def snapshot(path):
    """Every file under `path` with its bytes (folders as None)."""
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
        for p in sorted(path.rglob("*"))
    }


def export_cli(run, output, *flags):
    """`python -m jaxrm.export` on one CPU device (as a user runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "jaxrm.export", "--checkpoint", str(run), "--output", str(output)]
        + [*flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    )


def test_output_in_or_around_a_training_run_is_refused(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    refused = {
        run: "is",
        run / "checkpoints": "lies inside",
        run / "checkpoints" / "3": "lies inside",
        run / "tokenizer": "lies inside",
        run / "hf-step3": "lies inside",
        run / "hf" / "sub": "lies inside",
    }
    for output, where in refused.items():
        message = f"--output {output} {where} the training run {run}, "
        with pytest.raises(UserError, match=re.escape(message)):
            export_checkpoint(run, output, overwrite=True)
    links = tmp_path / "links"
    links.mkdir()
    (links / "run").symlink_to(run)
    with pytest.raises(UserError, match=rf"is the training run {re.escape(str(run))}"):
        export_checkpoint(run, links / "run", overwrite=True)
    with pytest.raises(UserError, match=r"lies inside the training run"):
        export_checkpoint(run, links / "run" / "checkpoints", overwrite=True)
    with pytest.raises(UserError, match=rf"not an export .*it holds the training run {run}\)"):
        export_checkpoint(run, tmp_path, overwrite=True)  # a folder holding a run
    assert snapshot(run) == before

    result = export_cli(run, run, "--overwrite")
    assert result.returncode == EXIT_USER_ERROR
    assert_one_line_error(result, f"--output {run} is the training run {run}", f"{run / 'hf'}")
    result = export_cli(run, run / "checkpoints", "--overwrite")
    assert result.returncode == EXIT_USER_ERROR
    assert_one_line_error(result, "checkpoints lies inside the training run")
    assert snapshot(run) == before  # every checkpoint, the tokenizer: all as they were

    # the run's own export, hf/: written, and replaced with --overwrite, also one written before
    # exports were marked; nothing else in the run changes
    path, step = export_checkpoint(run, run / "hf")
    assert json.loads((path / hf_export.EXPORT_MARKER).read_text()) == {
        "checkpoint": str(run),
        "step": 3,
        "dtype": "float32",
    }
    (path / hf_export.EXPORT_MARKER).unlink()
    assert export_checkpoint(run, run / "hf", overwrite=True) == (path, 3)
    assert (path / hf_export.EXPORT_MARKER).is_file() and (path / "model.safetensors").is_file()
    assert {k: v for k, v in snapshot(run).items() if not k.startswith("hf")} == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "hf", "tokenizer"]


def test_overwrite_replaces_only_what_jaxrm_exported(trained, exported, tmp_path):
    run = trained[0]
    mine = tmp_path / "mine"  # a user's model folder: config.json and weights, no marker
    shutil.copytree(exported, mine)
    (mine / hf_export.EXPORT_MARKER).unlink()
    (mine / "notes.txt").write_text("keep")
    with_folder = tmp_path / "with_folder"  # an export the user put a folder into
    shutil.copytree(exported, with_folder)
    (with_folder / "data").mkdir()
    (with_folder / "data" / "rows.jsonl").write_text("{}\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    before = snapshot(tmp_path)
    for output, why in (
        (mine, r"no \.jaxrm-export\.json in it"),
        (with_folder, "it holds folders"),
        (a_file, "a file"),
    ):
        message = rf"--output {re.escape(str(output))} exists and is not an export .*\({why}\)"
        with pytest.raises(UserError, match=message):
            export_checkpoint(run, output, overwrite=True)
    result = export_cli(run, mine, "--overwrite")
    assert result.returncode == EXIT_USER_ERROR
    assert_one_line_error(result, f"--output {mine} exists and is not an export written by jaxrm")
    assert snapshot(tmp_path) == before
    # an empty folder is filled; an export is replaced only with --overwrite
    (tmp_path / "empty").mkdir()
    assert export_checkpoint(run, tmp_path / "empty") == (tmp_path / "empty", 3)
    with pytest.raises(UserError, match=r"holds an export; pass --overwrite to replace it"):
        export_checkpoint(run, tmp_path / "empty")
    assert export_checkpoint(run, tmp_path / "empty", overwrite=True)[1] == 3


HOLD_LOCK = """
import sys, time
from pathlib import Path
from jaxrm.rundir import TargetLock
lock = TargetLock(Path(sys.argv[1]), "export").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_export_into_the_same_target_is_refused(trained, tmp_path):
    run = trained[0]
    target = tmp_path / "hf"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        who = f"{socket.gethostname()} pid {holder.pid}, running since"
        with pytest.raises(UserError, match=rf"hf is being written by another export \({who}"):
            export_checkpoint(run, target)
        assert os.listdir(tmp_path) == [".hf.jaxrm-export.lock"]  # the target not written
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (the kernel dropped its lock): the export goes ahead, then removes the
    # lock file
    assert export_checkpoint(run, target) == (target, 3)
    assert os.listdir(tmp_path) == ["hf"]


def test_step_rotated_away_while_exporting(trained, tmp_path, monkeypatch):
    from tests.test_checkpoint import rotate_while_reading

    run = copy_run(trained, tmp_path)
    root = run / "checkpoints"
    shutil.copytree(root / "3", root / "4")
    meta4 = root / "4" / "meta" / "meta.json"
    meta4.write_text(meta4.read_text().replace('"mean": 0.125', '"mean": 9.0'))
    # step 4 is the newest when the export starts, and is rotated away (4 -> 5) while its
    # params are read: step 5 is exported, with step 5's meta, and nothing is called damaged
    rotate_while_reading(monkeypatch, root, 4, saved=5, item="state")
    path, step = export_checkpoint(run, tmp_path / "a")
    assert step == 5
    assert json.loads((path / "config.json").read_text())["mean"] == 9.0
    # --step 5 removed while its params are read: one line, nothing written
    rotate_while_reading(monkeypatch, root, 5, item="state")
    with pytest.raises(UserError, match=r"step 5 was removed while it was being read"):
        export_checkpoint(run, tmp_path / "b", step=5)
    assert not (tmp_path / "b").exists()
    # without --step: the newest remaining step, 3, with its own reward stats
    shutil.copytree(root / "3", root / "5")
    path, step = export_checkpoint(run, tmp_path / "c")
    assert step == 3
    assert json.loads((path / "config.json").read_text())["mean"] == 0.125


def test_score_loads_the_newest_step_after_a_rotation(trained, tmp_path, monkeypatch):
    """score and evaluate find the newest step first (for its tokenizer) and read its params
    later: a step rotated away meanwhile gives way to the newest one, reported as such."""
    from tests.test_checkpoint import rotate_while_reading

    run = copy_run(trained, tmp_path)
    root = run / "checkpoints"
    shutil.copytree(root / "3", root / "4")
    rotate_while_reading(monkeypatch, root, 4, saved=5, item="state")
    data = write_jsonl(tmp_path / "convs.jsonl", [{"messages": c} for c in conversations()])
    out = tmp_path / "scored.jsonl"
    score_main(["--model", str(run), "--data", str(data), "--output", str(out), "--no_progress"])
    got = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    np.testing.assert_allclose(got, trained[3], atol=1e-4)  # step 5 is a copy of step 3
    source = locate_model(str(run))
    assert (source.step, source.newest) == (5, True)
    rotate_while_reading(monkeypatch, root, 5, saved=6, item="state")
    loaded = load_model(source, make_mesh(1, -1, 1))[1]
    assert (loaded.step, loaded.describe()) == (6, f"{run} step 6")
    pinned = locate_model(str(run), step=6)
    rotate_while_reading(monkeypatch, root, 6, item="state")
    with pytest.raises(UserError, match=r"step 6 was removed while it was being read"):
        load_model(pinned, make_mesh(1, -1, 1))


def damaged_newest_step(trained, tmp_path):
    """A copy of the run with a step 4 whose arrays' data is cut short (metadata intact)."""
    run = copy_run(trained, tmp_path)
    root = run / "checkpoints"
    shutil.copytree(root / "3", root / "4")
    data = [f for f in (root / "4" / "state").rglob("d/*") if f.stat().st_size > 10_000]
    assert data
    for f in data:  # the first few arrays still read, the others fail while being read
        os.truncate(f, 1000)
    return run


def test_damaged_newest_checkpoint_falls_back_quietly(trained, tmp_path, monkeypatch, caplog):
    """orbax's failed reads leave coroutines and tasks that printed hundreds of lines ("Exception
    ignored in: <coroutine ...>", "Task exception was never retrieved") when collected later;
    the fall-back to the previous step reports just its one warning. (Whether a failed read
    leaves any depends on timing: measured 1 read in 3, so it reads several times.)"""
    import gc

    run = damaged_newest_step(trained, tmp_path)
    leftovers = []
    monkeypatch.setattr(sys, "unraisablehook", leftovers.append)
    _, meta = hf_export.read_meta(run, 3)
    abstract = hf_export.abstract_params(
        hf_export.model_config_from_hf(meta["hf_config"]), make_mesh(1, -1, 1)
    )
    for _ in range(5):
        assert hf_export.restore_params_and_meta(run, None, abstract)[0] == 3
        gc.collect()
    assert leftovers == []
    assert "never retrieved" not in caplog.text
    assert caplog.text.count("checkpoint step 4 cannot be read") == 5

    result = export_cli(run, tmp_path / "hf", "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3" in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "checkpoint step 4 cannot be read" in lines[0], result.stderr[-3000:]


def test_truncated_safetensors_is_one_line(exported, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(exported, model)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 1000)
    with pytest.raises(UserError, match=rf"truncated safetensors file \({size - 1000:,} bytes"):
        tensorfiles.WeightFiles(model)
    data = write_jsonl(tmp_path / "convs.jsonl", [{"messages": c} for c in conversations(1)])
    result = subprocess.run(
        [sys.executable, "-m", "jaxrm.score", "--model", str(model), "--data", str(data)]
        + ["--output", str(tmp_path / "out.jsonl"), "--no_progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == EXIT_USER_ERROR
    assert_one_line_error(result, f"{weights}: truncated safetensors file", "download or copy")
    assert not (tmp_path / "out.jsonl").exists()
