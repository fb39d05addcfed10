"""Train-step throughput of jaxrm against the reference PyTorch loop, on the same pairs, in one run.

    .venv/bin/python scripts/bench.py                      # the CPU setting of issue 10 (~10 min)
    .venv/bin/python scripts/bench.py --preset gpu-1b      # a 1B-class Llama at 2048, bf16
    .venv/bin/python scripts/bench.py --sides jaxrm,reference --pairs 48   # quicker

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

The last line printed is one JSON object with every side's figures and the ratios.
"""

from __future__ import annotations

import argparse
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
}  # fmt: skip
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
SIDES = ("jaxrm", "jaxrm_padded", "reference")
OPTIONAL_SIDES = ("reference_flex",)  # run only when --sides names them


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


def run_jaxrm(args, workdir: Path, pairs: list, layout: str) -> dict:
    import jax
    from flax import nnx

    from jaxrm.backends import resolve_execution
    from jaxrm.data.batch import to_global
    from jaxrm.data.loader import length_buckets
    from jaxrm.dtypes import BY_NAME
    from jaxrm.hf import load_reward_model
    from jaxrm.objective import Objective
    from jaxrm.optimizer import make_optimizer, make_schedule
    from jaxrm.sharding import data_parallel_size, make_mesh
    from jaxrm.step import init_optimizer_state, make_train_step, stop_votes

    backend = jax.default_backend()
    run = resolve_execution(args.dtype, args.attention, backend, args.hidden // args.heads, layout)
    mesh = make_mesh(1, -1, 1)
    dp = data_parallel_size(mesh)
    model, _, _ = load_reward_model(
        str(workdir / "model"), mesh, dtype=BY_NAME[run.dtype], attention=run.kernels,
        remat_policy=args.remat,
    )  # fmt: skip
    data = pairs_data(pairs)
    steps = steps_of(list(range(len(pairs))), args.pairs_per_step)
    if layout == "packed":
        host, computed = packed_steps(args, data, steps, dp)
    else:
        buckets = length_buckets(args.max_length)
        host = [padded_batch(data, ids, buckets) for ids in steps]
        computed = [b["input_ids"].size for b in host]
    optimizer = make_optimizer(make_schedule(1e-5, len(steps) * (1 + args.timed_epochs), "linear"))
    graphdef, params = nnx.split(model)
    del model
    opt_state = init_optimizer_state(optimizer, params, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    step = make_train_step(
        graphdef, optimizer, mesh, shardings, Objective(1), packed=layout == "packed"
    )
    votes = stop_votes(mesh, False)
    state = (params, opt_state)

    def run_steps(batches):
        nonlocal state
        for batch in batches:
            state, out = step(state, to_global(batch, mesh), votes)
            jax.block_until_ready(out)

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
    return {
        "attention": run.attention,
        "dtype": run.dtype,
        "layout": layout,
        "seconds": seconds,
        "steps": len(host) * args.timed_epochs,
        "compile_seconds": max(0.0, warmup_seconds - per_step * len(warmup)),
        "tokens_computed": int(sum(computed)) * args.timed_epochs,
        "device_peak_bytes": device_peak(jax.devices()[0]),
        "device": jax.devices()[0].device_kind,
    }


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


def packed_steps(args, data, steps: list, dp: int) -> tuple[list[dict], list[int]]:
    """jaxrm's packed steps (prefix-shared rows, the default layout), tokens computed by each."""
    from jaxrm.data.packing import PackSpec, pack, row_shape

    length, rows = row_shape(args.max_length, 0, args.pack_rows)
    spec = PackSpec(length, rows, dp, args.pairs_per_step, True)
    host = [{"micro_batches": pack(data, np.array(ids), spec), "normalizer": len(ids)} for ids in steps]
    return host, [len(b["micro_batches"]) * spec.micro_rows * length for b in host]


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


def run_reference(args, workdir: Path, pairs: list) -> dict:
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
    steps = steps_of(pairs, args.pairs_per_step)

    def run_micro(micro_pairs, weight: float) -> int:
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
        return ids.numel()

    def run_step(step_pairs) -> int:
        size = args.reference_micro_pairs or len(step_pairs)
        micro = [step_pairs[i : i + size] for i in range(0, len(step_pairs), size)]
        computed = sum(run_micro(m, len(m) / len(step_pairs)) for m in micro)
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
    return torch_result("sdpa", layout, seconds, len(steps) * args.timed_epochs, 0.0, computed)


def tree_mask_mod(seg, branch):
    """flex_attention's mask_mod of jaxrm's tree mask (jaxrm/models/attention/mask.py) over torch
    segment and branch ids [B, T]; a padding query reads only itself (no empty row)."""

    def tree(b, h, q, kv):
        same = (seg[b, q] == seg[b, kv]) & (seg[b, q] > 0) & (kv <= q)
        shared = (branch[b, kv] == 0) | (branch[b, kv] == branch[b, q])
        return (same & shared) | ((seg[b, q] == 0) & (q == kv))

    return tree


def run_reference_flex(args, workdir: Path, pairs: list) -> dict:
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
    steps = steps_of(list(range(len(pairs))), args.pairs_per_step)
    host, computed = packed_steps(args, pairs_data(pairs), steps, 1)

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
    return torch_result(
        "flex_attention (tree mask)", "packed", seconds, count, compile_seconds, tokens
    )


def torch_result(
    attention: str, layout: str, seconds: float, steps: int, compile_seconds: float, tokens: int
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
        "device_peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def run_side(args) -> None:
    workdir = Path(args.workdir)
    pairs = json.loads((workdir / "pairs.json").read_text())
    if args.side == "reference":
        result = run_reference(args, workdir, pairs)
    elif args.side == "reference_flex":
        result = run_reference_flex(args, workdir, pairs)
    else:
        layout = "packed" if args.side == "jaxrm" else "padded"
        result = run_jaxrm(args, workdir, pairs, layout)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "pairs",
                "pairs_per_step", "max_length", "timed_epochs"):  # fmt: skip
        parser.add_argument(f"--{key}", type=int, default=None, help="overrides the preset")
    parser.add_argument("--sides", default=",".join(SIDES))
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
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.side:
        return run_side(args)

    if args.write_inputs:
        return write_inputs(Path(args.write_inputs), args)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := set(sides) - set(SIDES + OPTIONAL_SIDES):
        parser.error(f"--sides: unknown {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="jaxrm-bench-") as tmp:
        workdir = Path(tmp)
        pairs = make_pairs(args.pairs, args.vocab, args.max_length, args.seed)
        (workdir / "pairs.json").write_text(json.dumps([[list(map(int, c)), list(map(int, r))]
                                                         for c, r in pairs]))  # fmt: skip
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
    summary = summarize(args, pairs, results)
    summary["failed_sides"] = failed
    sides = [s for s in sides if s in results]
    print_table(summary, sides)
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    if set(failed) - set(OPTIONAL_SIDES):
        return 1


if __name__ == "__main__":
    sys.exit(main())
