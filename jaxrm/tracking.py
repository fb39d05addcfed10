"""Where metrics go: OUTPUT/metrics.jsonl always, TensorBoard when installed, wandb when asked,
and OUTPUT/metrics.png with the curves at the end. Only process 0 writes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLOTTED = (
    ("rm/accuracy", "accuracy"),
    ("rm/loss", "loss"),
    ("rm/chosen_rewards", "chosen reward"),
    ("rm/rejected_rewards", "rejected reward"),
    ("rm/reward_margin", "reward margin"),
    ("rm/lr", "learning rate"),
)


class MetricsWriter:
    def __init__(
        self, output_dir: Path, *, enabled: bool, config: dict[str, Any], wandb: dict | None = None
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        except ImportError:
            pass
        if wandb is not None:
            import wandb as wandb_lib

            self._wandb = wandb_lib.init(config=config, **wandb)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(records: list[dict[str, Any]], path: Path) -> None:
    """A 2x3 grid of train (line) and eval (dots) curves against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, PLOTTED, strict=True):
        for prefix, style in (("train/", "-"), ("eval/", "o-")):
            points = [(r["step"], r[prefix + key]) for r in records if prefix + key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label=prefix.rstrip("/"), markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
