"""The runlocal variant of every training config trains end to end on tiny data made here: a
warm-up epoch and a prototype epoch through the config's own input pipeline, architecture,
dtype, k-means backend and evaluators. (digits.py:runlocal is tests/test_trainer.py's run.)"""

import json
import os

import imagenet_like
import numpy as np
import pytest

from configs import cifar10, fashion_mnist, imagenet_hcsc_200ep, imagenet_hcsc_multicrop_200ep
from hcsc_jax import clustering
from hcsc_jax.run import trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return dict(imagenet=imagenet_like.make_folder(str(root / "imagenet")),  # 30 train / 12 val JPEGs
                fashion=imagenet_like.make_fashion_mnist(str(root / "fashion")))  # 128 / 64


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_run(workdir, summary, c, steps_per_epoch):
    """Two epochs (warm-up, then prototypes) of `steps_per_epoch` steps, finite losses, one
    hierarchy of the config's levels, the final evaluation of its levels."""
    assert (c.epochs, c.warmup_epochs) == (2, 1)
    assert summary["step"] == 2 * steps_per_epoch
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    steps = [r for r in records if "type" not in r]
    assert [r["step"] for r in steps] == list(range(1, 2 * steps_per_epoch + 1))  # log_every_steps 1
    assert all(np.isfinite(r["loss"]) for r in steps)
    epochs = [r for r in records if r.get("type") == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    levels = tuple(c.clustering.num_clusters)
    assert "loss_proto" not in epochs[0] and ("loss_proto" in epochs[1]) == bool(levels)
    if levels:
        assert os.listdir(os.path.join(workdir, "hierarchy")) == ["epoch_0001.npz"]
        h = clustering.Hierarchy.from_arrays(np.load(os.path.join(workdir, "hierarchy", "epoch_0001.npz")))
        assert h.num_clusters == levels
    assert summary["num_clusters"] == list(c.evals.summary.num_clusters) and 0 <= summary["knn_top1"] <= 1
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == summary


@pytest.mark.slow
@pytest.mark.parametrize("module", [imagenet_hcsc_200ep, imagenet_hcsc_multicrop_200ep],
                         ids=["single", "multicrop"])
def test_imagenet_runlocal_trains_on_an_image_folder(module, data, tmp_path):
    c = module.get_config("runlocal")
    assert c.dataset == "folder:/tmp/imagenet_tiny"  # `python tests/imagenet_like.py` makes it
    c.dataset = f"folder:{data['imagenet']}"
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    check_run(str(tmp_path), summary, c, steps_per_epoch=30 // 16)
    assert (c.model.arch, c.model.dtype, c.input.pipeline, c.clustering.backend) == (
        "resnet50", "bfloat16", "stream", "jax")
    records = read_jsonl(tmp_path / "metrics.jsonl")
    evals = [r for r in records if r.get("type") == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1] and "knn/per_k/5/top1" in evals[-1]
    local = [r for r in records if "type" not in r and "loss_local_instance" in r]
    assert len(local) == (2 if c.augment.local_views else 0)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["runlocal", "mocov2,runlocal", "pcl,runlocal"])
def test_fashion_mnist_runlocal_trains_on_generated_idx_files(variant, data, tmp_path):
    c = fashion_mnist.get_config(variant)
    assert c.data_dir == "/tmp/fashion_mnist_tiny"  # `python tests/imagenet_like.py` makes it
    c.data_dir = data["fashion"]
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    check_run(str(tmp_path), summary, c, steps_per_epoch=128 // 64)


@pytest.mark.slow
def test_cifar10_runlocal_trains_on_mock_tfds(tmp_path):
    import tensorflow_datasets as tfds

    c = cifar10.get_config("runlocal")
    assert (c.dataset, c.train_split, c.eval_split) == ("tfds:cifar10", "train[:256]", "test[:128]")
    with tfds.testing.mock_data(num_examples=128):  # every split: 128 random 32x32 images
        summary = trainer.train_and_evaluate(c, str(tmp_path))
    check_run(str(tmp_path), summary, c, steps_per_epoch=128 // 64)
