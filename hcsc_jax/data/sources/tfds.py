"""`tfds:<name>`: a prepared TFDS image-classification dataset (features "image", "label").

Prepared as ArrayRecord it is read with random access and without TensorFlow
(`builder.as_data_source`); the image bytes are read undecoded and decoded by `decode.decode`
(libjpeg-turbo for JPEGs). Prepared as TFRecord it has no random access: `load_dataset` reads it
whole through TensorFlow, and streaming it asks for an ArrayRecord rebuild.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from hcsc_jax.data import decode
from hcsc_jax.data.sources.base import ArrayDataset, as_hwc, materialize, stack_images
from hcsc_jax.data.sources.registry import register, register_check, register_lazy


def is_prepared(name: str, data_dir: str | None) -> bool:
    try:
        import tensorflow_datasets as tfds
        return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
    except (ImportError, ValueError, OSError):  # tfds missing or unusable: not prepared
        return False


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hide_gpus_from_tensorflow():
    """TFDS may import TensorFlow; keep it off the accelerators (JAX owns their memory)."""
    if "tensorflow" in sys.modules:
        sys.modules["tensorflow"].config.set_visible_devices([], "GPU")


def _builder(name: str, data_dir: str | None):
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


def _not_prepared(name: str, builder) -> FileNotFoundError:
    return FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir_root}. Prepare it "
        f"on a machine with network access: `tfds build {name} --data_dir=DIR "
        f"--file_format=array_record` (ArrayRecord reads without TensorFlow; plain "
        f"`tfds build` needs TensorFlow here), or download it with tfds.load there; then "
        f"copy DIR to this machine and pass data_dir=DIR.")


def _opens(builder, splits) -> bool:
    """Whether TFDS gives a data source of each split although the builder is not prepared."""
    try:
        return all(len(builder.as_data_source(split=split)) >= 0 for split in splits)
    except Exception:  # noqa: BLE001 - not prepared: TFDS raises what it raises
        return False


def _is_tfrecord(builder) -> bool:
    return builder.info.file_format is None or builder.info.file_format.value == "tfrecord"


def _labels_info(features) -> tuple[int | None, tuple[str, ...] | None]:
    """(num_classes, class_names) of the "label" feature, (None, None) without one."""
    if "label" not in features:
        return None, None
    names = getattr(features["label"], "names", None)
    return getattr(features["label"], "num_classes", None), tuple(names) if names else None


@register_lazy("tfds")
class TfdsSource:
    """`tfds:<name>` prepared as ArrayRecord, read with random access and without TensorFlow.
    Picklable: a loader worker reopens the ArrayRecord files itself."""

    def __init__(self, name: str | None, split: str, data_dir: str | None = None,
                 max_pixels: int = decode.MAX_PIXELS):
        if not name:
            raise ValueError("use 'tfds:<name>', e.g. 'tfds:cifar10'")
        tfds, builder = _builder(name, data_dir)
        self._tfds_name, self._data_dir, self._split = name, data_dir, split
        self.max_pixels = max_pixels
        try:
            self.num_examples = len(self._records)
        except Exception as e:
            if not builder.is_prepared():
                raise _not_prepared(name, builder) from e
            if _is_tfrecord(builder):
                raise ValueError(
                    f"TFDS dataset {name!r} in {builder.data_dir} is stored as TFRecord, which has "
                    f"no random access; rebuild it with `tfds build {name} "
                    f"--file_format=array_record`, or use load_dataset (in memory)") from e
            raise
        finally:
            _hide_gpus_from_tensorflow()
        features = builder.info.features
        self.name = f"tfds:{name}"
        self.num_classes, self.class_names = _labels_info(features)
        self._has_label = "label" in features
        self._feature_names = list(features)
        shape = features["image"].shape
        self.channels = int(shape[-1]) if shape and shape[-1] else 3
        self._mode = "L" if self.channels == 1 else "RGB"
        self._where = f"tfds:{name} split {split!r}"

    def __getstate__(self):  # the data source is reopened where it is used
        state = dict(self.__dict__)
        for cached in ("_records", "_metadata"):
            state.pop(cached, None)
        return state

    @functools.cached_property
    def _records(self):
        """The split's records with the image left encoded (bytes), or decoded by TFDS where the
        data source cannot skip decoding (tfds.testing.mock_data)."""
        tfds, builder = _builder(self._tfds_name, self._data_dir)
        try:
            skip = {"image": tfds.decode.SkipDecoding()}
            records = builder.as_data_source(split=self._split, decoders=skip)
            if len(records):
                records[0]
        except Exception:  # a source that only yields decoded images, or none: as TFDS reads it
            records = builder.as_data_source(split=self._split)
        finally:
            _hide_gpus_from_tensorflow()
        return records

    @functools.cached_property
    def _metadata(self) -> list[dict]:
        """Every example's features but the image: labels and file names without decoding."""
        return [{k: v for k, v in self._records[i].items() if k != "image"} for i in range(self.num_examples)]

    @functools.cached_property
    def labels(self) -> np.ndarray | None:
        """(N,) int32, read without decoding the images; None without a "label" feature."""
        if not self._has_label:
            return None
        return np.fromiter((int(ex["label"]) for ex in self._metadata), np.int32, self.num_examples)

    @functools.cached_property
    def file_names(self) -> tuple[str, ...] | None:
        """The "file_name" feature of every example (e.g. ImageNet's), or None without one."""
        if "file_name" not in self._feature_names:
            return None
        return tuple(_text(ex["file_name"]) for ex in self._metadata)

    def feature(self, name: str) -> list:
        """Feature `name` of every example, images undecoded (e.g. VOC's "labels")."""
        if name not in self._feature_names:
            raise ValueError(f"{self.name} has no feature {name!r}: {self._feature_names}")
        return [ex[name] for ex in self._metadata]

    def where(self, i: int) -> str:
        return f"{self._where} example {i}"

    def load(self, i: int) -> np.ndarray:
        image = self._records[int(i)]["image"]
        if isinstance(image, bytes):
            image = decode.decode(image, self._mode, self.where(i), self.max_pixels)
        return as_hwc(image, self._where)


@register_check("tfds")
def check_tfds(name: str | None, splits, data_dir: str | None) -> None:
    """The dataset is known to TFDS, prepared in `data_dir` (or readable anyway: a data source that
    opens, as under `tfds.testing.mock_data`), and has each split (or slice of one)."""
    if not name:
        raise ValueError("use 'tfds:<name>', e.g. 'tfds:cifar10'")
    tfds, builder = _builder(name, data_dir)
    try:
        if not builder.is_prepared():  # a source that opens has its splits (TFDS checks them)
            if not _opens(builder, splits):
                raise _not_prepared(name, builder)
            return
        for split in splits:
            try:
                builder.info.splits[split]
            except (KeyError, ValueError) as e:  # "Unknown split 'x'. Should be one of [...]."
                raise ValueError(f"TFDS dataset {name!r}: {str(e).strip().splitlines()[0]}") from None
    finally:
        _hide_gpus_from_tensorflow()


@register("tfds")
def load_tfds(name: str | None, split: str, data_dir: str | None, image_size) -> ArrayDataset:
    """The split in memory: through `TfdsSource` (ArrayRecord), or TensorFlow (TFRecord)."""
    if not name:
        raise ValueError("use 'tfds:<name>', e.g. 'tfds:cifar10'")
    tfds, builder = _builder(name, data_dir)
    if builder.is_prepared() and _is_tfrecord(builder):
        return _load_tfrecord(tfds, builder, name, split, image_size)
    return materialize(TfdsSource(name, split, data_dir), image_size)


def _load_tfrecord(tfds, builder, name: str, split: str, image_size) -> ArrayDataset:
    try:
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as TFRecord, which needs "
            f"TensorFlow (pip install tensorflow-cpu); or rebuild it with "
            f"`tfds build {name} --file_format=array_record`") from e
    _hide_gpus_from_tensorflow()
    where = f"tfds:{name} split {split!r}"
    features = builder.info.features
    images, labels = [], []
    for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        images.append(as_hwc(ex["image"], where))
        if "label" in features:
            labels.append(int(ex["label"]))
    _hide_gpus_from_tensorflow()
    num_classes, class_names = _labels_info(features)
    return ArrayDataset(stack_images(images, where, image_size),
                        np.asarray(labels, np.int32) if "label" in features else None,
                        num_classes, f"tfds:{name}", class_names)
