"""torchvision-layout ResNet (v1.5) in Flax NNX, NHWC, with grouped BatchNorm.

Layout and padding follow ``torchvision.models.resnet`` exactly (explicit symmetric padding, never
'SAME'), so PyTorch weights load with a key-mapping converter:

================================  ==========================================================
NNX path (``nnx.to_flat_state``)  torchvision ``state_dict`` key
================================  ==========================================================
``conv1/kernel``                  ``conv1.weight``          (HWIO <- OIHW: ``w.transpose(2, 3, 1, 0)``)
``bn1/scale``, ``bn1/bias``       ``bn1.weight``, ``bn1.bias``
``bn1/mean``, ``bn1/var``         ``bn1.running_mean``, ``bn1.running_var``
``layer{i}/{j}/conv{k}/kernel``   ``layer{i}.{j}.conv{k}.weight``
``layer{i}/{j}/bn{k}/...``        ``layer{i}.{j}.bn{k}.*``   (as bn1 above)
``layer{i}/{j}/downsample/0/...`` ``layer{i}.{j}.downsample.0.weight`` (1x1 conv)
``layer{i}/{j}/downsample/1/...`` ``layer{i}.{j}.downsample.1.*``      (BN)
================================  ==========================================================

``num_batches_tracked`` has no counterpart; the backbone has no ``fc`` (the projection head of
:mod:`hcsc_jax.models.heads` takes its place). Parameters are float32; ``dtype`` is the compute
dtype. Input is NHWC.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .norm import GroupedBatchNorm

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"); jax "normal" is untruncated.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _conv(cin, cout, k, stride, pad, *, dtype, rngs):
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        rngs=rngs,
    )


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch ``MaxPool2d(3, stride=2, padding=1)``: symmetric pad 1 with -inf (NHWC).

    The init value must be a concrete -inf so that JAX lowers this to the differentiable
    ``reduce_window_max`` primitive.
    """
    return jax.lax.reduce_window(
        x,
        np.array(-np.inf, x.dtype),
        jax.lax.max,
        (1, 3, 3, 1),
        (1, 2, 2, 1),
        ((0, 0), (1, 1), (1, 1), (0, 0)),
    )


def _downsample(cin, cout, stride, *, bn, dtype, rngs):
    """torch ``downsample = Sequential(conv1x1(stride), BN)`` as ``nnx.List`` [0: conv, 1: BN]."""
    if stride == 1 and cin == cout:
        return nnx.data(None)
    return nnx.List([_conv(cin, cout, 1, stride, 0, dtype=dtype, rngs=rngs), bn(cout)])


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, *, bn, dtype, rngs):
        cout = planes * self.expansion
        self.conv1 = _conv(cin, planes, 3, stride, 1, dtype=dtype, rngs=rngs)
        self.bn1 = bn(planes)
        self.conv2 = _conv(planes, cout, 3, 1, 1, dtype=dtype, rngs=rngs)
        self.bn2 = bn(cout, last=True)
        self.downsample = _downsample(cin, cout, stride, bn=bn, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, train: bool):
        out = nnx.relu(self.bn1(self.conv1(x), train=train))
        out = self.bn2(self.conv2(out), train=train)
        if self.downsample is not None:
            x = self.downsample[1](self.downsample[0](x), train=train)
        return nnx.relu(out + x)


class Bottleneck(nnx.Module):
    """torchvision v1.5 bottleneck: the stride is on the 3x3 conv."""

    expansion = 4

    def __init__(self, cin, planes, stride, *, bn, dtype, rngs):
        cout = planes * self.expansion
        self.conv1 = _conv(cin, planes, 1, 1, 0, dtype=dtype, rngs=rngs)
        self.bn1 = bn(planes)
        self.conv2 = _conv(planes, planes, 3, stride, 1, dtype=dtype, rngs=rngs)
        self.bn2 = bn(planes)
        self.conv3 = _conv(planes, cout, 1, 1, 0, dtype=dtype, rngs=rngs)
        self.bn3 = bn(cout, last=True)
        self.downsample = _downsample(cin, cout, stride, bn=bn, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, train: bool):
        out = nnx.relu(self.bn1(self.conv1(x), train=train))
        out = nnx.relu(self.bn2(self.conv2(out), train=train))
        out = self.bn3(self.conv3(out), train=train)
        if self.downsample is not None:
            x = self.downsample[1](self.downsample[0](x), train=train)
        return nnx.relu(out + x)


class ResNet(nnx.Module):
    """ResNet backbone: ``__call__(x NHWC, *, train) -> (B, num_features)`` float32 pooled features.

    Args:
      block: :class:`BasicBlock` or :class:`Bottleneck`.
      layers: blocks per stage, e.g. (3, 4, 6, 3).
      small_stem: 3x3 stride-1 pad-1 stem conv and no max-pool (for 8-32 px images).
      width: multiplier on all channel counts, ``max(1, round(c * width))``.
      bn_group_size: samples per BN-statistics group in train mode (None: the whole batch).
      bn_running_stats: what the running statistics average (`norm.RUNNING_STATS`).
      zero_init_residual: zero-init the last BN scale of each block (off, as in torchvision).
      in_channels: image channels (3; 1 for gray datasets trained from scratch).
      dtype: compute dtype; parameters and BN statistics stay float32.
    """

    def __init__(
        self,
        block,
        layers,
        *,
        small_stem: bool = False,
        width: float = 1.0,
        bn_group_size: int | None = 32,
        bn_running_stats: str = "mean_of_groups",
        zero_init_residual: bool = False,
        in_channels: int = 3,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        def bn(c, last=False):
            return GroupedBatchNorm(
                c, group_size=bn_group_size, running_stats=bn_running_stats, dtype=dtype,
                zero_scale=zero_init_residual and last
            )

        self.small_stem = small_stem
        self.dtype = dtype
        cin = _ch(64, width)
        if small_stem:
            self.conv1 = _conv(in_channels, cin, 3, 1, 1, dtype=dtype, rngs=rngs)
        else:
            self.conv1 = _conv(in_channels, cin, 7, 2, 3, dtype=dtype, rngs=rngs)
        self.bn1 = bn(cin)
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            planes = _ch(planes, width)
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, planes, stride, bn=bn, dtype=dtype, rngs=rngs))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.num_features = cin

    def stem(self, x, *, train: bool):
        x = nnx.relu(self.bn1(self.conv1(x.astype(self.dtype)), train=train))
        return x if self.small_stem else max_pool_3x3_s2(x)

    def __call__(self, x, *, train: bool):
        x = self.stem(x, train=train)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in layer:
                x = blk(x, train=train)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def resnet18(**kw) -> ResNet:
    """ResNet-18: BasicBlock, (2, 2, 2, 2); keyword arguments as `ResNet`."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kw)


def resnet34(**kw) -> ResNet:
    """ResNet-34: BasicBlock, (3, 4, 6, 3); keyword arguments as `ResNet`."""
    return ResNet(BasicBlock, (3, 4, 6, 3), **kw)


def resnet50(**kw) -> ResNet:
    """ResNet-50 (v1.5): Bottleneck, (3, 4, 6, 3); keyword arguments as `ResNet`."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kw)


ARCHS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
