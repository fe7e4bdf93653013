"""The real Fashion-MNIST from the Debian package `dataset-fashion-mnist` (CI installs it; on a
machine without it these tests skip unless the CI variable is set, so CI cannot pass silently)."""

import os

import numpy as np
import pytest

from configs import fashion_mnist
from hcsc_jax.data.sources import FASHION_MNIST_DIR, load_dataset

if not os.path.isdir(FASHION_MNIST_DIR) and not os.environ.get("CI"):
    pytest.skip(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist",
                allow_module_level=True)


@pytest.fixture(scope="module")
def train():
    return load_dataset("fashion_mnist", "train")


def test_package_splits_are_the_published_dataset(train):
    test = load_dataset("fashion_mnist", "test")
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28, 1)
    # balanced classes, and the first labels of the published files (ankle boot, T-shirt, ...)
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    np.testing.assert_array_equal(train.labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    np.testing.assert_array_equal(test.labels[:10], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])
    assert train.num_classes == 10 and train.class_names[9] == "Ankle boot"


def test_config_normalization_matches_the_data(train):
    x = train.images.astype(np.float64) / 255.0
    aug = fashion_mnist.get_config().augment
    np.testing.assert_allclose(aug.mean[0], x.mean(), atol=1e-3)
    np.testing.assert_allclose(aug.std[0], x.std(), atol=1e-3)


def test_cpu_budget_subset_is_the_first_15000_and_near_balanced(train):
    c = fashion_mnist.get_config("cpu")
    part = load_dataset(c.dataset, c.train_split)
    np.testing.assert_array_equal(part.labels, train.labels[:15000])
    counts = np.bincount(part.labels, minlength=10)
    assert counts.min() == 1445 and counts.max() == 1548  # as the config's comment says
    assert c.eval_split == "test" and len(part) // c.clustering.num_clusters[0] == 300
