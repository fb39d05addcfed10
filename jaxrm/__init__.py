"""jaxrm: Bradley-Terry reward-model training in JAX/Flax, faithful to open-instruct."""

__version__ = "0.1.0"
