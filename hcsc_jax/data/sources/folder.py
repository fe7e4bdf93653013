"""`folder:<path>`: an image folder, one sub-folder per class (sorted names -> label ids).

`path/<split>/<class>/...` when split folders exist (train, val/validation, test), else the whole
folder for every split. Files are listed once, up front (sorted by name within a class; this
order defines the example indices), and decoded on demand (`decode.decode`: libjpeg-turbo for
JPEGs, Pillow for the rest). `channels` follows the first image: gray-level -> 1, else 3; every
image is converted to that.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from etils import epath

from hcsc_jax.data import decode
from hcsc_jax.data.sources.registry import register_lazy

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

SPLIT_NAMES = {  # a split's names, in the order looked for (TFDS says validation, folders val)
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
            log.warning("skipping %s: a link to %s or a folder above it, not a class", os.fspath(e),
                        os.fspath(root))
            continue
        names.append(e.name)
    return sorted(names)


def folder_files(spec: str | None, split: str, data_dir: str | None):
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
        chosen = next((d for d in SPLIT_NAMES.get(split, (split,)) if d in present), None)
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


def read_bytes(path: str) -> bytes:
    """The file's bytes (local path or bucket); DecodeError naming it when it cannot be read."""
    try:
        return epath.Path(path).read_bytes()
    except OSError as e:
        raise decode.DecodeError(f"cannot read image {path}: {e}") from e


@register_lazy("folder")
class FolderSource:
    """`folder:<path>` read lazily (see the module doc); picklable, so loader workers share it."""

    def __init__(self, spec: str | None, split: str, data_dir: str | None = None):
        _, self.paths, self.labels, self.class_names = folder_files(spec, split, data_dir)
        self.name = f"folder:{spec}"
        self.num_examples = len(self.paths)
        self.num_classes = len(self.class_names)
        self._mode = decode.mode_of(read_bytes(self.paths[0]), self.paths[0])
        self.channels = 1 if self._mode == "L" else 3
        self.file_names = tuple(os.path.basename(p) for p in self.paths)

    def where(self, i: int) -> str:
        """What a message about example i names: its file."""
        return self.paths[i]

    def load(self, i: int) -> np.ndarray:
        path = self.paths[i]
        return decode.decode(read_bytes(path), self._mode, path)
