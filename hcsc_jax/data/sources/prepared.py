"""`prepared:<dir>`: a resized copy of a dataset written by `python -m hcsc_jax.data.prepare`.

`<dir>/<split>.array_record` holds one encoded image per record (JPEG, or PNG for gray-level
data), in the original's example order; `<dir>/<split>.json` holds the count, labels, class and
file names, channels and how the copy was made (longest side cap, JPEG quality, source). Read
with random access, without TensorFlow, and decoded like an image folder (`decode.decode`).
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
from etils import epath

from hcsc_jax.data import decode
from hcsc_jax.data.sources.folder import SPLIT_NAMES
from hcsc_jax.data.sources.registry import register_lazy

FORMAT = "hcsc-jax prepared v1"


def paths(root, split: str) -> tuple[epath.Path, epath.Path]:
    """(records, metadata) paths of `split` in a prepared directory."""
    root = epath.Path(root)
    return root / f"{split}.array_record", root / f"{split}.json"


@register_lazy("prepared")
class PreparedSource:
    """One split of a prepared copy (see the module doc)."""

    def __init__(self, spec: str | None, split: str, data_dir: str | None = None):
        if not spec:
            raise ValueError("use 'prepared:<dir>' (a directory written by python -m hcsc_jax.data.prepare)")
        root = epath.Path(spec) if data_dir is None else epath.Path(data_dir) / spec
        names = SPLIT_NAMES.get(split, (split,))  # "validation" finds a copy of "val", as in folders
        found = next((n for n in names if all(p.is_file() for p in paths(root, n))), names[0])
        self._records_path, meta_path = paths(root, found)
        if not meta_path.is_file() or not self._records_path.is_file():
            have = sorted(p.stem for p in root.glob("*.json")) if root.is_dir() else []
            raise FileNotFoundError(
                f"prepared dataset {os.fspath(root)!r} has no split {split!r} "
                f"({'splits: ' + ', '.join(have) if have else 'no prepared splits there'}); write it with "
                f"python -m hcsc_jax.data.prepare --source=... --split={split} --out={os.fspath(root)}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(meta_path)}: not a prepared dataset of this version "
                             f"(format {meta.get('format')!r}, expected {FORMAT!r})")
        self.meta = meta
        self.name = f"prepared:{spec}"
        self.num_examples = int(meta["num_examples"])
        self.channels = int(meta["channels"])
        self.labels = None if meta["labels"] is None else np.asarray(meta["labels"], np.int32)
        self.num_classes = meta["num_classes"]
        self.class_names = None if meta["class_names"] is None else tuple(meta["class_names"])
        self.file_names = None if meta["file_names"] is None else tuple(meta["file_names"])
        self._mode = "L" if self.channels == 1 else "RGB"

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
        return decode.decode(self._reader[int(i)], self._mode, self.where(i))
