"""`digits`: scikit-learn's 8x8 handwritten digits (ships with scikit-learn, no download).

Splits "train" (1437), "test" (360: the last 20% of a fixed permutation), "all" (1797),
or a slice of one ("train[:500]"). A `data_dir` is not used (`check_digits` says so)."""

from __future__ import annotations

import logging
import math

import numpy as np

from hcsc_jax.data.sources.base import ArrayDataset
from hcsc_jax.data.sources.registry import check_split, no_spec, register, register_check, take

log = logging.getLogger(__name__)
SPLITS = ("train", "test", "all")


@register_check("digits")
def check_digits(spec, splits, data_dir):
    """The split names; a warning that `data_dir` is not used (the data ships with scikit-learn).
    -> the number of images of the first split."""
    no_spec("digits", spec)
    for split in splits:
        check_split("digits", split, SPLITS)
    if data_dir is not None:
        log.warning("digits ships with scikit-learn: data_dir %s is not used", data_dir)
    return len(load_digits(spec, splits[0], None, None)) if splits else None


@register("digits")
def load_digits(spec, split, data_dir, image_size):
    no_spec("digits", spec)
    whole, rows = check_split("digits", split, SPLITS)
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    n = len(images)
    perm = np.random.default_rng(0).permutation(n)
    n_test = math.ceil(0.2 * n)  # 360 of 1797
    if whole == "train":
        idx = np.sort(perm[:n - n_test])
    elif whole == "test":
        idx = np.sort(perm[n - n_test:])
    else:
        idx = np.arange(n)
    return take(ArrayDataset(images[idx], labels[idx], 10, "digits", tuple(str(d) for d in range(10))),
                rows, split)
