"""The attention rule and its T x T reference against a literal float64 reading of it, and the
flash kernel against the reference: values, gradients (windows by position, soft-cap, scale),
skipped blocks, memory, and per device under a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxrm.models.attention import (
    ATTENTION_IMPLEMENTATIONS,
    KERNELS,
    NO_WINDOW,
    Logits,
    Mask,
    allowed_pairs,
    attend,
    reference_attention,
)
from jaxrm.models.attention.flash import live_blocks
from jaxrm.sharding import activation_sharding, activation_specs, make_mesh


def random_layout(rows: int, length: int, seed: int, share: bool = True, fill: float = 0.9):
    """Rows of groups [prefix][chosen rest][rejected rest] (or two plain sequences), then
    padding; one row may hold a single group that fills it completely."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, length), np.int32)
    branch = np.zeros((rows, length), np.int32)
    for r in range(rows):
        pos, sid = 0, 1
        while pos < fill * length:
            p = int(rng.integers(0, 40)) if share else 0
            c, j = (int(x) for x in rng.integers(1, 70, 2))
            n = min(p + c + j, length - pos)
            if n < 3:
                break
            p = min(p, n - 2)
            c = min(c, n - p - 1)
            seg[r, pos : pos + n] = sid
            branch[r, pos + p : pos + p + c] = 1
            branch[r, pos + p + c : pos + n] = 2
            pos, sid = pos + n, sid + 1
    return jnp.asarray(seg), jnp.asarray(branch)


def reference(q, k, v, mask: Mask, logits: Logits | None = None):
    return reference_attention(q, k, v, mask, logits or Logits(q.shape[-1] ** -0.5))


def qkv(rows, length, heads, kv_heads, dim, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (rows, length, heads, dim))
    k = jax.random.normal(keys[1], (rows, length, kv_heads, dim))
    v = jax.random.normal(keys[2], (rows, length, kv_heads, dim))
    cotangent = jax.random.normal(keys[3], (rows, length, heads, dim))
    return q, k, v, cotangent


@pytest.mark.parametrize(
    "rows, length, heads, kv_heads, block, share",
    [
        (2, 256, 4, 2, 32, True),  # GQA, prefix sharing
        (3, 192, 2, 2, 64, True),  # MHA
        (1, 128, 4, 1, 16, False),  # separate sequences, one kv head
        (2, 64, 2, 1, 64, True),  # a single block per row
    ],
)
def test_flash_equals_the_reference_in_values_and_gradients(
    rows, length, heads, kv_heads, block, share
):
    seg, branch = random_layout(rows, length, seed=length + rows, share=share)
    q, k, v, cotangent = qkv(rows, length, heads, kv_heads, 16)
    real = (seg > 0)[..., None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v) * cotangent, 0.0))

    flash = lambda q, k, v: attend(q, k, v, Mask(seg, branch), "flash", block=block)  # noqa: E731
    ref = lambda q, k, v: reference(q, k, v, Mask(seg, branch))  # noqa: E731
    np.testing.assert_allclose(
        np.where(real, flash(q, k, v), 0), np.where(real, ref(q, k, v), 0), atol=2e-6
    )
    got = jax.grad(loss(flash), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_padding_rows_and_a_row_filled_by_one_group():
    """An all-padding row gives zeros (finite) and no gradient; a row that is one group (prefix,
    then two rests) matches the reference."""
    length = 128
    seg = np.zeros((2, length), np.int32)
    branch = np.zeros((2, length), np.int32)
    seg[1, :] = 1
    branch[1, 40:90], branch[1, 90:] = 1, 2
    seg, branch = jnp.asarray(seg), jnp.asarray(branch)
    q, k, v, cotangent = qkv(2, length, 2, 1, 8, seed=3)
    out = attend(q, k, v, Mask(seg, branch), "flash", block=32)
    assert np.all(np.asarray(out[0]) == 0)
    np.testing.assert_allclose(out[1], reference(q, k, v, Mask(seg, branch))[1], atol=2e-6)
    flash = lambda q: attend(q, k, v, Mask(seg, branch), "flash", block=32)  # noqa: E731
    grads = jax.grad(lambda q: jnp.sum(flash(q) * cotangent))(q)
    assert np.all(np.asarray(grads[0]) == 0) and np.isfinite(np.asarray(grads)).all()


def test_live_blocks_cover_every_allowed_pair_and_skip_what_segments_mask():
    """Every block with an allowed pair is listed, in order; a listed block is never after the
    query block nor without a segment in common (block-level ranges may keep a block whose only
    common segment is one rest against the other: computed, masked, correct)."""
    rows, length, block = 3, 256, 16
    seg, branch = random_layout(rows, length, seed=7)
    triples, count = live_blocks(seg, branch, block)
    listed = [tuple(int(x) for x in t) for t in np.asarray(triples)[: int(count)]]
    mask = np.asarray(allowed_pairs(Mask(seg, branch), seg.shape))
    segments = np.asarray(seg).reshape(rows, -1, block)
    n = length // block
    allowed = [
        (b, i, j)
        for b in range(rows)
        for i in range(n)
        for j in range(n)
        if mask[b, i * block : (i + 1) * block, j * block : (j + 1) * block].any()
    ]
    assert listed == sorted(listed) and set(allowed) <= set(listed)
    for b, i, j in listed:
        common = set(segments[b, i].tolist()) & set(segments[b, j].tolist()) - {0}
        assert j <= i and common, (b, i, j)
    assert len(listed) <= 1.2 * len(allowed)
    assert len(listed) < rows * n * (n + 1) // 2  # masked blocks really are skipped


def test_memory_stays_linear_in_the_length():
    """Compiled forward + backward at T = 2048: XLA's temporaries hold T x T scores, flash's
    never hold even one T x T matrix."""
    length, heads = 2048, 4
    seg, branch = random_layout(1, length, seed=1)
    q, k, v, _ = qkv(1, length, heads, 2, 16)

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
        return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    flash = temp_bytes(lambda q, k, v: attend(q, k, v, Mask(seg, branch), "flash", block=128))
    xla = temp_bytes(lambda q, k, v: reference(q, k, v, Mask(seg, branch)))
    square = length * length * 4  # one float32 T x T matrix
    assert xla > heads * square
    assert flash < square


def test_per_device_under_a_mesh_equals_one_device():
    mesh = make_mesh(1, 4, 2)  # rows over fsdp (4), heads over tensor (2)
    seg, branch = random_layout(8, 128, seed=11)
    q, k, v, _ = qkv(8, 128, 4, 2, 8)
    want = reference(q, k, v, Mask(seg, branch))
    names = (("batch", "length", "act_heads", None), ("batch", "length", "act_kv_heads", None))
    names = (*names, ("batch", "length"))
    with activation_sharding(mesh):
        got_mesh, specs = activation_specs(names, (q, k, seg))
    assert specs[0] == PartitionSpec("fsdp", None, "tensor", None) and got_mesh is mesh

    @jax.jit
    def run(q, k, v, seg, branch):
        return attend(q, k, v, Mask(seg, branch), "flash", block=32, mesh=mesh, specs=specs)

    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    got = run(
        place(q, specs[0]),
        place(k, specs[1]),
        place(v, specs[1]),
        place(seg, specs[2]),
        place(branch, specs[2]),
    )
    real = np.asarray(seg > 0)[..., None, None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-6)


def test_one_entry_point_runs_what_the_table_says_for_each_mask():
    """`attend`: a mask without segments is causal (cudnn and xla, flash falls back to xla), one
    with segments is `segments` and with branches `tree` (flash or xla); anything else refused."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 64, 4, 8)), jnp.float32) for _ in range(3))
    assert set(KERNELS["causal"]) == set(ATTENTION_IMPLEMENTATIONS)
    causal = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(attend(q, k, v, Mask(), "flash"), causal, atol=1e-6)
    seg = jnp.asarray(np.repeat([[1] * 40 + [2] * 20 + [0] * 4], 2, axis=0), jnp.int32)
    want = reference(q, k, v, Mask(seg))
    for implementation in ("flash", "xla"):
        got = attend(q, k, v, Mask(seg), implementation, block=16)
        np.testing.assert_allclose(got[:, :60], want[:, :60], atol=2e-6)
    assert (Mask().kind, Mask(seg).kind, Mask(seg, seg).kind) == ("causal", "segments", "tree")
    refused = "segments masks need attention 'flash' or 'xla' or .*, not 'blocked'"
    with pytest.raises(ValueError, match=refused):
        attend(q, k, v, Mask(seg), "blocked")


def literal_attention(q, k, v, seg, branch, pos, window, logits):
    """The rule of jaxrm/models/attention/mask.py read literally, one query at a time, float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    rows, length, heads, _ = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(rows):
        for i in range(length):
            keys = [
                j
                for j in range(i + 1)
                if seg[b, j] == seg[b, i] != 0
                and (branch[b, j] == 0 or branch[b, j] == branch[b, i])
                and pos[b, i] - pos[b, j] < window
            ]
            for h in range(heads):
                s = np.array([q[b, i, h] @ k[b, j, h // group] for j in keys]) * logits.scale
                if logits.softcap is not None:
                    s = logits.softcap * np.tanh(s / logits.softcap)
                if keys:
                    p = np.exp(s - s.max())
                    out[b, i, h] = p @ v[b, keys, h // group] / p.sum()
    return out


def tree_positions(seg, branch):
    """Token positions as packing gives them: each rest continues from the end of its prompt."""
    seg, branch = np.asarray(seg), np.asarray(branch)
    pos = np.zeros(seg.shape, np.int32)
    for b in range(seg.shape[0]):
        for i in range(1, seg.shape[1]):
            same = seg[b, i] == seg[b, i - 1]
            restart = branch[b, i] == 2 and branch[b, i - 1] == 1
            if not same:
                pos[b, i] = 0
            elif restart:
                pos[b, i] = np.sum((seg[b, :i] == seg[b, i]) & (branch[b, :i] == 0))
            else:
                pos[b, i] = pos[b, i - 1] + 1
    return pos


FEATURES = [  # (window, softcap, scale): sliding windows by position, Gemma 2's soft-cap, scale
    (None, None, None),
    (24, None, None),
    (None, 2.0, 0.2),
    (9, 1.5, None),
]


@pytest.mark.parametrize("window, softcap, scale", FEATURES)
def test_the_reference_is_the_rule_read_literally(window, softcap, scale):
    seg, branch = random_layout(2, 64, seed=5)
    pos = tree_positions(seg, branch)
    q, k, v, _ = qkv(2, 64, 4, 2, 8, seed=1)
    logits = Logits(scale or 8**-0.5, softcap)
    mask = Mask(seg, branch, jnp.asarray(pos), window)
    got = reference_attention(q, k, v, mask, logits)
    want = literal_attention(
        q, k, v, np.asarray(seg), np.asarray(branch), pos, window or NO_WINDOW, logits
    )
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("window, softcap, scale", FEATURES[1:])
@pytest.mark.parametrize("share", [True, False])
def test_flash_windows_softcap_and_scale_equal_the_reference(window, softcap, scale, share):
    """Windows compare positions, not row offsets: in a shared row the rejected rest's distance to
    its prompt in the row exceeds the window while its distance in positions does not."""
    rows, length, block = 2, 256, 32
    seg, branch = random_layout(rows, length, seed=9, share=share)
    pos = jnp.asarray(tree_positions(seg, branch))
    mask = Mask(seg, branch if share else None, pos, jnp.int32(window) if window else None)
    logits = Logits(scale or 16**-0.5, softcap)
    q, k, v, cotangent = qkv(rows, length, 4, 2, 16, seed=2)
    real = (seg > 0)[..., None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v) * cotangent, 0.0))

    flash = lambda q, k, v: attend(q, k, v, mask, "flash", logits, block=block)  # noqa: E731
    ref = lambda q, k, v: reference(q, k, v, mask, logits)  # noqa: E731
    np.testing.assert_allclose(
        np.where(real, flash(q, k, v), 0), np.where(real, ref(q, k, v), 0), atol=2e-6
    )
    got = jax.grad(loss(flash), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5)
    if window and share:
        by_offset = Mask(seg, branch, None, window)
        differs = np.asarray(allowed_pairs(by_offset, seg.shape) != allowed_pairs(mask, seg.shape))
        assert differs.any()  # the layout really has rests whose offsets and positions disagree


def test_windows_skip_blocks_out_of_reach():
    """With a window of one block, a long sequence visits about two key blocks per query block."""
    length, block = 512, 32
    seg = jnp.ones((1, length), jnp.int32)
    branch = jnp.zeros_like(seg)
    pos = jnp.arange(length, dtype=jnp.int32)[None]
    _, full = live_blocks(seg, branch, block, pos, NO_WINDOW)
    _, windowed = live_blocks(seg, branch, block, pos, jnp.int32(block))
    n = length // block
    assert int(full) == n * (n + 1) // 2 and int(windowed) == 2 * n - 1
