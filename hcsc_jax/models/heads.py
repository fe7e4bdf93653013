"""MoCo v2 projection head and the backbone + head encoder."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .resnet import ARCHS, ResNet

# torch nn.Linear default init: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_linear_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear(cin, cout, *, dtype, rngs):
    bound = 1.0 / math.sqrt(cin)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(
        cin,
        cout,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_linear_kernel_init,
        bias_init=bias_init,
        rngs=rngs,
    )


class ProjectionHead(nnx.Module):
    """Linear(in, hidden) - ReLU - Linear(hidden, out), no BN.

    Torch names: ``fc0`` <-> ``fc.0``, ``fc2`` <-> ``fc.2`` (``kernel`` = ``weight.T``, ``bias``).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int = 128,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        hidden_features = in_features if hidden_features is None else hidden_features
        self.fc0 = _torch_linear(in_features, hidden_features, dtype=dtype, rngs=rngs)
        self.fc2 = _torch_linear(hidden_features, out_features, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc0(x)))


def l2_normalize(x, axis=-1, eps=1e-12):
    """torch ``F.normalize``: x / max(||x||, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


class Encoder(nnx.Module):
    """Backbone + projection head (MoCo ``encoder_q`` / ``encoder_k``).

    ``__call__(x NHWC, *, train) -> (features (B, F), projection (B, out))``, both float32;
    the projection is L2-normalised along the last axis. Torch names: ``backbone.X`` <-> ``X``,
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
