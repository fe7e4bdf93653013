"""Dataset names -> sources. `load_dataset` gives a split in memory, `open_source` one read on
demand; a name is registered once, as an in-memory loader (`register`) or as a lazy source
class (`register_lazy`), and each of the two functions serves both kinds (a lazy source is
decoded whole for `load_dataset`; an in-memory split is wrapped for `open_source`). A name may
have both, when reading it whole has a faster way than one example at a time (TFRecord TFDS).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from hcsc_jax.data.resize import resize_uint8
from hcsc_jax.data.sources.base import ArrayDataset, ArraySource, RandomAccessSource, materialize

Loader = Callable[[str | None, str, str | None, tuple[int, int] | None], ArrayDataset]
_LOADERS: dict[str, Loader] = {}
_LAZY: dict[str, type] = {}


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
    """Class decorator registering a `RandomAccessSource` class `cls(spec, split, data_dir)`."""
    return _registrar(_LAZY, name)


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
                 image_size: int | tuple[int, int] | None = None) -> ArrayDataset:
    """One split of a registered dataset fully in memory. `image_size` (int or (h, w)) resizes
    every image to that size (antialiased bilinear, aspect ratio not kept): sources whose images
    differ in size need it."""
    base, spec = _parse(name)
    size = size_tuple(image_size)
    if base in _LOADERS:
        ds = _LOADERS[base](spec, split, data_dir, size)
    else:
        ds = materialize(_LAZY[base](spec, split, data_dir), size)
    if size is not None and ds.images.shape[1:3] != size:
        ds = dataclasses.replace(ds, images=resize_uint8(ds.images, size))
    return ds


def open_source(name: str, split: str, data_dir: str | None = None) -> RandomAccessSource:
    """One split read on demand: a lazy source (`folder:`, `tfds:`, `prepared:`), or any other
    registered dataset loaded in memory behind an `ArraySource`."""
    base, spec = _parse(name)
    if base in _LAZY:
        return _LAZY[base](spec, split, data_dir)
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
