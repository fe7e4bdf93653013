"""The encoder (backbone + projection head) and how one is built: `make_encoder` from arguments,
`build_encoder` from the `encoder_meta` dict that checkpoints store beside the weights."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .heads import ProjectionHead
from .resnet import ARCHS, ResNet


def l2_normalize(x, axis=-1, eps=1e-12):
    """torch ``F.normalize``: x / max(||x||, eps). The one L2 normalization of the package: a
    NumPy array is normalized by NumPy on the host (same formula), anything else by jax.numpy."""
    xp = np if isinstance(x, np.ndarray) else jnp
    norm = xp.sqrt(xp.sum(xp.square(x), axis=axis, keepdims=True))
    return x / xp.maximum(norm, eps)


class Encoder(nnx.Module):
    """Backbone + projection head (MoCo ``encoder_q`` / ``encoder_k``).

    ``__call__(x NHWC, *, train) -> (features (B, F), projection (B, out))``, both float32;
    the projection is L2-normalized along the last axis. Torch names: ``backbone.X`` <-> ``X``,
    ``head.fc0``/``head.fc2`` <-> ``fc.0``/``fc.2``.

    Functional use inside ``jax.jit``/``jax.grad`` (train mode updates the BN stats in place)::

      graphdef, params, stats = nnx.split(encoder, nnx.Param, nnx.BatchStat)
      def loss_fn(params, stats, x):
        model = nnx.merge(graphdef, params, stats, copy=True)  # copy: stats from an outer trace
        feats, z = model(x, train=True)
        return loss(z), nnx.state(model, nnx.BatchStat)
      (l, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x)
    """

    def __init__(self, backbone: ResNet, head: ProjectionHead):
        self.backbone = backbone
        self.head = head

    def __call__(self, x, *, train: bool):
        feats = self.backbone(x, train=train)
        proj = self.head(feats.astype(self.backbone.dtype)).astype(jnp.float32)
        return feats, l2_normalize(proj)


def make_encoder(
    arch: str = "resnet50",
    *,
    out_dim: int = 128,
    hidden_dim: int | None = None,
    small_stem: bool = False,
    width: float = 1.0,
    bn_group_size: int | None = 32,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    **kw,
) -> Encoder:
    """Build ``Encoder(ARCHS[arch](...), ProjectionHead(F, hidden_dim or F, out_dim))``."""
    backbone = ARCHS[arch](
        small_stem=small_stem, width=width, bn_group_size=bn_group_size, dtype=dtype, rngs=rngs, **kw
    )
    head = ProjectionHead(backbone.num_features, hidden_dim, out_dim, dtype=dtype, rngs=rngs)
    return Encoder(backbone, head)


def encoder_meta(model_config: dict[str, Any], in_channels: int, bn_group_size, **extra) -> dict[str, Any]:
    """What `build_encoder` (and `checkpoints.load_encoder`) needs to rebuild an encoder: arch,
    width, small_stem, embed_dim, hidden_dim, dtype (the `config.model` fields), in_channels,
    bn_group_size, plus `extra`."""
    return dict(model=dict(model_config), in_channels=int(in_channels), bn_group_size=bn_group_size, **extra)


def build_encoder(meta: dict[str, Any], abstract: bool = False, seed: int = 0) -> Encoder:
    """The encoder described by `encoder_meta` (shapes only, no allocation, if `abstract`)."""
    m = meta["model"]
    make = lambda: make_encoder(
        m["arch"], out_dim=m["embed_dim"], hidden_dim=m.get("hidden_dim"), small_stem=m["small_stem"],
        width=m["width"], bn_group_size=meta.get("bn_group_size"), dtype=jnp.dtype(m.get("dtype", "float32")),
        in_channels=meta["in_channels"], rngs=nnx.Rngs(seed))
    return nnx.eval_shape(make) if abstract else make()
