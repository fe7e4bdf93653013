"""A training config -> the parts of a run: encoder, optimizer, train state, step functions, views.

trainer.py builds its run with `build`, benchmarks/train_step.py times the step `build` returns
and visualize.py normalizes images with `view_configs`, so all three run the same code:

    parts = setup.build(config, channels, steps_per_epoch, mesh)
    state, metrics = parts.warmup_step(state, images, labels, None)            # warm-up epochs
    state, metrics = parts.prototype_step(state, images, labels, prototypes)   # after them

The input (`make_input`) is opened from the same config: "memory" keeps the dataset on the
devices, "stream" decodes and crops on the host (`host_crops`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from hcsc_jax import models, sharding
from hcsc_jax.data import augmentations, pipeline
from hcsc_jax.data.crops import CropSpec
from hcsc_jax.method import objective, train_step
from hcsc_jax.run import checkpoints

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """What `build` makes of a config.

    model_meta: `models.encoder_meta` of the encoder (stored with every checkpoint);
    graphdef: its `models.split_model` graph; tx, schedule: the optax optimizer and its lr schedule
    (step -> lr); state: the initial `train_step.TrainState`, replicated over the mesh (its
    `jax.ShapeDtypeStruct`s when built `abstract`);
    warmup_step / prototype_step: the jitted steps (state, images, labels, prototypes) -> (state,
    metrics) of the instance-only warm-up epochs and of the epochs with prototypes;
    refresh_lse: state, prototypes -> state with the queue's ICSC normalizers for new prototypes;
    mean_std: the per-channel normalization of the views (and of every center crop).
    """

    model_meta: dict
    graphdef: Any
    tx: Any
    schedule: Callable
    state: train_step.TrainState
    warmup_step: Callable
    prototype_step: Callable
    refresh_lse: Callable
    mean_std: tuple[tuple, tuple]


def build(config, channels: int, steps_per_epoch: int, mesh, abstract: bool = False) -> TrainingSetup:
    """The parts of a run of `config` on `channels`-channel images, `steps_per_epoch` global
    batches per epoch (for the lr schedule), on `mesh`. The encoder is initialized from
    `config.seed` or, when set, `config.init_encoder`. `abstract`: nothing is allocated, the state
    is `jax.ShapeDtypeStruct`s with the shardings the trainer gives it (`jax.eval_shape`), for
    compiling the steps ahead of time on a mesh of devices that need not exist (`hcsc_jax.aot`)."""
    meta = models.encoder_meta(config.model.to_dict(), channels, config.bn_group_size)
    # The running-statistics rule is the training run's, not the encoder's: a restored or exported
    # encoder (fine-tuning, probes) averages its BN groups.
    model = models.build_encoder(meta, abstract=abstract, seed=config.seed,
                                 bn_running_stats=config.bn_running_stats)
    if config.get("init_encoder") and not abstract:
        init_from(model, config.init_encoder)
    graphdef = models.split_model(model)[0]
    tx, schedule = make_optimizer(config, steps_per_epoch)
    replicated = sharding.replicated(mesh)
    init = lambda model: train_step.init_state(model, tx, config.queue_size, config.model.embed_dim,
                                       len(config.clustering.num_clusters), config.seed)
    if abstract:
        shapes = jax.eval_shape(lambda: init(models.build_encoder(meta, seed=config.seed,
                                                                  bn_running_stats=config.bn_running_stats)))
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
    else:
        state = jax.device_put(init(model), replicated)
    step_cfg = step_config(config, channels)
    return TrainingSetup(
        model_meta=meta, graphdef=graphdef, tx=tx, schedule=schedule,
        state=state,
        warmup_step=train_step.jit_train_step(graphdef, tx, step_cfg, mesh, warmup=True),
        prototype_step=train_step.jit_train_step(graphdef, tx, step_cfg, mesh, warmup=False),
        refresh_lse=jax.jit(train_step.refresh_queue_lse, out_shardings=replicated, donate_argnums=(0,)),
        mean_std=view_configs(config, channels)[3])


def step_config(config, channels: int) -> train_step.StepConfig:
    """The step's static settings under `config` for `channels`-channel images."""
    view_q, view_k, view_local, _ = view_configs(config, channels)
    return train_step.StepConfig(objective=objective_config(config), view_q=view_q, view_k=view_k,
                         view_local=view_local, ema_momentum=config.ema_momentum,
                         shuffle_bn=config.shuffle_bn, shuffle_gather=config.shuffle_bn_gather)


def make_optimizer(config, steps_per_epoch: int):
    """-> (optax transformation, lr schedule) of `config` (see `train_step.make_optimizer`) for a
    run of `config.epochs` epochs of `steps_per_epoch` steps."""
    return train_step.make_optimizer(
        config.lr, config.batch_size, steps_per_epoch * config.epochs, config.weight_decay,
        config.sgd_momentum, optimizer=config.optimizer,
        warmup_steps=config.lr_warmup_epochs * steps_per_epoch, grad_clip=config.grad_clip,
        betas=tuple(config.adam_betas),
        hold_steps=steps_per_epoch if config.lr_granularity == "epoch" else 1)


def objective_config(config) -> objective.ObjectiveConfig:
    """`config.objective` as the step's static `ObjectiveConfig` (its fields, plus the BN group)."""
    return objective.ObjectiveConfig(**config.objective, group_size=config.bn_group_size)


def view_configs(config, channels: int):
    """-> (query view, key view, tuple of local views, (mean, std)) augmentation configs: the
    fields of `config.augment` at `config.image_size` with the normalization of `channels`-channel
    images (`augmentations.channel_stats`), and each `local_views` entry's (size, scale)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.augment.to_dict().items()}
    local_views = fields.pop("local_views")
    mean, std = augmentations.channel_stats(fields.pop("mean"), fields.pop("std"), channels)
    view = augmentations.AugmentConfig(crop_size=config.image_size, mean=mean, std=std, **fields)
    local = tuple(dataclasses.replace(view, crop_size=size, scale=tuple(scale))
                  for size, scale in local_views)
    return view, view, local, (mean, std)


def host_crops(config) -> tuple[CropSpec, ...]:
    """The streaming path's host crops: query, key, then the local views."""
    a = config.augment
    view = CropSpec(config.image_size, tuple(a.scale))
    return (view, view) + tuple(CropSpec(size, tuple(scale)) for size, scale in a.local_views)


def make_input(config, split: str, mesh, train: bool = True):
    """The dataset `split` as `config.input.pipeline` says: "memory" (resident on the devices)
    or "stream" (host decoding and crops; `train=False`: the feature pass only)."""
    i = config.input
    crops = host_crops(config) if train else ()
    return pipeline.open_input(i.pipeline, config.dataset, split, config.get("data_dir"), mesh,
                               config.batch_size, config.seed, crops, i.num_workers, i.prefetch,
                               resampling=i.resampling, bad_images=i.bad_images, max_pixels=i.max_pixels)


def check_init_encoder(config) -> None:
    """ValueError, one line, when `config.init_encoder` cannot start a run of `config`: it is
    neither a workdir nor an exported encoder, or it holds another architecture than config.model
    (train.py: before the workdir is written). From its meta alone: the weights are read, and
    checked, once, by `init_from`."""
    path = config.get("init_encoder")
    if not path:
        return
    try:
        meta = checkpoints.restore_encoder(path, meta_only=True)[1]
    except (OSError, checkpoints.NoReadableStep) as err:  # (FileNotFoundError, WorkdirError)
        raise ValueError(f"config.init_encoder: {err}") from None
    target = models.encoder_meta(config.model.to_dict(), meta["in_channels"], config.bn_group_size)
    _same_architecture(models.build_encoder(meta, abstract=True), models.build_encoder(target, abstract=True),
                       path, meta)


def _same_architecture(source, model, path: str, meta: dict) -> None:
    shapes = lambda m: jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(nnx.state(m)))
    if shapes(source) != shapes(model):
        raise ValueError(
            f"init_encoder {path} holds a different architecture than config.model "
            f"({meta['model']}, in_channels {meta['in_channels']}); set config.model to match it")


def init_from(model, path: str) -> None:
    """Overwrites `model`'s parameters and BN statistics with those of the encoder at `path`
    (a workdir or an exported / PyTorch-imported encoder); the architectures must match."""
    source, meta = checkpoints.restore_encoder(path)
    _same_architecture(source, model, path, meta)
    nnx.update(model, nnx.state(source))
    source_step = f"the query encoder of step {meta['step']}" if "step" in meta else "an exported encoder"
    log.info("both encoders start from %s: %s (%s, width %s)", path, source_step, meta["model"]["arch"],
             meta["model"]["width"])
