"""Antialiased bilinear resampling as weight matrices (torchvision / PIL semantics).

`bilinear_weights(in_size, out_size, start, length)` is the (out_size, in_size) matrix that
resamples the input interval `[start, start + length)` (whole pixels) to `out_size` pixels,
exactly as cropping that interval and then resizing it with torchvision's
`resize(..., interpolation=BILINEAR, antialias=True)` (equivalently PIL's `Image.resize`
with `BILINEAR` and a `box`):

* half-pixel centers: output pixel o samples the input at
  `start + (o + 0.5) * length / out_size - 0.5`;
* triangle kernel, widened by `length / out_size` when downscaling (the antialias filter),
  plain linear interpolation when upscaling;
* pixels outside the interval get zero weight and every row is renormalized to sum to 1
  (this is what cropping first does; at the image border it equals edge clamping).

The module works with NumPy (host, static sizes) and with `jax.numpy` (traced `start` and
`length`, as in the random crops of `augment`); `xp` selects which.
"""

from __future__ import annotations

import numpy as np


def bilinear_weights(in_size: int, out_size: int, start=0, length=None, *, antialias=True, xp=np):
    """(out_size, in_size) float32 resampling matrix for the input interval [start, start+length)."""
    if length is None:
        length = in_size
    start = xp.asarray(start, dtype=xp.float32)
    length = xp.asarray(length, dtype=xp.float32)
    step = length / out_size  # input pixels per output pixel
    kernel_scale = xp.maximum(step, 1.0) if antialias else xp.float32(1.0)
    sample = start + (xp.arange(out_size, dtype=xp.float32) + 0.5) * step - 0.5
    idx = xp.arange(in_size, dtype=xp.float32)
    dist = xp.abs(idx[None, :] - sample[:, None]) / kernel_scale
    w = xp.maximum(0.0, 1.0 - dist)
    inside = (idx >= start) & (idx < start + length)
    w = xp.where(inside[None, :], w, 0.0)
    total = xp.sum(w, axis=1, keepdims=True)
    return (w / xp.where(total > 0, total, 1.0)).astype(xp.float32)


def resize_uint8(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Host-side antialiased bilinear resize of uint8 images (..., H, W, C) to `size` = (h, w).

    Same weights as torchvision's antialiased bilinear resize; result rounded to uint8.
    """
    images = np.asarray(images)
    h, w = int(size[0]), int(size[1])
    in_h, in_w = images.shape[-3], images.shape[-2]
    if (in_h, in_w) == (h, w):
        return images.astype(np.uint8, copy=True)
    wy = bilinear_weights(in_h, h)
    wx = bilinear_weights(in_w, w)
    flat = images.reshape((-1, in_h, in_w, images.shape[-1]))
    out = np.empty((flat.shape[0], h, w, flat.shape[-1]), np.uint8)
    chunk = max(1, (1 << 24) // max(1, in_h * in_w * flat.shape[-1]))  # ~64 MiB of float32
    for s in range(0, flat.shape[0], chunk):
        x = flat[s:s + chunk].astype(np.float32)
        x = np.einsum("oh,nhwc->nowc", wy, x)
        x = np.einsum("pw,nowc->nopc", wx, x)
        out[s:s + chunk] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out.reshape(images.shape[:-3] + (h, w, images.shape[-1]))
