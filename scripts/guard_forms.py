"""XLA's temporaries of the AdamW update under each form of the divergence guard, on a target.

    .venv/bin/python scripts/guard_forms.py --target h100|cpu|v5e

Compiles (no accelerator needed: `jaxrm.deviceless`) clipping + AdamW over 8 float32 1024x1024
parameters with the parameters and Adam state donated, guarded three ways: `lax.cond` on the
finiteness decided before the update, an elementwise select on it, and no guard. The form that
adds no temporaries updates in place; `jaxrm.step.guard_form` picks it per backend.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxrm import deviceless  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="h100", help="cpu, or a jaxrm.deviceless target")
    args = parser.parse_args()
    if args.target != "cpu":
        deviceless.use_plugin(args.target)
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if args.target == "cpu":
        devices = jax.devices()[:1]
    else:
        devices = deviceless.target_devices(args.target, 1 if args.target == "h100" else 4)[:1]
    replicated = NamedSharding(Mesh(devices, ("x",)), PartitionSpec())

    def abstract(tree):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree
        )

    params = abstract({f"w{i}": jnp.zeros((1024, 1024)) for i in range(8)})
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, eps=1e-5))
    opt_state = abstract(jax.eval_shape(optimizer.init, params))
    loss = abstract(jnp.zeros(()))

    def update(state, grads):
        p, o = state
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    def finite(grads, loss):
        return jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))

    forms = {
        "cond": lambda s, g, loss: jax.lax.cond(
            finite(g, loss), lambda s: update(s, g), lambda s: s, s
        ),
        "select": lambda s, g, loss: jax.tree.map(
            lambda new, old: jnp.where(finite(g, loss), new, old), update(s, g), s
        ),
        "none": lambda s, g, loss: update(s, g),
    }
    result = {"target": args.target, "state_bytes": 3 * 8 * 1024 * 1024 * 4, "temporaries": {}}
    for name, form in forms.items():
        compiled = jax.jit(form, donate_argnums=(0,)).lower((params, opt_state), params, loss)
        memory = compiled.compile().memory_analysis()
        result["temporaries"][name] = int(memory.temp_size_in_bytes)
        print(f"{name:7s} temporaries {memory.temp_size_in_bytes / 2**20:7.1f} MiB", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
