"""jaxrm: Bradley-Terry reward-model training in JAX/Flax, faithful to open-instruct."""

__version__ = "0.1.0"

from jaxrm.tokenizer import silence_torch_notice  # noqa: E402 - after the version, before any use

silence_torch_notice()
