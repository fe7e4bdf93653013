"""The host's crops, in NumPy, Pillow and OpenCV only (loader workers never import JAX).

Random-resized views follow torchvision: `crop_box` is `RandomResizedCrop.get_params` (10
attempts, then the center-crop fallback; the same uniforms as the device's
`augmentations.sample_crop_box`). View v of example i in epoch e draws its uniforms from
`np.random.default_rng([seed, e, i, v, 1])` (the trailing 1 keeps it apart from the epoch order's
`[seed, e]`: numpy drops trailing zero words), so a view depends on nothing but those numbers.

The box is then resampled to the view's size by one of two filters (`resampling`):

* "linear" (default): OpenCV's bilinear `cv2.resize(INTER_LINEAR)`, no antialias filter when
  shrinking, as `tf.image.resize` in big_vision's and most TF/JAX input pipelines. Six to eight
  times faster than Pillow on the same core, which is what lets one core feed the step.
* "antialias": Pillow's antialiased bilinear, what torchvision's PIL path (the authors' loader)
  computes, and what the resident input's device crops compute.

Upscaling (a box smaller than the view) gives the same pixels either way, up to rounding.
Center crops (the clustering and evaluation view) always use Pillow's antialiased filter, on the
output pixels only (`Image.resize(box=...)`).
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "CROP_UNIFORMS",
    "RESAMPLING",
    "CropSpec",
    "center_crop_geometry",
    "center_crop_image",
    "check_crop_params",
    "crop_box",
    "random_resized_crops",
    "resized_crop",
]

CROP_UNIFORMS = 2 * 10 + 2  # uniforms used by a 10-attempt crop
RESAMPLING = ("linear", "antialias")


def check_crop_params(size: int, scale, ratio) -> None:
    """Raises ValueError unless size > 0 and scale, ratio are (lo, hi) with 0 < lo <= hi."""
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must satisfy 0 < lo <= hi, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")


def check_resampling(resampling: str) -> None:
    if resampling not in RESAMPLING:
        raise ValueError(f"resampling must be one of {', '.join(RESAMPLING)}, got {resampling!r}")


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """One random-resized view: `size` x `size` pixels, area fraction in `scale`, aspect in `ratio`."""

    size: int
    scale: tuple
    ratio: tuple = (3 / 4, 4 / 3)

    def __post_init__(self):
        check_crop_params(self.size, self.scale, self.ratio)


def crop_box(u: np.ndarray, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params from uniforms u (2 * attempts + 2,) in [0, 1):
    (top, left, h, w).

    Attempt a takes area fraction scale-lerp(u[a]) and log aspect lerp(u[attempts + a]),
    w = round(sqrt(area * r)), h = round(sqrt(area / r)); the first box that fits is placed at
    floor(u[-2] * (height - h + 1)), floor(u[-1] * (width - w + 1)). Else the fallback: the
    largest centered box with its aspect ratio clamped to `ratio`. Same uniforms, same box as
    the device's `augmentations.sample_crop_box` (up to float32 rounding there).
    """
    attempts = (len(u) - 2) // 2
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for a in range(attempts):
        target = height * width * (scale[0] + (scale[1] - scale[0]) * u[a])
        aspect = math.exp(lo + (hi - lo) * u[attempts + a])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[-2] * (height - h + 1)), height - h)
            left = min(int(u[-1] * (width - w + 1)), width - w)
            return top, left, h, w
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _array(im: Image.Image) -> np.ndarray:
    a = np.asarray(im, np.uint8)
    return a[..., None] if a.ndim == 2 else a


def resized_crop(image: np.ndarray, box: tuple[int, int, int, int], size: int,
                 resampling: str = "linear") -> np.ndarray:
    """Crop (top, left, h, w) of an (H, W, C) uint8 image, resampled to (size, size, C) uint8
    with `resampling` (see the module doc). The crop comes first: pixels outside the box never
    enter the result."""
    top, left, h, w = box
    if resampling == "linear":
        out = cv2.resize(image[top:top + h, left:left + w], (size, size), interpolation=cv2.INTER_LINEAR)
        return out[..., None] if out.ndim == 2 else out
    check_resampling(resampling)
    return _array(_pil(image).crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR))


def random_resized_crops(image: np.ndarray, crops: tuple[CropSpec, ...], seed: int, epoch: int,
                         index: int, resampling: str = "linear") -> tuple[np.ndarray, ...]:
    """The views of example `index` (H, W, C) uint8 in `epoch`: one (S_v, S_v, C) uint8 per crop,
    view v drawn from `np.random.default_rng([seed, epoch, index, v, 1])`."""
    height, width = image.shape[:2]
    views = []
    for v, c in enumerate(crops):
        u = np.random.default_rng([seed, epoch, index, v, 1]).random(CROP_UNIFORMS)
        views.append(resized_crop(image, crop_box(u, height, width, c.scale, c.ratio), c.size, resampling))
    return tuple(views)


def center_crop_geometry(height: int, width: int, crop_size: int) -> tuple[int, int, int, int]:
    """torchvision Resize(round(crop * 256 / 224)) of the shorter side then CenterCrop(crop):
    -> (resized height, resized width, crop top, crop left). As torchvision's
    _compute_resized_output_size, the long side is truncated, not rounded."""
    short = round(crop_size * 256 / 224)
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    return new_h, new_w, round((new_h - crop_size) / 2.0), round((new_w - crop_size) / 2.0)


def center_crop_image(image: np.ndarray, crop: int) -> np.ndarray:
    """Eval / clustering view of one (H, W, C) uint8 image -> (crop, crop, C) uint8: torchvision
    Resize(round(crop * 256 / 224)) (shorter side, bilinear, antialias) + CenterCrop(crop),
    computed for the kept pixels only: Pillow's `resize(box=...)` maps them back into the image
    with the whole resize's scale and filter support."""
    height, width = image.shape[:2]
    new_h, new_w, top, left = center_crop_geometry(height, width, crop)
    sy, sx = height / new_h, width / new_w
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return _array(_pil(image).resize((crop, crop), Image.BILINEAR, box=box))
