"""Every value of a training config checked before anything is written: one rule per field.

`RULES` maps each dotted field of the training configs (configs/default.py, the fields the dataset
configs and `configs.apply_vit` add) to its rule: its type, its range, its choices (the rules
themselves: `hcsc_jax.run.rules`). `evaluators.SETTINGS`, which each evaluator module declares for
itself, does the same for the settings of a `config.evals` entry. `RELATIONS` are the checks
between fields (levels shrink, one summary entry, ...);
`WARNINGS` the relations a run may have on purpose but rarely means (`warnings_for`: logged).
`check(config)` raises ConfigError for the first field that breaks its rule, that no rule knows,
or the first relation that fails: one line naming the field, what it accepts and the flag that
sets it (train.py: exit status 2, before the workdir exists).

What needs the data (the number of training images, the channels) is `check_data`, run before
the workdir exists when the data check knows the training split's size, and again with the
channels once the training set is open; the batch, queue and BN groups against the devices, the
objective's own switches and the model against the image sizes are checked by
`trainer.check_values` with the code that uses them.

Bounds are those a run can use: each says in a comment why it is where it is.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any

from hcsc_jax import clustering, evaluators, models, trees
from hcsc_jax.data import crops, loader, pipeline
from hcsc_jax.method import losses, objective, selection, train_step
from hcsc_jax.models import norm, vit
from hcsc_jax.run.rules import (
    BATCH,
    CLUSTERS,
    DIM,
    EVERY_EPOCHS,
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


class ConfigError(ValueError):
    """A config value that cannot train, with what to change (one line)."""



RULES: dict[str, Rule] = {
    "seed": SEED,
    # Data: the data sources check what `dataset` and the splits name.
    "dataset": text(),
    "data_dir": free(optional(text())),
    "train_split": text(),
    "eval_split": text(),
    "image_size": SIDE,
    "init_encoder": optional(text()),
    # Encoder. width: a ResNet's first stage has 64 x width channels (1/64: one); 16 is 4x the
    # widest published ResNet (x4). depth: ViT blocks (ViT-g has 40).
    "model.arch": choice(*models.ARCHS, *models.VIT_ARCHS),
    "model.width": real(1 / 64, 16),
    "model.small_stem": boolean(),
    "model.embed_dim": DIM,
    "model.hidden_dim": optional(DIM, note="None: the backbone's feature size"),
    "model.dtype": choice(*models.COMPUTE_DTYPES),
    "model.depth": optional(integer(1, 64), note="None: the arch's 12"),
    "model.pos_embed": choice(*vit.POS_EMBEDS),
    "model.image_size": optional(SIDE),
    # MoCo machinery and optimizer.
    "batch_size": BATCH,
    "bn_group_size": BATCH,
    "bn_running_stats": added(choice(*norm.RUNNING_STATS), "mean_of_groups"),
    "shuffle_bn": boolean(),
    "shuffle_bn_gather": added(choice(*train_step.SHUFFLE_GATHERS), "views"),
    "queue_size": QUEUE,
    "ema_momentum": real(0, 1),
    "lr": LEARNING_RATE,
    "weight_decay": real(0),
    "sgd_momentum": MOMENTUM,
    "optimizer": added(choice(*train_step.OPTIMIZERS), "sgd"),
    "adam_betas": added(fixed(MOMENTUM, MOMENTUM), [0.9, 0.999]),
    "lr_warmup_epochs": added(integer(0, MAX_EPOCHS), 0),
    "lr_granularity": added(choice(*train_step.LR_GRANULARITIES), "step"),
    "grad_clip": added(real(0, note="0: off"), 0.0),
    "epochs": integer(0, MAX_EPOCHS),
    "warmup_epochs": integer(0, MAX_EPOCHS),
    # Objective.
    "objective.semantics": choice(*losses.SEMANTICS),
    "objective.positive": choice(*objective.POSITIVES),
    "objective.temperature": TEMPERATURE,
    "objective.instance_selection": boolean(),
    "objective.prototype_selection": boolean(),
    "objective.instance_loss": boolean(),
    "objective.proto_loss": boolean(),
    "objective.sampler": choice(*selection.SAMPLERS),
    "objective.selection_on_local": boolean(),
    "objective.proto_negatives": integer(0, 2**20, note="0: every prototype is a negative"),
    "objective.skip_last_prototype": added(boolean(), False),
    # Clustering.
    "clustering.num_clusters": tuple_of(CLUSTERS),
    "clustering.temperature": TEMPERATURE,
    "clustering.niter": NITER,
    "clustering.nredo": NREDO,
    "clustering.max_points_per_centroid": integer(1),
    "clustering.min_points_per_centroid": integer(0),
    "clustering.backend": free(choice(*clustering.BACKENDS)),
    "clustering.mode": choice(*clustering.MODES),
    "clustering.seed_per_epoch": added(boolean(), True),
    # Augmentation. local_views: (crop side, scale range) per view.
    "augment.scale": SCALE,
    "augment.jitter_prob": PROBABILITY,
    "augment.grayscale_prob": PROBABILITY,
    "augment.blur_prob": PROBABILITY,
    "augment.flip": boolean(),
    "augment.mean": MEAN,
    "augment.std": STD,
    "augment.local_views": tuple_of(fixed(LOCAL_SIDE, SCALE)),
    # Input.
    "input.pipeline": choice(*pipeline.PIPELINES),
    "input.num_workers": free(WORKERS),
    "input.prefetch": free(integer(1, 1024)),
    "input.resampling": added(choice(*crops.RESAMPLING), "antialias"),
    "input.bad_images": free(added(choice(*loader.BAD_IMAGES), "skip")),
    "input.max_pixels": free(optional(integer(1))),
    # Outputs.
    "wandb.project": free(optional(text())),
    "wandb.entity": free(optional(text())),
    "wandb.name": free(optional(text())),
    "wandb.mode": free(choice("online", "offline", "disabled")),
    "figures_at_end": free(boolean()),
    "divergence.max_loss": free(real(0, note="0: no limit")),
    "divergence.max_grad_norm": free(real(0, note="0: no limit")),
    "log_every_steps": free(integer(0, note="0: at the end of each epoch only")),
    "checkpoint_every_epochs": free(integer(0, note="0: only at the end")),
    "checkpoint_every_steps": free(STEPS),
    "keep_checkpoints": free(integer(1)),
    "progress_bar": free(boolean()),
}

# Groups a resumed run may change as a whole: the evaluators of `config.evals` (they read the
# encoder, never train it), and `eval`, the one final evaluation of configs written before `evals`
# existed (so that their runs still resume). Each field's own policy is in its rule (`free`, `added`).
FREE_GROUPS = ("evals.", "eval.")

def get(config, field: str) -> Any:
    """The value of the dotted `field` of `config` (a ConfigDict or nested dicts)."""
    node = config
    for key in field.split("."):
        node = node[key]
    return node


def fields(config) -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every leaf field of `config`, in its order."""
    return iter(trees.flatten(config).items())


def rule_for(config, field: str) -> Rule | None:
    """The rule of the dotted `field` of `config`: its `RULES` entry, or for `evals.<name>.<setting>`
    the setting's rule for that entry's protocol; None when no rule knows the field."""
    parts = field.split(".")
    if field in RULES or parts[0] != "evals" or len(parts) != 3:
        return RULES.get(field)
    if parts[2] == "type":
        return choice(*evaluators.PROTOCOLS)
    if parts[2] == "every_epochs":
        return EVERY_EPOCHS
    protocol = evaluators.protocol(parts[1], get(config, f"evals.{parts[1]}"))
    return evaluators.SETTINGS.get(protocol, {}).get(parts[2])


def summary_entries(config) -> list[str]:
    """Names of the `config.evals` entries of type "summary" (at most one: `RELATIONS`)."""
    return [name for name, cfg in config["evals"].items() if evaluators.protocol(name, cfg) == "summary"]


def check(config) -> None:
    """Raises ConfigError, one line naming the field, what it accepts and its flag, for the first
    field of `config` (a ConfigDict or nested dicts) that is an evaluator entry of an unknown protocol
    or without its settings, a field no rule knows, a value its rule refuses; then for the first
    failing `RELATIONS` check."""
    _check_eval_entries(config)
    for field, value in fields(config):
        rule = rule_for(config, field)
        if rule is None:
            raise ConfigError(_unknown(config, field))
        if not rule.ok(value):
            raise ConfigError(f"config.{field} must be {rule.what}, got {value!r}; set --config.{field}")
    for relation in RELATIONS:
        problem = relation(config)
        if problem:
            raise ConfigError(problem)


def _check_eval_entries(config) -> None:
    for name, cfg in config["evals"].items():
        if not hasattr(cfg, "items"):
            raise ConfigError(f"config.evals.{name} must be a dict of settings (type, every_epochs, ...), "
                              f"got {cfg!r}")
        protocol = evaluators.protocol(name, cfg)
        if protocol not in evaluators.PROTOCOLS:
            raise ConfigError(f"config.evals.{name}: unknown evaluator {protocol!r}; known: "
                              f"{', '.join(evaluators.PROTOCOLS)} (or set its 'type')")
        missing = [s for s in ("every_epochs", *evaluators.SETTINGS[protocol])
                   if s not in cfg and s not in evaluators.DEFAULTED[protocol]]
        if missing:
            raise ConfigError(f"config.evals.{name} has no {', '.join(missing)} (settings of the {protocol} "
                              "evaluator); add them to the entry in the config file")


def check_eval_entry(name: str, cfg) -> None:
    """ConfigError, one line, for the `config.evals` entry `name` of an eval config (as eval.py
    runs it): an unknown protocol, a setting its protocol does not have, a value its rule refuses
    (None: left to the training run's config)."""
    protocol = evaluators.protocol(name, cfg)
    if protocol not in evaluators.PROTOCOLS:
        raise ConfigError(f"config.evals.{name}: unknown evaluator {protocol!r}; known: "
                          f"{', '.join(evaluators.PROTOCOLS)} (or set its 'type')")
    settings = evaluators.SETTINGS[protocol]
    for key, value in cfg.items():
        if key in ("type", "every_epochs") or value is None:
            continue
        if key not in settings:
            raise ConfigError(f"config.evals.{name}.{key}: the {protocol} evaluator has no such setting; "
                              f"known: {', '.join(settings)}")
        if not settings[key].ok(value):
            raise ConfigError(f"config.evals.{name}.{key} must be {settings[key].what}, got {value!r}; set "
                              f"--config.evals.{name}.{key}")


def _unknown(config, field: str) -> str:
    parts = field.split(".")
    if parts[0] == "evals" and len(parts) == 3:
        protocol = evaluators.protocol(parts[1], get(config, f"evals.{parts[1]}"))
        known = ", ".join(("type", "every_epochs", *evaluators.SETTINGS[protocol]))
        return (f"config.{field}: the {protocol} evaluator has no setting {parts[2]!r} (known: {known}); "
                "remove it")
    parent, _, name = field.rpartition(".")
    siblings = [f.rpartition(".")[2] for f in RULES if f.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(name, siblings, n=1)
    hint = f" (did you mean config.{parent + '.' if parent else ''}{close[0]}?)" if close else ""
    return f"config.{field} is not a setting of hcsc-jax: nothing reads it{hint}; remove it from the config"


# ---- Relations between fields: each -> None, or the one line saying what to change ----

def _levels_shrink(config) -> str | None:
    """A hierarchy's level clusters the centroids of the level before, so each is smaller: the
    training levels unless clustering.mode is "independent" (PCL), the summary's NMI levels always."""
    names = ["clustering.num_clusters"] if get(config, "clustering.mode") == "hierarchical" else []
    for field in names + [f"evals.{name}.num_clusters" for name in summary_entries(config)]:
        levels = tuple(get(config, field))
        if any(a <= b for a, b in zip(levels, levels[1:])):
            flat = (" (or --config.clustering.mode=independent: flat clusterings of any sizes)"
                    if field.startswith("clustering") else "")
            return (f"config.{field} must shrink level by level (each level clusters the centroids of the "
                    f"one before, e.g. (20, 8, 4)), got {levels}; set --config.{field}{flat}")
    return None


def _one_summary(config) -> str | None:
    """summary.json holds the result of one "summary" entry."""
    names = summary_entries(config)
    if len(names) > 1:
        return (f"config.evals has {len(names)} entries of type 'summary' ({', '.join(names)}); summary.json "
                "holds one: keep one")
    return None


def _mean_std(config) -> str | None:
    """Normalization: one mean and one std per channel."""
    mean, std = get(config, "augment.mean"), get(config, "augment.std")
    if len(mean) != len(std):
        return (f"config.augment.mean and config.augment.std need one entry per channel each, got "
                f"{len(mean)} and {len(std)}; set --config.augment.mean and --config.augment.std")
    return None


def _points_per_centroid(config) -> str | None:
    """faiss subsamples to at most max_points_per_centroid and warns below min_points_per_centroid."""
    low, high = (get(config, f"clustering.{k}_points_per_centroid") for k in ("min", "max"))
    if low > high:
        return (f"config.clustering.min_points_per_centroid ({low}) must be <= "
                f"config.clustering.max_points_per_centroid ({high}); set one of them")
    return None


def _prototype_terms(config) -> str | None:
    """Switches that would do nothing: prototype terms or selections without levels, a selection
    whose loss is off."""
    o = config["objective"]
    asked = [k for k in ("proto_loss", "instance_selection", "prototype_selection") if o[k]]
    if not get(config, "clustering.num_clusters") and asked:
        return (f"config.clustering.num_clusters is () (no prototypes), but config.objective."
                f"{', config.objective.'.join(asked)} need prototypes; set "
                f"{' '.join(f'--config.objective.{k}=False' for k in asked)} (as the mocov2 variants do), "
                "or give levels")
    for selection_, loss in (("prototype_selection", "proto_loss"), ("instance_selection", "instance_loss")):
        if o[selection_] and not o[loss]:
            return (f"config.objective.{selection_} selects negatives of the {loss.replace('_', ' ')}, which "
                    f"{loss}=False turns off; set --config.objective.{selection_}=False")
    return None


def _lr_warmup_within_run(config) -> str | None:
    """The cosine decay of the learning rate follows its warm-up: at least one epoch of it."""
    warmup, epochs = get(config, "lr_warmup_epochs"), get(config, "epochs")
    if warmup and get(config, "lr_granularity") == "epoch":
        return ("config.lr_granularity='epoch' holds the lr of each epoch's first step, which in a linear "
                "warm-up from 0 is 0 for the whole first epoch; set --config.lr_warmup_epochs=0 "
                "(the authors' schedule has none) or --config.lr_granularity=step")
    if warmup and epochs and warmup >= epochs:
        return (f"config.lr_warmup_epochs ({warmup}) must be smaller than config.epochs ({epochs}): the "
                "learning rate decays after its warm-up; set a smaller --config.lr_warmup_epochs (0: none)")
    return None


def _first_group_per_view(config) -> str | None:
    """First-group statistics are updated once per forward pass; local views of one size share one."""
    sizes = [size for size, _ in get(config, "augment.local_views")]
    if get(config, "bn_running_stats") == "first_group" and len(set(sizes)) < len(sizes):
        return ("config.bn_running_stats='first_group' updates the running statistics once per forward "
                f"pass, and local views of one size ({sorted(sizes)}) share one (the authors update once per "
                "view); give each local view its own size or set --config.bn_running_stats=mean_of_groups")
    return None


RELATIONS: tuple[Callable[[Any], str | None], ...] = (
    _levels_shrink, _one_summary, _mean_std, _points_per_centroid, _prototype_terms, _lr_warmup_within_run,
    _first_group_per_view)


# ---- Relations a run can have on purpose, but rarely means: each -> None, or a warning line ----

def _no_prototype_epoch(config) -> str | None:
    """Prototype levels set, but the warm-up (instance loss only, docs/method.md §6) lasts the whole
    run: a short run that will be resumed with more epochs does this on purpose."""
    levels, epochs, warmup = (get(config, f) for f in ("clustering.num_clusters", "epochs", "warmup_epochs"))
    if levels and 0 < epochs <= warmup:
        return (f"config.warmup_epochs ({warmup}) >= config.epochs ({epochs}): no epoch of this run uses "
                f"the prototypes {tuple(levels)} (it trains the instance loss only, as MoCo v2); set "
                f"--config.warmup_epochs below {epochs} for HCSC, or resume later with more epochs")
    return None


WARNINGS: tuple[Callable[[Any], str | None], ...] = (_no_prototype_epoch,)


def warnings_for(config) -> list[str]:
    """The `WARNINGS` lines of `config` (train.py logs them before it trains; nothing is refused)."""
    return [line for line in (w(config) for w in WARNINGS) if line]


def check_data(config, num_examples: int, channels: int | None = None) -> None:
    """ConfigError for sizes the training set (`num_examples` images of `channels` channels)
    cannot give: a global batch, a first level, a kNN k or a cluster evaluation's k larger than
    it, or fewer normalization entries than channels (not checked when `channels` is None)."""
    n, where = num_examples, f"{get(config, 'dataset')}:{get(config, 'train_split')}"
    if get(config, "batch_size") > n:
        raise ConfigError(f"config.batch_size {get(config, 'batch_size')} is larger than the {n} training "
                          f"images of {where}; set a smaller --config.batch_size")
    sizes = [("clustering.num_clusters", tuple(get(config, "clustering.num_clusters"))[:1])]
    for name, cfg in config["evals"].items():
        protocol = evaluators.protocol(name, cfg)
        sizes += [(f"evals.{name}.{k}", tuple(cfg[k]) if k != "knn_k" else (cfg[k],))
                  for k in evaluators.SIZED.get(
                      protocol, ())]
    for field, values in sizes:
        if values and max(values) > n:
            raise ConfigError(f"config.{field} = {max(values)} exceeds the {n} training images of {where}; "
                              f"set --config.{field} to at most {n}")
    entries = len(get(config, "augment.mean"))
    if channels is not None and entries < channels:
        raise ConfigError(f"config.augment.mean and config.augment.std have {entries} entries for the "
                          f"{channels}-channel images of {where}; give {channels}")
