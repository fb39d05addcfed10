"""Every model family jaxrm reads, against transformers' own classes: config.json's `model_type`
picks the family's adapter; a random tiny `*ForSequenceClassification` of each family (shapes
that catch shortcuts, tests/hf_reference.py) gives transformers' rewards at float32 on padded,
packed and prefix-shared rows, and its loss and gradients in a training step."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrm.assets import TINY_EVAL_FILE, TINY_MODEL_DIR
from jaxrm.data.packing import PackSpec
from jaxrm.errors import UserError
from jaxrm.hf import abstract_reward_model, load_reward_model, read_hf_config, tensor_map
from jaxrm.hf_export import export_checkpoint
from jaxrm.models.decoder import Decoder
from jaxrm.models.families import FAMILIES, family_named, family_of, model_config_from_hf
from jaxrm.models.llama_hf import LLAMA
from jaxrm.score import main as score_main
from jaxrm.sharding import make_mesh
from jaxrm.train import main as train_main
from tests import hf_reference
from tests.hf_reference import right_padded_batch, save_tiny_classifier, torch_rewards
from tests.test_export import REWARD_STATS, save_trained_run
from tests.test_export import torch_rewards as exported_rewards
from tests.test_packing import packed_loss_fn, padded_loss_fn
from tests.test_resume import common as resume_args
from tests.test_resume import crash_after_step_2
from tests.test_train_step import jax_losses, random_pairs, torch_losses

LENGTHS = [7, 19, 1, 12, 19, 3]


def single_device_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module", params=hf_reference.FAMILIES)
def family_model(request, tmp_path_factory):
    """(family, checkpoint dir, transformers' model) of a random tiny classifier."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, save_tiny_classifier(path, family=request.param, seed=7)


def test_model_type_picks_the_family():
    hf_config = read_hf_config(TINY_MODEL_DIR)
    assert family_of(hf_config) is LLAMA
    config = model_config_from_hf(hf_config, attention="flash")
    assert config.family == "llama" and config.attention == "flash"
    assert family_named(config.family) is LLAMA


def test_an_unknown_model_type_is_one_line_naming_the_supported():
    supported = "llama, qwen2, qwen3, mistral, olmo2, gemma2, gemma3_text, gemma3, phi3"
    with pytest.raises(UserError) as e:
        family_of({"model_type": "qwen3_moe"}, "m/config.json")
    assert (
        str(e.value)
        == f"m/config.json: unsupported model_type 'qwen3_moe' (jaxrm supports {supported})"
    )
    with pytest.raises(UserError, match="unsupported model_type None"):
        family_of({})


def test_the_config_picks_backbone_and_tensor_names():
    config = model_config_from_hf(read_hf_config(TINY_MODEL_DIR))
    graphdef, _ = abstract_reward_model(config)
    assert "Decoder" in repr(graphdef) and LLAMA.backbone is Decoder
    names = [e.hf_name for e in tensor_map(config)]
    assert names[:3] == ["model.embed_tokens.weight", "model.norm.weight", "score.weight"]
    assert "model.layers.{layer}.self_attn.q_proj.weight" in names
    assert [e.hf_name for e in tensor_map(config, "")][0] == "embed_tokens.weight"
    assert LLAMA.exported_class == "LlamaForSequenceClassification"


def test_families_have_distinct_names_and_model_types():
    names = [f.name for f in FAMILIES]
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(set(names)) == len(names) and len(set(types)) == len(types)


def test_a_config_error_is_one_line():
    with pytest.raises(UserError, match="config.json: missing key 'num_attention_heads'"):
        model_config_from_hf({"model_type": "qwen3", "vocab_size": 8})
    hf = hf_reference.tiny_config("gemma2").to_dict()
    with pytest.raises(UserError, match="unsupported activation 'relu'"):
        model_config_from_hf(dict(hf, hidden_activation="relu"))
    with pytest.raises(UserError, match="unsupported rope type 'longrope'"):
        model_config_from_hf(dict(hf, rope_parameters={"rope_type": "longrope", "factor": 2.0}))
    layers = hf["num_hidden_layers"]
    with pytest.raises(UserError, match="config.json: layer_windows needs one entry per layer"):
        model_config_from_hf(dict(hf, layer_types=["sliding_attention"] * (layers + 1)))


@pytest.mark.parametrize("attention", ["xla", "flash"])
def test_rewards_equal_transformers(family_model, attention):
    family, path, reference = family_model
    model, _, report = load_reward_model(str(path), single_device_mesh(), attention=attention)
    assert report.head == "loaded" and report.ignored == []
    assert model.config.family == family_of(read_hf_config(path)).name
    ids, mask = right_padded_batch(LENGTHS, vocab=96)
    got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    np.testing.assert_allclose(got, torch_rewards(reference, ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("share", [True, False])
def test_packed_rows_equal_transformers(family_model, share):
    """Packed (and prefix-shared) rows under `flash`: rewards equal transformers' on the same
    sequences (windows by position: a rejected rest sits after the chosen rest in its row)."""
    _, path, reference = family_model
    model, _, _ = load_reward_model(str(path), single_device_mesh(), attention="flash")
    graphdef, params = nnx.split(model)
    lists = small_pairs()
    spec = PackSpec(length=64, rows=1, devices=1, slots=len(lists), share_prefix=share)
    _, (chosen, rejected) = jax.jit(packed_loss_fn(graphdef, lists, spec))(params)
    for side, rewards in ((0, chosen), (1, rejected)):
        ids, mask = padded_rows([pair[side] for pair in lists])
        expected = torch_rewards(reference, ids, mask)
        np.testing.assert_allclose(np.asarray(rewards), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["flash", "xla"])
def test_packed_gradients_equal_padded_rows(tmp_path, attention):
    """Gemma 2 (soft-capped logits, windows, query_pre_attn_scalar): loss and gradients of
    prefix-shared rows equal those of right-padded rows (whose equal PyTorch's)."""
    save_tiny_classifier(tmp_path, family="gemma2", seed=7)
    model, _, _ = load_reward_model(str(tmp_path), single_device_mesh(), attention=attention)
    graphdef, params = nnx.split(model)
    lists = small_pairs()
    spec = PackSpec(length=64, rows=1, devices=1, slots=len(lists), share_prefix=True)
    padded = jax.jit(jax.value_and_grad(padded_loss_fn(graphdef, lists), has_aux=True))
    packed = jax.jit(jax.value_and_grad(packed_loss_fn(graphdef, lists, spec), has_aux=True))
    (want, _), g_want = padded(params)
    (got, _), g_got = packed(params)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_got), nnx.to_flat_state(g_want), strict=True):
        np.testing.assert_allclose(
            np.asarray(a.value), np.asarray(b.value), atol=2e-6, err_msg=path
        )


def small_pairs(seed: int = 1) -> list[tuple[list[int], list[int]]]:
    """Pairs longer than the test windows, with shared prompts, one differing only in its last
    token and one with nothing in common: fit for 64-token rows."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(5):
        prompt = list(rng.integers(1, 96, rng.integers(0, 9)))
        rests = [list(rng.integers(1, 96, rng.integers(1, 13))) for _ in range(2)]
        pairs.append((prompt + rests[0], prompt + rests[1]))
    same = list(rng.integers(1, 96, 11))
    pairs.append((same + [5], same + [6]))
    pairs.append(([7, 8, 9], [10, 11, 12, 13]))
    return pairs


def padded_rows(rows):
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def test_training_steps_equal_pytorch(family_model):
    """Losses of 3 AdamW steps (so gradients, clipping and updates) equal a PyTorch run's
    (Llama's: tests/test_train_step.py)."""
    family, path, _ = family_model
    if family == "llama":
        pytest.skip("tests/test_train_step.py trains Llama against PyTorch")
    steps = [random_pairs(8, seed=s) for s in range(3)]
    ours, _ = jax_losses(path, single_device_mesh(), steps)
    np.testing.assert_allclose(ours, torch_losses(path, steps), rtol=1e-4)


def test_export_loads_cleanly_and_scores_alike(family_model, tmp_path):
    """The family's `*ForSequenceClassification` export: transformers loads it with every
    loading-info list empty and computes jaxrm's rewards; config and reward stats as written."""
    family, path, _ = family_model
    if family == "llama":
        pytest.skip("tests/test_export.py exports Llama")
    (tmp_path / "run").mkdir()
    run, tokenizer, ids, rewards = save_trained_run(tmp_path / "run", path, make_mesh(1, 4, 2))
    exported, _ = export_checkpoint(run, tmp_path / "hf", dtype="float32")
    config = json.loads((exported / "config.json").read_text())
    exported_class = family_of(read_hf_config(path)).exported_class
    assert config["architectures"] == [exported_class]
    assert config["pad_token_id"] == tokenizer.pad_token_id
    assert config["reward_stats"] == REWARD_STATS
    _, got = exported_rewards(exported, ids, tokenizer.pad_token_id, exported_class)
    np.testing.assert_allclose(got, rewards, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_a_multimodal_gemma3_checkpoint_reads_its_text_model(tmp_path, prefix):
    """Gemma 3's multimodal checkpoints (model_type gemma3): the text model's weights under either
    prefix transformers has saved them with, the vision tower ignored, the flat text config read."""
    from safetensors.numpy import load_file, save_file

    text_dir, mm_dir = tmp_path / "text", tmp_path / "mm"
    reference = save_tiny_classifier(text_dir, family="gemma3_text", seed=2)
    tensors = load_file(text_dir / "model.safetensors")
    renamed = {
        (prefix + name.removeprefix("model.") if name.startswith("model.") else name): value
        for name, value in tensors.items()
    }
    renamed["model.vision_tower.vision_model.post_layernorm.weight"] = np.ones(4, np.float32)
    mm_dir.mkdir()
    save_file(renamed, mm_dir / "model.safetensors", metadata={"format": "pt"})
    text_config = json.loads((text_dir / "config.json").read_text())
    config = {"model_type": "gemma3", "text_config": text_config, "vision_config": {}}
    (mm_dir / "config.json").write_text(json.dumps(config))
    model, hf_config, report = load_reward_model(str(mm_dir), single_device_mesh())
    assert report.head == "loaded" and report.ignored == [
        "model.vision_tower.vision_model.post_layernorm.weight"
    ]
    assert hf_config["model_type"] == "gemma3_text" and "text_config" not in hf_config
    ids, mask = right_padded_batch(LENGTHS, vocab=96)
    got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    np.testing.assert_allclose(got, torch_rewards(reference, ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_a_run_trains_resumes_exports_and_scores(tmp_path, family):
    """The whole job on a causal-LM checkpoint of the family: a packed, prefix-shared run that
    dies after its step-2 checkpoint resumes with the straight run's losses; its export scores
    (`jaxrm.score`) as transformers does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model_dir, output = tmp_path / "model", tmp_path / "run"
    torch.manual_seed(0)
    vocab = -(-len(tokenizer) // 8) * 8
    config = hf_reference.tiny_config(family, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = [
        *resume_args(model_dir, output),
        "--config.batch_layout=packed",
        "--config.prefix_sharing=True",
    ]
    train_main(common)
    straight = losses(output)
    crash_after_step_2(output)
    assert train_main(common)["step"] == 4
    assert losses(output) == straight and len(straight) == 4

    exported, _ = export_checkpoint(output, tmp_path / "hf", dtype="float32")
    rows = [json.loads(line) for line in TINY_EVAL_FILE.read_text().splitlines()[:4]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored_file = tmp_path / "scored.jsonl"
    score_main(["--model", str(exported), "--data", str(data), "--output", str(scored_file)])
    scored = [json.loads(line) for line in scored_file.read_text().splitlines()]
    reference = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    for row, got in zip(rows, scored, strict=True):
        for key in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(row[key], tokenize=True, return_dict=False)
            with torch.no_grad():
                expected = reference(torch.tensor([ids])).logits[0, 0].item()
            assert abs(got[f"{key}_reward"] - expected) <= 1e-5


def losses(output) -> list[tuple[int, float, float]]:
    records = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/rm/loss"], r["train/grad_norm"]) for r in records]
