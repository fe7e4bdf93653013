"""hcsc-jax: Hierarchical Contrastive Selective Coding in JAX/Flax NNX.

A trained encoder in your own code: `hcsc_jax.load_encoder(path)` -> `hcsc_jax.Pretrained`
(`hcsc_jax/pretrained.py`; imported on first use, so `import hcsc_jax` stays light).
"""

__version__ = "0.1.0"
__all__ = ["Classifier", "FineTuned", "InputSpec", "Pretrained", "load_classifier", "load_encoder"]


def __getattr__(name):
    if name in __all__:
        from hcsc_jax import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'hcsc_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
