"""Builders for random tiny transformers models of every family jaxrm reads, the numerical
reference in tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_VARIANTS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "llama3_rope": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "linear_rope_bias": dict(
        num_attention_heads=2,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    ),
}


TINY_SHAPE = dict(  # what every family's tiny model shares
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    num_labels=1,
)


def tiny_llama_config(variant: str = "gqa", **overrides):
    from transformers import LlamaConfig

    kwargs = dict(TINY_SHAPE, tie_word_embeddings=False)
    kwargs.update(TINY_VARIANTS[variant])
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


# Per family: transformers' config class and keyword arguments for a tiny model whose shapes catch
# shortcuts: head_dim != hidden / heads, GQA, windows (5) shorter than the test sequences, soft-cap,
# query_pre_attn_scalar != head_dim, a Gemma 3 layer count that is not a multiple of 6, rope
# scaling (yarn with its attention factor, linear on Gemma 3's global layers only), tied embeddings.
FAMILY_CONFIGS = {
    "qwen2": (
        "Qwen2Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=32,
            ),
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
            tie_word_embeddings=True,
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5),
    ),
    "olmo2": (
        "Olmo2Config",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True),
    ),
    "gemma2": (
        "Gemma2Config",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=1.5,
            sliding_window=5,
            initializer_range=0.2,
        ),
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=7,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            rope_parameters=dict(
                full_attention=dict(rope_type="linear", rope_theta=1_000_000.0, factor=2.0),
                sliding_attention=dict(rope_type="default", rope_theta=10_000.0),
            ),
        ),
    ),
}
FAMILIES = ("llama", *FAMILY_CONFIGS)


def tiny_config(family: str = "llama", variant: str = "gqa", **overrides):
    """A tiny transformers config of `family` (Llama: of `variant`)."""
    import transformers

    if family == "llama":
        return tiny_llama_config(variant, **overrides)
    class_name, kwargs = FAMILY_CONFIGS[family]
    kwargs = {**TINY_SHAPE, "eos_token_id": 1, **kwargs, **overrides}
    return getattr(transformers, class_name)(**kwargs)


def save_tiny_classifier(
    path: Path, variant: str = "gqa", seed: int = 0, family: str = "llama", **overrides
):
    """A random `*ForSequenceClassification` of `family` (random biases and norm weights too)
    saved as safetensors."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(family, variant, **overrides)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def torch_rewards(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(input_ids, dtype=torch.long),
            attention_mask=torch.as_tensor(attention_mask, dtype=torch.long),
        )
    return out.logits[:, 0].float().numpy()


def right_padded_batch(lengths: list[int], vocab: int, pad_id: int = 0, seed: int = 0):
    """Random ids (never the pad id) right-padded to the longest row."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), pad_id, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(1, vocab, n)
        mask[row, :n] = 1
    return ids, mask
