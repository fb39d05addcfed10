"""Benchmark results for people: the terminal table, the JSON file and the bar chart."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxrm.errors import UserError, write_failure
from jaxrm.rewardbench.rules import BenchmarkResult, SubsetResult


def fmt_score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _subset_lines(subsets: Sequence[SubsetResult], with_section: bool) -> list[str]:
    head = f"{'subset':<24}" + (f"{'section':<11}" if with_section else "")
    lines = [head + f"{'score':>8}{'correct':>9}{'scored':>8}{'too long':>10}"]
    for s in subsets:
        correct = "-" if s.correct is None else f"{s.correct:g}"
        section = f"{s.section or '-':<11}" if with_section else ""
        lines.append(
            f"{s.name:<24}{section}{fmt_score(s.score):>8}{correct:>9}{s.scored:>8}{s.too_long:>10}"
        )
    return lines


def format_table(result: BenchmarkResult, title: str) -> str:
    """Sections (RewardBench) and the overall score, then every subset with its counts."""
    lines = [title, ""]
    if result.sections:
        lines.append(f"{'section':<24}{'score':>8}")
        lines += [f"{name:<24}{fmt_score(v):>8}" for name, v in result.sections.items()]
    overall = fmt_score(result.score) + ("" if result.complete else "  (incomplete)")
    lines += [f"{'Score':<24}{overall:>8}", ""]
    lines += _subset_lines(result.subsets, bool(result.sections))
    for s in result.subsets:
        if s.details:
            parts = [f"{k} {v:.4g}" for k, v in s.details.items()]
            lines += ["", f"{s.name} ({result.ties_formula}): " + ", ".join(parts)]
    if result.unknown_subsets:
        lines += ["", "subsets not in the benchmark (not in the score):"]
        lines += _subset_lines(result.unknown_subsets, False)
    if result.missing_subsets:
        lines += ["", f"subsets with no rows: {', '.join(result.missing_subsets)}"]
    return "\n".join(lines)


def output_paths(output: str) -> tuple[Path, Path]:
    """`--output` names the results JSON; the chart is its sibling with `.png` (`r.json` ->
    `r.png`, `r` -> `r.png`). A `.png` name is refused: the chart would replace the results."""
    path = Path(os.path.expanduser(output))
    if path.suffix.lower() == ".png":
        raise UserError(
            f"--output {output}: names the results JSON, and the chart is written beside it as "
            f".png; give a JSON name such as {path.with_suffix('.json')}"
        )
    return path, path.with_suffix(".png")


def write_results(
    output: Path, chart: Path, payload: dict[str, Any], result: BenchmarkResult, title: str
) -> None:
    """The results JSON, then the chart; a failed write is a one-line error."""
    try:
        write_json(output, payload)
        plot_result(result, title, chart)
    except OSError as e:
        raise UserError(
            f"could not write {output} or {chart} ({write_failure(e)}); the scores are above"
        ) from None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes `payload` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_result(result: BenchmarkResult, title: str, path: Path) -> None:
    """Horizontal bars: the overall score, the sections, then the subsets by section colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10").colors
    colour = {name: palette[i % 10] for i, name in enumerate(result.sections)}
    bars = [("Score", result.score, "black")]
    bars += [(name, v, colour[name]) for name, v in result.sections.items()]
    bars += [(s.name, s.score, colour.get(s.section, palette[0])) for s in result.subsets]
    bars += [(f"{s.name} (other)", s.score, "grey") for s in result.unknown_subsets]
    names = [b[0] for b in bars][::-1]
    values = [0.0 if b[1] is None else b[1] for b in bars][::-1]
    colours = [b[2] for b in bars][::-1]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * len(bars)), constrained_layout=True)
    ax.barh(names, values, color=colours)
    for y, (value, bar) in enumerate(zip(values, bars[::-1], strict=True)):
        ax.text(value + 0.01, y, fmt_score(bar[1]), va="center", fontsize=8)
    ax.set_xlim(min(0.0, *values) - 0.02, 1.12)
    ax.set_xlabel("score")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
