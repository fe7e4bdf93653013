"""`prepared:<dir>`: a resized copy of a dataset written by `python -m hcsc_jax.data.prepare`.

`<dir>/<split>.json` describes a split: the count, labels, class and file names, channels, how
the copy was made (longest side cap, JPEG quality, source) and the file holding its images,
`<dir>/<split>.<token>.array_record` (one encoded image per record: JPEG, or PNG for gray-level
data, in the original's example order), with that file's size in bytes. The JSON is written
last, in one rename, so it always names a complete records file of its own run (a copy of the
first format, "v1", has `<dir>/<split>.array_record` and no size). Read with random access,
without TensorFlow, and decoded like an image folder (`decode.decode`).

A copy is checked on open against its description, each problem one line naming the file
(`DataError`): the records file's size (a cut or replaced file) and record count, the length of
the labels and file names, labels in [0, num_classes), the channels.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
from etils import epath

from hcsc_jax.data import decode
from hcsc_jax.data.sources.base import DataError
from hcsc_jax.data.sources.folder import SPLIT_NAMES
from hcsc_jax.data.sources.registry import register_lazy

FORMAT = "hcsc-jax prepared v2"
FORMATS = ("hcsc-jax prepared v1", FORMAT)  # v1: records in <split>.array_record, no size


def meta_path(root, split: str) -> epath.Path:
    """The description (JSON) of `split` in a prepared directory."""
    return epath.Path(root) / f"{split}.json"


def records_name(meta: dict, split: str) -> str:
    """The name of the records file that a split's description `meta` names."""
    return meta.get("records") or f"{split}.array_record"


def read_meta(path: epath.Path) -> dict:
    """A split's description; DataError naming the file when it is not one of these formats."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{os.fspath(path)}: not a prepared split's description (cut short or not JSON: "
                        f"{e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{os.fspath(path)}: not a prepared dataset of this version (format {found!r}, "
                        f"expected one of {', '.join(map(repr, FORMATS))})")
    return meta


@register_lazy("prepared")
class PreparedSource:
    """One split of a prepared copy (see the module doc)."""

    def __init__(self, spec: str | None, split: str, data_dir: str | None = None,
                 max_pixels: int = decode.MAX_PIXELS):
        if not spec:
            raise ValueError("use 'prepared:<dir>' (a directory written by python -m hcsc_jax.data.prepare)")
        root = epath.Path(spec) if data_dir is None else epath.Path(data_dir) / spec
        names = SPLIT_NAMES.get(split, (split,))  # "validation" finds a copy of "val", as in folders
        found = next((n for n in names if meta_path(root, n).is_file()), None)
        if found is None:
            have = sorted(p.stem for p in root.glob("*.json")) if root.is_dir() else []
            raise FileNotFoundError(
                f"prepared dataset {os.fspath(root)!r} has no split {split!r} "
                f"({'splits: ' + ', '.join(have) if have else 'no prepared splits there'}); write it with "
                f"python -m hcsc_jax.data.prepare --source=... --split={split} --out={os.fspath(root)}")
        path = meta_path(root, found)
        meta = read_meta(path)
        self.meta = meta
        self.name = f"prepared:{spec}"
        self.max_pixels = max_pixels
        self._records_path = root / records_name(meta, found)
        again = (f"; write it again with python -m hcsc_jax.data.prepare --source={meta.get('source')} "
                 f"--split={found} --out={os.fspath(root)} --overwrite")
        try:
            self.num_examples = int(meta["num_examples"])
            self.channels = int(meta["channels"])
            self.labels = None if meta["labels"] is None else np.asarray(meta["labels"])
            self.num_classes = meta["num_classes"]
            self.class_names = None if meta["class_names"] is None else tuple(meta["class_names"])
            self.file_names = None if meta["file_names"] is None else tuple(meta["file_names"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{os.fspath(path)}: a field is missing or of the wrong type ({e!r})"
                            f"{again}") from None
        self._check(path, meta, again)
        self.labels = None if self.labels is None else self.labels.astype(np.int32)
        self._mode = "L" if self.channels == 1 else "RGB"

    def _check(self, path: epath.Path, meta: dict, again: str):
        """The description against itself and the records file (see the module doc)."""
        def refuse(what: str, where=path):
            raise DataError(f"{os.fspath(where)}: {what}{again}")

        records, n = self._records_path, self.num_examples
        if self.channels not in (1, 3):
            refuse(f"channels is {self.channels}, not 1 or 3")
        if not records.is_file():
            refuse(f"its records file {records.name} is missing")
        if "records_bytes" in meta and records.stat().length != meta["records_bytes"]:
            refuse(f"{records.stat().length:,} bytes, {path.name} says {meta['records_bytes']:,}: cut short "
                   "or not the file written with it", records)
        try:
            count = len(self._reader)
        except RuntimeError as e:
            why = " ".join(str(e).split()) or "RuntimeError"
            refuse(f"not a readable ArrayRecord file, cut short? ({why})", records)
        if count != n:
            refuse(f"holds {count} records, {path.name} says num_examples = {n}", records)
        for key, values in (("labels", self.labels), ("file_names", self.file_names)):
            if values is not None and len(values) != n:
                refuse(f"{key} has {len(values)} entries for {n} examples")
        k = self.num_classes
        if k is not None and (not isinstance(k, int) or k < 1):
            refuse(f"num_classes is {k!r}, not a positive integer")
        if self.class_names is not None and k is not None and len(self.class_names) != k:
            refuse(f"class_names has {len(self.class_names)} entries for num_classes = {k}")
        if self.labels is not None and n:
            if self.labels.dtype.kind not in "iu":
                refuse(f"labels are not integers ({self.labels.dtype})")
            if self.labels.min() < 0 or (k is not None and self.labels.max() >= k):
                refuse(f"labels outside [0, {k}): from {self.labels.min()} to {self.labels.max()}")

    def __getstate__(self):  # the reader is reopened where it is used
        state = dict(self.__dict__)
        state.pop("_reader", None)
        return state

    @functools.cached_property
    def _reader(self):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        return ArrayRecordDataSource([os.fspath(self._records_path)])

    def where(self, i: int) -> str:
        name = f" ({self.file_names[i]})" if self.file_names else ""
        return f"{self.name} example {i}{name}"

    def load(self, i: int) -> np.ndarray:
        return decode.decode(self._reader[int(i)], self._mode, self.where(i), self.max_pixels)
