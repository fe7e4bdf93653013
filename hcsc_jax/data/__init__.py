"""Datasets (in memory or streamed from the host) and MoCo v2 augmentation (on the device,
`augmentations.augment`)."""

from hcsc_jax.data import augmentations
from hcsc_jax.data.augmentations import (
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
    ArraySource,
    FolderSource,
    RandomAccessSource,
    TfdsSource,
    list_datasets,
    load_dataset,
    open_source,
    read_idx,
    register,
)
from hcsc_jax.data.stream import (
    CropSpec,
    TrainStream,
    center_crop_batches,
    epoch_permutation,
    prefetch_to_device,
)

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayDataset",
    "ArraySource",
    "AugmentConfig",
    "CropSpec",
    "FolderSource",
    "RandomAccessSource",
    "TfdsSource",
    "TrainStream",
    "augmentations",
    "bilinear_weights",
    "center_crop",
    "center_crop_batches",
    "epoch_permutation",
    "list_datasets",
    "load_dataset",
    "open_source",
    "prefetch_to_device",
    "read_idx",
    "register",
    "resize_uint8",
    "sample_crop_box",
]
