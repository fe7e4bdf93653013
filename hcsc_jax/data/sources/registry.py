"""Dataset names -> sources. `load_dataset` gives a split in memory, `open_source` one read on
demand; a name is registered once, as an in-memory loader (`register`) or as a lazy source
class (`register_lazy`), and each of the two functions serves both kinds (a lazy source is
decoded whole for `load_dataset`; an in-memory split is wrapped for `open_source`). A name may
have both, when reading it whole has a faster way than one example at a time (TFRecord TFDS).
`check_available` says, before a run writes anything, whether a dataset's splits can be read
(`register_check`: a dataset's own cheap check; without one, the splits are opened).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from hcsc_jax.data.decode import MAX_PIXELS
from hcsc_jax.data.resize import resize_uint8
from hcsc_jax.data.sources.base import ArrayDataset, ArraySource, DataError, RandomAccessSource, materialize

Loader = Callable[[str | None, str, str | None, tuple[int, int] | None], ArrayDataset]
_LOADERS: dict[str, Loader] = {}
_LAZY: dict[str, type] = {}
_CHECKS: dict[str, Callable] = {}


def _check_new(name: str, table: dict):
    if not name or ":" in name:
        raise ValueError(f"invalid dataset name {name!r}")
    if name in table:
        raise ValueError(f"dataset {name!r} is already registered")


def _registrar(table: dict, name: str):
    _check_new(name, table)

    def decorator(obj):
        _check_new(name, table)
        table[name] = obj
        return obj

    return decorator


def register(name: str):
    """Decorator registering `loader(spec, split, data_dir, image_size) -> ArrayDataset` under
    `name`; `spec` is the text after "name:" (None when absent)."""
    return _registrar(_LOADERS, name)


def register_lazy(name: str):
    """Class decorator registering a `RandomAccessSource` class `cls(spec, split, data_dir,
    max_pixels)` (`max_pixels`: the decoder's bound on an image's pixels, `decode.decode`)."""
    return _registrar(_LAZY, name)


def register_check(name: str):
    """Decorator registering `check(spec, splits, data_dir)` for dataset `name`: raises ValueError
    or OSError, one line, when a split of `splits` cannot be read from `data_dir`; reads metadata
    only (names, file lists, descriptions), never a whole split."""
    return _registrar(_CHECKS, name)


def check_available(name: str, splits, data_dir: str | None = None) -> int | None:
    """DataError, one line, unless dataset `name` is registered and each of `splits` can be read
    from `data_dir`: the dataset's `register_check`, else each split opened (`open_source`) or,
    for an in-memory loader, loaded. A run calls it before it writes anything. -> the number of
    examples of the first split when known (a `register_check` may return it, or None)."""
    try:
        base, spec = _parse(name)
        splits = tuple(dict.fromkeys(splits))
        if base in _CHECKS:
            return _CHECKS[base](spec, splits, data_dir)
        sizes = [open_source(name, split, data_dir).num_examples if base in _LAZY
                 else len(load_dataset(name, split, data_dir)) for split in splits]
        return sizes[0] if sizes else None
    except (ValueError, OSError) as e:
        raise DataError(" ".join(str(e).split()) or type(e).__name__) from None


# The (training, held-out) splits a dataset comes with, for a command told only the dataset
# (eval.py on an imported encoder): by full name, else by the name before ":".
STANDARD_SPLITS = {"digits": ("train", "test"), "fashion_mnist": ("train", "test"),
                   "folder": ("train", "val"), "tfds:imagenet2012": ("train", "validation"),
                   "tfds:cifar10": ("train", "test"),
                   "tfds:cifar100": ("train", "test"), "tfds:fashion_mnist": ("train", "test")}


def standard_splits(name: str) -> tuple[str, str] | None:
    """The `STANDARD_SPLITS` of dataset `name`, None when it has none known (a prepared copy, a
    TFDS dataset not listed)."""
    return STANDARD_SPLITS.get(name) or STANDARD_SPLITS.get(name.partition(":")[0])


def list_datasets() -> list[str]:
    return sorted({*_LOADERS, *_LAZY})


def size_tuple(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size


def _parse(name: str) -> tuple[str, str | None]:
    base, sep, spec = name.partition(":")
    if base not in _LOADERS and base not in _LAZY:
        raise ValueError(
            f"unknown dataset {name!r}; registered: {', '.join(list_datasets())} "
            "(use 'tfds:<name>', 'folder:<path>' or 'prepared:<path>' for the prefixed ones)")
    if sep and not spec:
        raise ValueError(f"dataset {name!r}: nothing after ':'")
    return base, spec if sep else None


def load_dataset(name: str, split: str, data_dir: str | None = None,
                 image_size: int | tuple[int, int] | None = None,
                 max_pixels: int = MAX_PIXELS) -> ArrayDataset:
    """One split of a registered dataset fully in memory. `image_size` (int or (h, w)) resizes
    every image to that size (antialiased bilinear, aspect ratio not kept): sources whose images
    differ in size need it. `max_pixels`: the decoder's bound on an image of a lazy source."""
    base, spec = _parse(name)
    size = size_tuple(image_size)
    if base in _LOADERS:
        ds = _LOADERS[base](spec, split, data_dir, size)
    else:
        ds = materialize(_LAZY[base](spec, split, data_dir, max_pixels=max_pixels), size)
    if size is not None and ds.images.shape[1:3] != size:
        ds = dataclasses.replace(ds, images=resize_uint8(ds.images, size))
    return ds


def open_source(name: str, split: str, data_dir: str | None = None,
                max_pixels: int = MAX_PIXELS) -> RandomAccessSource:
    """One split read on demand: a lazy source (`folder:`, `tfds:`, `prepared:`; `max_pixels`: its
    decoder's bound on an image), or any other registered dataset loaded in memory behind an
    `ArraySource`."""
    base, spec = _parse(name)
    if base in _LAZY:
        return _LAZY[base](spec, split, data_dir, max_pixels=max_pixels)
    return ArraySource(load_dataset(name, split, data_dir))


def no_spec(name: str, spec: str | None):
    if spec is not None:
        raise ValueError(f"dataset {name!r} takes no ':<argument>', got {name}:{spec}")


_SLICED = re.compile(r"(\w+)(?:\[(-?\d*):(-?\d*)\])?")


def check_split(name: str, split: str, splits) -> tuple[str, slice]:
    """'train' or a slice of it in TFDS's syntax with example counts, 'train[:20000]',
    'train[1000:]', 'test[-500:]' -> ('train', slice(None, 20000)), ...; anything else, or a
    split the dataset lacks -> ValueError naming the splits."""
    m = _SLICED.fullmatch(split)
    if m is None or m.group(1) not in splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(splits)} "
                         "(a slice of one: e.g. train[:20000], train[1000:])")
    bounds = [int(b) if b else None for b in m.group(2, 3)]
    return m.group(1), slice(*bounds)


def take(ds: ArrayDataset, rows: slice, split: str) -> ArrayDataset:
    """The examples `rows` of a whole split; a slice that selects none -> ValueError."""
    if rows == slice(None):
        return ds
    images = ds.images[rows]
    if not len(images):
        raise ValueError(f"{ds.name} split {split!r} selects no examples (the split has {len(ds)})")
    labels = None if ds.labels is None else ds.labels[rows]
    return dataclasses.replace(ds, images=np.ascontiguousarray(images), labels=labels)
