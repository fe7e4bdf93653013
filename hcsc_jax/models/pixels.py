"""The raw-pixel reference: an "encoder" whose features are the image itself.

`pixels_encoder(image_size, channels)` is an `Encoder` (no parameters, no statistics) whose pooled
features are the flattened center crop the evaluators give every encoder (the crop size and the
per-channel normalization of the run it is compared with), and whose projection is that vector
L2-normalized. Through the same evaluators as a trained encoder (kNN: cosine similarity of the
normalized pixels; linear probe; k-means NMI) it gives the reference rows a result must beat:
`python eval.py --eval=knn --checkpoint=pixels:runs/digits` (the data of that run).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

PIXELS = "pixels"


class Pixels(nnx.Module):
    """(B, S, S, C) -> (B, S * S * C) float32: the image, flattened."""

    def __init__(self, image_size: int, in_channels: int):
        self.num_features = int(image_size) * int(image_size) * int(in_channels)
        self.dtype = jnp.float32

    def __call__(self, x, *, train: bool = False):
        return x.reshape(x.shape[0], -1).astype(jnp.float32)


class Identity(nnx.Module):
    def __call__(self, x):
        return x


def pixels_meta(image_size: int, channels: int) -> dict:
    """The `encoder_meta` of the raw-pixel reference at this crop size."""
    size = int(image_size) * int(image_size) * int(channels)
    return dict(model=dict(arch=PIXELS, image_size=int(image_size), width=1.0, small_stem=False,
                           embed_dim=size, hidden_dim=None, dtype="float32"),
                in_channels=int(channels), bn_group_size=None)
