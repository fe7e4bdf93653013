"""`folder:<path>`: an image folder, one sub-folder per class (sorted names -> label ids).

`path/<split>/<class>/...` when split folders exist (train, val/validation, test), else the whole
folder for every split. Files are listed once, up front (a class's images are those under its
folder, sub-folders included, as torchvision's ImageFolder reads them; sorted by their path in it:
this order defines the example indices), and decoded on demand (`decode.decode`: libjpeg-turbo for
JPEGs, Pillow for the rest).

`channels` is decided from the headers of up to `CHANNEL_SAMPLE` files spread evenly over the
split (the first and the last included): 3 when any of them is color (RGB, CMYK, palette, ...),
1 when all that can be read are gray-level; a file that cannot be read is passed over (the loader
names it when it reaches it), and a split none of whose sampled files can be read is refused.
Every image is converted to the decided mode on decoding (a gray JPEG of ImageNet becomes three
equal channels, a color image of a gray folder its luma).

A file is checked before it is read (`read_bytes`): one that is not a regular file (a FIFO, a
device, a link to /dev/zero) or larger than `decode.max_file_bytes(max_pixels)` is refused with a
`DecodeError` naming it, as is one whose header says more than `max_pixels` pixels; the loader's
`bad_images` setting then skips it or stops the run.
"""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
from etils import epath

from hcsc_jax.data import decode
from hcsc_jax.data.sources.registry import register_lazy
from hcsc_jax.run import workdir as workdir_lib

log = logging.getLogger(__name__)
CHANNEL_SAMPLE = 32  # files whose headers decide `channels`
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


def _image_files(cls_dir: epath.Path) -> list[str]:
    """The image files under a class folder, in its sub-folders too (as torchvision's ImageFolder),
    sorted by their path in it; hidden folders are passed over, a local folder reached twice
    through links is read once."""
    found = []  # (path in cls_dir as parts, path)
    if workdir_lib.is_local(cls_dir):
        seen, root = set(), os.fspath(cls_dir)
        for here, dirs, names in os.walk(root, followlinks=True):
            if os.path.realpath(here) in seen:
                dirs[:] = []
                continue
            seen.add(os.path.realpath(here))
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [(os.path.relpath(p, root).split(os.sep), p)
                      for p in (os.path.join(here, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS))]
    else:  # a bucket: no links
        todo = [(cls_dir, [])]
        while todo:
            folder, rel = todo.pop()
            for e in folder.iterdir():
                if e.is_dir():
                    if not e.name.startswith("."):
                        todo.append((e, rel + [e.name]))
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append((rel + [e.name], os.fspath(e)))
    return [path for _, path in sorted(found)]


def folder_files(spec: str | None, split: str, data_dir: str | None):
    """(split_root, image paths, labels (N,) int32, class names) of an image folder.

    Classes are the sorted sub-folder names (the union over split folders), the image files of a
    class (in its sub-folders too) sorted by their path in it; this order defines the example indices.
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
        files = _image_files(cls_dir)
        if not files:  # a class with a label and no image: refused, never silent
            raise ValueError(f"class folder {os.fspath(cls_dir)!r} holds no {'/'.join(IMAGE_EXTENSIONS)} "
                             "files; add its images or move the folder out of the dataset")
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"image folder {split_root!r}: no {'/'.join(IMAGE_EXTENSIONS)} files")
    return split_root, paths, np.asarray(labels, np.int32), tuple(classes)


def read_bytes(path: str, max_pixels: int = decode.MAX_PIXELS) -> bytes:
    """The file's bytes (local path or bucket). DecodeError naming it, before anything is read,
    for a local file that is not a regular file (FIFO, device, a link to one) or holds more than
    `decode.max_file_bytes(max_pixels)` bytes; also when it cannot be read or grows past that
    bound while being read (a bucket object: read up to the bound)."""
    limit = decode.max_file_bytes(max_pixels)
    too_large = lambda size: decode.DecodeError(
        f"cannot read image {path}: {size}more than {limit:,} bytes (4 bytes per pixel of "
        f"config.input.max_pixels = {int(max_pixels):,})")
    try:
        if "://" not in path:
            st = os.stat(path)  # (follows links: a link to /dev/zero is a character device)
            if not stat.S_ISREG(st.st_mode):
                raise decode.DecodeError(f"cannot read image {path}: not a regular file (a FIFO, a device or "
                                         "a link to one)")
            if st.st_size > limit:
                raise too_large(f"{st.st_size:,} bytes, ")
        with epath.Path(path).open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise decode.DecodeError(f"cannot read image {path}: {e}") from e
    if len(data) > limit:
        raise too_large("")
    return data


def channel_mode(paths: list[str], max_pixels: int = decode.MAX_PIXELS) -> str:
    """The mode every image of `paths` is decoded to (see the module doc): "RGB" when any of up
    to CHANNEL_SAMPLE files spread evenly over them is color, "L" when those that can be read are
    all gray-level; DecodeError when none can be read."""
    picks = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(len(paths), CHANNEL_SAMPLE)).round()})
    gray, first_error = 0, None
    for i in picks:
        try:
            mode = decode.mode_of(read_bytes(paths[i], max_pixels), paths[i])
        except decode.DecodeError as e:
            first_error = first_error or e
            continue
        if mode == "RGB":
            return "RGB"
        gray += 1
    if not gray:
        raise decode.DecodeError(f"none of the {len(picks)} images sampled to decide the channels can be "
                                 f"read ({first_error})")
    return "L"


@register_lazy("folder")
class FolderSource:
    """`folder:<path>` read lazily (see the module doc); picklable, so loader workers share it."""

    def __init__(self, spec: str | None, split: str, data_dir: str | None = None,
                 max_pixels: int = decode.MAX_PIXELS):
        root, self.paths, self.labels, self.class_names = folder_files(spec, split, data_dir)
        self.name = f"folder:{spec}"
        self.num_examples = len(self.paths)
        self.num_classes = len(self.class_names)
        self.max_pixels = max_pixels
        self._mode = channel_mode(self.paths, max_pixels)
        self.channels = 1 if self._mode == "L" else 3
        # The path in its class folder: the file name, or sub/name for a file in a sub-folder.
        self.file_names = tuple(os.path.relpath(p, os.path.join(root, self.class_names[c]))
                                for p, c in zip(self.paths, self.labels))

    def stamps(self) -> list[list[int]]:
        """[size in bytes, modification time in ns] of each file: what changes when an image is
        replaced under the same name (`data.prepare` keeps a copy only while they are the same)."""
        return [[st.st_size, st.st_mtime_ns] for st in map(os.stat, self.paths)]

    def where(self, i: int) -> str:
        """What a message about example i names: its file."""
        return self.paths[i]

    def load(self, i: int) -> np.ndarray:
        path = self.paths[i]
        return decode.decode(read_bytes(path, self.max_pixels), self._mode, path, self.max_pixels)
