"""Every field of a training config, declared once: its default, its rule (what it accepts, from
`hcsc_jax.run.rules`) and with the rule its resume policy (`free`: a resumed run may change it;
`added`: what an older config.json means by leaving it out).

`defaults()` is the config these make, the published HCSC ImageNet settings (docs/method.md §6):
configs/default.py returns it and the dataset configs override what differs. `config_checks.RULES`,
`resume.SAFE_TO_CHANGE` / `ADDED_FIELDS` and the evaluators' input defaults (`default`) are read
from `FIELDS`. A field a variant adds (`configs.apply_vit`: the ViT's) is declared with
`VARIANT_ONLY`: it has a rule but is not in `defaults()`. The settings of a `config.evals` entry
are declared by its evaluator module (`evaluators.SETTINGS`); `EVALS` is the default entry.

Choices are the tuples of the modules that implement them (`models.ARCHS`, `pipeline.PIPELINES`,
...). Bounds are in `rules`, each with its reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from hcsc_jax import clustering, models
from hcsc_jax.data import crops, loader, pipeline
from hcsc_jax.data.decode import MAX_PIXELS
from hcsc_jax.method import losses, objective, selection, train_step
from hcsc_jax.models import norm, vit
from hcsc_jax.run.rules import (
    BATCH,
    CLUSTERS,
    DIM,
    LEARNING_RATE,
    LOCAL_SIDE,
    MAX_EPOCHS,
    MEAN,
    MOMENTUM,
    NITER,
    NREDO,
    PROBABILITY,
    QUEUE,
    SCALE,
    SEED,
    SIDE,
    STD,
    STEPS,
    TEMPERATURE,
    WORKERS,
    Rule,
    added,
    boolean,
    choice,
    fixed,
    free,
    integer,
    optional,
    real,
    text,
    tuple_of,
)

VARIANT_ONLY = object()  # the default of a field that only the variants adding it set


@dataclasses.dataclass(frozen=True)
class Field:
    """A training-config field: its `default` (VARIANT_ONLY: not in `defaults()`), its `rule`, and for
    a None default the `type` that `--config.<field>=...` parses to (an ml_collections placeholder)."""

    default: Any
    rule: Rule
    type: type | None = None


FIELDS: dict[str, Field] = {
    "seed": Field(0, SEED),

    # ---- Data: the data sources check what `dataset` and the splits name ----
    "dataset": Field("tfds:imagenet2012", text()),
    "data_dir": Field(None, free(optional(text())), str),  # None: the TFDS default, or the source's own
    "train_split": Field("train", text()),
    "eval_split": Field("validation", text()),
    "image_size": Field(224, SIDE),  # crop size of both views
    # Optional initialization of both encoders from an encoder checkpoint (a train.py workdir, or a
    # directory from `python -m hcsc_jax.convert import-torch`); architectures must match.
    "init_encoder": Field(None, optional(text()), str),

    # ---- Encoder: ResNet-50 (torchvision v1.5) + 2048-2048-128 MLP head, no BN in the head ----
    # A ViT (arch "vit_s16", ...: models/vit.py, `configs.apply_vit`) also reads model.depth,
    # pos_embed and image_size. width: a ResNet's first stage has 64 x width channels (1/64: one);
    # 16 is 4x the widest published ResNet (x4).
    "model.arch": Field("resnet50", choice(*models.ARCHS, *models.VIT_ARCHS)),
    "model.width": Field(1.0, real(1 / 64, 16)),
    "model.small_stem": Field(False, boolean()),
    "model.embed_dim": Field(128, DIM),
    "model.hidden_dim": Field(None, optional(DIM, note="None: the backbone's feature size"), int),
    "model.dtype": Field("float32", choice(*models.COMPUTE_DTYPES)),
    "model.depth": Field(VARIANT_ONLY, optional(integer(1, 64), note="None: the arch's 12")),  # ViT-g: 40
    "model.pos_embed": Field(VARIANT_ONLY, choice(*vit.POS_EMBEDS)),
    "model.image_size": Field(VARIANT_ONLY, optional(SIDE)),  # the grid of the exported pos_embed

    # ---- MoCo machinery and optimizer ----
    "batch_size": Field(256, BATCH),  # global
    "bn_group_size": Field(32, BATCH),
    # What BatchNorm's running statistics (eval mode: clustering features, kNN, linear probes)
    # follow: "mean_of_groups" (every BN group's statistics, averaged) or "first_group" (the first
    # group's: the authors' DDP runs, where broadcast_buffers copies rank 0's to every rank).
    "bn_running_stats": Field("mean_of_groups", added(choice(*norm.RUNNING_STATS), "mean_of_groups")),
    "shuffle_bn": Field(True, boolean()),
    # How ShuffleBN permutes the key view across devices (train_step.SHUFFLE_GATHERS): "views" (the
    # same run on any number of processes, but every device runs the key encoder on the whole batch)
    # or "images" (each device on its share; what the pod configs use).
    "shuffle_bn_gather": Field("views", added(choice(*train_step.SHUFFLE_GATHERS), "views")),
    "queue_size": Field(16384, QUEUE),
    "ema_momentum": Field(0.999, real(0, 1)),
    "lr": Field(0.03, LEARNING_RATE),  # at batch 256; scaled linearly with the global batch
    "weight_decay": Field(1e-4, real(0)),
    "sgd_momentum": Field(0.9, MOMENTUM),
    # "sgd" (MoCo v2, above) or "adamw" (MoCo v3's ViT recipe: decoupled weight_decay, adam_betas);
    # lr_warmup_epochs of linear warm-up before the cosine decay; grad_clip > 0: clip to that norm.
    "optimizer": Field("sgd", added(choice(*train_step.OPTIMIZERS), "sgd")),
    "adam_betas": Field((0.9, 0.999), added(fixed(MOMENTUM, MOMENTUM), [0.9, 0.999])),
    "lr_warmup_epochs": Field(0, added(integer(0, MAX_EPOCHS), 0)),
    # "step": the lr follows its schedule every step; "epoch": held for an epoch at the value of
    # its first step (the authors' adjust_learning_rate: a per-epoch cosine). Not with lr warm-up.
    "lr_granularity": Field("step", added(choice(*train_step.LR_GRANULARITIES), "step")),
    "grad_clip": Field(0.0, added(real(0, note="0: off"), 0.0)),
    "epochs": Field(200, integer(0, MAX_EPOCHS)),
    "warmup_epochs": Field(20, integer(0, MAX_EPOCHS)),  # instance loss only, no prototypes

    # ---- HCSC objective (hcsc_jax.method.objective.ObjectiveConfig) ----
    "objective.semantics": Field("paper", choice(*losses.SEMANTICS)),
    "objective.positive": Field("assignment", choice(*objective.POSITIVES)),
    "objective.temperature": Field(0.2, TEMPERATURE),
    "objective.instance_selection": Field(True, boolean()),
    "objective.prototype_selection": Field(True, boolean()),
    "objective.instance_loss": Field(True, boolean()),
    "objective.proto_loss": Field(True, boolean()),
    "objective.sampler": Field("hash", choice(*selection.SAMPLERS)),
    "objective.selection_on_local": Field(False, boolean()),  # multi-crop: local InfoNCE with the masks too
    # PCL's r: sampled negative prototypes per level (0: all, HCSC).
    "objective.proto_negatives": Field(0, integer(0, 2**20, note="0: every prototype is a negative")),
    # True: the authors' off-by-one (docs/method.md §9).
    "objective.skip_last_prototype": Field(False, added(boolean(), False)),

    # ---- Hierarchical k-means between epochs (docs/method.md §1); () = no prototypes ----
    "clustering.num_clusters": Field((3000, 2000, 1000), tuple_of(CLUSTERS)),
    "clustering.temperature": Field(0.2, TEMPERATURE),
    "clustering.niter": Field(20, NITER),
    "clustering.nredo": Field(5, NREDO),
    "clustering.max_points_per_centroid": Field(1000, integer(1)),
    "clustering.min_points_per_centroid": Field(10, integer(0)),
    # "faiss" (host CPU), "jax" (the same Lloyd iterations on the accelerators) or "auto": "jax"
    # when JAX has accelerators, "faiss" on CPU-only hosts (clustering.resolve_backend).
    "clustering.backend": Field("auto", free(choice(*clustering.BACKENDS))),
    # True: epoch e's k-means seed is seed + 1000 e + level (a new draw every epoch); False:
    # seed + level every epoch (the authors: 0, 1, 2 per level, as at seed 0).
    "clustering.seed_per_epoch": Field(True, added(boolean(), True)),
    # "hierarchical", or "independent": flat k-means per level, no parents (PCL).
    "clustering.mode": Field("hierarchical", choice(*clustering.MODES)),

    # ---- Augmentation (MoCo v2, docs/method.md §6) ----
    "augment.scale": Field((0.2, 1.0), SCALE),
    "augment.jitter_prob": Field(0.8, PROBABILITY),
    "augment.grayscale_prob": Field(0.2, PROBABILITY),
    "augment.blur_prob": Field(0.5, PROBABILITY),
    "augment.flip": Field(True, boolean()),
    "augment.mean": Field((0.485, 0.456, 0.406), MEAN),
    "augment.std": Field((0.229, 0.224, 0.225), STD),
    # Multi-crop (docs/method.md §6): local views through the query encoder only, as
    # ((crop_size, (scale_lo, scale_hi)), ...); empty = the two-view method.
    "augment.local_views": Field((), tuple_of(fixed(LOCAL_SIDE, SCALE))),

    # ---- Input ----
    # "memory": the dataset is decoded once and kept on the devices, every crop is taken there
    # (digits, Fashion-MNIST, CIFAR). "stream": each process's loader workers decode its share of
    # every batch and take the random-resized crops on the host; flip and photometric ops still run
    # on the devices.
    "input.pipeline": Field("memory", choice(*pipeline.PIPELINES)),
    "input.num_workers": Field(-1, free(WORKERS)),  # loader worker processes (see WORKERS)
    "input.prefetch": Field(2, free(integer(1, 1024))),  # batches each worker keeps ready
    # The host crops' resampling: "linear" (OpenCV bilinear, fast) or "antialias" (Pillow, as torchvision).
    "input.resampling": Field("linear", added(choice(*crops.RESAMPLING), "antialias")),
    # An undecodable image: "skip" (warn, use the next readable image) or "error" (stop).
    "input.bad_images": Field("skip", free(added(choice(*loader.BAD_IMAGES), "skip"))),
    # An image whose header says more pixels is refused before decoding, and a file of more than 4
    # bytes per such pixel before reading, as bad_images says (Pillow's decompression-bomb limit
    # PIL.Image.MAX_IMAGE_PIXELS; data/decode.py).
    "input.max_pixels": Field(MAX_PIXELS, free(optional(integer(1)))),

    # ---- Outputs ----
    # Metrics go to metrics.jsonl and TensorBoard event files (<workdir>/tensorboard); also to
    # Weights & Biases when wandb.project is set (pip install wandb; mode "offline" writes to the
    # workdir for `wandb sync` later).
    "wandb.project": Field(None, free(optional(text())), str),
    "wandb.entity": Field(None, free(optional(text())), str),
    "wandb.name": Field(None, free(optional(text())), str),
    "wandb.mode": Field("online", free(choice("online", "offline", "disabled"))),
    # Training-curve and cluster figures in <workdir>/figures at the end of a run (all figures:
    # python -m hcsc_jax.visualize WORKDIR).
    "figures_at_end": Field(True, free(boolean())),
    # Divergence guard: stop (keeping the last checkpoint) when a step's loss or gradient norm is
    # above these (0: no limit). A NaN or inf loss always stops the run.
    "divergence.max_loss": Field(0.0, free(real(0, note="0: no limit"))),
    "divergence.max_grad_norm": Field(0.0, free(real(0, note="0: no limit"))),
    # Bookkeeping.
    "log_every_steps": Field(50, free(integer(0, note="0: at the end of each epoch only"))),
    "checkpoint_every_epochs": Field(5, free(integer(0, note="0: only at the end"))),
    "checkpoint_every_steps": Field(0, free(STEPS)),  # also save mid-epoch every N global steps
    "keep_checkpoints": Field(3, free(integer(1))),
    "progress_bar": Field(True, free(boolean())),
}

# The evaluators (hcsc_jax/evaluators/), one schema with configs/eval_*.py: name -> {type (the
# protocol; default: the name), every_epochs (0: after the last epoch only), its settings}. Each
# runs every `every_epochs` epochs and after the last; results in metrics.jsonl ("type": "eval",
# "<name>/<metric>"). The entry of type "summary" is summary.json: kNN top-1 on `eval_split`
# (k = knn_k) and the NMI of a hierarchy of the key encoder's projections with levels
# `num_clusters` (empty: no NMI); without one, summary.json holds only step and epochs. A resumed
# run may change them all (`config_checks.FREE_GROUPS`).
EVALS = dict(summary=dict(type="summary", every_epochs=0, knn_k=20, knn_temperature=0.07,
                          num_clusters=(1000,)))


def default(field: str) -> Any:
    """The default of the dotted `field` (KeyError for a field not declared or only a variant's)."""
    value = FIELDS[field].default
    if value is VARIANT_ONLY:
        raise KeyError(f"config.{field} has no default: only the variants that add it set it")
    return value


def defaults() -> ml_collections.ConfigDict:
    """The default training config: every field of `FIELDS` but the variants' at its default (a None
    default a placeholder of its type), and `evals` = `EVALS`. A new object on every call."""
    c = ml_collections.ConfigDict()
    for field, f in FIELDS.items():
        if f.default is VARIANT_ONLY:
            continue
        *groups, name = field.split(".")
        node = c
        for group in groups:
            if group not in node:
                node[group] = ml_collections.ConfigDict()
            node = node[group]
        node[name] = ml_collections.config_dict.placeholder(f.type) if f.default is None else f.default
    c.evals = ml_collections.ConfigDict(EVALS)  # (nested dicts become new ConfigDicts: EVALS is not shared)
    return c
