"""The Pallas GPU kernel (`pallas`), run in interpret mode on the CPU, against the T x T reference
in values and gradients (q, k, v) for every mask kind and family feature; its visit lists against
the T x T rule (dead blocks are skipped: a NaN in a skipped block never reaches a result); and its
lowering for a GPU (Triton) without a GPU: no XLA loop outside the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jaxrm.deviceless import traced_for
from jaxrm.models.attention import (
    NO_WINDOW,
    Logits,
    Mask,
    allowed_pairs,
    attend,
    reference_attention,
)
from jaxrm.models.attention.pallas_gpu import (
    BlockSizes,
    block_pairs,
    block_tables,
    pallas_attention,
)
from jaxrm.sharding import activation_sharding, activation_specs, make_mesh
from tests.test_attention import qkv, random_layout, tree_positions

SMALL = BlockSizes(32, 16, 16, 32, 32, 16)  # several tiles per row at T = 256
TOLERANCE = 1e-5  # float32: |got - want| <= 1e-5 * (1 + |want|), with |want| the largest entry


BF16_TOLERANCE = 1e-2  # bfloat16 inputs (probabilities and score gradients cast to bf16 for
# the tile products, as FlashAttention does) against the float32 reference: ~1 bf16 ulp


def assert_close(got, want, tolerance: float = TOLERANCE):
    want = np.asarray(want, np.float32)
    atol = tolerance * (1 + np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tolerance, atol=atol)


def run_pallas(mask: Mask, logits: Logits, blocks: BlockSizes = SMALL):
    def attention(q, k, v):
        rows = mask.segment_ids
        if rows is None:
            rows = jnp.ones(q.shape[:2], jnp.int32)
        branch = jnp.zeros_like(rows) if mask.branch_ids is None else mask.branch_ids
        return pallas_attention(
            q,
            k,
            v,
            rows,
            branch,
            mask.token_positions(rows.shape),
            mask.window_size(),
            logits=logits,
            blocks=blocks,
            interpret=True,
        )

    return attention


def assert_equals_reference(mask: Mask, logits: Logits, shapes, seed=0, blocks=SMALL):
    """Values and the gradients of q, k and v under a random cotangent, at padding too (0)."""
    q, k, v, cotangent = qkv(*shapes, seed=seed)
    pallas = run_pallas(mask, logits, blocks)

    def reference(q, k, v):
        return reference_attention(q, k, v, mask, logits)

    def values_and_grads(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    got, got_grads = jax.jit(values_and_grads, static_argnums=0)(pallas)
    want, want_grads = values_and_grads(reference)
    assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(g, w)


@pytest.mark.parametrize(
    "kind, window, softcap, scale, kv_heads, dim",
    [
        ("causal", None, None, None, 2, 32),  # right-padded rows, GQA
        ("segments", 40, None, 0.3, 4, 32),  # packed, MHA, window by position, scale
        ("tree", 24, 2.0, 0.2, 1, 64),  # prefix sharing, one kv head, window, soft-cap
        ("tree", None, 1.5, None, 2, 40),  # head dim 40 (padded to 64 inside), soft-cap
    ],
)
def test_values_and_gradients_equal_the_reference(kind, window, softcap, scale, kv_heads, dim):
    rows, length, heads = 2, 256, 4
    seg, branch = random_layout(rows, length, seed=length + kv_heads, share=kind == "tree")
    positions = jnp.asarray(tree_positions(seg, branch))
    if kind == "causal":
        mask = Mask(window=window)
    else:
        mask = Mask(seg, branch if kind == "tree" else None, positions, window)
    logits = Logits(scale or dim**-0.5, softcap)
    assert mask.kind == kind
    assert_equals_reference(mask, logits, (rows, length, heads, kv_heads, dim))


def rest_far_from_its_prompt(length: int):
    """One row: a prompt [0, 32), the chosen rest [32, 160), the rejected rest [160, 224)
    (positions from 32 again), padding after."""
    seg = np.zeros((1, length), np.int32)
    branch = np.zeros((1, length), np.int32)
    seg[0, :224] = 1
    branch[0, 32:160], branch[0, 160:224] = 1, 2
    positions = np.zeros((1, length), np.int32)
    positions[0, :160] = np.arange(160)
    positions[0, 160:224] = 32 + np.arange(64)
    return jnp.asarray(seg), jnp.asarray(branch), jnp.asarray(positions)


def test_a_window_counts_positions_not_row_offsets():
    """The rejected rest sits 128 rows after its prompt but reads it within a window of 48
    positions; the length 250 is not a multiple of the tiles (padded inside)."""
    seg, branch, positions = rest_far_from_its_prompt(256)
    mask = Mask(seg, branch, positions, jnp.int32(48))
    reads_prompt = np.asarray(allowed_pairs(mask, seg.shape))[0, 170, :32]
    by_offset = np.asarray(allowed_pairs(Mask(seg, branch, None, 48), seg.shape))[0, 170, :32]
    assert reads_prompt.any() and not by_offset.any()
    short = Mask(*(x[:, :250] for x in (seg, branch, positions)), jnp.int32(48))
    assert_equals_reference(short, Logits(0.25), (1, 250, 4, 2, 32), seed=4)
    with pytest.raises(ValueError, match="tiles must be powers of two of at least 16"):
        run_pallas(short, Logits(0.25), BlockSizes(block_q=48))(*qkv(1, 250, 4, 2, 32)[:3])


def test_a_window_scanned_per_layer():
    """The window as a scanned per-layer input (traced): a sliding layer, then a global one."""
    seg, branch, positions = rest_far_from_its_prompt(256)
    q, k, v, _ = qkv(1, 256, 2, 1, 32, seed=5)
    windows = jnp.asarray([48, NO_WINDOW], jnp.int32)

    def layer(_, window):
        mask = Mask(seg, branch, positions, window)
        return None, attend(q, k, v, mask, "pallas", Logits(0.25))

    _, got = jax.jit(lambda w: jax.lax.scan(layer, None, w))(windows)
    for out, window in zip(got, (48, None), strict=True):
        mask = Mask(seg, branch, positions, window)
        assert_close(out, reference_attention(q, k, v, mask, Logits(0.25)))
    assert not np.allclose(got[0], got[1])  # the window changes the result


def test_padding_rows_and_queries_read_zeros_and_get_no_gradient():
    """A row of padding only and a row whose tail is padding (through `attend`, the default
    tiles): outputs 0 and gradients exactly 0 there, finite everywhere."""
    seg = np.zeros((2, 256), np.int32)
    seg[1, :100], seg[1, 100:180] = 1, 2
    seg = jnp.asarray(seg)
    q, k, v, cotangent = qkv(2, 256, 4, 2, 32, seed=6)
    mask = Mask(seg)

    def pallas(q, k, v):
        return attend(q, k, v, mask, "pallas")

    out, vjp = jax.vjp(pallas, q, k, v)
    grads = vjp(cotangent)
    padding = ~np.asarray(seg > 0)
    assert np.all(np.asarray(out)[padding] == 0)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all() and np.all(np.asarray(g)[padding] == 0)
    want, reference_vjp = jax.vjp(
        lambda *a: reference_attention(*a, mask, Logits(32**-0.5)), q, k, v
    )
    assert_close(out, want)
    for g, w in zip(grads, reference_vjp(cotangent), strict=True):
        assert_close(g, w)


def test_every_kind_runs_through_the_table():
    """`attend(..., "pallas")` for causal, segments and tree masks with the default tiles."""
    seg, branch = random_layout(1, 256, seed=2)
    q, k, v, _ = qkv(1, 256, 2, 1, 64, seed=8)
    for mask in (Mask(), Mask(seg), Mask(seg, branch)):
        want = reference_attention(q, k, v, mask, Logits(0.125))
        assert_close(attend(q, k, v, mask, "pallas"), want)


def test_per_device_under_a_mesh_equals_the_reference():
    """Rows over fsdp (4), heads over tensor (2): each device runs the kernels on its own rows."""
    mesh = make_mesh(1, 4, 2)
    seg, branch = random_layout(8, 128, seed=11)
    q, k, v, _ = qkv(8, 128, 4, 2, 16)
    mask = Mask(seg, branch)
    names = (("batch", "length", "act_heads", None), ("batch", "length", "act_kv_heads", None))
    with activation_sharding(mesh):
        _, specs = activation_specs((*names, ("batch", "length")), (q, k, seg))

    @jax.jit
    def run(q, k, v, seg, branch):
        return attend(q, k, v, Mask(seg, branch), "pallas", mesh=mesh, specs=specs)

    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    got = run(*(place(x, specs[i]) for x, i in ((q, 0), (k, 1), (v, 1), (seg, 2), (branch, 2))))
    assert_close(got, reference_attention(q, k, v, mask, Logits(16**-0.5)))


def test_bfloat16_is_within_a_bf16_ulp_of_the_float32_reference():
    seg, branch = random_layout(1, 256, seed=2)
    mask = Mask(seg, branch, jnp.asarray(tree_positions(seg, branch)), 100)
    logits = Logits(0.125, 30.0)
    q, k, v, cotangent = qkv(1, 256, 4, 2, 64, seed=3)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, cotangent)]
    got, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask, "pallas", logits), *bf16[:3])
    grads = vjp(bf16[3])
    assert got.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    upcast = [x.astype(jnp.float32) for x in bf16]
    want, reference_vjp = jax.vjp(
        lambda q, k, v: reference_attention(q, k, v, mask, logits), *upcast[:3]
    )
    assert_close(got, want, BF16_TOLERANCE)
    for g, w in zip(grads, reference_vjp(upcast[3]), strict=True):
        assert_close(g, w, BF16_TOLERANCE)


def test_visit_lists_cover_every_allowed_pair_and_skip_dead_blocks():
    """Each tile with an allowed (query, key) is listed by all three kernels' lists, once; a tile
    listed as full has every pair allowed (it runs unmasked); a block-aligned tree lists exactly
    the tiles with an allowed pair (the chosen x rejected rectangle and padding are skipped), and
    a window of one tile keeps two key tiles per query tile."""
    rows, length = 3, 256
    seg, branch = random_layout(rows, length, seed=7)
    positions = jnp.asarray(tree_positions(seg, branch))
    for window in (None, 20):
        mask = Mask(seg, branch, positions, window)
        allowed = np.asarray(allowed_pairs(mask, seg.shape))
        tables = block_tables(seg, branch, positions, mask.window_size(), SMALL)
        for table, bq, bk, by_key in (
            (tables.forward, SMALL.block_q, SMALL.block_k, False),
            (tables.dkv, SMALL.block_q_dkv, SMALL.block_k_dkv, True),
            (tables.dq, SMALL.block_q_dq, SMALL.block_k_dq, False),
        ):
            pairs = allowed.reshape(rows, length // bq, bq, length // bk, bk)
            listed = np.zeros(pairs.shape[:2] + pairs.shape[3:4], int)
            for b, a in np.ndindex(*table.shape[:2]):
                full, partial = (int(x) for x in table[b, a, :2])
                entries = np.asarray(table[b, a, 2 : 2 + full + partial])
                assert (np.diff(entries[:full]) > 0).all() and (np.diff(entries[full:]) > 0).all()
                for n, e in enumerate(entries):
                    tile = (b, e, a) if by_key else (b, a, e)
                    listed[tile] += 1
                    assert n >= full or pairs[tile[0], tile[1], :, tile[2]].all()
            assert listed.max() == 1 and (listed >= pairs.any(axis=(2, 4))).all()
            rows_k, rows_q = np.arange(length // bk)[None] * bk, np.arange(length // bq)[:, None]
            assert listed.sum() < rows * (rows_k < (rows_q + 1) * bq).sum()  # causal tiles

    seg, branch, positions = rest_far_from_its_prompt(256)
    live, full = (np.asarray(x) for x in block_pairs(seg, branch, positions, 2**30, 32, 32))
    tiles = np.asarray(allowed_pairs(Mask(seg, branch), seg.shape)).reshape(1, 8, 32, 8, 32)
    np.testing.assert_array_equal(live, tiles.any(axis=(2, 4)))
    assert not live[0, 5:7, 1:5].any()  # rejected queries x chosen keys
    assert full[0, 5:7, 0].all() and full[0, 2:5, 1:4].any()  # the prompt, the own rest
    ones = jnp.ones((1, 512), jnp.int32)
    line = jnp.arange(512, dtype=jnp.int32)[None]
    live, full = block_pairs(ones, 0 * ones, line, 32, 32, 32)
    assert int(live.sum()) == 2 * 16 - 1 and not full.any()
    live, full = block_pairs(ones, 0 * ones, line, 2**30, 32, 32)
    assert int(live.sum()) == 16 * 17 // 2 and int(full.sum()) == 16 * 15 // 2


def test_skipped_blocks_are_never_read():
    """NaN in the values of the chosen rest: the rejected rest's outputs stay finite (the forward
    and dQ kernels never read those key tiles), while the chosen rest's turn NaN (the test can
    fail); NaN in the cotangent of the rejected rest: the chosen rest's dK and dV stay finite."""
    seg, branch, positions = rest_far_from_its_prompt(256)
    mask = Mask(seg, branch, positions)
    q, k, v, cotangent = qkv(1, 256, 2, 1, 32, seed=9)
    chosen, rejected = slice(32, 160), slice(160, 224)
    pallas = run_pallas(mask, Logits(0.2), BlockSizes(32, 32, 32, 32, 32, 32))
    poisoned = v.at[:, chosen].set(jnp.nan)
    out, vjp = jax.vjp(pallas, q, k, poisoned)
    assert np.isnan(np.asarray(out[:, chosen])).all()
    assert np.isfinite(np.asarray(out[:, rejected])).all()
    assert np.isfinite(np.asarray(vjp(cotangent)[0][:, rejected])).all()
    _, vjp = jax.vjp(pallas, q, k, v)
    _, dk, dv = vjp(cotangent.at[:, rejected].set(jnp.nan))
    assert np.isfinite(np.asarray(dk[:, chosen])).all()
    assert np.isfinite(np.asarray(dv[:, chosen])).all()


def test_lowers_for_a_gpu_with_every_loop_inside_the_kernels():
    """Forward and backward lowered for CUDA (Triton kernels, no GPU needed) at Llama-3.1-8B head
    shapes, bf16, a traced window and a soft-cap: three Triton calls, no XLA while loop."""
    q = jax.ShapeDtypeStruct((1, 1024, 32, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1024, 8, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    window = jax.ShapeDtypeStruct((), jnp.int32)

    def loss(q, k, v, seg, branch, positions, window):
        out = pallas_attention(
            q, k, v, seg, branch, positions, window, logits=Logits(0.1, 50.0), interpret=False
        )
        return jnp.sum(out.astype(jnp.float32))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    with traced_for("h100"):  # from JAX 0.12 the Triton lowering asks the target's device
        lowered = step.trace(q, kv, kv, ids, ids, ids, window).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert "stablehlo.while" not in text
