"""scripts/gpu_check.sh's summary: OUTDIR/gpu_check.json (every step's status and figures) and
OUTDIR/gpu_check.md (short tables, with the issue's goals), from the steps' files in OUTDIR.

    python scripts/gpu_check_report.py OUTDIR MODE [TRAIN_METRICS_JSONL]

Goals (issue 20, on one H100): tree-mask attention fwd+bwd at >= 50% of cuDNN's dense causal
TFLOP/s (both over live pairs); the 1B Llama at 2048 packed at >= 40% MFU; jaxrm >= 1.3x the
PyTorch reference's non-pad tokens/s.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "torch",
            "transformers", "jaxrm")  # fmt: skip
GOALS = {"tree_vs_cudnn_causal": 0.5, "mfu": 0.4, "vs_reference": 1.3}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def last_eval(metrics_file: str | None) -> dict[str, float] | None:
    """The last metrics line with eval/ fields of the tiny run."""
    if not metrics_file or not Path(metrics_file).exists():
        return None
    found = None
    for line in Path(metrics_file).read_text().splitlines():
        row = json.loads(line)
        evals = {k: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, float)}
        if evals:
            found = {"step": row.get("step"), **evals}
    return found


def peak_gb(bench: dict, side: str) -> str:
    """A side's measured device peak (or the process's RSS off a GPU) and, for jaxrm, XLA's plan
    of the same step (scripts/bench.py `planned_peak`)."""
    measured = bench.get(f"{side}_device_peak_bytes") or bench.get(f"{side}_peak_rss_bytes")
    planned = bench.get(f"{side}_planned_peak_bytes")
    text = "" if measured is None else f"{measured / 1e9:.2f}"
    return text if planned is None else f"{text} / {planned / 1e9:.2f}"


def attention_goal(bench: dict) -> dict[str, Any] | None:
    """The best tree-mask rate against cuDNN's dense causal rate (TFLOP/s over live pairs)."""
    runs = bench["runs"]
    cudnn = [r["tflops_per_s"] for r in runs if r["kind"] == "causal" and r["implementation"] ==
             "cudnn"]  # fmt: skip
    tree = [r for r in runs if r["kind"] == "tree"]
    if not cudnn or not tree:
        return None
    best = max(tree, key=lambda r: r["tflops_per_s"])
    ratio = best["tflops_per_s"] / cudnn[0]
    goal = GOALS["tree_vs_cudnn_causal"]
    return {
        "implementation": best["implementation"],
        "tree_tflops_per_s": best["tflops_per_s"],
        "cudnn_causal_tflops_per_s": cudnn[0],
        "ratio": ratio,
        "goal": goal,
        "met": ratio >= goal,
    }


def markdown(summary: dict) -> list[str]:
    lines = [f"# gpu_check ({summary['mode']})", "", f"Device: {summary['device']}; "
             + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()), "",
             "| step | status | seconds |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in summary["steps"]]
    check = summary.get("attention_check")
    if check:
        failed = [r for r in check["checks"] if r["status"] == "FAILED"]
        lines += ["", f"Attention against the reference ({len(check['checks'])} checks, "
                  f"{len(failed)} failed; tolerances {check['tolerance']}):", ""]  # fmt: skip
        lines += check["markdown"]
    bench = summary.get("bench_attention")
    if bench:
        lines += ["", f"Attention fwd+bwd, {bench['rows']} x {bench['length']} tokens, "
                  f"{bench['heads']}/{bench['kv_heads']} heads, head_dim {bench['head_dim']}, "
                  f"{bench['dtype']} (TFLOP/s over live pairs):", "",
                  "| mask | implementation | ms | TFLOP/s | live pairs / causal | temp MiB |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in bench["runs"]:
            lines.append(f"| {r['kind']} | {r['implementation']} | {r['fwd_bwd_ms']} | "
                         f"{r['tflops_per_s']} | {r['live_pair_share_of_causal']} | "
                         f"{r['temp_bytes'] / 2**20:.0f} |")  # fmt: skip
    goal = summary.get("attention_goal")
    if goal:
        lines += ["", f"Tree vs cuDNN dense causal: {goal['implementation']} "
                  f"{goal['tree_tflops_per_s']} / {goal['cudnn_causal_tflops_per_s']} TFLOP/s = "
                  f"{goal['ratio']:.2f} (goal >= {goal['goal']}: "
                  f"{'met' if goal['met'] else 'NOT met'})"]  # fmt: skip
    train_bench = summary.get("bench")
    if train_bench:
        lines += ["", f"Train step, preset {train_bench['preset']} ({train_bench['pairs']} pairs):",
                  "", "| side | non-pad tokens/s | MFU | vs reference | peak GB: device (RSS off "
                  "a GPU) / XLA's plan | setup |", "|---|---|---|---|---|---|"]  # fmt: skip
        for side in ("jaxrm", "jaxrm_padded", "reference", "reference_flex"):
            if f"{side}_nonpad_tokens_per_s" not in train_bench:
                continue
            mfu = train_bench.get(f"{side}_mfu")
            ratio = train_bench.get(f"{side}_vs_reference")
            lines.append(f"| {side} | {train_bench[f'{side}_nonpad_tokens_per_s']:.0f} | "
                         f"{'' if mfu is None else f'{mfu:.1%}'} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x'} | "
                         f"{peak_gb(train_bench, side)} | "
                         f"{train_bench[f'{side}_setup']} |")  # fmt: skip
        lines.append(f"Goals: MFU >= {GOALS['mfu']:.0%}, jaxrm >= {GOALS['vs_reference']}x the "
                     "reference.")  # fmt: skip
    if summary.get("train_eval"):
        lines += ["", "Tiny config end to end, last eval: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in summary["train_eval"].items())]  # fmt: skip
    return lines


def main() -> int:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    metrics = sys.argv[3] if len(sys.argv) > 3 else None
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, status, seconds = line.split("\t")
        steps.append({"name": name, "status": status, "seconds": float(seconds)})
    check = read_json(out / "attention_check.json")
    bench_attention = read_json(out / "bench_attention.json")
    summary = {
        "mode": mode,
        "device": (check or bench_attention or {}).get("device", "unknown"),
        "versions": versions(),
        "steps": steps,
        "attention_check": check,
        "bench_attention": bench_attention,
        "attention_goal": attention_goal(bench_attention) if bench_attention else None,
        "bench": read_json(out / "bench.json"),
        "train_eval": last_eval(metrics),
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "gpu_check.md").write_text("\n".join(markdown(summary)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
