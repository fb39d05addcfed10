"""`python scripts/memory_plan.py --config configs/tulu8b.py --devices N [flags]`: XLA's per-device
memory analysis of the train step on N devices, without allocating any weights.

The N devices are fake CPU devices made here (XLA_FLAGS=--xla_force_host_platform_device_count=N,
JAX_PLATFORMS=cpu, set before JAX is imported), so the analysis is XLA:CPU's: it keeps more in
float32 than the GPU/TPU compilers and over-estimates their temporaries. With `--target h100`
(or v5e, v5p, v6e) they are N compile-only devices of JAX's CUDA plugin from `.cuda-plugin/` (or
libtpu from `.tpu-plugin/`; scripts/deviceless_plugin.sh), and the analysis is XLA:GPU's
(XLA:TPU's), still without the accelerator. Flags, the report and its final JSON line: see
jaxrm/memory_plan.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def fake_cpu_devices(count: int) -> None:
    """Environment for `count` fake CPU devices; must run before JAX is imported."""
    from jaxrm.deviceless import set_xla_flag

    set_xla_flag("--xla_force_host_platform_device_count", str(count))
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--devices", type=int, default=16)
    early.add_argument("--target", default="cpu")
    known, _ = early.parse_known_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from jaxrm.errors import exit_on_user_error, run_cli

    @exit_on_user_error
    def run() -> None:
        if known.target == "cpu":
            fake_cpu_devices(max(known.devices, 1))
        else:
            from jaxrm.deviceless import use_plugin

            use_plugin(known.target)
        from jaxrm.memory_plan import main

        main(sys.argv[1:])

    run_cli(run)
