"""Where metrics go: OUTPUT/metrics.jsonl always, TensorBoard when installed, wandb when asked,
and OUTPUT/metrics.png with the curves at the end. Only process 0 writes.

metrics.jsonl is strict JSON: a value that is not finite (e.g. a window of only skipped steps) is
written as null, never as a bare NaN. A resumed run first drops the records after its checkpoint's
step, so the replayed steps replace them and every step has one record.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from jaxrm.errors import UserError

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
        record = {k: _finite_or_none(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
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
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def keep_metrics_until(path: Path, last_step: int) -> None:
    """Rewrites metrics.jsonl (atomically) without the records after `last_step` (and without a
    torn last line)."""
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if not Path(path).is_file() or Path(path).read_text() == text:
        return
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no temporary behind
    if len(kept) < len(records):
        dropped = len(records) - len(kept)
        log.info("metrics.jsonl: dropped %d records after step %d", dropped, last_step)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a torn last line (a write cut by a full disk or a kill) is
    left out with a warning, a bad line elsewhere is a one-line error."""
    if not Path(path).is_file():
        return []
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise UserError(f"{path}: line {number} is not JSON ({e.msg})") from None
            log.warning("%s: leaving out its last line, cut short by an interrupted write", path)
    return records


def plot_metrics(records: list[dict[str, Any]], path: Path) -> None:
    """A 2x3 grid of train (line) and eval (dots) curves against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, PLOTTED, strict=True):
        for prefix, style in (("train/", "-"), ("eval/", "o-")):
            points = [
                (r["step"], r[prefix + key]) for r in records if r.get(prefix + key) is not None
            ]
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
