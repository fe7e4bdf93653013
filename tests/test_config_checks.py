"""hcsc_jax.run.config_checks: every field of every training config has a rule its shipped values
pass; a bad value of each kind is one line naming the field; the relations between fields; the
settings a fuzz of configs/digits.py:runlocal found accepted. In-process: no jit, no workdir
(test_cli.py runs train.py for the exit status and that nothing is written)."""

import copy
import importlib
import math
import pathlib

import pytest

from hcsc_jax.run import config_checks, trainer
from hcsc_jax.run.config_checks import ConfigError

ROOT = pathlib.Path(__file__).parent.parent
TRAINING = sorted(p.stem for p in ROOT.glob("configs/*.py")
                  if p.stem != "__init__" and not p.stem.startswith("eval_"))


def variants(name):
    """(module name, variant) of every variant of a training config, methods with runlocal too."""
    module = importlib.import_module(f"configs.{name}")
    declared = getattr(module, "VARIANTS", (None,))
    return [(name, v) for v in (*declared, *(f"{m},runlocal" for m in getattr(module, "METHODS", ())))]


VARIANTS = [pair for name in TRAINING for pair in variants(name)]


def load(name, variant):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config() if variant is None else module.get_config(variant)


@pytest.mark.parametrize("name,variant", VARIANTS, ids=[f"{n}:{v}" for n, v in VARIANTS])
def test_every_field_of_every_training_config_has_a_rule_that_its_value_passes(name, variant):
    c = load(name, variant)
    for field, value in config_checks.fields(c):
        rule = config_checks.rule_for(c, field)
        assert rule is not None, f"config.{field} has no rule in config_checks.RULES / evaluators.SETTINGS"
        assert rule.ok(value), f"config.{field} = {value!r} is refused: {rule.what}"
    trainer.check_values(c, 1)


def _one_config_per_field():
    """{dotted field: (a config holding it as a plain dict)}, over every variant of every config."""
    found = {}
    for name, variant in VARIANTS:
        c = load(name, variant)
        for field, _ in config_checks.fields(c):
            found.setdefault(field, c.to_dict())
    return found


FIELDS = _one_config_per_field()


def _set(tree, field, value):
    *parents, key = field.split(".")
    for p in parents:
        tree = tree[p]
    tree[key] = value


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_a_bad_value_of_each_kind_is_one_line_naming_the_field(field):
    base = FIELDS[field]
    rule = config_checks.rule_for(base, field)
    kinds = {kind for kind, _ in rule.bad}
    assert any("wrong type" in k for k in kinds)
    if isinstance(rule.example, float):
        assert {"nan", "inf"} <= kinds
    if rule.what.startswith("one of"):
        assert "not a choice" in kinds
    for kind, value in rule.bad:
        tree = copy.deepcopy(base)
        _set(tree, field, value)
        with pytest.raises(ConfigError) as err:
            config_checks.check(tree)
        message = str(err.value)
        assert len(message.splitlines()) == 1, (kind, message)
        named = (f"config.{field.rsplit('.', 1)[0]}: unknown evaluator" if field.endswith(".type")
                 else f"config.{field} ")
        assert message.startswith(named), (kind, value, message)


def test_the_kinds_of_bad_values_cover_type_range_choice_and_non_finite():
    kinds = {kind for f, base in FIELDS.items() for kind, _ in config_checks.rule_for(base, f).bad}
    assert {"wrong type", "out of range", "not a choice", "nan", "inf"} <= kinds


# Settings of configs/digits.py:runlocal that every check accepted before (a fuzz of 76), and
# the first words of their one line now.
PROBED = [
    ("lr", math.inf, "config.lr must be a finite number > 0"),
    ("weight_decay", -1.0, "config.weight_decay must be a finite number >= 0"),
    ("weight_decay", math.nan, "config.weight_decay must be a finite number >= 0, got nan"),
    ("sgd_momentum", -5.0, "config.sgd_momentum must be a finite number in [0, 1)"),
    ("grad_clip", -1.0, "config.grad_clip must be a finite number >= 0"),
    ("adam_betas", (2.0,), "config.adam_betas must be a tuple (a finite number in [0, 1), "),
    ("image_size", 2, "config.image_size must be an integer in [8, 4096]"),
    ("model.width", 1e-9, "config.model.width must be a finite number in [0.015625, 16]"),
    ("model.hidden_dim", 0, "config.model.hidden_dim must be an integer in [1, 65536] or None"),
    ("model.hidden_dim", -4, "config.model.hidden_dim must be an integer in [1, 65536] or None"),
    ("queue_size", 2**36, "config.queue_size must be an integer in [1, 16777216]"),
    ("clustering.num_clusters", (4, 8, 20), "config.clustering.num_clusters must shrink level by level"),
    ("clustering.num_clusters", (2.5,), "config.clustering.num_clusters must be a tuple of any number of "
                                        "entries, each an integer"),
    ("clustering.temperature", math.inf, "config.clustering.temperature must be a finite number in"),
    ("clustering.niter", 10**9, "config.clustering.niter must be an integer in [1, 100000]"),
    ("clustering.max_points_per_centroid", 0, "config.clustering.max_points_per_centroid must be an "
                                              "integer >= 1"),
    ("clustering.mode", "flat", "config.clustering.mode must be one of 'hierarchical', 'independent'"),
    ("clustering.backend", "gpu", "config.clustering.backend must be one of 'auto', 'faiss', 'jax'"),
    ("objective.temperature", 1e-30, "config.objective.temperature must be a finite number in [0.001, 1000]"),
    ("augment.scale", (0.9, 0.1), "config.augment.scale must be a pair (lo, hi) with 0 < lo <= hi <= 1"),
    ("augment.scale", (-1, 5), "config.augment.scale must be a pair (lo, hi)"),
    ("augment.scale", (), "config.augment.scale must be a pair (lo, hi)"),
    ("augment.std", (0.0,), "config.augment.std must be a tuple of 1 to 3 entries, each a finite number > 0"),
    ("augment.mean", (), "config.augment.mean must be a tuple of 1 to 3 entries"),
    ("augment.jitter_prob", 5.0, "config.augment.jitter_prob must be a finite number in [0, 1]"),
    ("augment.blur_prob", -1.0, "config.augment.blur_prob must be a finite number in [0, 1]"),
    ("seed", -1, "config.seed must be an integer in [0, "),
    ("input.bad_images", "ignore", "config.input.bad_images must be one of 'skip', 'error'"),
    ("input.prefetch", -1, "config.input.prefetch must be an integer in [1, 1024]"),
    ("input.resampling", "cubic", "config.input.resampling must be one of 'linear', 'antialias'"),
    ("input.pipeline", "bogus", "config.input.pipeline must be one of 'memory', 'stream'"),
    ("evals.summary.knn_k", 0, "config.evals.summary.knn_k must be an integer in [1, "),
    ("evals.knn.ks", (), "config.evals.knn.ks must be a tuple of 1 or more entries"),
    ("divergence.max_loss", math.nan, "config.divergence.max_loss must be a finite number >= 0"),
    ("optimizer", "adam", "config.optimizer must be one of 'sgd', 'adamw'"),
    ("model.dtype", "int8", "config.model.dtype must be one of 'float32', 'bfloat16'"),
    ("model.arch", "resnet9", "config.model.arch must be one of 'resnet18', 'resnet34', 'resnet50', "),
]


@pytest.mark.parametrize("field,value,message", PROBED, ids=[f"{f}={v!r}" for f, v, _ in PROBED])
def test_the_settings_a_fuzz_found_accepted_are_refused(field, value, message):
    from configs import digits

    c = digits.get_config("runlocal")
    _set(c, field, value)
    with pytest.raises(ConfigError) as err:
        trainer.check_values(c, 1)
    assert str(err.value).startswith(message) and f"; set --config.{field}" in str(err.value)


def _digits(**overrides):
    from configs import digits

    c = digits.get_config("runlocal")
    for field, value in overrides.items():
        _set(c, field.replace("__", "."), value)
    return c


@pytest.mark.parametrize("overrides,message", [
    (dict(evals__summary__num_clusters=(10, 20)), r"config.evals.summary.num_clusters must shrink level by "
                                                  r"level .*, got \(10, 20\)"),
    (dict(clustering__num_clusters=(8, 8)), r"config.clustering.num_clusters must shrink .* \(or "
                                            r"--config.clustering.mode=independent"),
    (dict(augment__mean=(0.5, 0.5, 0.5)), r"config.augment.mean and config.augment.std need one entry per "
                                          r"channel each, got 3 and 1"),
    (dict(clustering__min_points_per_centroid=2000),
     r"config.clustering.min_points_per_centroid \(2000\) must be <= "
     r"config.clustering.max_points_per_centroid \(1000\)"),
    (dict(clustering__num_clusters=()), r"config.clustering.num_clusters is \(\) \(no prototypes\), but "
                                        r"config.objective.proto_loss, config.objective.instance_selection, "
                                        r"config.objective."
                                        r"prototype_selection need prototypes; set --config.objective."
                                        r"proto_loss=False"),
    (dict(objective__proto_loss=False), r"config.objective.prototype_selection selects negatives of the "
                                        r"proto loss, which proto_loss=False turns off"),
    (dict(objective__instance_loss=False), r"config.objective.instance_selection selects negatives of the "
                                           r"instance loss"),
    (dict(model__foo=1), r"config.model.foo is not a setting of hcsc-jax: nothing reads it; remove it "),
    (dict(lrr=0.1), r"config.lrr is not a setting .* \(did you mean config.lr\?\)"),
    (dict(evals__knn__kss=(5,)), r"config.evals.knn.kss: the knn evaluator has no setting 'kss' \(known: "
                                 r"type, every_epochs, ks, temperature, train_chunk, test_block\)"),
    (dict(evals__lin=dict(type="linear", every_epochs=1)), r"config.evals.lin has no epochs, lr, batch_size, "
                                                           r"milestones, gamma, momentum, scale, flip "
                                                           r"\(settings of the linear evaluator\)"),
    (dict(evals__final=dict(type="summary", every_epochs=0, knn_k=5, knn_temperature=0.1,
                            num_clusters=(4,))), r"config.evals has 2 entries of type 'summary'"),
    (dict(lr_warmup_epochs=3), r"config.lr_warmup_epochs \(3\) must be smaller than config.epochs \(3\): "
                               r"the learning rate decays after its warm-up; set a smaller "
                               r"--config.lr_warmup_epochs"),
    (dict(lr_warmup_epochs=1, lr_granularity="epoch"),
     r"config.lr_granularity='epoch' holds the lr of each epoch's first step, which in a linear warm-up "
     r"from 0 is 0 for the whole first epoch"),
    (dict(bn_running_stats="rank0"), r"config.bn_running_stats must be one of"),
    (dict(bn_running_stats="first_group", augment__local_views=((6, (0.1, 0.5)), (6, (0.2, 0.6)))),
     r"config.bn_running_stats='first_group' updates the running statistics once per forward pass, and "
     r"local views of one size \(\[6, 6\]\) share one"),
])
def test_relations_unknown_fields_and_missing_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=f"^{message}") as err:
        config_checks.check(_digits(**overrides))
    assert len(str(err.value).splitlines()) == 1


def test_a_warm_up_as_long_as_the_run_is_a_warning_logged_before_anything_is_written(tmp_path, caplog):
    """HCSC levels with warmup_epochs >= epochs train MoCo v2 only: said in one line before the
    run starts (not refused: a short run resumed later with more epochs does it on purpose)."""
    from hcsc_jax.run import trainer

    assert config_checks.warnings_for(_digits()) == []  # runlocal: 3 epochs, warm-up 1
    assert config_checks.warnings_for(_digits(epochs=0)) == []  # the untrained encoder
    assert config_checks.warnings_for(_digits(clustering__num_clusters=(), objective__proto_loss=False,
                                              objective__instance_selection=False,
                                              objective__prototype_selection=False, epochs=1)) == []
    c = _digits(epochs=1, dataset="no_such_dataset")  # stops at the data check, after the warning
    with caplog.at_level("WARNING"), pytest.raises(Exception, match="no_such_dataset"):
        trainer.train_and_evaluate(c, str(tmp_path / "run"))
    lines = [r.getMessage() for r in caplog.records if "warmup_epochs" in r.getMessage()]
    assert lines == ["config.warmup_epochs (1) >= config.epochs (1): no epoch of this run uses the "
                     "prototypes (20, 8, 4) (it trains the instance loss only, as MoCo v2); set "
                     "--config.warmup_epochs below 1 for HCSC, or resume later with more epochs"]
    assert not (tmp_path / "run").exists()


def test_the_eval_configs_protocols_pass_as_training_evaluators():
    """A training config may run any protocol with the eval configs' settings (those of
    configs/eval_*.py but the summary's, whose unset settings are the run's own)."""
    protocols = set()
    for module in ("eval_digits", "eval_imagenet"):
        for variant in importlib.import_module(f"configs.{module}").VARIANTS:
            evals = load(module, variant or None).evals
            c = _digits()
            for name, entry in evals.items():
                if entry.get("type", name) != "summary":
                    c.evals[f"{name}_entry"] = dict(entry.to_dict(), type=entry.get("type", name),
                                                    every_epochs=0)
                    protocols.add(entry.get("type", name))
            config_checks.check(c)  # (raises ConfigError naming the entry's field)
            c.evals.knn_entry.ks = ()  # the same entries are checked: a bad value is refused
            with pytest.raises(ConfigError, match="evals.knn_entry.ks"):
                config_checks.check(c)
    assert {"knn", "linear", "linear_fast", "cluster"} <= protocols


def test_sizes_the_training_set_cannot_give_are_one_line():
    """Checked before the workdir exists when the data check knows the split's size, and again
    once the data is open."""
    config_checks.check_data(_digits(), 1437, 1)
    for overrides, message in [
        (dict(evals__summary__knn_k=100000), "config.evals.summary.knn_k = 100000 exceeds the 1437 training "
                                             "images of digits:train; set --config.evals.summary.knn_k to at "
                                             "most 1437"),
        (dict(evals__knn__ks=(5, 5000)), "config.evals.knn.ks = 5000 exceeds the 1437 training images"),
        (dict(clustering__num_clusters=(5000,)), "config.clustering.num_clusters = 5000 exceeds the 1437"),
        (dict(batch_size=2048, queue_size=2048), "config.batch_size 2048 is larger than the 1437 training"),
    ]:
        with pytest.raises(ConfigError, match=f"^{message}"):
            config_checks.check_data(_digits(**overrides), 1437, 1)
    with pytest.raises(ConfigError, match=r"config.augment.mean and config.augment.std have 1 entries for "
                                          r"the 3-channel images of digits:train; give 3"):
        config_checks.check_data(_digits(), 1437, 3)


def test_every_rule_names_a_field_that_a_config_has():
    """The other direction: a field is declared (`config_fields.FIELDS`: default, rule, resume
    policy) only while some config has it: a field only a variant adds (`VARIANT_ONLY`) is added by
    one, and a field no config reads any more takes its declaration with it."""
    stale = sorted(set(config_checks.RULES) - set(FIELDS))
    assert not stale, f"RULES has rules for fields no config declares: {stale}"
