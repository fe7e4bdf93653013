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
    if not levels:  # a baseline without prototypes must not ask for prototype terms
        assert not c.objective.proto_loss and not c.objective.prototype_selection

