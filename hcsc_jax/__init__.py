"""hcsc-jax: Hierarchical Contrastive Selective Coding in JAX/Flax NNX."""

__version__ = "0.1.0"
