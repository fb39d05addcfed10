"""Every attention implementation the table holds for this backend, against the T x T reference,
on this machine's default device: values and gradients, float32 and bfloat16, per mask kind.

    python scripts/attention_check.py [--length 1024] [--heads 8 --kv_heads 2 --head_dim 128]
        [--output FILE.json]

For each mask kind (`causal`, `segments`, `tree`, on chat-like rows of scripts/attention_inputs.py,
with padding) and each implementation `KERNELS[kind]` holds that the backends table lets run here
(`jaxrm.backends.attention_misfit`), in each dtype and each family feature (plain; a sliding window
of length/16 positions; Gemma 2's soft-cap 50 with scale 0.1): the output and the gradients of
sum(out * cotangent) with respect to q, k and v, against `reference_attention` run in float32 at the
highest matmul precision on the same (dtype-rounded) inputs. A feature the table says an
implementation cannot express (`Implementation.misfit`) is listed as `refused`, not run.

Error: max |x - ref| / max(1, max |ref|) per tensor. Tolerances: float32 2e-2 (a GPU's float32
matmuls may run as TF32, 10-bit mantissa), bfloat16 6e-2 (8-bit mantissa, scores and outputs
rounded once more). The last line printed is one JSON object; exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from attention_inputs import (
    MASK_KINDS,
    add_shape_arguments,
    chat_rows,
    implementations,
    make_mask,
    random_inputs,
)

from jaxrm.models.attention import (
    IMPLEMENTATIONS,
    Features,
    Logits,
    attend,
    reference_attention,
)

TOLERANCE = {"float32": 2e-2, "bfloat16": 6e-2}
WINDOW_SHARE = 16  # the sliding window: 1/16 of the row length in positions
FEATURES = {  # name -> (sliding window?, softcap, scale or None: 1/sqrt(head_dim))
    "plain": (False, None, None),
    "window": (True, None, None),
    "softcap": (False, 50.0, 0.1),
}


def relative_error(x: jax.Array, ref: jax.Array) -> float:
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(x - ref)) / jnp.maximum(1.0, jnp.max(jnp.abs(ref))))


def check_one(kind, implementation, dtype, feature, inputs, ids, head_dim, cache: dict) -> dict:
    slides, softcap, scale = FEATURES[feature]
    logits = Logits(scale or head_dim**-0.5, softcap)
    length = inputs[0].shape[1]
    mask = make_mask(kind, ids, length // WINDOW_SHARE if slides else None)
    q, k, v, cotangent = (x.astype(dtype) for x in inputs)

    def grads(fn):
        def loss(q, k, v, cotangent, mask):
            out = fn(q, k, v, mask)
            return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    def ours(q, k, v, mask):
        return attend(q, k, v, mask, implementation, logits)

    def reference(q, k, v, mask):
        with jax.default_matmul_precision("highest"):
            f32 = (x.astype(jnp.float32) for x in (q, k, v))
            return reference_attention(*f32, mask, logits)

    row = {"kind": kind, "implementation": implementation, "dtype": dtype, "feature": feature}
    features = Features(softcap=softcap is not None, window=slides)
    refusal = IMPLEMENTATIONS[implementation].misfit(kind, features)
    if refusal is not None:
        return {**row, "status": "refused", "reason": refusal}
    (dq, dk, dv), out = grads(ours)(q, k, v, cotangent, mask)
    if (kind, dtype, feature) not in cache:
        cache[kind, dtype, feature] = grads(reference)(q, k, v, cotangent, mask)
    ref_grads, ref_out = cache[kind, dtype, feature]
    errors = {"out": relative_error(out, ref_out)}
    errors.update(
        {
            f"d{n}": relative_error(g, r)
            for n, g, r in zip("qkv", (dq, dk, dv), ref_grads, strict=True)
        }
    )
    worst = max(errors.values())
    status = "ok" if worst <= TOLERANCE[dtype] else "FAILED"
    return {**row, "status": status, "tolerance": TOLERANCE[dtype], "max_error": worst, **errors}


def markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| mask | implementation | dtype | feature | status | max error (tol) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        error = f"{r['max_error']:.1e} ({r['tolerance']:g})" if "max_error" in r else ""
        lines.append(
            f"| {r['kind']} | {r['implementation']} | {r['dtype']} | {r['feature']} | "
            f"{r['status']} | {error} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, rows=2, length=1024, heads=8, kv_heads=2, dim=128)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--kinds", default=",".join(MASK_KINDS))
    parser.add_argument("--features", default=",".join(FEATURES))
    parser.add_argument(
        "--float32_features",
        default=None,
        help="the features checked in float32 (default: --features); bfloat16 checks them all",
    )
    parser.add_argument(
        "--implementations",
        default=None,
        help="only these (default: every one the table runs here); each check compiles a forward "
        "and a backward, ~10 s on an H100",
    )
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()

    backend = jax.default_backend()
    inputs = random_inputs(args, jnp.float32)
    rows, cache = [], {}
    for kind in args.kinds.split(","):
        ids = chat_rows(kind, args.rows, args.length, args.seed)
        for dtype in args.dtypes.split(","):
            for implementation in implementations(kind, backend, dtype, args.head_dim):
                if args.implementations and implementation not in args.implementations.split(","):
                    continue
                features = args.features
                if dtype == "float32" and args.float32_features:
                    features = args.float32_features
                for feature in features.split(","):
                    row = check_one(
                        kind, implementation, dtype, feature, inputs, ids, args.head_dim, cache
                    )
                    rows.append(row)
                    error = f" {row['max_error']:.1e}" if "max_error" in row else ""
                    print(f"{kind:9s}{implementation:8s}{dtype:9s}{feature:8s}{row['status']}"
                          f"{error}", flush=True)  # fmt: skip
    failed = [r for r in rows if r["status"] == "FAILED"]
    result = {
        "backend": backend,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "shape": {
            "rows": args.rows,
            "length": args.length,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
        },  # fmt: skip
        "tolerance": TOLERANCE,
        "checks": rows,
        "failed": len(failed),
        "markdown": markdown(rows),
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
