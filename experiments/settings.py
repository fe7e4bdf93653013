"""What the study studies: the methods and settings (`SETTINGS`), their descriptions for
RESULTS.md (`DESCRIPTION`), and where a setting's run lives (`run_dir`) and what it has finished
(`eval_result`, `trained`, `complete`). Shared by the runner (experiments/study.py) and the report
(experiments/report.py)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_MODES = ("knn", "linear_fast", "cluster")

# Fashion-MNIST's 10 classes in 4 coarse groups, for the NMI of the top prototype level.
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
FASHION_COARSE = {"tops": (0, 2, 4, 6), "trousers & dresses": (1, 3), "footwear": (5, 7, 9), "bags": (8,)}


def fashion_coarse_labels(labels: np.ndarray) -> np.ndarray:
    table = np.zeros(10, np.int32)
    for g, members in enumerate(FASHION_COARSE.values()):
        table[list(members)] = g
    return table[labels]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # row label
    config: str  # configs/<file>[:<variant>]
    overrides: tuple[str, ...] = ()
    group: str = "main"  # "main", "ablation" or "reference" (e.g. the encoder before training)
    seeds: tuple[int, ...] = (0, 1, 2)
    reuse: str | None = None  # take the runs of this method (same seeds) instead of training
    # The raw-pixel reference on the data of this method's run (same seed): nothing trained, the
    # evaluators on the flattened center crops (`eval.py --checkpoint=pixels:<that run>`).
    pixels_of: str | None = None


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    dataset: str
    num_classes: int
    methods: tuple[Method, ...]
    common: tuple[str, ...] = ()  # overrides added to every train command
    eval_overrides: tuple[str, ...] = ()
    coarse: str | None = None  # name of a coarse label grouping (fashion_mnist)
    needs_gpu: bool = False
    baseline: str | None = None  # also paired differences to this row (same seed)
    curve_table: bool = False  # also a table of each run's in-training kNN, epoch by epoch


ABL = ("--config.objective.instance_selection", "--config.objective.prototype_selection")


def _methods(config: str, main_seeds, abl_seeds):
    """MoCo v2, PCL and HCSC of one config file ("digits.py", "fashion_mnist.py:cpu"), then the
    Table-5 ablations as command-line overrides of its HCSC config."""
    file, _, variant = config.partition(":")

    def variant_of(method):
        return f"{file}:{','.join(v for v in (variant, method) if v)}"

    return (
        Method("MoCo v2", variant_of("mocov2"), seeds=main_seeds),
        Method("PCL", variant_of("pcl"), seeds=main_seeds),
        Method("HCSC", config, seeds=main_seeds),
        Method("hier. prototypes, no selection", config, (f"{ABL[0]}=False", f"{ABL[1]}=False"),
               "ablation", abl_seeds),
        Method("+ ICSC only", config, (f"{ABL[1]}=False",), "ablation", abl_seeds),
        Method("+ PCSC only", config, (f"{ABL[0]}=False",), "ablation", abl_seeds),
        Method("+ ICSC + PCSC (= HCSC)", config, (), "ablation", abl_seeds, reuse="HCSC"),
        Method("HCSC, official semantics", config, ("--config.objective.semantics=official",),
               "ablation", abl_seeds),
    )


# The recipe as it was before the sweep (batch 128, ShuffleBN groups of 32), spelled out so that the
# sweep's rows keep their meaning whatever configs/digits.py now says.
RECIPE_BEFORE = ("--config.batch_size=128", "--config.bn_group_size=32")
BATCH_32 = ("--config.batch_size=32", "--config.bn_group_size=8")
RECIPE_CHANGES = (  # (what changes, train.py overrides, the methods it runs for), in run order
    ("", RECIPE_BEFORE, ("MoCo v2", "HCSC")),
    ("batch 32", BATCH_32, ("MoCo v2", "HCSC")),
    ("lr x4", RECIPE_BEFORE + ("--config.lr=0.24",), ("MoCo v2",)),
    ("batch 16", ("--config.batch_size=16", "--config.bn_group_size=8"), ("MoCo v2",)),
    ("batch 32, lr x2", BATCH_32 + ("--config.lr=0.12",), ("MoCo v2",)),
    ("EMA 0.99", RECIPE_BEFORE + ("--config.ema_momentum=0.99",), ("MoCo v2",)),
    ("queue 256", RECIPE_BEFORE + ("--config.queue_size=256",), ("MoCo v2",)),
    ("T 0.1", RECIPE_BEFORE + ("--config.objective.temperature=0.1", "--config.clustering.temperature=0.1"),
     ("MoCo v2",)),
    ("crops 0.2-1", RECIPE_BEFORE + ("--config.augment.scale=(0.2,1.0)",), ("MoCo v2",)),
)
_RECIPE_CONFIGS = {"MoCo v2": "digits.py:mocov2", "HCSC": "digits.py"}
RECIPES = tuple(Method(f"{name}, {change}" if change else name, _RECIPE_CONFIGS[name], overrides, seeds=(0,))
                for change, overrides, names in RECIPE_CHANGES for name in names)
# Which of the :authors switches moves HCSC on digits (issue 35): official semantics, then each
# switch turned on alone, then all of them (= configs/digits.py:authors).
OFFICIAL = "HCSC, official"
SWITCHES = (
    ("their negative-prototype off-by-one", "--config.objective.skip_last_prototype=True"),
    ("lr per epoch", "--config.lr_granularity=epoch"),
    ("same k-means seeds every epoch", "--config.clustering.seed_per_epoch=False"),
    ("first-group BN statistics", "--config.bn_running_stats=first_group"),
)
AUTHORS_SWITCHES = (
    Method(OFFICIAL, "digits.py", ("--config.objective.semantics=official",), seeds=(0, 1, 2, 3)),
    *(Method(f"{OFFICIAL} + {name}", "digits.py", ("--config.objective.semantics=official", flag),
             seeds=(0, 1, 2, 3)) for name, flag in SWITCHES),
    Method("HCSC, :authors (all four)", "digits.py:authors", seeds=(0, 1, 2, 3)),
)
PIXELS = "raw pixels"
UNTRAINED = "untrained encoder"


def _references(config: str):
    """The rows every method must beat: the encoder of `config` before training (3 seeds: three
    initializations), and the raw pixels of the same data, crop and normalization."""
    return (Method(UNTRAINED, config, ("--config.epochs=0", "--config.warmup_epochs=0"), "reference"),
            Method(PIXELS, config, group="reference", seeds=(0,), pixels_of=UNTRAINED))


SETTINGS = {
    "digits": Setting("digits", "digits", 10,
                      _references("digits.py") + _methods("digits.py", (0, 1, 2, 3, 4), (0, 1, 2))),
    # The 2-core CPU budget of configs/fashion_mnist.py:cpu (<= 15 minutes a run).
    "fashion_mnist_cpu": Setting(
        "fashion_mnist_cpu", "fashion_mnist", 10,
        _references("fashion_mnist.py:cpu") + _methods("fashion_mnist.py:cpu", (0, 1, 2), (0, 1, 2)),
        coarse="fashion_mnist"),
    "fashion_mnist": Setting(
        "fashion_mnist", "fashion_mnist", 10,
        (Method("MoCo v2", "fashion_mnist.py:mocov2", seeds=(0, 1, 2)),
         Method("PCL", "fashion_mnist.py:pcl", seeds=(0, 1, 2)),
         Method("HCSC", "fashion_mnist.py", seeds=(0, 1, 2))),
        coarse="fashion_mnist", needs_gpu=True),
    # The digits recipe: MoCo v2 at configs/digits.py with one change each (and HCSC with the
    # changes that leave the InfoNCE plateau), seed 0: which default visibly learns in ~3-4 min.
    "digits_recipe": Setting("digits_recipe", "digits", 10, _references("digits.py") + RECIPES),
    # Where MoCo v2's kNN stops rising at the digits recipe (batch 32, groups of 8): one 120-epoch run
    # with its kNN curve in metrics.jsonl (every 10 epochs), from which the converged budget is read.
    "digits_curve": Setting("digits_curve", "digits", 10, (
        Method("MoCo v2, 120 epochs", "digits.py:mocov2",
               BATCH_32 + ("--config.epochs=120", "--config.evals.knn.every_epochs=10"), seeds=(0,)),),
        curve_table=True),
    # The digits study's main methods at the converged budget read from digits_curve (90 epochs).
    "digits_converged": Setting(
        "digits_converged", "digits", 10,
        _references("digits.py:converged") + _methods("digits.py:converged", (0, 1, 2), ())[:3]),
    "authors_switches": Setting("authors_switches", "digits", 10, AUTHORS_SWITCHES, baseline=OFFICIAL),
    # CI smoke test: 2 epochs (1 warm-up), one seed, a tiny model, a short linear probe.
    "smoke": Setting(
        "smoke", "digits", 10,
        (Method("MoCo v2", "digits.py:mocov2", seeds=(0,)), Method("PCL", "digits.py:pcl", seeds=(0,)),
         Method("HCSC", "digits.py", seeds=(0,))),
        common=("--config.epochs=2", "--config.warmup_epochs=1", "--config.model.width=0.125",
                "--config.batch_size=128", "--config.bn_group_size=32",
                "--config.model.arch=resnet18", "--config.clustering.nredo=1", "--config.clustering.niter=5",
                "--config.evals.summary.num_clusters=(10,)"),
        eval_overrides=("--config.evals.linear_fast.epochs=5",)),
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_dir(root: str, setting: Setting, method: Method, seed: int) -> str:
    return os.path.join(root, setting.name, f"{slug(method.name)}_seed{seed}")


def eval_result(workdir: str, mode: str):
    """The newest-step eval/<mode>_step<N>.json of a workdir, or None."""
    files = glob.glob(os.path.join(workdir, "eval", f"{mode}_step*.json"))
    if not files:
        return None
    path = max(files, key=lambda p: int(re.search(r"_step(\d+)\.json$", p).group(1)))
    with open(path) as f:
        return json.load(f)


def trained(workdir: str) -> bool:
    """Trained, or a reference that trains nothing (reference.json: the raw pixels)."""
    return any(os.path.isfile(os.path.join(workdir, f)) for f in ("summary.json", "reference.json"))


def complete(workdir: str) -> bool:
    """Trained, and every eval of EVAL_MODES written."""
    return trained(workdir) and all(eval_result(workdir, m) is not None for m in EVAL_MODES)


DESCRIPTION = {
    "digits": (
        "scikit-learn's digits (1,437 train / 360 test 8x8 images, upsampled to 16 px by the crops), the "
        "`configs/digits.py` budget for every method: narrow small-stem ResNet-18 (width 0.25), 40 epochs "
        "(10 warm-up epochs of InfoNCE only), batch 32 (ShuffleBN groups of 8, 1,760 steps; the recipe "
        "`digits_recipe` chose), queue 1024, prototype levels / clusterings 60/30/10. MoCo v2 = "
        "`configs/digits.py:mocov2`, PCL = `configs/digits.py:pcl` (independent k-means "
        "60/30/10, r = 16 sampled negative prototypes per clustering, PCL's code semantics), HCSC = "
        "`configs/digits.py` (paper semantics); the ablations are `configs/digits.py` with the overrides in "
        "their commands."),
    "digits_recipe": (
        "The sweep that chose the digits recipe: `configs/digits.py:mocov2` (MoCo v2) and "
        "`configs/digits.py` (HCSC) at the 40-epoch budget, seed 0, from the recipe before it (batch 128, "
        "ShuffleBN groups of 32: 440 steps; the unnamed rows) with one change (named in the row; the "
        "overrides are in each run's command). Batch 32 (groups of 8) was chosen: 4x the steps in about the "
        "same time. What to read: the last epoch's InfoNCE "
        "loss against log(K+1), the plateau of a key no closer than the queue's (K = queue size), and the "
        "instance accuracy: a run that stays near the plateau has not learned to tell the images apart, "
        "whatever its kNN (the untrained encoder's kNN is the floor, the raw pixels' the bar)."),
    "digits_curve": (
        "Where MoCo v2 stops gaining on digits at the batch-32 recipe: `configs/digits.py:mocov2` for 120 "
        "epochs, seed 0, kNN every 10 epochs during training (its `metrics.jsonl`: the curve); the converged "
        "budget of the digits study is read from it."),
    "digits_converged": (
        "The digits study's main methods at the converged budget: `configs/digits.py:converged` (90 epochs "
        "instead of 40, everything else as in `digits`), where MoCo v2's kNN stopped rising in "
        "`digits_curve` (k = 200 flat from epoch 80, k = 20 from 90, within two test images). MoCo v2 = "
        "`:converged,mocov2`, PCL = `:converged,pcl`, HCSC = `:converged`; the references are the same "
        "encoder before training and the same pixels."),
    "fashion_mnist": (
        "Fashion-MNIST (60,000 / 10,000 28x28 images), `configs/fashion_mnist.py` and its `:mocov2` / `:pcl` "
        "variants: small-stem ResNet-18 (width 0.5), 100 epochs (10 warm-up), batch 256, queue 8192, "
        "levels / clusterings 200/50/10; "
        "PCL with r = 64. Top-level NMI is also reported against 4 coarse groups: "
        + "; ".join(f"{g} = {', '.join(FASHION_CLASSES[i] for i in m)}"
                    for g, m in FASHION_COARSE.items()) + "."),
    "fashion_mnist_cpu": (
        "Fashion-MNIST on a 2-core CPU budget (`configs/fashion_mnist.py:cpu`, one run <= 15 minutes on an "
        "idle machine): the first 15,000 training images (1,445-1,548 per class) for training, kNN banks and "
        "k-means; the whole 10,000-image test split for kNN and linear_fast; 16 px crops, small-stem "
        "ResNet-18 at width 0.25 (64-d projection), 18 epochs (4 warm-up epochs of InfoNCE only), batch "
        "64 (ShuffleBN groups of 16, lr 0.12), queue 4096, levels / clusterings 50/16/4 (300 images per "
        "bottom cluster); PCL with r = 16. "
        "MoCo v2 = `:cpu,mocov2`, PCL = `:cpu,pcl`, HCSC = `:cpu`; the untrained encoder (reference row) = "
        "`:cpu` with `--config.epochs=0 --config.warmup_epochs=0`. Top-level NMI is also reported against "
        "the 4 coarse groups: "
        + "; ".join(f"{g} = {', '.join(FASHION_CLASSES[i] for i in m)}"
                    for g, m in FASHION_COARSE.items()) + "."),
}
