"""In-memory image datasets behind a small registry.

`load_dataset(name, split, data_dir=None, image_size=None)` returns an `ArrayDataset`: all images
of one split as a (N, H, W, C) uint8 array (C = 1 for gray-level data, 3 for color) with int32
labels. Registered sources:

* `digits`: scikit-learn's 8x8 handwritten digits (ships with scikit-learn, no download);
  splits "train" (1437), "test" (360: the last 20% of a fixed permutation), "all" (1797).
* `fashion_mnist`: the four IDX files, from `data_dir` or `/usr/share/datasets/fashion-mnist/`
  (Debian package `dataset-fashion-mnist`); falls back to a prepared TFDS `fashion_mnist`.
  Splits "train" (60000) and "test" (10000).
* `tfds:<name>`: a prepared TFDS image-classification dataset (keys "image", "label"), read
  without TensorFlow when it was prepared as ArrayRecord, with TensorFlow otherwise.
* `folder:<path>`: one sub-folder per class (sorted names -> label ids), JPEG/PNG via Pillow;
  `path/<split>/<class>/...` when split folders exist, else the whole folder for every split.

`image_size` (int or (h, w)) resizes every image to that fixed size (antialiased bilinear,
aspect ratio not preserved); it is needed for sources whose images differ in size.
New sources: decorate `loader(spec, split, data_dir, image_size) -> ArrayDataset` with
`@register("name")`; `spec` is the text after "name:" (None when absent).

`open_source(name, split, data_dir=None)` is the lazy counterpart for data that does not fit in
memory: a `RandomAccessSource` whose `load(i)` decodes one (H, W, C) uint8 image on demand (sizes
may differ); its `labels` and `file_names` never decode an image. `folder:` and `tfds:`
(ArrayRecord only) are read lazily; every other name is
loaded with `load_dataset` and wrapped in an `ArraySource`.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Protocol

import numpy as np
from etils import epath

from hcsc_jax.data.resize import resize_uint8

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "ArrayDataset",
    "ArraySource",
    "FolderSource",
    "RandomAccessSource",
    "SubsetSource",
    "TfdsSource",
    "list_datasets",
    "load_dataset",
    "open_source",
    "read_idx",
    "register",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
GRAY_MODES = ("L", "1", "I;16", "I")


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
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


Loader = Callable[[str | None, str, str | None, tuple[int, int] | None], ArrayDataset]
_REGISTRY: dict[str, Loader] = {}


def register(name: str):
    """Decorator registering `loader(spec, split, data_dir, image_size)` under `name`."""
    if not name or ":" in name:
        raise ValueError(f"invalid dataset name {name!r}")

    def decorator(fn: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def _size_tuple(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size


def load_dataset(name: str, split: str, data_dir: str | None = None,
                 image_size: int | tuple[int, int] | None = None) -> ArrayDataset:
    """Load one split of a registered dataset fully into memory (see the module docstring)."""
    base, sep, spec = name.partition(":")
    if base not in _REGISTRY:
        raise ValueError(
            f"unknown dataset {name!r}; registered: {', '.join(list_datasets())} "
            "(use 'tfds:<name>' or 'folder:<path>' for the prefixed ones)")
    if sep and not spec:
        raise ValueError(f"dataset {name!r}: nothing after ':'")
    size = _size_tuple(image_size)
    ds = _REGISTRY[base](spec if sep else None, split, data_dir, size)
    if size is not None and ds.images.shape[1:3] != size:
        ds = dataclasses.replace(ds, images=resize_uint8(ds.images, size))
    return ds


def _no_spec(name: str, spec: str | None):
    if spec is not None:
        raise ValueError(f"dataset {name!r} takes no ':<argument>', got {name}:{spec}")


def _check_split(name: str, split: str, splits):
    if split not in splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(splits)}")


# ----------------------------------------------------------------------------- digits

@register("digits")
def _load_digits(spec, split, data_dir, image_size):
    _no_spec("digits", spec)
    _check_split("digits", split, ("train", "test", "all"))
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    n = len(images)
    perm = np.random.default_rng(0).permutation(n)
    n_test = math.ceil(0.2 * n)  # 360 of 1797
    if split == "train":
        idx = np.sort(perm[:n - n_test])
    elif split == "test":
        idx = np.sort(perm[n - n_test:])
    else:
        idx = np.arange(n)
    return ArrayDataset(images[idx], labels[idx], 10, "digits",
                        tuple(str(d) for d in range(10)))


# ----------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw, detected from the content) into an array.

    Format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, one big-endian uint32 per dimension,
    then the big-endian data. Raises ValueError naming the file when anything is off.
    """
    path = os.fspath(path)
    raw = epath.Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with type "
            f"TT in {{{', '.join(f'{t:02x}' for t in _IDX_DTYPES)}}}); corrupt or not an IDX file")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {what}: shape {dims} of {dtype.name} needs {expected} data bytes, "
            f"found {got}")
    data = np.frombuffer(raw, dtype, count=math.prod(dims), offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


# ----------------------------------------------------------------------------- Fashion-MNIST

def _find_file(directory: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        path = epath.Path(directory) / candidate
        if path.is_file():
            return os.fspath(path)
    return None


def _tfds_prepared(name: str, data_dir: str | None) -> bool:
    try:
        import tensorflow_datasets as tfds
        return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
    except (ImportError, ValueError, OSError):  # tfds missing or unusable: not prepared
        return False


@register("fashion_mnist")
def _load_fashion_mnist(spec, split, data_dir, image_size):
    _no_spec("fashion_mnist", spec)
    _check_split("fashion_mnist", split, tuple(FASHION_MNIST_FILES))
    directory = data_dir if data_dir is not None else FASHION_MNIST_DIR
    stems = FASHION_MNIST_FILES[split]
    paths = [_find_file(directory, s) for s in stems]
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
        return ArrayDataset(np.ascontiguousarray(images[..., None]), labels, 10,
                            "fashion_mnist", names)
    if _tfds_prepared("fashion_mnist", data_dir):
        ds = _load_tfds("fashion_mnist", split, data_dir, image_size)
        return dataclasses.replace(ds, name="fashion_mnist")
    expected = [s + "[.gz]" for split_stems in FASHION_MNIST_FILES.values() for s in split_stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    raise FileNotFoundError(
        f"Fashion-MNIST not found: {directory} lacks {', '.join(missing)}(.gz) and no prepared "
        f"TFDS 'fashion_mnist' is in {data_dir or 'the default TFDS data_dir'}. "
        f"Install the Debian package `dataset-fashion-mnist` (apt-get install "
        f"dataset-fashion-mnist, files in {FASHION_MNIST_DIR}) or put the 4 IDX files in "
        f"data_dir: {', '.join(expected)}. The runlocal variants' tiny files in /tmp/fashion_mnist_tiny: "
        "`python tests/imagenet_like.py` writes them")


# ----------------------------------------------------------------------------- TFDS

def _stack_images(images: list[np.ndarray], where: str, image_size) -> np.ndarray:
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


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _as_hwc(img, where: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 (H, W[, C]) images, got {img.dtype} {img.shape}")
    return img


@register("tfds")
def _load_tfds_entry(spec, split, data_dir, image_size):
    if spec is None:
        raise ValueError("use 'tfds:<name>', e.g. 'tfds:cifar10'")
    return _load_tfds(spec, split, data_dir, image_size)


def _hide_gpus_from_tensorflow():
    """TFDS may import TensorFlow; keep it off the accelerators (JAX owns their memory)."""
    if "tensorflow" in sys.modules:
        sys.modules["tensorflow"].config.set_visible_devices([], "GPU")


def _tfds_builder(name: str, data_dir: str | None):
    """(tfds module, builder) of an image dataset; clear errors for a missing tfds or name."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("'tfds:' datasets need tensorflow-datasets (pip install "
                          "tensorflow-datasets)") from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"TFDS has no dataset named {name!r} (see tfds.list_builders())") from e
    if "image" not in builder.info.features:
        raise ValueError(f"TFDS dataset {name!r} has no 'image' feature: {list(builder.info.features)}")
    return tfds, builder


def _tfds_not_prepared(name: str, builder) -> FileNotFoundError:
    return FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir_root}. Prepare it "
        f"on a machine with network access: `tfds build {name} --data_dir=DIR "
        f"--file_format=array_record` (ArrayRecord reads without TensorFlow; plain "
        f"`tfds build` needs TensorFlow here), or download it with tfds.load there; then "
        f"copy DIR to this machine and pass data_dir=DIR.")


def _is_tfrecord(builder) -> bool:
    return builder.info.file_format is None or builder.info.file_format.value == "tfrecord"


def _tfds_labels(features) -> tuple[int | None, tuple[str, ...] | None]:
    """(num_classes, class_names) of the "label" feature, (None, None) without one."""
    if "label" not in features:
        return None, None
    names = getattr(features["label"], "names", None)
    return getattr(features["label"], "num_classes", None), tuple(names) if names else None


def _load_tfds(name: str, split: str, data_dir: str | None, image_size) -> ArrayDataset:
    tfds, builder = _tfds_builder(name, data_dir)
    features = builder.info.features
    where = f"tfds:{name} split {split!r}"
    try:
        source = builder.as_data_source(split=split)
        records = (source[i] for i in range(len(source)))
    except Exception as source_error:  # not prepared, or prepared as TFRecord
        if not builder.is_prepared():
            raise _tfds_not_prepared(name, builder) from source_error
        if not _is_tfrecord(builder):
            raise
        try:
            import tensorflow  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"TFDS dataset {name!r} in {builder.data_dir} is stored as TFRecord, which needs "
                f"TensorFlow (pip install tensorflow-cpu); or rebuild it with "
                f"`tfds build {name} --file_format=array_record`") from e
        _hide_gpus_from_tensorflow()
        records = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    images, labels = [], []
    has_label = "label" in features
    for ex in records:
        images.append(_as_hwc(ex["image"], where))
        if has_label:
            labels.append(int(ex["label"]))
    _hide_gpus_from_tensorflow()
    stacked = _stack_images(images, where, image_size)
    num_classes, class_names = _tfds_labels(features)
    return ArrayDataset(stacked, np.asarray(labels, np.int32) if has_label else None,
                        num_classes, f"tfds:{name}", class_names)


# ----------------------------------------------------------------------------- image folder

_SPLIT_DIRS = {
    "train": ("train",),
    "val": ("val", "validation"),
    "validation": ("validation", "val"),
    "test": ("test", "val", "validation"),
}


def _class_dirs(root: epath.Path) -> list[str]:
    """The class folder names in `root`; a link to `root` itself or to a folder above it (a loop,
    never a class) is skipped with a warning."""
    names = []
    for e in root.iterdir():
        if e.name.startswith(".") or not e.is_dir():
            continue
        target = os.path.realpath(os.fspath(e)) if os.path.islink(os.fspath(e)) else None
        if target and os.path.commonpath([target, os.path.realpath(os.fspath(root))]) == target:
            logging.getLogger(__name__).warning("skipping %s: a link to %s or a folder above it, not a class",
                                                os.fspath(e), os.fspath(root))
            continue
        names.append(e.name)
    return sorted(names)


def _import_pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("'folder:' datasets decode JPEG/PNG with Pillow: pip install pillow") from e
    return Image


def _folder_files(spec: str | None, split: str, data_dir: str | None):
    """(split_root, image paths, labels (N,) int32, class names) of an image folder.

    Classes are the sorted sub-folder names (the union over split folders), files sorted by
    name within a class; this order defines the example indices.
    """
    if spec is None:
        raise ValueError("use 'folder:<path>'")
    root = epath.Path(spec) if data_dir is None else epath.Path(data_dir) / spec  # (an absolute spec wins)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {os.fspath(root)!r} does not exist")
    present = [d for d in ("train", "val", "validation", "test") if (root / d).is_dir()]
    if present:
        chosen = next((d for d in _SPLIT_DIRS.get(split, (split,)) if d in present), None)
        if chosen is None:
            raise ValueError(f"image folder {os.fspath(root)!r} has split folders {present}, none for "
                             f"split {split!r}")
        split_root = root / chosen
        # One label space for all splits: the union of the class folders of every split.
        classes = sorted({c for d in present for c in _class_dirs(root / d)})
    else:
        split_root = root
        classes = _class_dirs(root)
    split_root = os.fspath(split_root)
    if not classes:
        raise ValueError(f"image folder {split_root!r} has no class sub-folders")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        cls_dir = epath.Path(split_root) / cls
        if not cls_dir.is_dir():
            continue
        files = sorted(os.fspath(f) for f in cls_dir.iterdir() if f.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:  # a class with a label and no image: refused, never silent
            raise ValueError(f"class folder {os.fspath(cls_dir)!r} holds no {'/'.join(IMAGE_EXTENSIONS)} "
                             "files; add its images or move the folder out of the dataset")
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"image folder {split_root!r}: no {'/'.join(IMAGE_EXTENSIONS)} files")
    return split_root, paths, np.asarray(labels, np.int32), tuple(classes)


def _open_image(Image, path: str):
    """The decoded PIL image at `path`; ValueError naming the file if it cannot be decoded."""
    try:
        with epath.Path(path).open("rb") as f, Image.open(f) as im:
            im.load()
            return im
    except Exception as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e


def _as_array(im, mode: str) -> np.ndarray:
    """PIL image -> (H, W, C) uint8 in `mode` ("L": C = 1, "RGB": C = 3)."""
    a = np.asarray(im if im.mode == mode else im.convert(mode), np.uint8)
    return a[..., None] if a.ndim == 2 else a


@register("folder")
def _load_folder(spec, split, data_dir, image_size):
    split_root, paths, labels, classes = _folder_files(spec, split, data_dir)
    Image = _import_pil()
    images = [_open_image(Image, p) for p in paths]
    # Gray-level folder -> C=1; anything else (RGB, palette, RGBA, mixed) -> RGB.
    mode = "L" if all(im.mode in GRAY_MODES for im in images) else "RGB"
    arrays = [_as_array(im, mode) for im in images]
    stacked = _stack_images(arrays, f"image folder {split_root!r}", image_size)
    return ArrayDataset(stacked, labels, len(classes), f"folder:{spec}", classes)


# ----------------------------------------------------------------------------- lazy sources

class RandomAccessSource(Protocol):
    """One split, decoded one example at a time: `load(i)` -> (H, W, C) uint8, i < num_examples."""

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


class FolderSource:
    """`folder:<path>`, decoded lazily with Pillow; same examples and order as `load_dataset`.

    `channels` follows the first image (gray -> 1, else 3); every image is converted to that.
    Files are listed once, up front; decoding is thread-safe (Pillow releases the GIL).
    """

    def __init__(self, spec: str | None, split: str, data_dir: str | None = None):
        self._image = _import_pil()
        _, self.paths, self.labels, self.class_names = _folder_files(spec, split, data_dir)
        self.name = f"folder:{spec}"
        self.num_examples = len(self.paths)
        self.num_classes = len(self.class_names)
        self._mode = "L" if _open_image(self._image, self.paths[0]).mode in GRAY_MODES else "RGB"
        self.channels = 1 if self._mode == "L" else 3
        self.file_names = tuple(os.path.basename(p) for p in self.paths)

    def load(self, i: int) -> np.ndarray:
        return _as_array(_open_image(self._image, self.paths[i]), self._mode)


class TfdsSource:
    """`tfds:<name>` prepared as ArrayRecord, read with random access and without TensorFlow
    (`builder.as_data_source`, what `tfds.data_source` returns)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        _, builder = _tfds_builder(name, data_dir)
        try:
            self._source = builder.as_data_source(split=split)
        except Exception as e:
            if not builder.is_prepared():
                raise _tfds_not_prepared(name, builder) from e
            if _is_tfrecord(builder):
                raise ValueError(
                    f"TFDS dataset {name!r} in {builder.data_dir} is stored as TFRecord, which has "
                    f"no random access; rebuild it with `tfds build {name} "
                    f"--file_format=array_record`, or use load_dataset (in memory)") from e
            raise
        finally:
            _hide_gpus_from_tensorflow()
        features = builder.info.features
        self._builder, self._split = builder, split
        self.name = f"tfds:{name}"
        self.num_examples = len(self._source)
        self.num_classes, self.class_names = _tfds_labels(features)
        self._has_label = "label" in features
        shape = features["image"].shape
        self.channels = int(shape[-1]) if shape and shape[-1] else 3
        self._where = f"tfds:{name} split {split!r}"

    @functools.cached_property
    def _metadata(self) -> list[dict]:
        """Every example's features but the image, read with `SkipDecoding` for the image: labels
        and file names without decoding a single JPEG (the bytes are dropped at once)."""
        import tensorflow_datasets as tfds

        raw = self._builder.as_data_source(split=self._split, decoders={"image": tfds.decode.SkipDecoding()})
        _hide_gpus_from_tensorflow()
        return [{k: v for k, v in raw[i].items() if k != "image"} for i in range(self.num_examples)]

    @functools.cached_property
    def labels(self) -> np.ndarray | None:
        """(N,) int32, read without decoding the images; None without a "label" feature."""
        if not self._has_label:
            return None
        return np.fromiter((int(ex["label"]) for ex in self._metadata), np.int32, self.num_examples)

    @functools.cached_property
    def file_names(self) -> tuple[str, ...] | None:
        """The "file_name" feature of every example (e.g. ImageNet's), or None without one."""
        if "file_name" not in self._builder.info.features:
            return None
        return tuple(_text(ex["file_name"]) for ex in self._metadata)

    def feature(self, name: str) -> list:
        """Feature `name` of every example, images undecoded (e.g. VOC's "labels")."""
        if name not in self._builder.info.features:
            raise ValueError(f"{self.name} has no feature {name!r}: {list(self._builder.info.features)}")
        return [ex[name] for ex in self._metadata]

    def load(self, i: int) -> np.ndarray:
        return _as_hwc(self._source[int(i)]["image"], self._where)


def open_source(name: str, split: str, data_dir: str | None = None) -> RandomAccessSource:
    """A lazy `RandomAccessSource` for `folder:` and `tfds:` names; any other registered name is
    loaded with `load_dataset` and held in memory behind an `ArraySource`."""
    base, _, spec = name.partition(":")
    if base == "folder":
        return FolderSource(spec or None, split, data_dir)
    if base == "tfds":
        if not spec:
            raise ValueError("use 'tfds:<name>', e.g. 'tfds:cifar10'")
        return TfdsSource(spec, split, data_dir)
    return ArraySource(load_dataset(name, split, data_dir))
