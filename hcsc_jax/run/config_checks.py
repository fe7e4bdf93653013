"""Every value of a training config checked before anything is written: one rule per field.

`RULES` maps each dotted field of the training configs to its rule: its type, its range, its
choices, read from the field's one declaration in `config_fields.FIELDS` (with its default and
resume policy; the rules themselves: `hcsc_jax.run.rules`). `evaluators.SETTINGS`, which each
evaluator module declares for itself, does the same for the settings of a `config.evals` entry.
`RELATIONS` are the checks between fields (levels shrink, one summary entry, ...); `WARNINGS`
the relations a run may have on purpose but rarely means (`warnings_for`: logged).
`check(config)` raises ConfigError for the first field that breaks its rule, that no rule knows,
or the first relation that fails: one line naming the field, what it accepts and the flag that
sets it (train.py: exit status 2, before the workdir exists).

What needs the data (the number of training images, the channels) is `check_data`, run before
the workdir exists when the data check knows the training split's size, and again with the
channels once the training set is open; the batch, queue and BN groups against the devices, the
objective's own switches and the model against the image sizes are checked by
`trainer.check_values` with the code that uses them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any

from hcsc_jax import evaluators, trees
from hcsc_jax.run import config_fields
from hcsc_jax.run.rules import EVERY_EPOCHS, Rule, choice


class ConfigError(ValueError):
    """A config value that cannot train, with what to change (one line)."""


# Each field's rule, from its one declaration (with its default) in `config_fields.FIELDS`.
RULES: dict[str, Rule] = {field: f.rule for field, f in config_fields.FIELDS.items()}

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
