"""Every value of a training config checked before anything is written: one rule per field.

`RULES` maps each dotted field of the training configs (configs/default.py, the fields the dataset
configs and `configs.apply_vit` add) to its rule: its type, its range, its choices.
`EVAL_SETTINGS` does the same for the settings of each evaluator protocol of a `config.evals`
entry. `RELATIONS` are the checks between fields (levels shrink, one summary entry, ...);
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

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterator
from typing import Any

from hcsc_jax import clustering, console, evaluators, losses, models, objective, selection, train_step, trees
from hcsc_jax.data import crops, loader, pipeline
from hcsc_jax.models import norm, vit


class ConfigError(ValueError):
    """A config value that cannot train, with what to change (one line)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field accepts: `ok(value)`, said as `what` ("an integer >= 1"); `example` is a value it
    accepts and `bad` (kind, value) pairs it refuses, one of each kind (for the tests)."""

    what: str
    ok: Callable[[Any], bool]
    example: Any
    bad: tuple[tuple[str, Any], ...]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(x) -> str:
    return str(x) if _is_int(x) else f"{x:g}"


def _range(min_, max_, above=None, below=None) -> str:
    """">= 1", "> 0", "in [0, 1)", ...: the bounds given (None: none)."""
    low = min_ if min_ is not None else above
    high = max_ if max_ is not None else below
    if low is not None and high is not None:
        return (f"in {'[' if min_ is not None else '('}{_fmt(low)}, {_fmt(high)}"
                f"{']' if max_ is not None else ')'}")
    if low is not None:
        return f"{'>=' if min_ is not None else '>'} {_fmt(low)}"
    return f"{'<=' if max_ is not None else '<'} {_fmt(high)}" if high is not None else ""


def integer(min: int | None = None, max: int | None = None, note: str = "") -> Rule:
    """An int (not a bool) in [min, max] (None: unbounded)."""
    what = " ".join(filter(None, ["an integer", _range(min, max), f"({note})" if note else ""]))
    bad = [("wrong type", "x"), ("wrong type", 1.5)]
    bad += [("out of range", min - 1)] if min is not None else []
    bad += [("out of range", max + 1)] if max is not None else []
    return Rule(what, lambda v: _is_int(v) and (min is None or v >= min) and (max is None or v <= max),
                min if min is not None else (max if max is not None else 0), tuple(bad))


def real(min: float | None = None, max: float | None = None, *, above: float | None = None,
         below: float | None = None, note: str = "") -> Rule:
    """A finite int or float with min <= v <= max, above < v < below (None: unbounded)."""
    what = " ".join(filter(None, ["a finite number", _range(min, max, above, below),
                                  f"({note})" if note else ""]))

    def ok(v) -> bool:
        return (_is_number(v) and (min is None or v >= min) and (max is None or v <= max)
                and (above is None or v > above) and (below is None or v < below))

    lo = min if min is not None else (above if above is not None else 0.0)
    hi = max if max is not None else (below if below is not None else lo + 2.0)
    bad = [("wrong type", "x"), ("wrong type", True), ("nan", math.nan), ("inf", math.inf),
           ("inf", -math.inf)]
    bad += [("out of range", min - 1 - abs(min))] if min is not None else []
    bad += [("out of range", above)] if above is not None else []
    bad += [("out of range", max + 1 + abs(max))] if max is not None else []
    bad += [("out of range", below)] if below is not None else []
    return Rule(what, ok, (lo + hi) / 2, tuple(bad))


def boolean() -> Rule:
    return Rule("True or False", lambda v: isinstance(v, bool), False,
                (("wrong type", "yes"), ("wrong type", 1)))


def choice(*options: str) -> Rule:
    return Rule(f"one of {', '.join(map(repr, options))}", lambda v: isinstance(v, str) and v in options,
                options[0], (("not a choice", "bogus"), ("wrong type", 3)))


def text() -> Rule:
    """A non-empty string (a path, a dataset or split name: their sources check what they name)."""
    return Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()), "x",
                (("wrong type", 5), ("empty", "")))


def optional(rule: Rule, note: str = "") -> Rule:
    """None, or what `rule` accepts."""
    return Rule(f"{rule.what} or None" + (f" ({note})" if note else ""),
                lambda v: v is None or rule.ok(v), None, rule.bad)


def tuple_of(item: Rule, min_len: int = 0, max_len: int | None = None) -> Rule:
    """A tuple (or list) of `min_len` to `max_len` entries, each accepted by `item`."""
    count = (f"{min_len} to {max_len}" if max_len is not None and max_len != min_len else
             f"{min_len}" if max_len is not None else f"{min_len} or more" if min_len else "any number of")
    bad = [("wrong type", "x"), *((f"entry {kind}", (value,)) for kind, value in item.bad)]
    bad += [("too short", ())] if min_len else []
    return Rule(f"a tuple of {count} entries, each {item.what}",
                lambda v: (isinstance(v, (tuple, list)) and len(v) >= min_len
                           and (max_len is None or len(v) <= max_len) and all(item.ok(x) for x in v)),
                (item.example,) * max(min_len, 1), tuple(bad))


def fixed(*items: Rule) -> Rule:
    """A tuple (or list) of len(items) entries, entry i accepted by items[i]."""
    example = tuple(r.example for r in items)
    bad = [("wrong type", "x"), ("too short", example[:-1])]
    bad += [(f"entry {i} {kind}", example[:i] + (value,) + example[i + 1:])
            for i, r in enumerate(items) for kind, value in r.bad[:1]]
    return Rule(f"a tuple ({', '.join(r.what for r in items)})",
                lambda v: (isinstance(v, (tuple, list)) and len(v) == len(items)
                           and all(r.ok(x) for r, x in zip(items, v))),
                example, tuple(bad))


def interval(lo: float, hi: float) -> Rule:
    """A pair (a, b) with lo < a <= b <= hi: a range of crop scales."""
    return Rule(f"a pair (lo, hi) with {lo:g} < lo <= hi <= {hi:g}",
                lambda v: (isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_is_number, v))
                           and lo < v[0] <= v[1] <= hi),
                ((lo + hi) / 2, hi),
                (("wrong type", "x"), ("too short", ()), ("not ordered", (0.9 * hi, 0.1 * hi)),
                 ("out of range", (lo - 1, hi + 4)), ("nan", (math.nan, hi))))


# ---- Bounds, each with its reason ----
# Epochs: 10**5 is 500 times ImageNet's 200 (and keeps the clustering seed below 2**31, see SEED).
MAX_EPOCHS = 10**5
# faiss and NumPy take 32-bit seeds; an epoch's k-means seed (clustering.epoch_seed) is at most
# seed + 1000 x epoch, plus the level, < 2**31.
SEED = integer(0, 2**31 - 1 - 1000 * MAX_EPOCHS)
# Image sides: 8 px is digits' own size (a small-stem ResNet's stride-8 map is then 1x1); 4096 px
# is 18x ImageNet's 224 (a batch of 256 such float32 views is 48 GiB).
SIDE = integer(8, 4096)
# Multi-crop's local views are smaller crops (96 of 224 px; 4 of digits' 8 in the tests): below 4 px
# a 3x3 convolution sees mostly its zero padding.
LOCAL_SIDE = integer(4, 4096)
# A batch or group beyond 2**20 images does not fit any device (ImageNet recipes: 256 to 4096).
BATCH = integer(1, 2**20)
# The queue: 2**24 keys x 128 dims float32 are 8 GiB on every device, 13x ImageNet's 1.28M images.
QUEUE = integer(1, 2**24)
# Layer sizes: MoCo v3's head is 4096 wide; 2**16 x 2048 features is a 0.5 GiB layer.
DIM = integer(1, 2**16)
# Level and k sizes: 2**20 clusters or neighbours is 0.8x ImageNet's training set.
CLUSTERS = integer(1, 2**20)
# Softmax temperatures (MoCo's 0.07 to 0.2) scale the logits of unit vectors by 1/T: below 1e-3
# they span 2000 and the softmax is one-hot (float32 exp underflows below -87), above 1e3 they stay
# within 1e-3 of each other and it is uniform.
TEMPERATURE = real(1e-3, 1e3)
# Iterations and restarts of k-means: faiss's defaults are 25 and 1; 10**5 iterations of ImageNet's
# 3000 clusters take days on any host.
NITER, NREDO = integer(1, 10**5), integer(1, 1000)
PROBABILITY = real(0, 1)
# Loader workers and prefetch: 1024 is more than any host's cores.
WORKERS = integer(-1, 1024, note="-1: one per core but one, 0: in the training process")
STEPS = integer(0, note="0: off")
EVERY_EPOCHS = integer(0, note="0: after the last epoch only")
LEARNING_RATE = real(above=0)  # (no upper bound: the NaN stop and the divergence guard catch a diverging one)
MOMENTUM = real(0, below=1)  # (1: no decay of the old velocity, which grows without bound)
SCALE = interval(0, 1)  # random-resized-crop areas, as fractions of the image
# Normalization: 1 (gray) or 3 (RGB) channels; a std of 0 divides by 0.
MEAN = tuple_of(real(), 1, 3)
STD = tuple_of(real(above=0), 1, 3)

RULES: dict[str, Rule] = {
    "seed": SEED,
    # Data: the data sources check what `dataset` and the splits name.
    "dataset": text(),
    "data_dir": optional(text()),
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
    "bn_running_stats": choice(*norm.RUNNING_STATS),
    "shuffle_bn": boolean(),
    "shuffle_bn_gather": choice(*train_step.SHUFFLE_GATHERS),
    "queue_size": QUEUE,
    "ema_momentum": real(0, 1),
    "lr": LEARNING_RATE,
    "weight_decay": real(0),
    "sgd_momentum": MOMENTUM,
    "optimizer": choice(*train_step.OPTIMIZERS),
    "adam_betas": fixed(MOMENTUM, MOMENTUM),
    "lr_warmup_epochs": integer(0, MAX_EPOCHS),
    "lr_granularity": choice(*train_step.LR_GRANULARITIES),
    "grad_clip": real(0, note="0: off"),
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
    "objective.skip_last_prototype": boolean(),
    # Clustering.
    "clustering.num_clusters": tuple_of(CLUSTERS),
    "clustering.temperature": TEMPERATURE,
    "clustering.niter": NITER,
    "clustering.nredo": NREDO,
    "clustering.max_points_per_centroid": integer(1),
    "clustering.min_points_per_centroid": integer(0),
    "clustering.backend": choice(*clustering.BACKENDS),
    "clustering.mode": choice(*clustering.MODES),
    "clustering.seed_per_epoch": boolean(),
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
    "input.num_workers": WORKERS,
    "input.prefetch": integer(1, 1024),
    "input.resampling": choice(*crops.RESAMPLING),
    "input.bad_images": choice(*loader.BAD_IMAGES),
    "input.max_pixels": optional(integer(1)),
    # Outputs.
    "wandb.project": optional(text()),
    "wandb.entity": optional(text()),
    "wandb.name": optional(text()),
    "wandb.mode": choice("online", "offline", "disabled"),
    "figures_at_end": boolean(),
    "divergence.max_loss": real(0, note="0: no limit"),
    "divergence.max_grad_norm": real(0, note="0: no limit"),
    "log_every_steps": integer(0, note="0: at the end of each epoch only"),
    "checkpoint_every_epochs": integer(0, note="0: only at the end"),
    "checkpoint_every_steps": STEPS,
    "keep_checkpoints": integer(1),
    "progress_bar": boolean(),
}

# The settings of each evaluator protocol in a `config.evals` entry (besides `type` and
# `every_epochs`), and those the protocol has a default for (the others must be set).
_LINEAR = {"epochs": integer(1, MAX_EPOCHS), "lr": LEARNING_RATE, "batch_size": BATCH,
           "milestones": tuple_of(integer(1, MAX_EPOCHS)), "gamma": real(above=0, max=1),
           "momentum": MOMENTUM, "scale": SCALE, "flip": boolean(), "checkpoint_every_steps": STEPS}
EVAL_SETTINGS: dict[str, dict[str, Rule]] = {
    "knn": {"ks": tuple_of(CLUSTERS, 1), "temperature": TEMPERATURE, "train_chunk": integer(1, 2**24),
            "test_block": integer(1, 2**20)},
    "linear": _LINEAR,
    "linear_fast": _LINEAR,
    "semisup": {**{k: r for k, r in _LINEAR.items() if k not in ("lr", "checkpoint_every_steps")},
                "split_file": optional(text(), note="None: a class-balanced fraction"),
                "fraction": real(above=0, max=1), "trunk_lr": real(0), "head_lr": LEARNING_RATE},
    "cluster": {"ks": tuple_of(CLUSTERS, 1), "niter": NITER, "nredo": NREDO,
                "max_points_per_centroid": integer(1)},
    "voc": {"dataset": text(), "train_split": text(), "test_split": text(),
            "image_size": optional(SIDE, note="None: the run's image_size"),
            "costs": tuple_of(real(above=0), 1), "folds": integer(2, 100)},
    "summary": {"knn_k": CLUSTERS, "knn_temperature": TEMPERATURE, "num_clusters": tuple_of(CLUSTERS)},
}
EVAL_DEFAULTED = {"knn": ("train_chunk", "test_block"), "linear": ("checkpoint_every_steps",),
                  "linear_fast": ("checkpoint_every_steps",), "semisup": ("split_file",),
                  "cluster": ("max_points_per_centroid",)}


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
    return EVAL_SETTINGS.get(protocol, {}).get(parts[2])


def summary_entries(config) -> list[str]:
    """Names of the `config.evals` entries of type "summary" (at most one: `RELATIONS`)."""
    return [name for name, cfg in config["evals"].items() if evaluators.protocol(name, cfg) == "summary"]


def check(config) -> None:
    """Raises ConfigError, one line naming the field, what it accepts and its flag, for the first
    field of `config` (a ConfigDict or nested dicts) that is a renamed one (`console.RENAMED_FIELDS`),
    an evaluator entry of an unknown protocol or without its settings, a field no rule knows, a value
    its rule refuses; then for the first failing `RELATIONS` check."""
    renamed = console.renamed_fields(config)
    if renamed:
        raise ConfigError(renamed)
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
        missing = [s for s in ("every_epochs", *EVAL_SETTINGS[protocol])
                   if s not in cfg and s not in EVAL_DEFAULTED.get(protocol, ())]
        if missing:
            raise ConfigError(f"config.evals.{name} has no {', '.join(missing)} (settings of the {protocol} "
                              "evaluator); add them to the entry in the config file")


def _unknown(config, field: str) -> str:
    parts = field.split(".")
    if parts[0] == "evals" and len(parts) == 3:
        protocol = evaluators.protocol(parts[1], get(config, f"evals.{parts[1]}"))
        known = ", ".join(("type", "every_epochs", *EVAL_SETTINGS[protocol]))
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
                  for k in {"knn": ("ks",), "cluster": ("ks",), "summary": ("knn_k", "num_clusters")}.get(
                      protocol, ())]
    for field, values in sizes:
        if values and max(values) > n:
            raise ConfigError(f"config.{field} = {max(values)} exceeds the {n} training images of {where}; "
                              f"set --config.{field} to at most {n}")
    entries = len(get(config, "augment.mean"))
    if channels is not None and entries < channels:
        raise ConfigError(f"config.augment.mean and config.augment.std have {entries} entries for the "
                          f"{channels}-channel images of {where}; give {channels}")
