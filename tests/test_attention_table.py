"""The attention table: what each implementation declares it can express, `auto` and explicit
choices per mask kind, and the accelerator kernels run on the CPU against the T x T reference:
cuDNN's wrapper and masks through XLA (`implementation=None`, the same code path), splash in
Pallas' interpret mode. Values and gradients, for every mask kind and feature each claims."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.backends import resolve_execution
from jaxrm.errors import UserError
from jaxrm.models.attention import (
    IMPLEMENTATIONS,
    KERNELS,
    MASK_KINDS,
    Choice,
    Features,
    Implementation,
    Logits,
    Mask,
    attend,
    padded_rows_as_segments,
    prepare_mask,
    reference_attention,
)
from jaxrm.models.attention.cudnn import fused_attention, prepare
from jaxrm.models.attention.mask import dense_mask
from jaxrm.models.attention.table import choose
from tests.test_attention import qkv, random_layout, tree_positions


def masks(rows: int, length: int, seed: int) -> dict[str, Mask]:
    """One mask of each kind over the same rows (packed ones with padding at the end)."""
    seg, branch = random_layout(rows, length, seed=seed, share=True)
    seg, branch = seg.at[:, -8:].set(0), branch.at[:, -8:].set(0)  # padding in every row
    pos = jnp.asarray(tree_positions(seg, branch))
    plain, _ = random_layout(rows, length, seed=seed, share=False)
    plain = plain.at[:, -8:].set(0)
    plain_pos = jnp.asarray(tree_positions(plain, jnp.zeros_like(plain)))
    return {
        "causal": Mask(positions=jnp.broadcast_to(jnp.arange(length), (rows, length))),
        "segments": Mask(plain, None, plain_pos),
        "tree": Mask(seg, branch, pos),
    }


def assert_matches_reference(run, q, k, v, cotangent, mask: Mask, logits: Logits, atol: float):
    """`run(q, k, v)` equals the reference under `mask` in values and q/k/v gradients."""

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)

    ref = lambda q, k, v: reference_attention(q, k, v, mask, logits)  # noqa: E731
    np.testing.assert_allclose(run(q, k, v), ref(q, k, v), atol=atol)
    got = jax.grad(loss(run), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, atol=10 * atol)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("window", [None, 11])
def test_cudnn_wrapper_and_its_masks_equal_the_reference(kind, window):
    """The cuDNN entry's code path with XLA underneath: the dense mask prepared once (padding
    queries reading themselves, zeroed after), a traced per-layer window ANDed in the layer."""
    rows, length = 2, 128
    mask = masks(rows, length, seed=4)[kind]
    prepared = prepare(mask)
    assert (prepared.prepared is None) == (kind == "causal")
    if window is not None:
        prepared = prepared._replace(window=jnp.int32(window))
        mask = mask._replace(window=jnp.int32(window))
    q, k, v, cotangent = qkv(rows, length, 4, 2, 16, seed=6)
    logits = Logits(0.3)
    run = lambda q, k, v: fused_attention(q, k, v, prepared, logits, None)  # noqa: E731
    assert_matches_reference(run, q, k, v, cotangent, mask, logits, atol=2e-6)


def test_the_dense_mask_leaves_no_row_empty():
    mask = masks(2, 128, seed=8)["tree"]
    allowed = np.asarray(dense_mask(mask, mask.segment_ids.shape))
    assert allowed.any(axis=-1).all()
    padding = np.asarray(mask.segment_ids) == 0
    assert padding.any()
    rows, queries = np.nonzero(padding)
    assert (allowed[rows, queries].sum(axis=-1) == 1).all()  # itself only
    assert allowed[rows, queries, queries].all()


@pytest.mark.parametrize(
    "kind, softcap, rows, length",
    [
        ("causal", None, 1, 128),
        ("tree", 2.0, 2, 128),
    ],
)
def test_splash_in_interpret_mode_equals_the_reference(kind, softcap, rows, length):
    """Splash (TPU) run by Pallas' interpreter: GQA, padding, soft-cap, scale; the tree as the
    prepared dynamic mask (block maps built once, before the layer scan). Segments: below."""
    mask = masks(rows, length, seed=length + rows)[kind]
    q, k, v, cotangent = qkv(rows, length, 4, 2, 128, seed=1)
    logits = Logits(0.05, softcap)
    prepared = prepare_mask(mask, "splash")
    assert (prepared.prepared is not None) == (kind == "tree")
    run = lambda q, k, v: attend(q, k, v, prepared, "splash", logits)  # noqa: E731
    assert_matches_reference(run, q, k, v, cotangent, mask, logits, atol=2e-5)


def test_splash_runs_segments_and_right_padded_rows_of_any_length():
    """Segment ids (right-padded rows run as one segment each, padding apart; here two sequences
    in the second row), a length that is no multiple of 128 (padded inside), soft-cap."""
    rows, length = 2, 100
    seg = (np.arange(length)[None] < np.array([[70], [100]])).astype(np.int32)
    seg[1, 40:] = 2
    mask = Mask(jnp.asarray(seg))
    q, k, v, cotangent = qkv(rows, length, 2, 1, 128, seed=2)
    assert padded_rows_as_segments("splash") and not padded_rows_as_segments("cudnn")
    logits = Logits(128**-0.5, 3.0)
    run = lambda q, k, v: attend(q, k, v, mask, "splash", logits)  # noqa: E731
    assert_matches_reference(run, q, k, v, cotangent, mask, logits, atol=2e-5)


def test_each_implementation_declares_what_its_kernels_refuse():
    """A declared inability is a refusal of the kernel, never a silent wrong answer."""
    q, k, v, _ = qkv(1, 128, 2, 1, 128)
    seg = jnp.ones((1, 128), jnp.int32)
    assert not IMPLEMENTATIONS["cudnn"].softcap and not IMPLEMENTATIONS["splash"].window
    with pytest.raises(ValueError, match="cannot soft-cap"):
        attend(q, k, v, Mask(seg), "cudnn", Logits(0.1, 2.0))
    with pytest.raises(ValueError, match="cannot slide a window"):
        attend(q, k, v, Mask(seg, window=16), "splash")
    for name, implementation in IMPLEMENTATIONS.items():
        assert set(implementation.kernels) <= set(MASK_KINDS)
        for kind, kernel in implementation.kernels.items():
            assert KERNELS[kind][name] is kernel


@pytest.mark.parametrize(
    "backend, head_dim, features, expected",
    [
        ("gpu", 128, Features(), "cudnn"),
        ("gpu", 256, Features(), "flash"),  # beyond cuDNN's head_dim
        ("gpu", 128, Features(softcap=True), "flash"),  # Gemma 2: cuDNN has no soft-cap
        ("gpu", 128, Features(window=True), "cudnn"),  # windows by position: the mask
        ("tpu", 128, Features(softcap=True), "splash"),
        ("tpu", 128, Features(window=True), "flash"),  # splash slides by row offset only
        ("tpu", 64, Features(), "flash"),
        ("cpu", 128, Features(softcap=True, window=True), "flash"),
    ],
)
def test_auto_per_mask_kind_follows_the_backend_and_the_model(
    backend, head_dim, features, expected
):
    for layout, sharing in (("padded", True), ("packed", True), ("packed", False)):
        run = resolve_execution(
            "auto", "auto", backend, head_dim, layout, prefix_sharing=sharing, features=features
        )
        assert run.kernels == Choice.uniform(expected) and run.attention == expected
    kind = resolve_execution("auto", "auto", "cpu", 64, "packed", prefix_sharing=False).kind
    assert kind == "segments"


@pytest.mark.parametrize(
    "attention, backend, features, message",
    [
        (
            "cudnn",
            "gpu",
            Features(softcap=True),
            "'attention': cudnn attention cannot soft-cap logits (the model's are); tree masks "
            "here can run flash, xla (leave it at 'auto' to choose)",
        ),
        (
            "splash",
            "tpu",
            Features(window=True),
            "splash attention cannot slide a window by position (the model's layers do); tree "
            "masks here can run flash, xla",
        ),
        ("splash", "gpu", Features(), "needs a tpu backend, not gpu; tree masks here can run"),
    ],
)
def test_an_impossible_explicit_choice_is_one_line_naming_what_can(
    attention, backend, features, message
):
    with pytest.raises(UserError) as error:
        resolve_execution("auto", attention, backend, 128, "packed", features=features)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_choices_differ_per_kind_where_an_implementation_lacks_one():
    """A kernel for packed rows only: auto takes it there and the next one for causal rows; an
    explicit choice of it is refused only where the run meets causal rows."""
    table = {
        "packed_only": Implementation("packed_only", {"segments": None, "tree": None}),
        "xla": IMPLEMENTATIONS["xla"],
    }
    args = (("packed_only", "xla"), ("tree", "segments"), Features(), "cpu", "float32", 64)
    chosen = choose(table, "auto", *args)
    assert chosen.choice == Choice("xla", "packed_only", "packed_only")
    assert chosen.choice.describe() == "causal xla, segments packed_only, tree packed_only"
    assert choose(table, "packed_only", *args).choice == chosen.choice
    refused = choose(table, "packed_only", args[0], ("causal", "segments"), *args[2:])
    assert refused == (
        "packed_only attention cannot express causal masks; causal masks here can run xla"
    )


def test_packed_rows_without_shared_prompts_run_the_segments_kind(tmp_path):
    """The step gives the model no branches when prompts are not shared, so the plan's
    `segments` implementation runs (here `tree` is one the CPU cannot run), and the rewards
    equal those of right-padded rows."""
    from flax import nnx

    from jaxrm.data.packing import PackSpec, pack
    from jaxrm.data.pairs import Pairs, Ragged
    from jaxrm.hf import load_reward_model
    from jaxrm.objective import Objective
    from jaxrm.sharding import make_mesh
    from jaxrm.step import pair_rewards
    from tests.hf_reference import save_tiny_classifier
    from tests.test_train_step import contract_batch, random_pairs

    save_tiny_classifier(tmp_path, "gqa", seed=3)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    choice = Choice("xla", "flash", "cudnn")
    model, _, _ = load_reward_model(str(tmp_path), mesh, attention=choice)
    graphdef, params = nnx.split(model)
    pairs = random_pairs(4, seed=1)
    data = Pairs(
        Ragged.from_lists([c for c, _ in pairs]),
        Ragged.from_lists([r for _, r in pairs]),
        np.zeros(len(pairs), np.float32),
        np.zeros(len(pairs), np.int32),
        0,
    )
    spec = PackSpec(length=128, rows=1, devices=1, slots=len(pairs), share_prefix=False)
    (micro,) = pack(data, np.arange(len(pairs)), spec)
    micro = {k: jnp.asarray(v) for k, v in micro.items()}
    chosen, rejected, _, _ = pair_rewards(graphdef, params, micro, Objective(1), False)
    padded = contract_batch(pairs, 1, width=32)
    rewards = model(*(jnp.asarray(padded[k][0]) for k in ("input_ids", "attention_mask")))
    by_pair = sorted(zip(np.asarray(chosen), np.asarray(rejected), strict=True))  # slot order
    want = sorted(zip(np.asarray(rewards[:4]), np.asarray(rewards[4:]), strict=True))
    np.testing.assert_allclose(by_pair, want, atol=1e-5)
    with pytest.raises(Exception, match="(?i)cudnn|gpu"):  # with branches: the tree kind
        pair_rewards(graphdef, params, micro, Objective(1), True)


def test_splash_per_device_under_a_mesh_with_block_maps_prepared_once():
    """Rows over fsdp, heads over tensor: each device runs splash on its rows and heads, the
    prepared per-row block maps split with the rows."""
    from jax.sharding import NamedSharding

    from jaxrm.sharding import activation_sharding, activation_specs, make_mesh

    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    mask = masks(2, 128, seed=12)["tree"]
    q, k, v, _ = qkv(2, 128, 4, 2, 128, seed=5)
    names = (("batch", "length", "act_heads", None), ("batch", "length", "act_kv_heads", None))
    with activation_sharding(mesh):
        _, specs = activation_specs((*names, ("batch", "length")), (q, k, mask.segment_ids))
    assert specs[0] == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)

    @jax.jit
    def run(q, k, v, mask):
        prepared = prepare_mask(mask, "splash")
        return attend(q, k, v, prepared, "splash", mesh=mesh, specs=specs)

    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    rows = [place(x, specs[2]) for x in (mask.segment_ids, mask.branch_ids, mask.positions)]
    got = run(place(q, specs[0]), place(k, specs[1]), place(v, specs[1]), Mask(*rows))
    want = reference_attention(q, k, v, mask, Logits(128**-0.5))
    np.testing.assert_allclose(got, want, atol=2e-5)
