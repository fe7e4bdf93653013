"""Tiny stand-ins for ImageNet and VOC07 made on the fly: an image folder in ImageNet's layout
(synset folders, JPEGs of different sizes named <synset>_<n>.JPEG) and TFDS ArrayRecord builds
(no TensorFlow needed: the images are handed to TFDS already JPEG-encoded); also Fashion-MNIST's
four IDX files with a few generated images.

  python tests/imagenet_like.py   # the data of the runlocal configs:
                                  # /tmp/imagenet_tiny, /tmp/fashion_mnist_tiny
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import sys

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

SYNSETS = ("n01440764", "n01443537", "n01484850")


def _image(rng, label: int, height: int, width: int) -> np.ndarray:
    """A class-dependent picture: a bright square of the class's color on noise."""
    img = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    color = np.zeros(3, np.uint8)
    color[label % 3] = 230
    img[height // 4:3 * height // 4, width // 4:3 * width // 4] = color
    return img


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def examples(split: str, per_class: int, same_size: bool = False):
    """[(file name, label, (H, W, 3) uint8)] of a split, deterministic."""
    rng = np.random.default_rng({"train": 0, "val": 1, "validation": 1}.get(split, 2))
    out = []
    for label, synset in enumerate(SYNSETS):
        for j in range(per_class):
            h, w = (24, 24) if same_size else (int(rng.integers(20, 48)), int(rng.integers(20, 48)))
            out.append((f"{synset}_{1000 + j}.JPEG", label, _image(rng, label, h, w)))
    return out


def make_folder(root: str, per_class=(10, 4), same_size: bool = False) -> str:
    """root/{train,val}/<synset>/<synset>_<n>.JPEG -> root."""
    for split, n in zip(("train", "val"), per_class):
        for name, label, img in examples(split, n, same_size):
            d = os.path.join(root, split, SYNSETS[label])
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, name), "wb") as f:
                f.write(_jpeg(img))
    return root


class HcscTinyImagenet(tfds.core.GeneratorBasedBuilder):
    """The folder's images as a TFDS dataset with ImageNet's features (image, label, file_name)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=list(SYNSETS)),
            "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", 10),
                "validation": self._generate_examples("val", 4)}

    def _generate_examples(self, split, per_class):
        for name, label, img in examples(split, per_class):
            yield name, {"image": _jpeg(img), "label": label, "file_name": name}


class HcscTinyVoc(tfds.core.GeneratorBasedBuilder):
    """VOC07's label features (labels, labels_no_difficult) over 20 classes, without a "label"."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        classes = tfds.features.ClassLabel(num_classes=20)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "labels": tfds.features.Sequence(classes),
            "labels_no_difficult": tfds.features.Sequence(classes)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 60), "validation": self._generate_examples(1, 20),
                "test": self._generate_examples(2, 24)}

    def _generate_examples(self, seed, n):
        rng = np.random.default_rng(seed)
        for i in range(n):
            present = sorted({i % 20, (i + 7) % 20})
            easy = [i % 20] if i % 5 == 0 else present  # every fifth: its other class only difficult
            yield f"{seed}_{i}", {"image": _jpeg(_image(rng, present[0], 24, 28)), "labels": present,
                                  "labels_no_difficult": easy}


def make_tfds(data_dir: str) -> str:
    """Builds hcsc_tiny_imagenet and hcsc_tiny_voc as ArrayRecord in data_dir -> data_dir."""
    for cls in (HcscTinyImagenet, HcscTinyVoc):
        cls(data_dir=data_dir, file_format="array_record").download_and_prepare(
            download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return data_dir


def _idx(array: np.ndarray) -> bytes:
    """uint8 array -> IDX bytes (magic 0x0000 08 ndim, big-endian sizes)."""
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_fashion_mnist(root: str, sizes=(128, 64)) -> str:
    """Fashion-MNIST's four gzipped IDX files in root, `sizes` (train, test) 28x28 gray images of
    10 classes (a class-dependent bright bar on noise) -> root."""
    os.makedirs(root, exist_ok=True)
    for (stem_images, stem_labels), n, seed in zip(
            (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
            sizes, (0, 1)):
        rng = np.random.default_rng(seed)
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label:6 + 2 * label, 4:24] = 230
        for stem, array in ((stem_images, images), (stem_labels, labels)):
            with open(os.path.join(root, stem + ".gz"), "wb") as f:
                f.write(gzip.compress(_idx(array)))
    return root


if __name__ == "__main__":
    imagenet, fashion = (sys.argv[1:3] if len(sys.argv) > 2
                         else ("/tmp/imagenet_tiny", "/tmp/fashion_mnist_tiny"))
    print(make_folder(imagenet), make_fashion_mnist(fashion))
