"""What each attention implementation can express, and the choice a run makes per mask kind.

An `Implementation` declares the mask kinds it has a kernel for, whether it takes the model's
soft-cap and sliding window (by position), and what it needs of the backend, the compute dtype and
head_dim. `misfit` says in one line why it cannot run a mask kind for a model here (None: it
can); `choose` picks, per mask kind, the first candidate that fits (the backend's order, fastest
first) or checks an explicit name, naming the implementations that could in its one-line error.
A `Choice` holds the result: one implementation per mask kind, static and hashable, so a model
config carries it and `attend` looks up the kind of the mask it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from jaxrm.models.attention.mask import Mask

MASK_KINDS = ("causal", "segments", "tree")

Kernel = Callable[..., jax.Array]


class Features(NamedTuple):
    """What of the model's attention an implementation must express beyond the mask."""

    softcap: bool = False  # logits soft-capped (Gemma 2)
    window: bool = False  # some layer slides (a window by token position, traced per layer)

    @classmethod
    def of(cls, config: Any) -> Features:
        """A model config's features (`attn_softcap`, `windowed` where its family has them)."""
        return cls(
            getattr(config, "attn_softcap", None) is not None,
            bool(getattr(config, "windowed", False)),
        )


NO_FEATURES = Features()


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One attention implementation: its kernels per mask kind and what it can express."""

    name: str
    kernels: Mapping[str, Kernel]  # mask kind -> kernel(q, k, v, mask, logits, block, mesh, specs)
    softcap: bool = True
    window: bool = True
    backends: tuple[str, ...] | None = None  # None: any
    dtypes: tuple[str, ...] | None = None  # compute dtypes; None: any
    head_dim_multiple: int = 1
    max_head_dim: int | None = None
    # computed once per forward pass, before the layer scan (a dense mask, a kernel's mask info)
    prepare: Callable[[Mask], Mask] | None = None
    # right-padded rows run as one segment per row (padding its own), so padding blocks are skipped
    padded_rows_as_segments: bool = False

    def misfit(
        self,
        kind: str,
        features: Features = NO_FEATURES,
        backend: str | None = None,
        dtype: str | None = None,
        head_dim: int | None = None,
    ) -> str | None:
        """Why this cannot run `kind` masks for such a model here, or None when it can (an
        argument left None is not checked)."""
        name = self.name
        if self.backends is not None and backend is not None and backend not in self.backends:
            return f"{name} attention needs a {'/'.join(self.backends)} backend, not {backend}"
        if self.dtypes is not None and dtype is not None and dtype not in self.dtypes:
            return f"{name} attention needs dtype {' or '.join(self.dtypes)}, not {dtype}"
        if head_dim is not None and (
            head_dim % self.head_dim_multiple
            or (self.max_head_dim is not None and head_dim > self.max_head_dim)
        ):
            limit = f" and at most {self.max_head_dim}" if self.max_head_dim else ""
            return (
                f"{name} attention needs head_dim a multiple of {self.head_dim_multiple}"
                f"{limit}; the model's is {head_dim}"
            )
        if kind not in self.kernels:
            return f"{name} attention cannot express {kind} masks"
        if features.softcap and not self.softcap:
            return f"{name} attention cannot soft-cap logits (the model's are)"
        if features.window and not self.window:
            return f"{name} attention cannot slide a window by position (the model's layers do)"
        return None


class Choice(NamedTuple):
    """The implementation for each mask kind (static: a model config field)."""

    causal: str
    segments: str
    tree: str

    @classmethod
    def uniform(cls, name: str) -> Choice:
        return cls(name, name, name)

    def for_kind(self, kind: str) -> str:
        return getattr(self, kind)

    def describe(self) -> str:
        """'flash' when one implementation serves every kind, else each kind's."""
        if len(set(self)) == 1:
            return self.causal
        return ", ".join(f"{kind} {name}" for kind, name in zip(MASK_KINDS, self, strict=True))


def implementation_name(attention: str | Choice, kind: str) -> str:
    """The implementation `attention` (one name, or a `Choice`) runs for `kind` masks."""
    return attention if isinstance(attention, str) else attention.for_kind(kind)


def check_attention(attention: str | Choice, known: Sequence[str]) -> None:
    """ValueError unless `attention` names only `known` implementations (a model config's check)."""
    names = {attention} if isinstance(attention, str) else set(attention)
    if not names <= set(known) or not isinstance(attention, (str, Choice)):
        raise ValueError(f"attention must be one of {tuple(known)} or a Choice of them")


class Chosen(NamedTuple):
    """`choose`'s result: the choice, and per mask kind why the faster candidates were passed."""

    choice: Choice
    skipped: dict[str, list[str]]


def choose(
    table: Mapping[str, Implementation],
    attention: str,
    candidates: Sequence[str],
    used: Sequence[str],
    features: Features,
    backend: str,
    dtype: str,
    head_dim: int | None,
) -> Chosen | str:
    """Per mask kind: `attention` when named (it must fit every kind in `used`; a kind not used
    takes it where it fits, else auto's pick), else the first of `candidates` that fits. Returns
    the one-line reason instead when no implementation fits a kind in `used`."""

    def fits(name: str, kind: str) -> str | None:
        return table[name].misfit(kind, features, backend, dtype, head_dim)

    picked: dict[str, str] = {}
    skipped: dict[str, list[str]] = {}
    for kind in (*used, *(k for k in MASK_KINDS if k not in used)):  # errors name a used kind
        if attention != "auto":
            misfit = fits(attention, kind)
            if misfit is None:
                picked[kind] = attention
                continue
            if kind in used:
                able = [name for name in table if fits(name, kind) is None]
                return f"{misfit}; {kind} masks here can run {', '.join(able)}" if able else misfit
        passed = []
        for name in candidates:
            misfit = fits(name, kind)
            if misfit is None:
                picked[kind] = name
                break
            passed.append(misfit)
        else:
            return f"no implementation fits {kind} masks ({'; '.join(passed)})"
        skipped[kind] = passed
    return Chosen(Choice(*(picked[kind] for kind in MASK_KINDS)), skipped)
