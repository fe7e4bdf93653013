"""Streaming input for datasets that do not fit in device memory (docs/method.md §6, §1.1).

The host decodes each image once and cuts its random-resized crops (one per `CropSpec`, e.g.
2 x 224 for MoCo v2, plus 192/160/128/96 for multi-crop) in a thread pool (Pillow releases the
GIL); flip and the photometric ops run on the device on the already-cropped uint8 views.

Determinism: epoch e visits `epoch_permutation(seed, e, N)` in order, `global_batch` examples per
step; view v of example i in epoch e draws from `np.random.default_rng([seed, e, i, v, 1])` (the
trailing 1 keeps it apart from the epoch order's `[seed, e]`: numpy drops trailing zero words). So a
batch depends only on (seed, epoch, step): not on threads, prefetching, the process count, or
whether the epoch was resumed at `start_step`. Process p of P gets rows [p*b, (p+1)*b) of every
global batch, b = global_batch // P; `sharding.to_global` assembles the process-local parts into
one batch-sharded array.

Crops follow torchvision: `RandomResizedCrop.get_params` (10 attempts, then the center-crop
fallback; same uniforms layout as `augmentations.sample_crop_box`), then crop-then-resize with
Pillow's antialiased bilinear filter. JPEGs are decoded at full size: Pillow's `draft()` (DCT
scaling by 1/2, 1/4, 1/8) would only apply when every view's box is at least 2x its output size,
which an ImageNet-size image (~500 x 375) never allows for a 224 view, and it replaces the
bilinear filter by the decoder's, so crops would no longer match torchvision's.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from PIL import Image

from hcsc_jax import sharding
from hcsc_jax.data.augmentations import CROP_UNIFORMS, center_crop_geometry, check_crop_params
from hcsc_jax.data.sources import RandomAccessSource

__all__ = [
    "CropSpec",
    "TrainStream",
    "center_crop_batches",
    "center_crop_image",
    "crop_box",
    "epoch_permutation",
    "prefetch_to_device",
    "random_resized_crops",
    "resized_crop",
]

ATTEMPTS = (CROP_UNIFORMS - 2) // 2  # torchvision's 10


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The data order of an epoch: a function of (seed, epoch) only, so runs resume exactly."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """One random-resized view: `size` x `size` pixels, area fraction in `scale`, aspect in `ratio`."""

    size: int
    scale: tuple
    ratio: tuple = (3 / 4, 4 / 3)

    def __post_init__(self):
        check_crop_params(self.size, self.scale, self.ratio)


# ----------------------------------------------------------------------------- per image

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


def resized_crop(im: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop (top, left, h, w) of a PIL image, then antialiased bilinear resize:
    (size, size, C) uint8. Crop first: `resize(box=...)` would also read pixels outside the box."""
    top, left, h, w = box
    return _array(im.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR))


def random_resized_crops(image: np.ndarray, crops: tuple[CropSpec, ...], seed: int, epoch: int,
                         index: int) -> tuple[np.ndarray, ...]:
    """The views of example `index` (H, W, C) uint8 in `epoch`: one (S_v, S_v, C) uint8 per crop,
    view v drawn from `np.random.default_rng([seed, epoch, index, v, 1])`."""
    im = _pil(image)
    height, width = image.shape[:2]
    views = []
    for v, c in enumerate(crops):
        u = np.random.default_rng([seed, epoch, index, v, 1]).random(CROP_UNIFORMS)
        views.append(resized_crop(im, crop_box(u, height, width, c.scale, c.ratio), c.size))
    return tuple(views)


def center_crop_image(image: np.ndarray, crop: int) -> np.ndarray:
    """Eval / clustering view of one (H, W, C) uint8 image -> (crop, crop, C) uint8: torchvision
    Resize(round(crop * 256 / 224)) (shorter side, bilinear, antialias; long side truncated as in
    `augmentations.center_crop`) + CenterCrop(crop)."""
    new_h, new_w, top, left = center_crop_geometry(*image.shape[:2], crop)
    resized = _pil(image).resize((new_w, new_h), Image.BILINEAR)
    return _array(resized.crop((left, top, left + crop, top + crop)))


# ----------------------------------------------------------------------------- batching

def _processes(process_index, process_count) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} not in [0, {count})")
    return index, count


def _local_batch(batch: int, process_count: int) -> int:
    if batch <= 0 or batch % process_count:
        raise ValueError(f"batch {batch} must be a positive multiple of process_count {process_count}")
    return batch // process_count


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _parallel_batches(batches: Iterable[np.ndarray], fill: Callable[[tuple, int, int], None],
                      shapes: tuple[tuple, ...], num_workers: int, prefetch: int
                      ) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
    """For each indices (b,) int32 (-1 = padding) -> (indices, outputs (b, *shape) uint8 per shape),
    `fill(outputs, row, index)` run in a thread pool for every non-padding row, `prefetch`
    batches submitted ahead of the one yielded. Padding rows stay zero."""
    pool = ThreadPoolExecutor(num_workers)
    pending = collections.deque()
    batches = iter(batches)

    def submit():
        indices = next(batches, None)
        if indices is not None:
            outs = tuple(np.zeros((len(indices),) + s, np.uint8) for s in shapes)
            pending.append((indices, outs, [pool.submit(fill, outs, r, int(i))
                                            for r, i in enumerate(indices) if i >= 0]))

    try:
        for _ in range(prefetch + 1):
            submit()
        while pending:
            indices, outs, futures = pending.popleft()
            for f in futures:
                f.result()
            yield indices, outs
            submit()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class TrainStream:
    """Random-resized views of one process's part of every global batch (see the module doc).

    `epoch(e, start_step)` yields per step (indices (b,) int32, views: one (b, S_v, S_v, C) uint8
    per crop), b = global_batch // process_count. With `drop_remainder=False` the last step is
    filled up with the first examples of the epoch's order (static shapes, every example seen).
    """

    def __init__(self, source: RandomAccessSource, crops: tuple[CropSpec, ...], global_batch: int,
                 seed: int, *, process_index: int | None = None, process_count: int | None = None,
                 num_workers: int | None = None, prefetch: int = 2, drop_remainder: bool = True):
        self.source, self.crops, self.seed = source, tuple(crops), int(seed)
        self.global_batch = int(global_batch)
        self.process_index, self.process_count = _processes(process_index, process_count)
        self.local_batch = _local_batch(self.global_batch, self.process_count)
        n = source.num_examples
        if drop_remainder and n < self.global_batch:
            raise ValueError(f"{source.name}: {n} examples, fewer than one global batch of "
                             f"{self.global_batch}")
        self.steps_per_epoch = n // self.global_batch if drop_remainder else -(-n // self.global_batch)
        self.num_workers = num_workers or _default_workers()
        self.prefetch = int(prefetch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch * global_batch,) int32: the global batches of `epoch`, concatenated."""
        n = self.source.num_examples
        perm = np.resize(epoch_permutation(self.seed, epoch, n), self.steps_per_epoch * self.global_batch)
        return perm.astype(np.int32)

    def epoch(self, epoch: int, start_step: int = 0):
        """Yields (indices (b,) int32, views tuple of (b, S_v, S_v, C) uint8) for steps
        start_step .. steps_per_epoch - 1 of `epoch`."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} not in [0, {self.steps_per_epoch}]")
        order = self.epoch_order(epoch)
        g, b = self.global_batch, self.local_batch
        first = self.process_index * b
        batches = (order[s * g + first:s * g + first + b] for s in range(start_step, self.steps_per_epoch))
        c = self.source.channels
        shapes = tuple((crop.size, crop.size, c) for crop in self.crops)

        def fill(outs, row, index):
            views = random_resized_crops(self.source.load(index), self.crops, self.seed, epoch, index)
            for out, view in zip(outs, views):
                out[row] = view

        yield from _parallel_batches(batches, fill, shapes, self.num_workers, self.prefetch)


def center_crop_batches(source: RandomAccessSource, crop: int, batch: int, *,
                        process_index: int | None = None, process_count: int | None = None,
                        num_workers: int | None = None, prefetch: int = 2):
    """All N examples in index order, `batch` per step split across processes (the clustering /
    eval pass). Yields (indices (b,) int32, images (b, crop, crop, C) uint8, valid (b,) bool),
    b = batch // process_count; ceil(N / batch) steps on every process. Padding rows (past N)
    have index 0, zero pixels and valid False."""
    p, count = _processes(process_index, process_count)
    b = _local_batch(batch, count)
    n = source.num_examples
    positions = (s * batch + p * b + np.arange(b) for s in range(-(-n // batch)))
    batches = (np.where(pos < n, pos, -1).astype(np.int32) for pos in positions)

    def fill(outs, row, index):
        outs[0][row] = center_crop_image(source.load(index), crop)

    for indices, (images,) in _parallel_batches(batches, fill, ((crop, crop, source.channels),),
                                                num_workers or _default_workers(), prefetch):
        valid = indices >= 0
        yield np.where(valid, indices, 0).astype(np.int32), images, valid


# ----------------------------------------------------------------------------- device

def prefetch_to_device(iterator: Iterable, size: int, mesh: jax.sharding.Mesh):
    """`sharding.to_global` of each item of `iterator`, with `size` further items already transferred
    (device_put is asynchronous) while the consumer works on the one yielded."""
    queue = collections.deque()
    iterator = iter(iterator)

    def enqueue(k):
        queue.extend(sharding.to_global(mesh, item) for item in itertools.islice(iterator, k))

    enqueue(size)
    while queue:
        item = queue.popleft()
        enqueue(1)
        yield item
