"""Which keys each query reads, and how its scores are made: the one rule every attention
implementation expresses (and `allowed_pairs` spells out as T x T for the reference).

Query i may read key j when

    j <= i                                          (causal, by row index)
    and seg[j] == seg[i] != 0                       (packed rows: one sequence or group per id)
    and (branch[j] == 0 or branch[j] == branch[i])  (prefix sharing: a rest reads the shared
                                                     prompt and itself)
    and pos[i] - pos[j] < window                    (sliding window, by token position)

The window compares token positions, not row offsets: in a prefix-shared row the rejected rest sits
after the chosen rest, so its distance in the row to the prompt is longer than in the real sequence.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

NO_WINDOW = 2**30  # the window of a global layer in a model whose other layers slide


class Mask(NamedTuple):
    """The rule's inputs. No `segment_ids`: right-padded rows (causal). No `branch_ids`: packed
    rows without prefix sharing. No `positions`: the row index. No `window`: none; a window may be
    a traced int32 scalar (a per-layer input of the layer scan). `prepared`: what an
    implementation computed from the others once per forward pass (`prepare_mask`: a dense mask,
    a kernel's block map), never part of the rule."""

    segment_ids: jax.Array | None = None
    branch_ids: jax.Array | None = None
    positions: jax.Array | None = None
    window: jax.Array | int | None = None
    prepared: Any = None

    @property
    def kind(self) -> str:
        """`causal`, `segments` or `tree`: the kind of mask an implementation must express."""
        if self.segment_ids is None:
            return "causal"
        return "segments" if self.branch_ids is None else "tree"

    def token_positions(self, shape: tuple[int, int]) -> jax.Array:
        """[B, T] positions: the given ones, else the row index."""
        if self.positions is not None:
            return self.positions
        return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)

    def window_size(self) -> jax.Array:
        """The window as an int32 scalar (NO_WINDOW when there is none)."""
        return jnp.asarray(NO_WINDOW if self.window is None else self.window, jnp.int32)


class Logits(NamedTuple):
    """How scores are made from q.k (static): times `scale`, then, with `softcap`,
    `softcap * tanh(s / softcap)` (Gemma 2), before the mask and the softmax."""

    scale: float
    softcap: float | None = None


def cap(scores: jax.Array, logits: Logits) -> jax.Array:
    """Scaled (and soft-capped) scores."""
    scores = scores * logits.scale
    if logits.softcap is not None:
        scores = logits.softcap * jnp.tanh(scores / logits.softcap)
    return scores


def cap_derivative(capped: jax.Array, logits: Logits) -> jax.Array:
    """d capped / d raw q.k, from the capped scores."""
    if logits.softcap is None:
        return jnp.asarray(logits.scale, capped.dtype)
    return logits.scale * (1.0 - jnp.square(capped / logits.softcap))


def allowed_pairs(mask: Mask, shape: tuple[int, int]) -> jax.Array:
    """[B, T, T] bool for rows of `shape` [B, T]: which keys (last axis) each query may read."""
    t = shape[1]
    allowed = jnp.broadcast_to(jnp.arange(t)[:, None] >= jnp.arange(t)[None, :], (shape[0], t, t))
    if mask.segment_ids is not None:
        seg_q, seg_k = mask.segment_ids[:, :, None], mask.segment_ids[:, None, :]
        allowed = allowed & (seg_q == seg_k) & (seg_k > 0)
    if mask.branch_ids is not None:
        br_q, br_k = mask.branch_ids[:, :, None], mask.branch_ids[:, None, :]
        allowed = allowed & ((br_k == 0) | (br_k == br_q))
    if mask.window is not None:
        allowed = allowed & window_pairs(mask, shape)
    return allowed


def dense_mask(mask: Mask, shape: tuple[int, int]) -> jax.Array:
    """[B, T, T] bool for kernels that take the mask as an array: the rule without its window
    (a per-layer value, applied in the layer), and each padding query reading itself, so no row
    is empty (a softmax over nothing); the kernel's caller zeroes those queries' output."""
    allowed = allowed_pairs(mask._replace(window=None), shape)
    if mask.segment_ids is None:
        return allowed
    padding = (mask.segment_ids == 0)[:, :, None]
    return allowed | (padding & jnp.eye(shape[1], dtype=bool)[None])


def window_pairs(mask: Mask, shape: tuple[int, int]) -> jax.Array:
    """[B, T, T] bool: the pairs within the mask's window, by position (all without one)."""
    pos = mask.token_positions(shape)
    return pos[:, :, None] - pos[:, None, :] < mask.window_size()


def zero_padding(out: jax.Array, mask: Mask) -> jax.Array:
    """`out` [B, T, ...] with padding queries (segment 0) set to 0, as the rule has them."""
    if mask.segment_ids is None:
        return out
    real = (mask.segment_ids > 0).reshape(*mask.segment_ids.shape, *(1,) * (out.ndim - 2))
    return jnp.where(real, out, jnp.zeros((), out.dtype))
