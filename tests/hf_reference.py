"""Builders for random tiny transformers Llama models, the numerical reference in tests."""

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


def tiny_llama_config(variant: str = "gqa", **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        num_labels=1,
        tie_word_embeddings=False,
    )
    kwargs.update(TINY_VARIANTS[variant])
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_classifier(path: Path, variant: str = "gqa", seed: int = 0, **overrides):
    """A random LlamaForSequenceClassification (random biases too) saved as safetensors."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(tiny_llama_config(variant, **overrides)).eval()
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
