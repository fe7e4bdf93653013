"""`fashion_mnist`: the four IDX files, from `data_dir` or `/usr/share/datasets/fashion-mnist/`
(Debian package `dataset-fashion-mnist`); falls back to a prepared TFDS `fashion_mnist`. Splits
"train" (60000) and "test" (10000), or a slice of one ("train[:20000]": the first 20,000)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from etils import epath

from hcsc_jax.data.sources import tfds as tfds_source
from hcsc_jax.data.sources.base import ArrayDataset
from hcsc_jax.data.sources.idx import read_idx
from hcsc_jax.data.sources.registry import check_split, no_spec, register, register_check, take

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(directory: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        path = epath.Path(directory) / candidate
        if path.is_file():
            return os.fspath(path)
    return None


def _files(data_dir, whole: str) -> tuple[str, list[str | None]]:
    """(the directory looked in, [images file, labels file] of split `whole`, None where missing)."""
    directory = data_dir if data_dir is not None else FASHION_MNIST_DIR
    return directory, [_find_file(directory, s) for s in FASHION_MNIST_FILES[whole]]


def _not_found(directory: str, data_dir, stems, paths) -> FileNotFoundError:
    expected = [s + "[.gz]" for split_stems in FASHION_MNIST_FILES.values() for s in split_stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    return FileNotFoundError(
        f"Fashion-MNIST not found: {directory} lacks {', '.join(missing)}(.gz) and no prepared "
        f"TFDS 'fashion_mnist' is in {data_dir or 'the default TFDS data_dir'}. "
        f"Install the Debian package `dataset-fashion-mnist` (apt-get install "
        f"dataset-fashion-mnist, files in {FASHION_MNIST_DIR}) or put the 4 IDX files in "
        f"data_dir: {', '.join(expected)}. The runlocal variants' tiny files in /tmp/fashion_mnist_tiny: "
        "`python tests/imagenet_like.py` writes them")


@register_check("fashion_mnist")
def check_fashion_mnist(spec, splits, data_dir):
    """The split names, and each split's two IDX files present (or a prepared TFDS copy). -> the
    number of images of the first split, from its labels file (None for a TFDS copy)."""
    no_spec("fashion_mnist", spec)
    sizes = []
    for split in splits:
        whole, rows = check_split("fashion_mnist", split, tuple(FASHION_MNIST_FILES))
        directory, paths = _files(data_dir, whole)
        if not all(paths) and not tfds_source.is_prepared("fashion_mnist", data_dir):
            raise _not_found(directory, data_dir, FASHION_MNIST_FILES[whole], paths)
        sizes.append(len(range(len(read_idx(paths[1])))[rows]) if all(paths) else None)
    return sizes[0] if sizes else None


@register("fashion_mnist")
def _load_fashion_mnist(spec, split, data_dir, image_size):
    no_spec("fashion_mnist", spec)
    whole, rows = check_split("fashion_mnist", split, tuple(FASHION_MNIST_FILES))
    directory, paths = _files(data_dir, whole)
    if all(paths):
        images = read_idx(paths[0])
        labels = read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST files in {directory} disagree: images {images.shape}, "
                f"labels {labels.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"{paths[0]}: expected uint8 images, got {images.dtype}")
        labels = labels.astype(np.int32)
        names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot")
        return take(ArrayDataset(np.ascontiguousarray(images[..., None]), labels, 10,
                                 "fashion_mnist", names), rows, split)
    if tfds_source.is_prepared("fashion_mnist", data_dir):
        ds = tfds_source.load_tfds("fashion_mnist", split, data_dir, image_size)
        return dataclasses.replace(ds, name="fashion_mnist")
    raise _not_found(directory, data_dir, FASHION_MNIST_FILES[whole], paths)
