"""What every dataset source is: a split held in memory (`ArrayDataset`) or read one example at
a time (`RandomAccessSource`), and the two wrappers between them."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from hcsc_jax.data.resize import resize_uint8


class DataError(ValueError):
    """A dataset that cannot be read as asked (an unknown name or split, missing files, a copy that
    does not match its description): one line naming the file, or what to set."""


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """All images of one split: (N, H, W, C) uint8 (C = 1 gray, 3 color), (N,) int32 labels."""

    images: np.ndarray          # (N, H, W, C) uint8
    labels: np.ndarray | None   # (N,) int32, or None when unknown
    num_classes: int | None
    name: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be (N, H, W, C) uint8, got {self.images.dtype} {self.images.shape}")
        if self.labels is not None:
            if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
                raise ValueError(
                    f"labels must be ({len(self.images)},) int32, got "
                    f"{self.labels.dtype} {self.labels.shape}")
            if self.num_classes is not None and len(self.labels) and (
                    self.labels.min() < 0 or self.labels.max() >= self.num_classes):
                raise ValueError(f"labels outside [0, {self.num_classes})")

    def __len__(self) -> int:
        return len(self.images)


class RandomAccessSource(Protocol):
    """One split, decoded one example at a time: `load(i)` -> (H, W, C) uint8, i < num_examples.

    A source must pickle (the loader's worker processes each hold a copy) and must not hold
    accelerator memory."""

    name: str
    num_examples: int
    num_classes: int | None
    channels: int
    class_names: tuple[str, ...] | None

    @property
    def labels(self) -> np.ndarray | None:
        """(num_examples,) int32, or None when unknown."""

    @property
    def file_names(self) -> tuple[str, ...] | None:
        """Each example's file name (image folders, TFDS "file_name"), or None when unknown."""

    def load(self, i: int) -> np.ndarray:
        """Example i as (H, W, C) uint8."""


class ArraySource:
    """An in-memory `ArrayDataset` as a `RandomAccessSource`."""

    def __init__(self, dataset: ArrayDataset):
        self.dataset = dataset
        self.name = dataset.name
        self.num_examples = len(dataset)
        self.labels = dataset.labels
        self.num_classes = dataset.num_classes
        self.channels = dataset.images.shape[-1]
        self.class_names = dataset.class_names
        self.file_names = None

    def load(self, i: int) -> np.ndarray:
        return self.dataset.images[i]


class SubsetSource:
    """The examples `indices` (M,) of another source, in that order (e.g. a labelled subset)."""

    def __init__(self, source: RandomAccessSource, indices):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.name = f"{source.name}[{len(self.indices)} of {source.num_examples}]"
        self.num_examples = len(self.indices)
        self.labels = None if source.labels is None else source.labels[self.indices]
        self.num_classes, self.channels = source.num_classes, source.channels
        self.class_names = source.class_names
        names = source.file_names
        self.file_names = None if names is None else tuple(names[i] for i in self.indices)

    def load(self, i: int) -> np.ndarray:
        return self.source.load(int(self.indices[i]))


def stack_images(images: list[np.ndarray], where: str, image_size) -> np.ndarray:
    """Stack (H, W, C) uint8 images; resize each to image_size if given, else require one size."""
    if not images:
        raise ValueError(f"{where}: no images")
    if image_size is not None:
        images = [img if img.shape[:2] == image_size else resize_uint8(img, image_size)
                  for img in images]
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        some = sorted(shapes)[:3]
        raise ValueError(
            f"{where}: images differ in size ({len(shapes)} shapes, e.g. {some}); pass "
            "image_size=(h, w) (or an int) to load_dataset to resize them to one size")
    return np.stack(images).astype(np.uint8, copy=False)


def materialize(source: RandomAccessSource, image_size=None) -> ArrayDataset:
    """Every example of a lazy source decoded into one `ArrayDataset` (the in-memory input)."""
    images = stack_images([source.load(i) for i in range(source.num_examples)], source.name, image_size)
    return ArrayDataset(images, source.labels, source.num_classes, source.name, source.class_names)


def as_hwc(img, where: str) -> np.ndarray:
    """A decoded image as (H, W, C) uint8; ValueError naming `where` for anything else."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 (H, W[, C]) images, got {img.dtype} {img.shape}")
    return img
