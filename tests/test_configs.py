"""Every shipped config is consistent: batch, queue and BN groups fit, levels make a tree."""

import importlib
import pathlib

import pytest

from hcsc_jax import train_step, trainer

CONFIGS = sorted(p.stem for p in pathlib.Path(__file__).parent.parent.joinpath("configs").glob("*.py")
                 if p.stem not in ("__init__", "default") and not p.stem.startswith("eval"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_consistent(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    train_step.check_batch_config(c.batch_size, c.queue_size, c.bn_group_size, 1)
    levels = list(c.clustering.num_clusters)
    assert levels == sorted(levels, reverse=True) and len(set(levels)) == len(levels)
    trainer.objective_config(c)  # validates semantics, positive, sampler, switches
    assert 0 <= c.warmup_epochs <= c.epochs
    assert len(c.augment.mean) == len(c.augment.std)
    trainer.check_evals(c)
    if not levels:  # a baseline without prototypes must not ask for prototype terms
        assert not c.objective.proto_loss and not c.objective.prototype_selection



@pytest.mark.parametrize("name", CONFIGS)
def test_config_views_build(name):
    """Every view (global and multi-crop local) is a valid augmentation for both pipelines."""
    c = importlib.import_module(f"configs.{name}").get_config()
    channels = len(c.augment.mean)
    q, k, local, _ = trainer.view_configs(c, channels)
    assert q.crop_size == k.crop_size == c.image_size and q.random_crop
    assert [v.crop_size for v in local] == [size for size, _ in c.augment.local_views]
    assert len(trainer.host_crops(c)) == 2 + len(c.augment.local_views)
    assert c.input.pipeline in ("memory", "stream") and c.clustering.backend in ("faiss", "jax")


def test_imagenet_configs_hold_the_published_settings():
    """Spec §6 and §1: the settings behind the paper's 200-epoch ImageNet numbers."""
    from configs import imagenet_hcsc_200ep, imagenet_hcsc_multicrop_200ep

    for c in (imagenet_hcsc_200ep.get_config(), imagenet_hcsc_multicrop_200ep.get_config()):
        assert (c.model.arch, c.model.width, c.model.small_stem, c.model.embed_dim) == ("resnet50", 1.0, False, 128)
        assert (c.batch_size, c.bn_group_size, c.queue_size, c.ema_momentum) == (256, 32, 16384, 0.999)
        assert (c.lr, c.weight_decay, c.sgd_momentum, c.epochs, c.warmup_epochs) == (0.03, 1e-4, 0.9, 200, 20)
        assert tuple(c.clustering.num_clusters) == (3000, 2000, 1000)
        assert (c.clustering.niter, c.clustering.nredo, c.clustering.max_points_per_centroid) == (20, 5, 1000)
        assert c.objective.temperature == 0.2 and c.image_size == 224 and tuple(c.augment.scale) == (0.2, 1.0)
        assert (c.augment.jitter_prob, c.augment.grayscale_prob, c.augment.blur_prob) == (0.8, 0.2, 0.5)
        assert c.model.dtype == "bfloat16" and c.input.pipeline == "stream"
    assert imagenet_hcsc_200ep.get_config().augment.local_views == ()
    local = imagenet_hcsc_multicrop_200ep.get_config().augment.local_views
    assert tuple((s, tuple(sc)) for s, sc in local) == (
        (192, (0.172, 0.86)), (160, (0.143, 0.715)), (128, (0.114, 0.571)), (96, (0.086, 0.429)))


def test_bad_evals_say_what_to_change():
    from configs import digits

    c = digits.get_config()
    c.evals.nope = dict(every_epochs=1)
    with pytest.raises(ValueError, match=r"config.evals.nope: unknown evaluator 'nope'; known: knn, linear"):
        trainer.check_evals(c)
    c = digits.get_config()
    c.evals.knn.every_epochs = 0
    with pytest.raises(ValueError, match=r"every_epochs must be >= 1"):
        trainer.check_evals(c)
