"""The encoder (backbone + projection head) and how one is built: `make_encoder` from arguments,
`build_encoder` from the `encoder_meta` dict that checkpoints store beside the weights,
`check_model_config` before a run starts. Backbones: the ResNets of `resnet.ARCHS` and the ViTs
of `vit.VIT_ARCHS`."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .heads import ProjectionHead
from .pixels import PIXELS, Identity, Pixels
from .resnet import ARCHS, ResNet
from .vit import VIT_ARCHS, VisionTransformer, build_vit, check_dims, check_image_size

# config.model fields that only a ViT reads: blocks (None: the arch's 12), "sincos" or "learn"
# position embedding, and the image side the learned one is sized for.
VIT_FIELDS = ("depth", "pos_embed", "image_size")
# config.model.dtype: the compute dtype (parameters, BN statistics and the loss stay float32).
COMPUTE_DTYPES = ("float32", "bfloat16")


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

    def __init__(self, backbone: ResNet | VisionTransformer | Pixels, head: ProjectionHead | Identity):
        self.backbone = backbone
        self.head = head

    def __call__(self, x, *, train: bool):
        feats = self.backbone(x, train=train)
        proj = self.head(feats.astype(self.backbone.dtype)).astype(jnp.float32)
        return feats, l2_normalize(proj)


def split_model(model: nnx.Module):
    """-> (graphdef, params, batch_stats) of an NNX encoder: the parts `apply_model`, the train
    state and the checkpoints hold."""
    return nnx.split(model, nnx.Param, nnx.BatchStat)


def apply_model(graphdef, params, stats, x, train: bool):
    """Runs the encoder functionally: -> (pooled features, L2-normalized projection, new stats)."""
    model = nnx.merge(graphdef, params, stats, copy=True)
    features, projection = model(x, train=train)
    return features, projection, nnx.state(model, nnx.BatchStat)


def make_encoder(
    arch: str = "resnet50",
    *,
    out_dim: int = 128,
    hidden_dim: int | None = None,
    small_stem: bool = False,
    width: float = 1.0,
    bn_group_size: int | None = 32,
    bn_running_stats: str = "mean_of_groups",
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    **kw,
) -> Encoder:
    """Build ``Encoder(backbone, ProjectionHead(F, hidden_dim or F, out_dim))``: the backbone is
    ``ARCHS[arch](...)`` for a ResNet, ``build_vit(arch, ...)`` for a ViT (which takes ``width``,
    ``in_channels`` and the `VIT_FIELDS` in ``kw``, and has no BatchNorm: ``bn_group_size`` and
    ``bn_running_stats`` unused)."""
    if arch in VIT_ARCHS:
        if small_stem:
            raise ValueError(f"small_stem is a ResNet option; a ViT's first layer is its patch size ({arch}: "
                             f"{VIT_ARCHS[arch][3]} px; vit_s4 for 32-px images): set model.small_stem=False")
        backbone = build_vit(arch, width=width, dtype=dtype, rngs=rngs, **kw)
    elif arch in ARCHS:
        backbone = ARCHS[arch](
            small_stem=small_stem, width=width, bn_group_size=bn_group_size,
            bn_running_stats=bn_running_stats, dtype=dtype, rngs=rngs, **kw
        )
    else:
        raise ValueError(f"unknown model.arch {arch!r}; known: {', '.join(list(ARCHS) + list(VIT_ARCHS))}")
    head = ProjectionHead(backbone.num_features, hidden_dim, out_dim, dtype=dtype, rngs=rngs)
    return Encoder(backbone, head)


def encoder_meta(model_config: dict[str, Any], in_channels: int, bn_group_size, **extra) -> dict[str, Any]:
    """What `build_encoder` (and `checkpoints.restore_encoder`) needs to rebuild an encoder: arch,
    width, small_stem, embed_dim, hidden_dim, dtype (and for a ViT the `VIT_FIELDS`: the
    `config.model` fields), in_channels, bn_group_size, plus `extra`."""
    return dict(model=dict(model_config), in_channels=int(in_channels), bn_group_size=bn_group_size, **extra)


def check_input(image_size=None, mean=None, std=None, channels: int | None = None, where: str = "") -> None:
    """ValueError, one line starting with `where`, unless the input an encoder is given is one it
    can take: `image_size` an integer >= 1, `mean` / `std` lists of finite numbers (std > 0), at
    least `channels` of each when it is known (the first `channels` are used). None: not checked."""
    integer = isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool)
    if image_size is not None and (not integer or image_size < 1):
        raise ValueError(f"{where}image_size must be an integer >= 1, got {image_size!r}")
    for name, values, positive in (("mean", mean, False), ("std", std, True)):
        if values is None:
            continue
        ok = isinstance(values, (list, tuple)) and len(values) >= 1 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            and (v > 0 or not positive) for v in values)
        if not ok or (channels is not None and len(values) < channels):
            per = f"one per channel ({channels})" if channels else "one per channel"
            raise ValueError(f"{where}{name} must be finite numbers{' > 0' if positive else ''}, {per}, "
                             f"got {values!r}")


def input_meta(image_size: int, channels: int, mean, std) -> dict[str, Any]:
    """The input an encoder was trained on, kept as `meta["input"]` beside its weights (exported
    and imported encoders, whose directory has no training config.json): the crop size and the
    per-channel normalization of its `channels`-channel images (the first `channels` entries of
    `mean` / `std`, as `augmentations.channel_stats`). ValueError (`check_input`) for an input no
    encoder can take: a size < 1, a std of 0, a NaN, fewer values than channels."""
    check_input(image_size, list(mean), list(std), int(channels))
    mean, std = [float(m) for m in mean][:channels], [float(s) for s in std][:channels]
    return dict(image_size=int(image_size), channels=int(channels), mean=mean, std=std)


def build_encoder(meta: dict[str, Any], abstract: bool = False, seed: int = 0,
                  bn_running_stats: str = "mean_of_groups") -> Encoder:
    """The encoder described by `encoder_meta` (shapes only, no allocation, if `abstract`);
    `bn_running_stats`: what its BatchNorm running statistics follow in train mode (a training
    run's `config.bn_running_stats`; `norm.RUNNING_STATS`)."""
    m = meta["model"]
    if m["arch"] == PIXELS:  # the raw-pixel reference (models/pixels.py)
        return Encoder(Pixels(m["image_size"], meta["in_channels"]), Identity())
    vit_kw = {k: m[k] for k in VIT_FIELDS if m.get(k) is not None} if m["arch"] in VIT_ARCHS else {}
    make = lambda: make_encoder(
        m["arch"], out_dim=m["embed_dim"], hidden_dim=m.get("hidden_dim"), small_stem=m["small_stem"],
        width=m["width"], bn_group_size=meta.get("bn_group_size"),
        bn_running_stats=bn_running_stats, dtype=jnp.dtype(m.get("dtype", "float32")),
        in_channels=meta["in_channels"], rngs=nnx.Rngs(seed), **vit_kw)
    return nnx.eval_shape(make) if abstract else make()


def check_model_config(model_config, image_size: int, shuffle_bn: bool, view_sizes=()) -> None:
    """ValueError saying what to change when `config.model` cannot train on these views: an
    unknown arch; for a ViT, ShuffleBN (it has no BatchNorm to shuffle), small_stem, an embedding
    dim that does not suit the heads, an image or local view size that the patch size does not
    divide, or local views of another size with a learned position embedding."""
    arch = model_config["arch"]
    if arch not in ARCHS and arch not in VIT_ARCHS:
        raise ValueError(f"unknown model.arch {arch!r}; known: {', '.join(list(ARCHS) + list(VIT_ARCHS))}")
    if arch not in VIT_ARCHS:
        return
    if shuffle_bn:
        raise ValueError(f"shuffle_bn=True asks to shuffle BatchNorm groups, but {arch} is a ViT and has no "
                         "BatchNorm: set --config.shuffle_bn=False")
    if model_config.get("small_stem"):
        raise ValueError(f"small_stem is a ResNet option; {arch} takes its patch size from its name: set "
                         "model.small_stem=False")
    dim, _, heads, patch = VIT_ARCHS[arch]
    pos_embed = model_config.get("pos_embed") or "sincos"
    check_dims(max(1, int(round(dim * model_config.get("width", 1.0)))), heads, pos_embed)
    for size in (image_size, *view_sizes):
        check_image_size(int(size), patch)
    if pos_embed == "learn":
        sizes = {int(model_config.get("image_size") or image_size), int(image_size), *map(int, view_sizes)}
        if len(sizes) > 1:
            raise ValueError(f"a learned position embedding fits one image size; the views are "
                             f"{sorted(sizes)} px (model.image_size, image_size, local views): use "
                             "pos_embed='sincos' or one size")
