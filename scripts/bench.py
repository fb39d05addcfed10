"""Train-step throughput of jaxrm against the reference PyTorch loop, on the same pairs, in one run.

    .venv/bin/python scripts/bench.py                      # the CPU setting of issue 10 (~10 min)
    .venv/bin/python scripts/bench.py --preset gpu-1b      # a 1B-class Llama at 2048, bf16
    .venv/bin/python scripts/bench.py --sides jaxrm,reference --pairs 48   # quicker
    .venv/bin/python scripts/bench.py --preset cpu-kwise   # K-wise groups vs their pairs (~2-4 min)

Each side runs in its own process (so each one's peak memory is its own) on the same model (a
random Llama of the given shape, saved once as an HF checkpoint) and the same pairs, in the same
order: `--pairs` pairs, `--pairs_per_step` per optimizer step. Lengths are drawn from a
long-tailed chat-like distribution (log-normal prompts of median ~70 tokens shared by chosen and
rejected, responses of median ~130 tokens; rows up to `--max_length`), never all equal.

Sides:
- `jaxrm`: the default layout (packed rows, shared prompts) and attention (`auto`).
- `jaxrm_padded`: right-padded rows in length buckets (the tests' reference layout), the same
  attention: shows what packing buys, and the step's speed on its own.
- `reference`: open-instruct's way in PyTorch: transformers LlamaForSequenceClassification (sdpa),
  chosen + rejected padded to the longest row of the step, one forward, -logsigmoid loss,
  clip 1.0, AdamW (eps 1e-5, wd 0.01); float32 on CPU, bf16 autocast on GPU.
- `reference_flex` (only when named; a GPU's: FlexAttention has no backward on CPU): the same
  model and optimizer in PyTorch on jaxrm's packed, prefix-shared rows, with flex_attention and the
  same tree mask: what PyTorch makes of the packing. If it fails, it is reported and left out.

Each side runs the steps once to warm up (every compiled shape of jaxrm's steps) and is then timed
over `--timed_epochs` passes over the pairs. Non-pad tokens are the tokens of the chosen plus the
rejected sequence of each pair, prompt counted in each: the same unit of work for every side,
however it is computed. Model FLOPs per sequence of n tokens: 6 * N * n + 6 * L * d * n^2 (N:
parameters in the matmuls, i.e. all but the embedding; the second term: causal attention's
score and value matmuls, forward and backward, in L layers of width d), the usual count
(PaLM appendix B, halved for causality); MFU is that rate over the device's peak where known.

K-wise mode (`--responses K`, K >= 2; the `cpu-kwise` preset: K = 4): `--prompts` groups of one
log-normal prompt (as above) and K responses of the responses' length distribution, each response
scored by an integer rating drawn uniformly from 1..5 (ties allowed, as UltraFeedback's ratings;
a group's ratings are redrawn until at least two differ). Every optimizer step holds
`--prompts_per_step` prompts, the same on every side:
- `jaxrm_kwise`: the groups packed whole (`[prompt][response 1]...[response K]`, each response a
  branch reading the prompt; a group too long for a row is split into sub-groups that repeat the
  prompt), Bradley-Terry over every pair the ratings imply, averaged per pair;
- the pair sides (`jaxrm` by default; `reference` etc. when named) on the same groups cut into
  their implied pairs (`Groups.to_pairs`: up to K(K-1)/2 per prompt), each step holding the pairs
  of that step's prompts, so both sides optimize the same loss on the same pairs step by step
  (their per-step losses are compared: `loss_max_rel_diff`).
Figures per side: tokens computed (the non-pad tokens in the rows it ran: segment id > 0, or the
attention mask when padded), implied pairs and prompts trained per second, wall time, peak memory;
and the K-wise / pairs ratios.

The last line printed is one JSON object with every side's figures and the ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PRESETS = {
    # The CPU setting of issue 10: hidden 512, 8 layers, 8/4 heads, vocab 32000, 96 pairs.
    "cpu": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=32000,
                pairs=96, pairs_per_step=8, max_length=1024, timed_epochs=1),
    # A 1B-class Llama (Llama 3.2 1B's shape) at 2048 tokens, for a GPU.
    "gpu-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
                   pairs=512, pairs_per_step=64, max_length=2048, timed_epochs=1,
                   reference_micro_pairs=4, reference_checkpointing=1),
    # K-wise: 4 responses per prompt against the same data cut into pairs, the `cpu` model shape.
    "cpu-kwise": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=32000,
                      responses=4, prompts=16, prompts_per_step=4, max_length=1024,
                      timed_epochs=1),
}  # fmt: skip
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
SIDES = ("jaxrm", "jaxrm_padded", "reference")
OPTIONAL_SIDES = ("reference_flex",)  # run only when --sides names them
KWISE_SIDES = ("jaxrm_kwise", "jaxrm")  # --responses K: the defaults
RATINGS = 5  # K-wise scores: integer ratings 1..RATINGS


# ----------------------------------------------------------------------------------------------
# Shared inputs: the model and the pairs


def make_pairs(n: int, vocab: int, max_length: int, seed: int) -> list[tuple[list, list]]:
    """Chat-like pairs: a log-normal prompt shared by both, log-normal responses."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n:
        prompt, chosen, rejected = np.exp(rng.normal(np.log([70, 130, 130]), 0.8)).astype(int) + 4
        if prompt + max(chosen, rejected) > max_length:
            continue
        ids = rng.integers(3, vocab, prompt + chosen + rejected)
        head = list(ids[:prompt])
        pairs.append(
            (head + list(ids[prompt : prompt + chosen]), head + list(ids[prompt + chosen :]))
        )
    return pairs


def make_groups(n: int, k: int, vocab: int, max_length: int, seed: int):
    """K-wise groups (`jaxrm.data.groups.Groups`): a log-normal prompt shared by k log-normal
    responses (make_pairs' lengths), rated 1..RATINGS at random with at least two ratings apart."""
    from jaxrm.data.groups import Groups

    rng = np.random.default_rng(seed)
    groups, scores = [], []
    while len(groups) < n:
        prompt, *responses = np.exp(rng.normal(np.log([70] + [130] * k), 0.8)).astype(int) + 4
        if prompt + max(responses) > max_length:
            continue
        head = list(rng.integers(3, vocab, prompt))
        groups.append([head + list(rng.integers(3, vocab, r)) for r in responses])
        rating = rng.integers(1, RATINGS + 1, k)
        while len(set(rating)) < 2:
            rating = rng.integers(1, RATINGS + 1, k)
        scores.append(rating.tolist())
    return Groups.from_lists(groups, scores)


def pair_steps_of_groups(owner: np.ndarray, prompts: int, per_step: int) -> list[list[int]]:
    """The pairs (ids into `Groups.to_pairs`, whose group ids are `owner`) of each step of
    `per_step` consecutive prompts; the prompts left over after the last whole step are left out."""
    return [
        np.flatnonzero((owner >= s) & (owner < s + per_step)).tolist()
        for s in range(0, prompts - per_step + 1, per_step)
    ]


def save_model(path: Path, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_length,
        pad_token_id=0,
        num_labels=1,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)


def write_inputs(directory: Path, args) -> None:
    """The benchmark's model and pairs as a training run reads them (the tiny tokenizer: the
    pairs are pre-tokenized, it only supplies the pad token and the chat template)."""
    import shutil

    from transformers import AutoTokenizer

    from jaxrm.assets import TINY_MODEL_DIR

    directory.mkdir(parents=True, exist_ok=True)
    save_model(directory / "model", args)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(directory / "tokenizer")
    pairs = make_pairs(args.pairs, args.vocab, args.max_length, args.seed)
    with open(directory / "pairs.jsonl.tmp", "w") as f:
        for chosen, rejected in pairs:
            row = {
                "chosen_input_ids": list(map(int, chosen)),
                "rejected_input_ids": list(map(int, rejected)),
            }
            f.write(json.dumps(row) + "\n")
    shutil.move(directory / "pairs.jsonl.tmp", directory / "pairs.jsonl")
    print(f"wrote {directory}/model, tokenizer, pairs.jsonl ({len(pairs)} pairs)")


def steps_of(pairs: list, per_step: int) -> list[list]:
    return [pairs[i : i + per_step] for i in range(0, len(pairs) - per_step + 1, per_step)]


def model_flops(pairs: list, args) -> float:
    d, layers = args.hidden, args.layers
    kv = d * args.kv_heads // args.heads
    matmul_params = layers * (2 * d * d + 2 * d * kv + 3 * d * args.intermediate) + d
    lengths = np.array([len(s) for pair in pairs for s in pair], np.float64)
    return float(np.sum(6 * matmul_params * lengths + 6 * layers * d * lengths**2))


# ----------------------------------------------------------------------------------------------
# The sides


def run_jaxrm(args, workdir: Path, layout: str, make_host) -> dict:
    """Times jaxrm's train steps `make_host(dp) -> (steps, slots computed per step, non-pad
    tokens computed per step)` in `layout` ("packed", "padded" or "kwise": packed K-wise groups)."""
    import jax
    from flax import nnx

    from jaxrm.backends import resolve_execution
    from jaxrm.data.batch import to_global
    from jaxrm.dtypes import BY_NAME
    from jaxrm.hf import load_reward_model
    from jaxrm.objective import Objective
    from jaxrm.optimizer import make_optimizer, make_schedule
    from jaxrm.sharding import data_parallel_size, make_mesh
    from jaxrm.step import init_optimizer_state, make_train_step, stop_votes

    backend = jax.default_backend()
    attention_layout = "padded" if layout == "padded" else "packed"
    run = resolve_execution(
        args.dtype, args.attention, backend, args.hidden // args.heads, attention_layout
    )
    mesh = make_mesh(1, -1, 1)
    dp = data_parallel_size(mesh)
    model, _, _ = load_reward_model(
        str(workdir / "model"), mesh, dtype=BY_NAME[run.dtype], attention=run.kernels,
        remat_policy=args.remat,
    )  # fmt: skip
    host, computed, real = make_host(dp)
    optimizer = make_optimizer(make_schedule(1e-5, len(host) * (1 + args.timed_epochs), "linear"))
    graphdef, params = nnx.split(model)
    del model
    opt_state = init_optimizer_state(optimizer, params, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    step = make_train_step(
        graphdef, optimizer, mesh, shardings, Objective(1), packed=layout != "padded",
        kwise=layout == "kwise",
    )  # fmt: skip
    votes = stop_votes(mesh, False)
    state = (params, opt_state)
    losses = []

    def run_steps(batches):
        nonlocal state
        for batch in batches:
            state, out = step(state, to_global(batch, mesh), votes)
            jax.block_until_ready(out)
            losses.append(float(out["loss_sum"]) / float(out["loss_count"]))

    shapes, warmup = set(), []
    for batch in host:  # one step of every distinct shape: everything compiles here
        shape = tuple(m["input_ids"].shape for m in batch.get("micro_batches", [batch]))
        if shape[:1] not in shapes:
            shapes.add(shape[:1])
            warmup.append(batch)
    started = time.perf_counter()
    run_steps(warmup)
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.timed_epochs):
        run_steps(host)
    seconds = time.perf_counter() - started
    per_step = seconds / (len(host) * args.timed_epochs)
    measured = device_peak(jax.devices()[0])
    return {
        "attention": run.attention,
        "dtype": run.dtype,
        "layout": layout,
        "seconds": seconds,
        "steps": len(host) * args.timed_epochs,
        "compile_seconds": max(0.0, warmup_seconds - per_step * len(warmup)),
        "tokens_computed": int(sum(computed)) * args.timed_epochs,
        "nonpad_tokens_computed": int(sum(real)) * args.timed_epochs,
        "losses": losses[len(warmup) :],
        "device_peak_bytes": measured,
        "planned_peak_bytes": planned_peak(step, state, host[0], mesh),
        "device": jax.devices()[0].device_kind,
    }


def planned_peak(step, state, batch: dict, mesh) -> int:
    """XLA's plan of the step just timed, by scripts/memory_plan.py's method (the largest of its
    compiled pieces' buffers plus what stays resident beside them), to set beside the device's
    measured peak: how far a plan made without the device can be trusted."""
    from jaxrm.data.batch import to_global
    from jaxrm.memory_plan import step_pieces

    batch = batch["micro_batches"][0] if "micro_batches" in batch else batch
    pieces, resident = step_pieces(step, state, to_global(batch, mesh), mesh)
    return max(p.total + resident[p.name] for p in pieces)


def pairs_data(pairs: list):
    """The pairs as jaxrm's `Pairs` (no margins)."""
    from jaxrm.data.pairs import Pairs, Ragged

    return Pairs(
        Ragged.from_lists([c for c, _ in pairs]),
        Ragged.from_lists([r for _, r in pairs]),
        np.zeros(len(pairs), np.float32),
        np.zeros(len(pairs), np.int32),
        0,
    )


def pack_spec(args, dp: int, slots: int):
    """The packed rows' shape of a training run (prefix-shared rows of the default length)."""
    from jaxrm.data.packing import PackSpec, row_shape

    length, rows = row_shape(args.max_length, 0, args.pack_rows)
    return PackSpec(length, rows, dp, slots, True)


def packed_counts(host: list[dict], spec) -> tuple[list[dict], list[int], list[int]]:
    """Packed steps with, per step, the token slots computed (rows x length) and the non-pad
    tokens among them (segment id > 0)."""
    slots = [len(b["micro_batches"]) * spec.micro_rows * spec.length for b in host]
    real = [sum(int((m["segment_ids"] > 0).sum()) for m in b["micro_batches"]) for b in host]
    return host, slots, real


def packed_steps(args, data, steps: list, dp: int) -> tuple[list[dict], list[int], list[int]]:
    """jaxrm's packed steps (prefix-shared rows, the default layout) and `packed_counts`; pair
    slots for the step with the most pairs, so every micro-batch has one shape."""
    from jaxrm.data.packing import pack

    spec = pack_spec(args, dp, max(len(ids) for ids in steps))
    host = [
        {"micro_batches": pack(data, np.array(ids), spec), "normalizer": len(ids)} for ids in steps
    ]
    return packed_counts(host, spec)


def padded_steps(args, data, steps: list) -> tuple[list[dict], list[int], list[int]]:
    """The padded layout's steps in length buckets, with their token slots and non-pad tokens."""
    from jaxrm.data.loader import length_buckets

    buckets = length_buckets(args.max_length)
    host = [padded_batch(data, ids, buckets) for ids in steps]
    return host, [b["input_ids"].size for b in host], [int(b["lengths"].sum()) for b in host]


def kwise_steps(args, groups, dp: int) -> tuple[list[dict], list[int], list[int]]:
    """K-wise packed steps of `--prompts_per_step` consecutive groups (Bradley-Terry over the
    implied pairs, averaged per pair; slots fixed for the run, as the loader fixes them) and
    `packed_counts`."""
    from jaxrm.data.group_packing import KwiseSpec, pack_groups, slots_for

    spec = pack_spec(args, dp, 0)
    slots = slots_for(groups, args.prompts_per_step)
    host = []
    for start in range(0, len(groups) - args.prompts_per_step + 1, args.prompts_per_step):
        ids = np.arange(start, start + args.prompts_per_step)
        micro, normalizer = pack_groups(groups, ids, spec, KwiseSpec(), slots)
        host.append({"micro_batches": micro, "normalizer": normalizer})
    return packed_counts(host, spec)


def padded_batch(data, ids, buckets) -> dict:
    """The loader's padded contract for one step (k = 1), bucketed like training."""
    rows = [data.chosen[i] for i in ids] + [data.rejected[i] for i in ids]
    longest = max(len(r) for r in rows)
    width = min(b for b in buckets if b >= longest)
    input_ids = np.zeros((1, len(rows), width), np.int32)
    lengths = np.zeros((1, len(rows)), np.int32)
    for j, row in enumerate(rows):
        input_ids[0, j, : len(row)] = row
        lengths[0, j] = len(row)
    return {
        "input_ids": input_ids,
        "attention_mask": (np.arange(width) < lengths[..., None]).astype(np.int32),
        "lengths": lengths,
        "margin": np.zeros((1, len(ids)), np.float32),
        "weight": np.ones((1, len(ids)), np.float32),
    }


def device_peak(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def run_reference(args, workdir: Path, pairs: list, step_ids: list[list[int]]) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(
        workdir / "model", num_labels=1, dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    model.config.pad_token_id = 0
    if args.reference_checkpointing:  # open-instruct's recipes train with it
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-5, weight_decay=0.01)
    steps = [[pairs[i] for i in ids] for ids in step_ids]

    def run_micro(micro_pairs, weight: float) -> tuple[int, int]:
        rows = [c for c, _ in micro_pairs] + [r for _, r in micro_pairs]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            rewards = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0]
        chosen, rejected = rewards.float().chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        (loss * weight).backward()
        return ids.numel(), int(mask.sum())

    def run_step(step_pairs) -> np.ndarray:
        size = args.reference_micro_pairs or len(step_pairs)
        micro = [step_pairs[i : i + size] for i in range(0, len(step_pairs), size)]
        computed = np.sum([run_micro(m, len(m) / len(step_pairs)) for m in micro], axis=0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return computed

    run_step(steps[0])  # warm-up: allocator, kernels
    started = time.perf_counter()
    computed = sum(run_step(s) for _ in range(args.timed_epochs) for s in steps)
    seconds = time.perf_counter() - started
    layout = "padded to the micro-batch's longest row"
    count = len(steps) * args.timed_epochs
    return torch_result("sdpa", layout, seconds, count, 0.0, *map(int, computed))


def tree_mask_mod(seg, branch):
    """flex_attention's mask_mod of jaxrm's tree mask (jaxrm/models/attention/mask.py) over torch
    segment and branch ids [B, T]; a padding query reads only itself (no empty row)."""

    def tree(b, h, q, kv):
        same = (seg[b, q] == seg[b, kv]) & (seg[b, q] > 0) & (kv <= q)
        shared = (branch[b, kv] == 0) | (branch[b, kv] == branch[b, q])
        return (same & shared) | ((seg[b, q] == 0) & (q == kv))

    return tree


def run_reference_flex(args, workdir: Path, pairs: list, step_ids: list[list[int]]) -> dict:
    """The reference model and optimizer on jaxrm's packed, prefix-shared rows: PyTorch
    flex_attention with the same tree mask (a BlockMask from segment and branch ids; a padding
    query reads only itself), rewards gathered at the pairs' last tokens."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import AutoModelForSequenceClassification

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(
        workdir / "model", num_labels=1, dtype=torch.float32, attn_implementation="flex_attention"
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-5, weight_decay=0.01)
    host, computed, real = packed_steps(args, pairs_data(pairs), step_ids, 1)

    def rewards(micro: dict) -> tuple:
        t = {k: torch.as_tensor(v, device=device) for k, v in micro.items()}
        rows, length = t["segment_ids"].shape
        tree = tree_mask_mod(t["segment_ids"], t["branch_ids"])
        block_mask = create_block_mask(tree, rows, None, length, length, device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            hidden = model.model(
                input_ids=t["input_ids"].long(),
                attention_mask=block_mask,
                position_ids=t["positions"].long(),
            ).last_hidden_state
            scores = model.score(hidden).float().reshape(-1)
        real = t["weight"][0] > 0
        chosen, rejected = (t[f"{k}_index"][0][real].long() for k in ("chosen", "rejected"))
        return scores[chosen], scores[rejected]

    def run_step(step: dict) -> None:
        for micro in step["micro_batches"]:
            chosen, rejected = rewards(micro)
            loss = -torch.nn.functional.logsigmoid(chosen - rejected).sum() / step["normalizer"]
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    started = time.perf_counter()
    run_step(host[0])  # warm-up: flex_attention's compile, allocator
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.timed_epochs):
        for step in host:
            run_step(step)
    seconds = time.perf_counter() - started
    count = len(host) * args.timed_epochs
    compile_seconds = max(0.0, warmup_seconds - seconds / count)
    tokens = int(sum(computed)) * args.timed_epochs
    nonpad = int(sum(real)) * args.timed_epochs
    return torch_result(
        "flex_attention (tree mask)", "packed", seconds, count, compile_seconds, tokens, nonpad
    )


def torch_result(
    attention: str,
    layout: str,
    seconds: float,
    steps: int,
    compile_seconds: float,
    tokens: int,
    nonpad: int,
) -> dict:
    """A PyTorch side's figures (bf16 autocast on a GPU, float32 on CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "attention": attention,
        "dtype": "bfloat16 autocast" if cuda else "float32",
        "layout": layout,
        "seconds": seconds,
        "steps": steps,
        "compile_seconds": compile_seconds,
        "tokens_computed": tokens,
        "nonpad_tokens_computed": nonpad,
        "device_peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def run_side(args) -> None:
    workdir = Path(args.workdir)
    pairs = json.loads((workdir / "pairs.json").read_text())
    step_ids = json.loads((workdir / "steps.json").read_text())
    if args.side == "reference":
        result = run_reference(args, workdir, pairs, step_ids)
    elif args.side == "reference_flex":
        result = run_reference_flex(args, workdir, pairs, step_ids)
    elif args.side == "jaxrm_kwise":
        groups = load_groups(workdir / "groups.json")
        result = run_jaxrm(args, workdir, "kwise", functools.partial(kwise_steps, args, groups))
    elif args.side == "jaxrm":
        make_host = functools.partial(packed_steps, args, pairs_data(pairs), step_ids)
        result = run_jaxrm(args, workdir, "packed", make_host)
    else:  # jaxrm_padded: one device
        result = run_jaxrm(
            args, workdir, "padded", lambda _: padded_steps(args, pairs_data(pairs), step_ids)
        )
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# The run


def summarize(args, pairs: list, results: dict[str, dict]) -> dict:
    steps = steps_of(pairs, args.pairs_per_step)
    used = [p for s in steps for p in s]
    nonpad = sum(len(c) + len(r) for c, r in used) * args.timed_epochs
    flops = model_flops(used, args) * args.timed_epochs
    summary: dict = {"preset": args.preset, "pairs": len(used), "nonpad_tokens": nonpad}
    for side, r in results.items():
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in r["device"]), None)
        rate = flops / r["seconds"]
        summary[f"{side}_nonpad_tokens_per_s"] = nonpad / r["seconds"]
        summary[f"{side}_pairs_per_s"] = len(used) * args.timed_epochs / r["seconds"]
        summary[f"{side}_step_seconds"] = r["seconds"] / r["steps"]
        summary[f"{side}_compile_seconds"] = r["compile_seconds"]
        summary[f"{side}_peak_rss_bytes"] = r["peak_rss_bytes"]
        summary[f"{side}_device_peak_bytes"] = r["device_peak_bytes"]
        summary[f"{side}_planned_peak_bytes"] = r.get("planned_peak_bytes")
        summary[f"{side}_padding_fraction"] = 1 - nonpad / r["tokens_computed"]
        summary[f"{side}_model_tflops_per_s"] = rate / 1e12
        summary[f"{side}_mfu"] = rate / peak if peak and "bfloat16" in r["dtype"] else None
        summary[f"{side}_setup"] = f"{r['layout']}, {r['attention']} attention, {r['dtype']}"
        summary[f"{side}_device"] = r["device"]
    if "reference" in results:
        for side in results:
            if side != "reference":
                summary[f"{side}_vs_reference"] = (
                    summary[f"{side}_nonpad_tokens_per_s"]
                    / summary["reference_nonpad_tokens_per_s"]
                )
    # the keys issue 10 names
    if "jaxrm" in results:
        summary["jaxrm_peak_memory_bytes"] = (
            summary["jaxrm_device_peak_bytes"] or summary["jaxrm_peak_rss_bytes"]
        )
    if "reference" in results:
        summary["reference_peak_memory_bytes"] = (
            summary["reference_device_peak_bytes"] or summary["reference_peak_rss_bytes"]
        )
    return summary


def print_table(summary: dict, sides: list[str]) -> None:
    print(f"{'side':<14}{'tokens/s':>10}{'pairs/s':>9}{'s/step':>8}{'peak GB':>9}{'padding':>9}"
          f"{'TFLOP/s':>9}  setup")  # fmt: skip
    for side in sides:
        peak = summary[f"{side}_device_peak_bytes"] or summary[f"{side}_peak_rss_bytes"]
        print(
            f"{side:<14}{summary[f'{side}_nonpad_tokens_per_s']:>10.0f}"
            f"{summary[f'{side}_pairs_per_s']:>9.2f}{summary[f'{side}_step_seconds']:>8.2f}"
            f"{peak / 1e9:>9.2f}{summary[f'{side}_padding_fraction']:>9.0%}"
            f"{summary[f'{side}_model_tflops_per_s']:>9.3f}  {summary[f'{side}_setup']}"
        )


def summarize_kwise(args, groups, pairs: list, step_ids: list, results: dict[str, dict]) -> dict:
    """K-wise mode's figures: per side tokens computed (non-pad tokens in its rows), implied pairs
    and prompts per second, wall time, peak memory; K-wise over each pair side."""
    from jaxrm.data.group_packing import layout_tokens

    epochs = args.timed_epochs
    prompts = len(step_ids) * args.prompts_per_step
    used = [pairs[i] for ids in step_ids for i in ids]
    length = pack_spec(args, 1, 0).length
    summary: dict = {
        "preset": args.preset,
        "mode": "kwise",
        "responses": args.responses,
        "prompts": prompts,
        "pairs": len(used),
        "steps": len(step_ids),
        "prompts_per_step": args.prompts_per_step,
        "timed_epochs": epochs,
        "row_length": length,
        "split_groups": sum(
            layout_tokens(groups.sequences(g), True) > length for g in range(prompts)
        ),
        "pair_sequence_tokens": sum(len(c) + len(r) for c, r in used) * epochs,
    }
    for side, r in results.items():
        summary[f"{side}_tokens_computed"] = r["nonpad_tokens_computed"]
        summary[f"{side}_row_tokens"] = r["tokens_computed"]
        summary[f"{side}_padding_fraction"] = 1 - r["nonpad_tokens_computed"] / r["tokens_computed"]
        summary[f"{side}_pairs_per_s"] = len(used) * epochs / r["seconds"]
        summary[f"{side}_prompts_per_s"] = prompts * epochs / r["seconds"]
        summary[f"{side}_tokens_computed_per_s"] = r["nonpad_tokens_computed"] / r["seconds"]
        summary[f"{side}_seconds"] = r["seconds"]
        summary[f"{side}_step_seconds"] = r["seconds"] / r["steps"]
        summary[f"{side}_compile_seconds"] = r["compile_seconds"]
        summary[f"{side}_peak_rss_bytes"] = r["peak_rss_bytes"]
        summary[f"{side}_device_peak_bytes"] = r["device_peak_bytes"]
        summary[f"{side}_planned_peak_bytes"] = r.get("planned_peak_bytes")
        summary[f"{side}_peak_memory_bytes"] = r["device_peak_bytes"] or r["peak_rss_bytes"]
        summary[f"{side}_setup"] = f"{r['layout']}, {r['attention']} attention, {r['dtype']}"
        summary[f"{side}_device"] = r["device"]
    if "jaxrm_kwise" in results:
        for side in set(results) - {"jaxrm_kwise"}:
            for key in ("pairs_per_s", "tokens_computed", "peak_memory_bytes"):
                summary[f"kwise_vs_{side}_{key}"] = (
                    summary[f"jaxrm_kwise_{key}"] / summary[f"{side}_{key}"]
                )
    if "jaxrm_kwise" in results and "jaxrm" in results:  # the same loss, step by step
        a, b = (np.array(results[s]["losses"]) for s in ("jaxrm_kwise", "jaxrm"))
        summary["loss_max_rel_diff"] = float(np.max(np.abs(a - b) / np.abs(b)))
    return summary


def print_kwise_table(summary: dict, sides: list[str]) -> None:
    print(f"{'side':<13}{'tokens':>9}{'pairs/s':>9}{'prompts/s':>10}{'s/step':>8}{'wall s':>8}"
          f"{'peak GB':>9}{'padding':>9}  setup")  # fmt: skip
    for side in sides:
        print(
            f"{side:<13}{summary[f'{side}_tokens_computed']:>9}"
            f"{summary[f'{side}_pairs_per_s']:>9.3f}{summary[f'{side}_prompts_per_s']:>10.3f}"
            f"{summary[f'{side}_step_seconds']:>8.2f}{summary[f'{side}_seconds']:>8.1f}"
            f"{summary[f'{side}_peak_memory_bytes'] / 1e9:>9.2f}"
            f"{summary[f'{side}_padding_fraction']:>9.0%}  {summary[f'{side}_setup']}"
        )


def save_groups(path: Path, groups) -> None:
    responses = [[s.tolist() for s in groups.sequences(g)] for g in range(len(groups))]
    scores = [groups.scores[groups.members(g)].tolist() for g in range(len(groups))]
    path.write_text(json.dumps({"responses": responses, "scores": scores}))


def load_groups(path: Path):
    from jaxrm.data.groups import Groups

    data = json.loads(path.read_text())
    return Groups.from_lists(data["responses"], data["scores"])


def write_run_inputs(workdir: Path, args) -> tuple[list, list[list[int]], object]:
    """The pairs, each step's pair ids and (K-wise mode) the groups the sides read, written to
    `workdir` as pairs.json, steps.json and groups.json."""
    groups = None
    if args.responses:
        groups = make_groups(args.prompts, args.responses, args.vocab, args.max_length, args.seed)
        cut, owner = groups.to_pairs()
        pairs = [(cut.chosen[i].tolist(), cut.rejected[i].tolist()) for i in range(len(cut))]
        step_ids = pair_steps_of_groups(owner, len(groups), args.prompts_per_step)
        save_groups(workdir / "groups.json", groups)
    else:
        pairs = make_pairs(args.pairs, args.vocab, args.max_length, args.seed)
        step_ids = steps_of(list(range(len(pairs))), args.pairs_per_step)
    (workdir / "pairs.json").write_text(json.dumps([[list(map(int, c)), list(map(int, r))]
                                                     for c, r in pairs]))  # fmt: skip
    (workdir / "steps.json").write_text(json.dumps(step_ids))
    return pairs, step_ids, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "pairs",
                "pairs_per_step", "max_length", "timed_epochs", "prompts",
                "prompts_per_step"):  # fmt: skip
        parser.add_argument(f"--{key}", type=int, default=None, help="overrides the preset")
    parser.add_argument(
        "--responses",
        type=int,
        default=None,
        help="K >= 2: K-wise mode, K responses per prompt against the same groups cut into "
        "pairs (0: pairs, the default but in cpu-kwise)",
    )
    parser.add_argument(
        "--sides",
        default=None,
        help=f"default {','.join(SIDES)}; K-wise mode: {','.join(KWISE_SIDES)}",
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--pack_rows", type=int, default=0, help="rows per device; 0: default")
    parser.add_argument(
        "--reference_micro_pairs",
        type=int,
        default=None,
        help="the reference's pairs per forward pass, gradients accumulated over the step's "
        "(open-instruct's per-device batch; 0: the whole step at once)",
    )
    parser.add_argument(
        "--reference_checkpointing",
        type=int,
        default=None,
        help="1: the reference recomputes activations in the backward (gradient checkpointing, "
        "as open-instruct's recipes; sdpa with a padding mask materializes T x T scores)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the summary JSON here")
    parser.add_argument(
        "--write_inputs",
        default=None,
        metavar="DIR",
        help="only write the model, a tokenizer and the pairs (pre-tokenized jsonl) for "
        "python -m jaxrm.train (configs/bench_cpu.py), then exit",
    )
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = {"responses": 0, "prompts": 16, "prompts_per_step": 4}
    for key, value in {**defaults, **PRESETS[args.preset]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.side:
        return run_side(args)

    kwise = args.responses > 0
    if args.responses == 1 or args.responses < 0:
        parser.error(f"--responses {args.responses}: K-wise needs at least 2 (0: pairs)")
    if kwise and not 0 < args.prompts_per_step <= args.prompts:
        parser.error(f"--prompts_per_step {args.prompts_per_step}: 1 to --prompts {args.prompts}")
    if args.write_inputs:
        if kwise:
            parser.error("--write_inputs writes pairs: not with --responses")
        return write_inputs(Path(args.write_inputs), args)
    sides = [
        s.strip() for s in (args.sides or ",".join(KWISE_SIDES if kwise else SIDES)).split(",")
    ]
    sides = [s for s in sides if s]
    if unknown := set(sides) - set(SIDES + OPTIONAL_SIDES + (KWISE_SIDES[:1] if kwise else ())):
        parser.error(f"--sides: unknown {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="jaxrm-bench-") as tmp:
        workdir = Path(tmp)
        pairs, step_ids, groups = write_run_inputs(workdir, args)
        save_model(workdir / "model", args)
        results, failed = {}, {}
        for side in sides:
            result_file = workdir / f"{side}.json"
            command = [sys.executable, __file__, *sys.argv[1:], "--side", side,
                       "--workdir", str(workdir), "--result", str(result_file)]  # fmt: skip
            print(f"running {side} ...", file=sys.stderr, flush=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            done = subprocess.run(command, env=env)
            if done.returncode:  # reported and left out; the others' figures still count
                print(f"{side} failed (exit {done.returncode}); left out", file=sys.stderr)
                failed[side] = done.returncode
                continue
            results[side] = json.loads(result_file.read_text())
    if kwise:
        summary = summarize_kwise(args, groups, pairs, step_ids, results)
    else:
        summary = summarize(args, pairs, results)
    summary["failed_sides"] = failed
    sides = [s for s in sides if s in results]
    (print_kwise_table if kwise else print_table)(summary, sides)
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    if set(failed) - set(OPTIONAL_SIDES):
        return 1


if __name__ == "__main__":
    sys.exit(main())
