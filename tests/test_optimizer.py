"""Schedules and AdamW against transformers' schedulers and torch.optim.AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from jaxrm.errors import UserError
from jaxrm.optimizer import current_lr, make_optimizer, make_schedule, num_warmup_steps

LR = 3e-6


def _torch_lrs(kind: str, total: int, warmup: int, n: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    if kind == "linear":
        sched = get_linear_schedule_with_warmup(opt, warmup, total)
    elif kind == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    else:
        sched = get_constant_schedule_with_warmup(opt, warmup)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])  # lr used by this optimizer.step()
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.25])
def test_schedule_matches_transformers(kind, warmup_ratio):
    total = 20
    warmup = num_warmup_steps(total, warmup_ratio)
    expected = _torch_lrs(kind, total, warmup, total + 3)  # a few steps past the end too
    schedule = make_schedule(LR, total, kind, warmup_ratio=warmup_ratio)
    got = [current_lr(schedule, k) for k in range(total + 3)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-20)
    jitted = jax.jit(schedule)
    np.testing.assert_allclose(
        [float(jitted(jnp.int32(k))) for k in range(total + 3)], got, rtol=1e-6, atol=1e-20
    )


def test_warmup_steps_rules():
    assert num_warmup_steps(1050, 0.0) == 0
    assert num_warmup_steps(1050, 0.03) == 32  # ceil(31.5)
    assert num_warmup_steps(10, 0.1) == 1  # ceil, not round-down of an inexact float
    assert num_warmup_steps(10, 0.0, warmup_steps=4) == 4
    with pytest.raises(UserError):
        num_warmup_steps(10, 0.1, warmup_steps=4)
    with pytest.raises(UserError):
        make_schedule(LR, 10, "polynomial")
    # explicit warmup steps equal the same ratio
    a = make_schedule(LR, 20, "linear", warmup_steps=5)
    b = make_schedule(LR, 20, "linear", warmup_ratio=0.25)
    assert [current_lr(a, k) for k in range(20)] == [current_lr(b, k) for k in range(20)]
    # no warmup: the first update uses the full learning rate, the last step's lr is 0
    s = make_schedule(LR, 4, "linear")
    assert current_lr(s, 0) == pytest.approx(LR)
    assert current_lr(s, 4) == 0.0


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = {"w": (4, 3), "b": (3,), "head": (5,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    targets = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    scales = {k: rng.uniform(0.5, 4.0, size=s).astype(np.float32) for k, s in shapes.items()}
    return params, targets, scales


def _grad_np(params, targets, scales, step):
    # quadratic loss 0.5 * sum(scale * (p - t)^2), gradients amplified on some steps so that
    # clipping is active on those and inactive on others
    amp = 10.0 if step % 3 == 0 else 0.05
    return {k: (amp * scales[k] * (params[k] - targets[k])).astype(np.float32) for k in params}


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_adamw_matches_torch(max_grad_norm):
    params, targets, scales = _problem()
    total, steps = 12, 10
    # torch reference: clip_grad_norm_ + AdamW + LambdaLR linear (no warmup)
    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    topt = torch.optim.AdamW(
        tparams.values(), lr=LR * 1e5, betas=(0.9, 0.999), eps=1e-5, weight_decay=0.01
    )
    tsched = get_linear_schedule_with_warmup(topt, 0, total)

    schedule = make_schedule(LR * 1e5, total, "linear")
    tx = make_optimizer(schedule, max_grad_norm=max_grad_norm)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(jparams)
    update = jax.jit(tx.update)

    clipped_steps = 0
    for step in range(steps):
        g = _grad_np({k: v.detach().numpy() for k, v in tparams.items()}, targets, scales, step)
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k])
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(tparams.values()), max_grad_norm)
            clipped_steps += int(norm > max_grad_norm)
        topt.step()
        tsched.step()

        jg = _grad_np({k: np.asarray(v) for k, v in jparams.items()}, targets, scales, step)
        updates, state = update(jax.tree.map(jnp.asarray, jg), state, jparams)
        jparams = optax.apply_updates(jparams, updates)

        # atol 2e-7: torch float32 itself differs from torch float64 by ~1.3e-7 here
        for k in params:
            np.testing.assert_allclose(
                np.asarray(jparams[k]), tparams[k].detach().numpy(), rtol=1e-6, atol=2e-7
            )
    if max_grad_norm is not None:
        assert 0 < clipped_steps < steps  # clipping both active and inactive
    # parameters actually moved (the comparison is not vacuous)
    assert not np.allclose(np.asarray(jparams["w"]), params["w"], atol=1e-3)


def test_plain_optax_adamw_is_not_torch_exact():
    """Why scale_by_adam_torch exists: optax's float32 `1 - 0.999**t` is off by ~1e-5 at t=1.
    Ours is within 2 float32 ulps of torch's own first step (bit-equal on JAX 0.12, whose float32
    expm1 is exact here; 1.5e-7 off on 0.10.2)."""
    g, p = {"a": jnp.full((3,), 2.0)}, {"a": jnp.zeros((3,))}
    weights = torch.zeros(3, requires_grad=True)
    torch_adamw = torch.optim.AdamW([weights], lr=0.1, eps=1e-5, weight_decay=0.0)
    weights.grad = torch.full((3,), 2.0)
    torch_adamw.step()
    torch_first = weights.detach().numpy()  # lr * g / (|g| + eps) in torch's float32
    np.testing.assert_allclose(torch_first, -0.1 * 2.0 / (2.0 + 1e-5), rtol=2e-7)
    ours = make_optimizer(0.1, weight_decay=0.0, max_grad_norm=None)
    u, _ = ours.update(g, ours.init(p), p)
    np.testing.assert_allclose(u["a"], torch_first, rtol=2e-7)
    plain = optax.adamw(0.1, eps=1e-5, weight_decay=0.0)
    u, _ = plain.update(g, plain.init(p), p)
    assert np.max(np.abs(np.asarray(u["a"]) / torch_first - 1)) > 1e-6


def test_no_clipping_when_disabled():
    g = {"a": jnp.full((3,), 100.0)}
    p = {"a": jnp.zeros((3,))}
    for mgn in (None, 0.0, -1.0):
        tx = make_optimizer(0.1, max_grad_norm=mgn, weight_decay=0.0)
        u, _ = tx.update(g, tx.init(p), p)
        # first Adam step is lr * g / (|g| + eps) ~= lr whatever the scale of g
        np.testing.assert_allclose(u["a"], -0.1 * 100.0 / (100.0 + 1e-5), rtol=1e-6)
