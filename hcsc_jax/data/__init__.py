"""Datasets (in memory, host side) and MoCo v2 augmentation (on the device).

`hcsc_jax.data.augment` is the augmentation *module* (the function is
`hcsc_jax.data.augment.augment`; the package does not re-export it, so the module stays
importable as `from hcsc_jax.data import augment`).
"""

from hcsc_jax.data import augment
from hcsc_jax.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    center_crop,
    sample_crop_box,
)
from hcsc_jax.data.resize import bilinear_weights, resize_uint8
from hcsc_jax.data.sources import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    ArrayDataset,
    list_datasets,
    load_dataset,
    read_idx,
    register,
)

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayDataset",
    "AugmentConfig",
    "augment",
    "bilinear_weights",
    "center_crop",
    "list_datasets",
    "load_dataset",
    "read_idx",
    "register",
    "resize_uint8",
    "sample_crop_box",
]
