"""MoCo v2 augmentation on the device: batched, jittable, static shapes (docs/method.md §6).

`augment(key, images, cfg)` maps a (B, H, W, C) uint8 batch to (B, crop, crop, C) float32,
normalized, applying per example and in this order (torchvision semantics, float images in
[0, 1] until normalization):

1. RandomResizedCrop(crop, scale, ratio) (skipped with `random_crop=False`, for views the host
   already cropped): `sample_crop_box` draws torchvision's 10 candidate
   boxes at once and keeps the first valid one (else torchvision's center-crop fallback); the box
   is resampled with antialiased bilinear weights (`resize.bilinear_weights`), i.e. exactly
   crop-then-resize, never reading pixels outside the box.
2. RandomApply(ColorJitter(b, c, s, h), p=jitter_prob): factors b, c, s ~ U[max(0, 1-v), 1+v],
   hue shift ~ U[-h, h], the four ops in a random order per example; brightness, contrast
   (blend with the mean gray level) and saturation (blend with the gray image) clip to [0, 1];
   hue rotates H in HSV. For C = 1 saturation and hue are the identity (as torchvision).
3. RandomGrayscale(p=grayscale_prob): luma 0.299 R + 0.587 G + 0.114 B on all three channels.
4. RandomApply(GaussianBlur, p=blur_prob): sigma ~ U(blur_sigma), odd kernel of ~10% of the crop
   (23 for 224), separable, reflect padding.
5. RandomHorizontalFlip(p=0.5) when `flip` (folded into the resampling matrix: flipping commutes
   with steps 2-4).
6. Normalize: (x - mean) / std per channel.

Randomness: example b uses `jax.random.fold_in(key, indices[b])` (indices defaults to
arange(B)), so its view depends only on (key, its index): not on the batch size, on how the
batch is sharded, or on the other examples. Pass global indices when augmenting a shard.
Each example draws all its decisions from a single vector of uniforms (one threefry call).

Where torchvision and the MoCo v2 recipe differ, this follows torchvision's *tensor* ops: MoCo
v2 applies ColorJitter to PIL uint8 images (8-bit rounding between ops) and blurs with PIL's
`GaussianBlur(radius=sigma)` (no kernel-size cap); here everything is float and the blur kernel
is capped at ~10% of the crop, as torchvision's `GaussianBlur(23, (0.1, 2.0))` ports do.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from hcsc_jax.data.batch import Images
from hcsc_jax.data.crops import CROP_UNIFORMS, center_crop_geometry, check_crop_params
from hcsc_jax.data.resize import bilinear_weights

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "augment",
    "blur_kernel_size",
    "center_crop",
    "color_jitter",
    "gaussian_blur",
    "hsv_to_rgb",
    "jitter_params",
    "normalize",
    "rgb_to_hsv",
    "sample_crop_box",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop_size: int
    scale: tuple = (0.2, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    flip: bool = True
    mean: tuple = IMAGENET_MEAN   # per channel; 1-tuples for 1-channel data
    std: tuple = IMAGENET_STD
    # False: the input is already cropped to crop_size (host-side crop of the streaming path);
    # only the flip and the photometric ops run here.
    random_crop: bool = True

    def __post_init__(self):
        check_crop_params(self.crop_size, self.scale, self.ratio)
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("brightness, contrast and saturation must be >= 0")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")


def _normalize(x: jax.Array, mean, std) -> jax.Array:
    c = x.shape[-1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {c}-channel images; "
                         "pass 1-tuples for 1-channel data")
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ----------------------------------------------------------------------------- crop

def sample_crop_box(key, height: int, width: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                    attempts: int = 10):
    """torchvision RandomResizedCrop.get_params, vectorised: int32 scalars (top, left, h, w).

    Draws `attempts` (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)) candidates,
    w = round(sqrt(area * r)), h = round(sqrt(area / r)), keeps the first with 0 < w <= width and
    0 < h <= height and places it uniformly; if none is valid, torchvision's fallback: the
    largest centered box whose aspect ratio is clamped to `ratio`.
    """
    u = jax.random.uniform(key, (2 * attempts + 2,))
    return _crop_box(u, height, width, scale, ratio)


def _crop_box(u, height: int, width: int, scale, ratio):
    """sample_crop_box from uniforms u (2 * attempts + 2,) in [0, 1)."""
    attempts = (u.shape[0] - 2) // 2
    area = float(height * width)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:attempts])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(lo + (hi - lo) * u[attempts:2 * attempts])
    w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(valid)
    found = valid[first]
    # Fallback (static: depends on the image shape only).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fh, fw = height, round(height * max(ratio))
    else:
        fw, fh = width, height
    fi, fj = (height - fh) // 2, (width - fw) // 2
    h = jnp.where(found, h[first], fh)
    w = jnp.where(found, w[first], fw)
    # Uniform integer offsets in [0, size - box]: floor(u * count), clamped against u -> 1.
    top = jnp.minimum(jnp.floor(u[-2] * (height - h + 1)).astype(jnp.int32), height - h)
    left = jnp.minimum(jnp.floor(u[-1] * (width - w + 1)).astype(jnp.int32), width - w)
    top = jnp.where(found, top, fi)
    left = jnp.where(found, left, fj)
    return top.astype(jnp.int32), left.astype(jnp.int32), h.astype(jnp.int32), w.astype(jnp.int32)


def _resample(x: jax.Array, wy: jax.Array, wx: jax.Array) -> jax.Array:
    """x (H, W, C) -> channel-first (C, oh, ow) with row weights wy (oh, H) and column
    weights wx (ow, W)."""
    x = jnp.einsum("oh,hwc->cow", wy, x, precision=_HIGHEST)
    return jnp.einsum("pw,cow->cop", wx, x, precision=_HIGHEST)


# ----------------------------------------------------------------------------- color
# Internally images are channel-first (C, H, W): per-channel planes are contiguous, which
# XLA:CPU vectorises far better than a trailing axis of 3 (the blur runs ~4x faster). The
# public helpers take channel-last arrays.

def _gray_cf(x: jax.Array) -> jax.Array:
    """(3, ...) -> (1, ...) luma (ITU-R 601-2)."""
    return (LUMA[0] * x[0] + LUMA[1] * x[1] + LUMA[2] * x[2])[None]


def _rgb_to_hsv_cf(x: jax.Array) -> jax.Array:
    """torchvision's _rgb2hsv on (3, ...) floats in [0, 1]; h, s, v in [0, 1]."""
    r, g, b = x[0], x[1], x[2]
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    minc = jnp.minimum(jnp.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / jnp.where(eqc, 1.0, maxc)
    div = jnp.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = jnp.where(maxc == r, bc - gc, 0.0)
    hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
    hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
    h = jnp.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return jnp.stack([h, s, maxc])


def _hsv_to_rgb_cf(x: jax.Array) -> jax.Array:
    """torchvision's _hsv2rgb on (3, ...)."""
    h, s, v = x[0], x[1], x[2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = jnp.mod(i.astype(jnp.int32), 6)
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    conds = [i == k for k in range(6)]
    r = jnp.select(conds, [v, q, p, p, t, v])
    g = jnp.select(conds, [t, v, v, q, p, p])
    b = jnp.select(conds, [p, p, t, v, v, q])
    return jnp.stack([r, g, b])


def _last_to_first(fn):
    return lambda x, *args: jnp.moveaxis(fn(jnp.moveaxis(jnp.asarray(x), -1, 0), *args), 0, -1)


def rgb_to_hsv(x: jax.Array) -> jax.Array:
    """torchvision's _rgb2hsv on (..., 3) floats in [0, 1]; h, s, v in [0, 1]."""
    return _last_to_first(_rgb_to_hsv_cf)(x)


def hsv_to_rgb(x: jax.Array) -> jax.Array:
    """torchvision's _hsv2rgb on (..., 3)."""
    return _last_to_first(_hsv_to_rgb_cf)(x)


def _exact_mean(x: jax.Array) -> jax.Array:
    """Mean of values in [0, 1], the same to the last bit whatever the batch layout.

    `jnp.mean` lets XLA pick the float summation order, and that order changed with the number
    of examples per device (1 vs 8 devices gave last-bit differences that training amplified).
    Here the values are rounded to fixed point with s = 2^k <= 2^24 steps, the largest s with
    size * s < 2^32, and summed as uint32: integer addition is associative, hence exact in any
    order. The rounding moves the mean by at most 0.5 / s (1e-5 for 224 x 224).
    """
    n = x.size
    scale = float(1 << min(24, ((2**32 - 1) // n).bit_length() - 1))
    q = jnp.round(jnp.clip(x, 0.0, 1.0) * scale).astype(jnp.uint32)
    total = jnp.sum(q, dtype=jnp.uint32)
    return total.astype(jnp.float32) / jnp.float32(n * scale)


def _factor_range(v: float) -> tuple[float, float]:
    return max(0.0, 1.0 - v), 1.0 + v


JITTER_UNIFORMS = 8


def jitter_params(key, cfg: AugmentConfig):
    """ColorJitter.get_params: (order (4,) int32 permutation of [brightness, contrast,
    saturation, hue] = [0, 1, 2, 3], factors (4,) float32 = (b, c, s, hue shift))."""
    return _jitter_params(jax.random.uniform(key, (JITTER_UNIFORMS,)), cfg)


def _jitter_params(u, cfg: AugmentConfig):
    order = jnp.argsort(u[:4]).astype(jnp.int32)  # uniformly random permutation
    ranges = [_factor_range(cfg.brightness), _factor_range(cfg.contrast),
              _factor_range(cfg.saturation), (-cfg.hue, cfg.hue)]
    lo = jnp.asarray([r[0] for r in ranges], jnp.float32)
    hi = jnp.asarray([r[1] for r in ranges], jnp.float32)
    return order, lo + (hi - lo) * u[4:8]


def color_jitter(key, x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Always-applied ColorJitter of one float image (H, W, C) in [0, 1] (see jitter_params).

    Brightness, contrast and saturation are all blends `clip(f * x + (1 - f) * target)` with
    target 0, the mean gray level, the gray image; they are applied through 3 slots before and
    3 slots after the (single, expensive) hue op, each slot active or not by the drawn order.
    """
    return _last_to_first(lambda x: _color_jitter_cf(jitter_params(key, cfg), x, cfg))(x)


def _color_jitter_cf(params, x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    order, factors = params
    color = x.shape[0] == 3
    position = jnp.argsort(order)             # position[op] = when op runs
    cheap_order = jnp.argsort(position[:3])   # brightness/contrast/saturation in run order
    hue_at = position[3]                      # number of cheap ops before the hue op

    def blend(img, op):
        gray = _gray_cf(img) if color else img
        f = factors[op]
        if not color:  # saturation is the identity on 1-channel images
            f = jnp.where(op == 2, 1.0, f)
        # target: 0 (brightness), mean gray (contrast), gray image (saturation)
        target = jnp.where(op == 2, 1.0, 0.0) * gray + jnp.where(op == 1, _exact_mean(gray), 0.0)
        return jnp.clip(f * img + (1.0 - f) * target, 0.0, 1.0)

    for t in range(3):
        x = jnp.where(t < hue_at, blend(x, cheap_order[t]), x)
    if color and cfg.hue > 0:
        hsv = _rgb_to_hsv_cf(x)
        hsv = hsv.at[0].set(jnp.mod(hsv[0] + factors[3], 1.0))
        x = _hsv_to_rgb_cf(hsv)
    for t in range(3):
        x = jnp.where(t >= hue_at, blend(x, cheap_order[t]), x)
    return x


# ----------------------------------------------------------------------------- blur

def blur_kernel_size(crop_size: int) -> int:
    """Odd kernel of ~10% of the crop: 23 for 224 (as in MoCo v2 / SimCLR ports), 3 for 32."""
    k = max(3, round(0.1 * crop_size))
    return k if k % 2 else k + 1


def _blur_cf(x: jax.Array, sigma, kernel_size: int) -> jax.Array:
    """torchvision gaussian_blur of one (C, H, W) image: separable, reflect padding."""
    half = (kernel_size - 1) / 2.0
    pos = jnp.linspace(-half, half, kernel_size)
    kernel = jnp.exp(-0.5 * (pos / sigma) ** 2)
    kernel = kernel / jnp.sum(kernel)
    pad = kernel_size // 2
    h, w = x.shape[1], x.shape[2]
    if min(h, w) <= pad:
        raise ValueError(f"blur kernel {kernel_size} too large for a {h}x{w} image")
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="reflect")
    x = sum(kernel[k] * xp[:, k:k + h] for k in range(kernel_size))
    xp = jnp.pad(x, ((0, 0), (0, 0), (pad, pad)), mode="reflect")
    return sum(kernel[k] * xp[:, :, k:k + w] for k in range(kernel_size))


def gaussian_blur(x: jax.Array, sigma, kernel_size: int) -> jax.Array:
    """torchvision gaussian_blur of one image (H, W, C): separable, reflect padding."""
    return _last_to_first(_blur_cf)(x, sigma, kernel_size)


# ----------------------------------------------------------------------------- pipeline

_U_CROP = slice(0, CROP_UNIFORMS)
_U_JITTER = slice(CROP_UNIFORMS, CROP_UNIFORMS + JITTER_UNIFORMS)
_U_FLIP, _U_JAPPLY, _U_GRAY, _U_BAPPLY, _U_SIGMA = range(CROP_UNIFORMS + JITTER_UNIFORMS,
                                                        CROP_UNIFORMS + JITTER_UNIFORMS + 5)
NUM_UNIFORMS = CROP_UNIFORMS + JITTER_UNIFORMS + 5


def _augment_one(key, image: jax.Array, cfg: AugmentConfig) -> jax.Array:
    # All of the example's randomness comes from one draw of NUM_UNIFORMS uniforms (one
    # threefry call: cheaper to run and much cheaper to compile than one call per decision).
    u = jax.random.uniform(key, (NUM_UNIFORMS,))
    height, width, channels = image.shape
    size = cfg.crop_size

    if cfg.random_crop:
        top, left, h, w = _crop_box(u[_U_CROP], height, width, cfg.scale, cfg.ratio)
        wy = bilinear_weights(height, size, top, h, xp=jnp)
        wx = bilinear_weights(width, size, left, w, xp=jnp)
        if cfg.flip:
            wx = jnp.where(u[_U_FLIP] < 0.5, wx[::-1], wx)
        x = _resample(image.astype(jnp.float32) / 255.0, wy, wx)
    else:
        if (height, width) != (size, size):
            raise ValueError(f"random_crop=False needs images already cropped to {size}x{size}, "
                             f"got {height}x{width}")
        x = jnp.moveaxis(image.astype(jnp.float32) / 255.0, -1, 0)
        if cfg.flip:
            x = jnp.where(u[_U_FLIP] < 0.5, x[:, :, ::-1], x)

    if cfg.jitter_prob > 0:
        jittered = _color_jitter_cf(_jitter_params(u[_U_JITTER], cfg), x, cfg)
        x = jnp.where(u[_U_JAPPLY] < cfg.jitter_prob, jittered, x)
    if channels == 3 and cfg.grayscale_prob > 0:
        gray = jnp.broadcast_to(_gray_cf(x), x.shape)
        x = jnp.where(u[_U_GRAY] < cfg.grayscale_prob, gray, x)
    if cfg.blur_prob > 0:
        lo, hi = cfg.blur_sigma
        sigma = lo + (hi - lo) * u[_U_SIGMA]
        blurred = _blur_cf(x, sigma, blur_kernel_size(size))
        x = jnp.where(u[_U_BAPPLY] < cfg.blur_prob, blurred, x)
    return jnp.moveaxis(x, 0, -1)


def augment(key, images, cfg: AugmentConfig, indices=None) -> jax.Array:
    """MoCo v2 views of a uint8 batch (B, H, W, C) -> (B, crop, crop, C) float32, normalized.

    Example b draws its randomness from `fold_in(key, indices[b])`; `indices` defaults to
    arange(B) (pass the examples' global positions when augmenting one shard of a batch).
    Jittable with `cfg` static, e.g. `jax.jit(augment, static_argnums=2)`.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[-1]}")
    if len(cfg.mean) != images.shape[-1]:
        raise ValueError(f"cfg.mean/std have {len(cfg.mean)} entries for {images.shape[-1]}-"
                         "channel images; pass 1-tuples for 1-channel data")
    if indices is None:
        indices = jnp.arange(images.shape[0], dtype=jnp.uint32)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))
    views = jax.vmap(lambda k, img: _augment_one(k, img, cfg))(keys, images)
    return _normalize(views, cfg.mean, cfg.std)


def augment_input(keys, images: Images, cfgs: tuple[AugmentConfig, ...], orders=None,
                  gather=lambda x, order: x[order]) -> list[jax.Array]:
    """One augmented view per (key, cfg) of a step's `images` (`data.batch.Images`): whole
    images, from which every view is cropped here, or the views (B, S_v, S_v, C) the host
    already cropped, one per cfg, which only get the flip and the photometric ops.
    `orders`: per view None or a permutation `order` of the batch; that view comes in its order
    (row i: example order[i]'s view, its randomness still that of example order[i]), the uint8
    images being gathered before the augmentation: across devices a permutation then moves one
    byte a pixel, not the float view's two or four. `gather(x, order)`: x[order] (the caller may
    say how it crosses devices: `train_step.make_views`)."""
    views = images.views
    if images.cropped:
        if len(views) != len(cfgs):
            raise ValueError(f"got {len(views)} view arrays for {len(cfgs)} views")
        cfgs = tuple(dataclasses.replace(c, random_crop=False) for c in cfgs)
    else:
        views = views * len(cfgs)
    orders = orders or (None,) * len(cfgs)
    return [augment(k, x, c) if order is None else augment(k, gather(x, order), c, indices=order)
            for k, x, c, order in zip(keys, views, cfgs, orders)]


def channel_stats(mean, std, channels: int) -> tuple[tuple, tuple]:
    """The per-channel (mean, std) of `channels`-channel images: the first `channels` entries of
    configured ones (configs give the three RGB values; gray-level data uses the first)."""
    return tuple(mean)[:channels], tuple(std)[:channels]


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """uint8 (B, H, W, C) already cropped on the host -> float32 (x / 255 - mean) / std."""
    return _normalize(jnp.asarray(images).astype(jnp.float32) / 255.0, mean, std)


def center_crop(images, crop_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """Eval / clustering view: torchvision Resize(round(crop * 256 / 224)) (shorter side,
    bilinear, antialias) + CenterCrop(crop) + Normalize, on a (B, H, W, C) uint8 batch."""
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
    _, height, width, _ = images.shape
    new_h, new_w, top, left = center_crop_geometry(height, width, crop_size)
    # Only the rows/columns of the resized image that survive the crop are computed.
    wy = jnp.asarray(bilinear_weights(height, new_h)[top:top + crop_size])
    wx = jnp.asarray(bilinear_weights(width, new_w)[left:left + crop_size])
    x = jax.vmap(lambda img: _resample(img.astype(jnp.float32) / 255.0, wy, wx))(images)
    return _normalize(jnp.moveaxis(x, 1, -1), mean, std)
