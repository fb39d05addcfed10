"""Time `packing.first_fit_decreasing` (the packer of training, `jaxrm.score` and
`jaxrm.evaluate`) on 10k to 160k sequences, against the quadratic first-fit it replaced.

    .venv/bin/python scripts/bench_packing.py                  # 10k..160k, quadratic up to 40k
    .venv/bin/python scripts/bench_packing.py --sizes 10000,2000000 --quadratic_up_to 0

Lengths are drawn from a long-tailed chat-like distribution (log-normal, median ~200 tokens,
clipped to 1..`--capacity`), the same for both packers at each size; each figure is the best of
`--repeats` runs. Both packers must return the same bins. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from jaxrm.data.packing import first_fit_decreasing


def quadratic_first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """The packer before issue 18: a linear scan of every open bin per item."""
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    room: list[int] = []
    for item in order:
        size = int(lengths[item])
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(int(item))
                room[b] -= size
                break
        else:
            bins.append([int(item)])
            room.append(capacity - size)
    return bins


def chat_lengths(n: int, capacity: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(200), 0.8, n).astype(np.int64), 1, capacity)


def best_time(fn, lengths: np.ndarray, capacity: int, repeats: int) -> tuple[float, list]:
    best, bins = float("inf"), []
    for _ in range(repeats):
        started = time.perf_counter()
        bins = fn(lengths, capacity)
        best = min(best, time.perf_counter() - started)
    return best, bins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,20000,40000,80000,160000")
    parser.add_argument("--capacity", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--quadratic_up_to", type=int, default=40000, help="0: never")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        lengths = chat_lengths(n, args.capacity)
        seconds, bins = best_time(first_fit_decreasing, lengths, args.capacity, args.repeats)
        row = {"sequences": n, "bins": len(bins), "seconds": round(seconds, 4)}
        if n <= args.quadratic_up_to:
            old, old_bins = best_time(quadratic_first_fit_decreasing, lengths, args.capacity, 1)
            if old_bins != bins:
                raise SystemExit(f"{n} sequences: the two packers disagree")
            row["quadratic_seconds"] = round(old, 3)
        results.append(row)
        old = f", quadratic {row['quadratic_seconds']:.3f}s" if "quadratic_seconds" in row else ""
        print(f"{n:>9} sequences -> {len(bins):>7} rows: {seconds:.3f}s{old}", flush=True)
    print(
        json.dumps(
            {
                "capacity": args.capacity,
                "python": platform.python_version(),
                "numpy": np.__version__,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
