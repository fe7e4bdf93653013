"""Every shipped config and each of its variants is consistent: batch, queue and BN groups fit,
levels make a tree; variants are what they say (big_vision style `get_config(arg)`)."""

import importlib
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from hcsc_jax import clustering
from hcsc_jax.method import train_step
from hcsc_jax.run import config_checks, setup, trainer

ROOT = pathlib.Path(__file__).parent.parent
MODULES = sorted(p.stem for p in ROOT.joinpath("configs").glob("*.py")
                 if p.stem not in ("__init__", "default"))
CONFIGS = [m for m in MODULES if not m.startswith("eval")]


def variants(name):
    """Every variant of a config module, and each of its methods combined with runlocal."""
    declared = importlib.import_module(f"configs.{name}").VARIANTS
    methods = importlib.import_module(f"configs.{name}").__dict__.get("METHODS", ())
    return list(declared) + [f"{m},runlocal" for m in methods]


VARIANTS = [(name, v) for name in CONFIGS for v in variants(name)]


def load(name, variant=None):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config() if variant is None else module.get_config(variant)


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_config_is_consistent(name, variant):
    c = load(name, variant)
    train_step.check_batch_config(c.batch_size, c.queue_size, c.bn_group_size, 1)
    levels = list(c.clustering.num_clusters)
    assert levels == sorted(levels, reverse=True) and len(set(levels)) == len(levels)
    setup.objective_config(c)  # validates semantics, positive, sampler, switches
    assert 0 <= c.warmup_epochs <= c.epochs
    assert len(c.augment.mean) == len(c.augment.std)
    config_checks.check(c)
    if not levels:  # a baseline without prototypes must not ask for prototype terms
        assert not c.objective.proto_loss and not c.objective.prototype_selection



@pytest.mark.parametrize("name,variant", VARIANTS)
def test_config_views_build(name, variant):
    """Every view (global and multi-crop local) is a valid augmentation for both pipelines."""
    c = load(name, variant)
    channels = len(c.augment.mean)
    q, k, local, _ = setup.view_configs(c, channels)
    assert q.crop_size == k.crop_size == c.image_size and q.random_crop
    assert [v.crop_size for v in local] == [size for size, _ in c.augment.local_views]
    assert len(setup.host_crops(c)) == 2 + len(c.augment.local_views)
    assert c.input.pipeline in ("memory", "stream") and c.clustering.backend in clustering.BACKENDS


@pytest.mark.parametrize("name", CONFIGS)
def test_training_configs_cluster_where_the_compute_is(name):
    """Every training config leaves the k-means backend to "auto" (jax with accelerators)."""
    assert load(name).clustering.backend == "auto"


def test_imagenet_configs_hold_the_published_settings():
    """docs/method.md §6 and §1: the settings behind the paper's 200-epoch ImageNet numbers."""
    from configs import imagenet_hcsc_200ep, imagenet_hcsc_multicrop_200ep

    for c in (imagenet_hcsc_200ep.get_config(), imagenet_hcsc_multicrop_200ep.get_config()):
        assert (c.model.arch, c.model.width, c.model.small_stem, c.model.embed_dim) == (
            "resnet50", 1.0, False, 128)
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
        config_checks.check(c)
    c = digits.get_config()
    c.evals.knn.every_epochs = 0  # after the last epoch only: accepted
    config_checks.check(c)
    c.evals.knn.every_epochs = -1
    with pytest.raises(ValueError, match=r"config.evals.knn.every_epochs must be an integer >= 0 \(0: "
                                         r"after the last epoch only\), got -1; set "
                                         r"--config.evals.knn.every_epochs"):
        config_checks.check(c)
    c = digits.get_config()
    c.evals.final = dict(c.evals.summary)  # (its type: "summary")
    with pytest.raises(ValueError,
                       match=r"2 entries of type 'summary' \(final, summary\); summary.json holds one"):
        config_checks.check(c)


def test_a_config_with_the_old_final_evaluation_is_refused_naming_the_field():
    """A config written before `config.evals.summary` (its own `c.eval`) is refused naming the
    field nothing reads, as ConfigError (train.py: exit status 2)."""
    from configs import digits

    c = digits.get_config()
    c.eval = dict(knn_k=20, knn_temperature=0.07, num_clusters=(10,))
    with pytest.raises(trainer.ConfigError, match=r"^config.eval.knn_k is not a setting of hcsc-jax: nothing "
                                                r"reads it; remove it from the config"):
        trainer.check_values(c, 1)


def test_the_summary_is_an_evals_entry_of_every_training_config():
    """configs/default.py's `evals.summary`: after the last epoch only, the former `config.eval`
    settings; the dataset configs set its levels."""
    from configs import default, digits

    s = default.get_config().evals.summary
    assert (s.type, s.every_epochs, s.knn_k, s.knn_temperature, tuple(s.num_clusters)) == (
        "summary", 0, 20, 0.07, (1000,))
    assert tuple(digits.get_config().evals.summary.num_clusters) == (60, 30, 10)
    assert "eval" not in default.get_config()


def _flat(c, prefix=""):
    out = {}
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def _changed(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    return {k: fb[k] for k in fa if fa[k] != fb[k]}


@pytest.mark.parametrize("name", MODULES)
def test_every_config_declares_its_variants_and_a_runlocal(name):
    module = importlib.import_module(f"configs.{name}")
    assert "runlocal" in module.VARIANTS
    default = _flat(load(name))
    for variant in module.VARIANTS:
        c = load(name, variant)
        assert isinstance(c, ml_collections.ConfigDict)
        # "" / the first name is the default: the same config as get_config().
        assert (_flat(c) == default) == (variant in ("", module.VARIANTS[0])), variant
    runlocal = load(name, "runlocal")
    if not name.startswith("eval"):
        assert (runlocal.progress_bar is False and runlocal.epochs <= 3
                and 0 < runlocal.warmup_epochs < runlocal.epochs)
        assert runlocal.model.width < load(name).model.width and runlocal.batch_size <= 64
    with pytest.raises(ValueError, match=rf"unknown variant 'nope' of configs/{name}\.py; variants: "
                       + ", ".join(v for v in module.VARIANTS if v)):
        load(name, "runlocal,nope")


def test_default_holds_no_variants():
    """configs/default.py is the shared base, not a config of its own."""
    from configs import default

    assert not hasattr(default, "VARIANTS") and default.get_config().dataset == "tfds:imagenet2012"


def test_the_default_config_is_every_declared_field_at_its_default_in_a_new_object_each_call():
    """configs/default.py is `config_fields.defaults()`: each field of `config_fields.FIELDS` at its
    declared default but those only a variant adds; a None default is a placeholder that parses
    `--config.<field>=...` as its type; no call shares a mutable part with another or with
    `FIELDS` / `EVALS` (a dataset config changing its copy changes no other)."""
    from configs import default
    from hcsc_jax import trees
    from hcsc_jax.run import config_fields

    a, b = default.get_config(), default.get_config()
    flat = trees.flatten(b)
    for field, f in config_fields.FIELDS.items():
        if f.default is config_fields.VARIANT_ONLY:
            assert field not in flat, field
            with pytest.raises(KeyError, match=f"config.{field} has no default"):
                config_fields.default(field)
        else:
            assert flat.pop(field) == f.default == config_fields.default(field), field
    assert sorted(flat) == sorted(f"evals.{k}" for k in trees.flatten(config_fields.EVALS))
    a.evals.summary.knn_k, a.input.prefetch, a.clustering.num_clusters = 5, 9, (4,)
    assert (b.evals.summary.knn_k, b.input.prefetch, b.clustering.num_clusters) == (20, 2, (3000, 2000, 1000))
    assert config_fields.EVALS["summary"]["knn_k"] == 20
    for field, wrong, right in (("data_dir", 5, "/data"), ("model.hidden_dim", "64", 64),
                                ("wandb.project", 1.0, "p")):
        *groups, name = field.split(".")
        node = b[groups[0]] if groups else b
        with pytest.raises(TypeError):  # (what --config.<field>=... is parsed against)
            setattr(node, name, wrong)
        setattr(node, name, right)
        assert trees.flatten(b)[field] == right


@pytest.mark.parametrize("name,negatives", [("digits", 16), ("fashion_mnist", 64)])
def test_baseline_variants_are_the_old_baseline_files(name, negatives):
    """digits.py:mocov2 / :pcl (ex digits_mocov2.py / digits_pcl.py) change these fields of the
    HCSC config and nothing else; likewise fashion_mnist.py."""
    hcsc = load(name)
    assert _changed(hcsc, load(name, "hcsc")) == {}
    assert _changed(hcsc, load(name, "mocov2")) == {
        "clustering.num_clusters": (), "objective.instance_selection": False,
        "objective.prototype_selection": False, "objective.proto_loss": False}
    assert _changed(hcsc, load(name, "pcl")) == {
        "clustering.mode": "independent", "objective.semantics": "official",
        "objective.instance_selection": False, "objective.prototype_selection": False,
        "objective.proto_negatives": negatives}
    # The same switches on top of runlocal, which keeps the method's fields of the HCSC config.
    small = load(name, "runlocal")
    assert _changed(small, load(name, "pcl,runlocal")) == _changed(hcsc, load(name, "pcl"))
    assert _changed(small, load(name, "runlocal,mocov2")) == _changed(hcsc, load(name, "mocov2"))
    assert small.objective == hcsc.objective and small.clustering.mode == "hierarchical"
    with pytest.raises(ValueError, match="variants mocov2 and pcl exclude each other"):
        load(name, "pcl,mocov2")


@pytest.mark.parametrize("name,base", [
    ("digits", "hcsc"), ("digits", "mocov2"), ("digits", "pcl,runlocal"), ("fashion_mnist", "cpu,pcl"),
    ("cifar10", ""), ("imagenet_hcsc_200ep", ""), ("imagenet_hcsc_multicrop_200ep", "runlocal")])
def test_authors_variant_switches_every_difference_and_only_those(name, base):
    """`:authors` = the config it is added to with the five switches of docs/method.md §9 on."""
    plain = load(name, base or None)
    authors = load(name, ",".join(v for v in (base, "authors") if v))
    switched = {"objective.semantics": "official", "objective.skip_last_prototype": True,
                "lr_granularity": "epoch", "clustering.seed_per_epoch": False,
                "bn_running_stats": "first_group"}
    a, p = dict(config_checks.fields(authors.to_dict())), dict(config_checks.fields(plain.to_dict()))
    assert {k: a[k] for k in switched} == switched
    assert {k for k in a if a[k] != p[k]} <= set(switched)
    config_checks.check(authors)
    with pytest.raises(ValueError, match="does not combine with a ViT"):
        load("digits", "vit,authors")


def test_first_group_statistics_are_the_training_runs_not_the_encoders():
    """bn_running_stats is how a run trains, not part of the encoder: its meta (checkpoints,
    exports, load_encoder, fine-tuning) rebuilds an encoder that averages its BN groups."""
    from flax import nnx

    from hcsc_jax import models, sharding

    parts = setup.build(load("digits", "authors,runlocal"), 1, 4, sharding.make_mesh(), abstract=True)
    assert "bn_running_stats" not in parts.model_meta
    restored = models.build_encoder(parts.model_meta, abstract=True)  # from the meta alone
    trained = nnx.merge(parts.graphdef, *models.split_model(restored)[1:])  # the step's graph
    assert trained.backbone.bn1.running_stats == "first_group"
    assert restored.backbone.bn1.running_stats == "mean_of_groups"


def test_epoch_seed_is_new_every_epoch_unless_the_authors():
    c = load("digits")
    assert [clustering.epoch_seed(c.clustering, 3, e) for e in (0, 1, 2)] == [3, 1003, 2003]
    c.clustering.seed_per_epoch = False
    assert [clustering.epoch_seed(c.clustering, 3, e) for e in (0, 1, 2)] == [3, 3, 3]


def test_digits_runlocal_is_the_tests_tiny_run():
    """tests/test_trainer.py asserts step counts, levels and eval epochs of exactly this config."""
    c = load("digits", "runlocal")
    assert (c.epochs, c.image_size, c.warmup_epochs, c.batch_size, c.bn_group_size, c.queue_size, c.lr) == (
        3, 8, 1, 64, 8, 256, 0.03)
    assert (c.log_every_steps, c.checkpoint_every_epochs, c.progress_bar) == (5, 1, False)
    assert (c.model.arch, c.model.width, c.model.embed_dim, c.model.hidden_dim) == ("resnet18", 0.125, 16, 32)
    assert (tuple(c.clustering.num_clusters), c.clustering.nredo, c.clustering.niter) == ((20, 8, 4), 1, 10)
    assert tuple(c.evals.summary.num_clusters) == (20, 10)
    assert (c.evals.knn.every_epochs, tuple(c.evals.knn.ks)) == (2, (5, 20))
    # Everything else is the digits config.
    assert c.dataset == "digits" and c.augment == load("digits").augment and c.seed == 0


def test_train_py_names_the_workdir_after_config_and_variants():
    code = ("import train; print(train.run_name('configs/digits.py'),"
            " train.run_name('configs/digits.py:pcl,runlocal'),"
            " train.run_name('/x/configs/imagenet_hcsc_200ep.py:runlocal'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["digits", "digits_pcl_runlocal", "imagenet_hcsc_200ep_runlocal"]
