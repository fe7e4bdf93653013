"""Dataset sources: one module each, behind one registry (`registry.py`).

`load_dataset(name, split, data_dir=None, image_size=None)` returns an `ArrayDataset` (a split in
memory, (N, H, W, C) uint8 with C = 1 for gray-level data, 3 for color, int32 labels);
`open_source(name, split, data_dir=None)` a `RandomAccessSource` whose `load(i)` decodes one
(H, W, C) uint8 image on demand (sizes may differ) and whose `labels` / `file_names` never decode
an image; `check_available(name, splits, data_dir=None)` raises `DataError` (one line) unless
each split can be read, from metadata only (a run checks its data before it writes anything).
Registered names:

* `digits` (`digits.py`): scikit-learn's 8x8 digits, no download.
* `fashion_mnist` (`fashion_mnist.py`): the IDX files of the Debian package
  `dataset-fashion-mnist` or of `data_dir` (`idx.py` reads them), else a prepared TFDS copy.
* `tfds:<name>` (`tfds.py`): a prepared TFDS image dataset; ArrayRecord reads lazily and without
  TensorFlow.
* `folder:<path>` (`folder.py`): an image folder, one sub-folder per class.
* `prepared:<dir>` (`prepared.py`): a resized ArrayRecord copy written by
  `python -m hcsc_jax.data.prepare`.

A new dataset: decorate `loader(spec, split, data_dir, image_size) -> ArrayDataset` with
`@register("name")`, or a `RandomAccessSource` class `cls(spec, split, data_dir, max_pixels)` with
`@register_lazy("name")`; `spec` is the text after "name:" (None when absent). Optionally a cheap
`check(spec, splits, data_dir)` with `@register_check("name")` (else the check opens the splits).
"""

from hcsc_jax.data.sources import digits, fashion_mnist, folder, prepared, tfds  # noqa: F401 (registers)
from hcsc_jax.data.sources.base import (
    ArrayDataset,
    ArraySource,
    DataError,
    RandomAccessSource,
    SubsetSource,
    materialize,
)
from hcsc_jax.data.sources.fashion_mnist import FASHION_MNIST_DIR, FASHION_MNIST_FILES
from hcsc_jax.data.sources.folder import FolderSource
from hcsc_jax.data.sources.idx import read_idx
from hcsc_jax.data.sources.prepared import PreparedSource
from hcsc_jax.data.sources.registry import (
    check_available,
    list_datasets,
    load_dataset,
    open_source,
    register,
    register_check,
    register_lazy,
    standard_splits,
)
from hcsc_jax.data.sources.tfds import TfdsSource

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "ArrayDataset",
    "ArraySource",
    "DataError",
    "FolderSource",
    "PreparedSource",
    "RandomAccessSource",
    "SubsetSource",
    "TfdsSource",
    "check_available",
    "list_datasets",
    "load_dataset",
    "materialize",
    "open_source",
    "read_idx",
    "register",
    "register_check",
    "register_lazy",
    "standard_splits",
]
