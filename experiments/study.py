"""Multi-seed study: HCSC vs MoCo v2 and PCL, and the paper's Table-5 ablations (issue 12).

  python experiments/study.py --setting=digits --root=/tmp/study          # train + eval + report
  nice -n 19 python experiments/study.py --setting=fashion_mnist_cpu --root=/tmp/study \
      --results_md=RESULTS.md                                             # 2-core CPU, <= 15 min a run
  python experiments/study.py --setting=fashion_mnist --root=/data/study  # needs a GPU
  python experiments/study.py --setting=fashion_mnist_cpu --report_only --results_md=RESULTS.md

Every run is `python train.py --config <config> --workdir <root>/<setting>/<run> --config.seed=S
<overrides>` followed by `python eval.py --eval=knn|linear_fast|cluster --checkpoint=<workdir>`;
the tables are built from the files those commands write (eval/<mode>_step<N>.json, the last
hierarchy/epoch_XXXX.npz) and nothing else. Runs go in the order of `plan()`: the main methods
seed by seed (so partial results stay balanced), then the ablations.

Archive: each finished run's small outputs (config.json, summary.json, metrics.jsonl, the eval
JSONs, study_times.json, the last hierarchy/epoch_XXXX.npz if under 1 MB; no checkpoints) are
copied to --archive/<setting>/<run> (default experiments/runs, committed to the repository), and
the report is built from the archive alone, so a later checkout continues where this one stopped.

Resuming: a run whose outputs are in the archive, or whose train and eval outputs all exist in
its workdir, is skipped; a half-trained run continues from its newest checkpoint (train.py
resumes by itself); missing evals are redone. A run that
fails (missing dataset, NaN loss, ...) is reported with its command, exit code and the end of its
log in <root>/<setting>/failures.json; the study goes on with the others, reports on what
finished and exits with status 1.

Outputs in --out (default: <archive>/<setting>/report): results.json (one row per finished run),
tables.md (mean +- std over seeds, paired differences to MoCo v2 and PCL), PNG figures;
--results_md also writes RESULTS.md (one section per setting of the archive; a setting with no
archived run keeps the section the file already has; figures under results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = os.path.join(REPO, "experiments", "runs")
EVAL_MODES = ("knn", "linear_fast", "cluster")
ARCHIVED_FILES = ("config.json", "summary.json", "reference.json", "metrics.jsonl", "study_times.json")
MAX_ARCHIVED_HIERARCHY = 1 << 20  # bytes

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


def plan(setting: Setting):
    """-> [(method, seed)] in run order: references (cheap), main methods seed-major, then
    ablations seed-major."""
    order = []
    for group in ("reference", "main", "ablation"):
        methods = [m for m in setting.methods if m.group == group and m.reuse is None]
        for seed in sorted({s for m in methods for s in m.seeds}):
            order += [(m, seed) for m in methods if seed in m.seeds]
    return order


def train_command(setting: Setting, method: Method, seed: int, workdir: str, extra=()) -> list[str]:
    return [sys.executable, "train.py", f"--config=configs/{method.config}", f"--workdir={workdir}",
            f"--config.seed={seed}", "--config.progress_bar=False", *setting.common, *method.overrides,
            *extra]


def eval_command(setting: Setting, mode: str, workdir: str) -> list[str]:
    cmd = [sys.executable, "eval.py", f"--eval={mode}", f"--checkpoint={workdir}",
           "--config.progress_bar=False"]
    if mode == "knn":
        cmd.append("--config.evals.knn.ks=(20,200)")
    if mode == "cluster":
        cmd.append(f"--config.evals.cluster.ks=({setting.num_classes},)")
    return cmd + list(setting.eval_overrides)


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


def archive_run(workdir: str, dest: str) -> list[str]:
    """Copies the small outputs of a finished run (ARCHIVED_FILES, the newest eval JSON of each
    mode, the last hierarchy npz when under MAX_ARCHIVED_HIERARCHY bytes) to `dest` -> the files
    written (relative to dest). Written into `dest`.tmp first, then renamed: an archive folder is
    whole or absent."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "eval"))
    names = [f for f in ARCHIVED_FILES if os.path.isfile(os.path.join(workdir, f))]
    for mode in EVAL_MODES:
        files = glob.glob(os.path.join(workdir, "eval", f"{mode}_step*.json"))
        newest = max(files, key=lambda p: int(re.search(r"_step(\d+)\.json$", p).group(1)))
        names.append(os.path.relpath(newest, workdir))
    hierarchies = sorted(glob.glob(os.path.join(workdir, "hierarchy", "epoch_*.npz")))
    if hierarchies and os.path.getsize(hierarchies[-1]) <= MAX_ARCHIVED_HIERARCHY:
        os.makedirs(os.path.join(tmp, "hierarchy"))
        names.append(os.path.relpath(hierarchies[-1], workdir))
    for name in names:
        shutil.copy2(os.path.join(workdir, name), os.path.join(tmp, name))
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return sorted(names)


def _run(cmd, log_path) -> tuple[int, float]:
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return rc, time.time() - t0


def _tail(path, lines=15) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _lock(workdir: str) -> bool:
    """Claims a run for this process (<workdir>/study.lock with its pid); False if another live
    study process holds it. A lock left by a dead process is taken over."""
    path = os.path.join(workdir, "study.lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(path).read().strip() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError, FileNotFoundError):
                try:
                    os.remove(path)  # stale
                except FileNotFoundError:
                    pass
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def execute(setting: Setting, root: str, extra=(), only=None, log=print, archive=ARCHIVE) -> list[dict]:
    """Trains and evaluates every planned run not yet complete, archiving each as it finishes
    (`archive_run`). -> failures (dicts). Several study processes may work on one root at once:
    each run is claimed by a lock file."""
    failures = []
    for method, seed in plan(setting):
        if only and slug(method.name) not in only:
            continue
        workdir = run_dir(root, setting, method, seed)
        kept = run_dir(archive, setting, method, seed)
        name = f"{method.name} seed {seed}"
        if complete(kept):
            log(f"[skip] {name}: archived ({kept})")
            continue
        todo = [m for m in EVAL_MODES if eval_result(workdir, m) is None]
        if trained(workdir) and not todo:
            archive_run(workdir, kept)
            log(f"[skip] {name}: complete ({workdir}); archived to {kept}")
            continue
        os.makedirs(workdir, exist_ok=True)
        if not _lock(workdir):
            log(f"[busy] {name}: another study process is running it")
            continue
        try:
            if method.pixels_of:
                failed = _pixels_run(setting, method, seed, workdir, name, todo, (archive, root), log)
            else:
                failed = _execute_run(setting, method, seed, workdir, name, todo, extra, log)
            failures += failed
            if not failed:
                archive_run(workdir, kept)
                log(f"[archived] {name}: {kept}")
        finally:
            os.remove(os.path.join(workdir, "study.lock"))
    return failures


def _execute_run(setting, method, seed, workdir, name, todo, extra, log) -> list[dict]:
    """Trains (or resumes) one run and runs its missing evals. -> its failures."""
    failures = []
    log_path = os.path.join(workdir, "study.log")
    times_path = os.path.join(workdir, "study_times.json")
    times = json.load(open(times_path)) if os.path.isfile(times_path) else {}
    if not trained(workdir):
        cmd = train_command(setting, method, seed, workdir, extra)
        log(f"[train] {name}: {' '.join(cmd)}")
        rc, secs = _run(cmd, log_path)
        times["train_seconds"] = times.get("train_seconds", 0.0) + secs
        times["train_command"] = " ".join(cmd[1:])
        times.setdefault("environment", environment())  # where it trained (its first part, if resumed)
        json.dump(times, open(times_path, "w"), indent=2)
        if rc != 0 or not trained(workdir):
            failures.append(dict(run=name, workdir=workdir, stage="train", command=" ".join(cmd),
                                 returncode=rc, log=log_path, log_tail=_tail(log_path)))
            log(f"[FAILED] {name}: train.py exited with {rc}; see {log_path}:\n{_tail(log_path, 5)}")
            return failures
    for mode in todo:
        cmd = eval_command(setting, mode, workdir)
        rc, secs = _run(cmd, log_path)
        times[f"eval_{mode}_seconds"] = secs
        json.dump(times, open(times_path, "w"), indent=2)
        if rc != 0 or eval_result(workdir, mode) is None:
            failures.append(dict(run=name, workdir=workdir, stage=f"eval {mode}", command=" ".join(cmd),
                                 returncode=rc, log=log_path, log_tail=_tail(log_path)))
            log(f"[FAILED] {name}: eval.py --eval={mode} exited with {rc}; see {log_path}")
            break
    else:
        log(f"[done] {name} ({times.get('train_seconds', 0):.0f} s training)")
    return failures


def _pixels_run(setting, method, seed, workdir, name, todo, roots, log) -> list[dict]:
    """The raw-pixel reference: `eval.py --checkpoint=pixels:<workdir>` for each missing mode, on
    the data of the `pixels_of` method's run of this seed (its config.json, copied here)."""
    source = next(m for m in setting.methods if m.name == method.pixels_of)
    data_of = next((d for d in (run_dir(r, setting, source, seed) for r in roots) if trained(d)), None)
    if data_of is None:
        log(f"[FAILED] {name}: needs {source.name} seed {seed} first (its data and crops)")
        return [dict(run=name, workdir=workdir, stage="data", command="", returncode=None, log="",
                     log_tail=f"no trained run of {source.name} seed {seed}")]
    shutil.copy(os.path.join(data_of, "config.json"), os.path.join(workdir, "config.json"))
    times = dict(environment=environment(), train_seconds=0.0,
                 train_command=f"eval.py --checkpoint=pixels:<run> on the data of {source.name} seed {seed}")
    log_path = os.path.join(workdir, "study.log")
    for mode in todo:
        cmd = eval_command(setting, mode, f"pixels:{workdir}") + [f"--out={os.path.join(workdir, 'eval')}"]
        rc, times[f"eval_{mode}_seconds"] = _run(cmd, log_path)
        if rc != 0 or eval_result(workdir, mode) is None:
            log(f"[FAILED] {name}: eval.py --eval={mode} exited with {rc}; see {log_path}")
            return [dict(run=name, workdir=workdir, stage=f"eval {mode}", command=" ".join(cmd),
                         returncode=rc, log=log_path, log_tail=_tail(log_path))]
    json.dump(times, open(os.path.join(workdir, "study_times.json"), "w"), indent=2)
    json.dump(dict(encoder=PIXELS, data_of=f"{source.name} seed {seed}"),
              open(os.path.join(workdir, "reference.json"), "w"), indent=2)
    log(f"[done] {name}")
    return []


# ---------------------------------------------------------------------------------------------
# Collecting and reporting


def _labels(config_path: str):
    """The labels of the training split of the run whose config.json is `config_path`."""
    sys.path.insert(0, REPO)
    from hcsc_jax.data import sources  # the dataset's labels only

    config = json.load(open(config_path))
    return sources.load_dataset(config["dataset"], config["train_split"], config.get("data_dir")).labels


def level_nmi(workdir: str, labels, coarse=None) -> dict:
    """NMI of each prototype level of the run's last hierarchy/epoch_XXXX.npz against the train
    labels (and of the top level against a coarse grouping). {} without a hierarchy."""
    from sklearn.metrics import normalized_mutual_info_score as nmi

    files = sorted(glob.glob(os.path.join(workdir, "hierarchy", "epoch_*.npz")))
    if not files:
        return {}
    with np.load(files[-1]) as z:
        levels = []
        while f"level{len(levels)}/assignments" in z:
            levels.append(np.asarray(z[f"level{len(levels)}/assignments"]))
        sizes = [int(z[f"level{l}/centroids"].shape[0]) for l in range(len(levels))]
    out = {"hierarchy_file": os.path.basename(files[-1]), "level_sizes": sizes,
           "level_nmi": [float(nmi(labels, a)) for a in levels]}
    if coarse is not None:
        top = int(np.argmin(sizes))
        out["top_level_coarse_nmi"] = float(nmi(coarse, levels[top]))
    return out


def collect(setting: Setting, archive: str) -> list[dict]:
    """One row per archived run (train + every eval), from the run's own files."""
    labels = {}  # train split -> its labels
    rows = []
    for method in setting.methods:
        source = next(m for m in setting.methods if m.name == method.reuse) if method.reuse else method
        for seed in method.seeds:
            workdir = run_dir(archive, setting, source, seed)
            if not complete(workdir):
                continue
            results = {m: eval_result(workdir, m) for m in EVAL_MODES}
            knn, lin, clu = results["knn"]["per_k"], results["linear_fast"], results["cluster"]["per_k"]
            k = str(setting.num_classes)
            times = json.load(open(os.path.join(workdir, "study_times.json")))
            row = dict(method=method.name, group=method.group, seed=seed,
                       environment=times.get("environment"),
                       workdir=os.path.relpath(workdir, REPO) if workdir.startswith(REPO) else workdir,
                       knn20=knn["20"]["top1"], knn200=knn["200"]["top1"], linear_fast=lin["top1"],
                       nmi=clu[k]["nmi"], ami=clu[k]["ami"], train_seconds=times.get("train_seconds"),
                       command=times.get("train_command"))
            config_path = os.path.join(workdir, "config.json")
            split = json.load(open(config_path))["train_split"]
            if split not in labels:
                labels[split] = _labels(config_path)
            coarse = fashion_coarse_labels(labels[split]) if setting.coarse == "fashion_mnist" else None
            row.update(level_nmi(workdir, labels[split], coarse))
            row.update(_curve(workdir))
            row.update(last_epoch(workdir))
            rows.append(row)
    return rows


def last_epoch(workdir: str) -> dict:
    """The last epoch record's InfoNCE loss and instance accuracy (%) of a trained run's
    metrics.jsonl: whether it left the log(K+1) plateau. {} for a run without one."""
    path = os.path.join(workdir, "metrics.jsonl")
    epochs = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    epochs = [r for r in epochs if r.get("type") == "epoch" and "loss_instance" in r]
    if not epochs:
        return {}
    queue = json.load(open(os.path.join(workdir, "config.json")))["queue_size"]
    last = epochs[-1]
    acc = last.get("instance_acc")  # (with instance selection: one per level, averaged)
    if acc is None:
        acc = np.mean([v for k, v in last.items() if k.startswith("instance_acc/")])
    return dict(last_loss_instance=last["loss_instance"], last_instance_acc=100 * float(acc),
                plateau=float(np.log(queue + 1)))


def _curve(workdir: str) -> dict:
    """kNN-vs-epoch points, if the run's metrics.jsonl holds evaluator records (any numeric key
    with "knn" and "top1" in its name on a record with an epoch)."""
    path = os.path.join(workdir, "metrics.jsonl")
    points, by_k = [], []  # (epoch from 0, best top-1); (epochs done, k=20, k=200 top-1)
    if os.path.isfile(path):
        for line in open(path):
            rec = json.loads(line)
            keys = sorted(k for k, v in rec.items()
                          if "knn" in k and "top1" in k and isinstance(v, (int, float)))
            if keys and "epoch" in rec:
                points.append((rec["epoch"], rec[keys[0]]))
                if "knn/per_k/20/top1" in rec:
                    by_k.append((rec["epoch"] + 1, rec["knn/per_k/20/top1"], rec.get("knn/per_k/200/top1")))
    return {"knn_curve": points, "knn_by_epoch": by_k} if points else {}


METRICS = (("knn20", "kNN top-1 k=20 (%)"), ("knn200", "kNN top-1 k=200 (%)"),
           ("linear_fast", "linear_fast top-1 (%)"), ("nmi", "NMI (k-means, k=#classes)"),
           ("ami", "AMI (k-means, k=#classes)"))


def _ms(values, digits=2):
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return "-"
    std = v.std(ddof=1) if len(v) > 1 else float("nan")
    return f"{v.mean():.{digits}f} ± {std:.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def _digits(metric):
    return 3 if metric in ("nmi", "ami") else 2


def tables(setting: Setting, rows: list[dict]) -> str:
    by_method = {m.name: [r for r in rows if r["method"] == m.name] for m in setting.methods}
    out = []
    for group, title in (("reference", "Reference"), ("main", "Methods"),
                         ("ablation", "Ablations (Table-5 style: the HCSC config with one switch changed)")):
        methods = [m for m in setting.methods if m.group == group]
        if not methods:
            continue
        out.append(f"#### {title}\n")
        out.append("| method | seeds done / planned | " + " | ".join(h for _, h in METRICS)
                   + " | NMI per prototype level | last epoch: InfoNCE loss (plateau log(K+1)) / instance "
                     "acc (%) | train wall time (s) |")
        out.append("|" + " --- |" * (len(METRICS) + 5))
        for m in methods:
            rs = by_method[m.name]
            seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
            cells = [_ms([r[k] for r in rs], _digits(k)) for k, _ in METRICS]
            lv = [r["level_nmi"] for r in rs if "level_nmi" in r]
            lvl = " / ".join(_ms(col, 3) for col in zip(*lv)) if lv else "-"
            if lv:
                lvl += f" ({'/'.join(map(str, rs[0]['level_sizes']))})"
            if any("top_level_coarse_nmi" in r for r in rs):
                lvl += "; top vs coarse groups " + _ms([r["top_level_coarse_nmi"] for r in rs], 3)
            t = _ms([r["train_seconds"] for r in rs if r.get("train_seconds")], 0)
            last = [r for r in rs if "last_loss_instance" in r]
            inst = (f"{_ms([r['last_loss_instance'] for r in last], 2)} ({last[0]['plateau']:.2f}) / "
                    f"{_ms([r['last_instance_acc'] for r in last], 1)}") if last else "-"
            out.append(f"| {m.name} | {len(rs)} / {len(m.seeds)} (seeds {seeds or '-'}) | "
                       + " | ".join(cells) + f" | {lvl} | {inst} | {t} |")
        out.append("")
    if setting.curve_table:  # the in-training kNN of each run, epoch by epoch
        for r in rows:
            pts = r.get("knn_by_epoch") or []
            if pts:
                out.append(f"#### kNN top-1 during training: {r['method']}, seed {r['seed']} "
                           "(k = 20 / 200, %)\n")
                out.append("| epochs done | " + " | ".join(str(e) for e, _, _ in pts) + " |")
                out.append("|" + " --- |" * (len(pts) + 1))
                out.append("| k = 20 | " + " | ".join(f"{a:.2f}" for _, a, _ in pts) + " |")
                out.append("| k = 200 | " + " | ".join("-" if b is None else f"{b:.2f}" for _, _, b in pts)
                           + " |")
                out.append("")
    # Paired differences over the seeds both have: every method vs MoCo v2 and vs PCL; the ablations also vs
    # "hierarchical prototypes, no selection" (what the selection adds, as the paper's Table 5).
    no_sel = next((m.name for m in setting.methods if m.name.startswith("hier. prototypes")), None)
    for base_name, methods in ((PIXELS, [m.name for m in setting.methods if m.name != PIXELS]),
                               ("MoCo v2", [m.name for m in setting.methods
                                            if m.name != "MoCo v2" and m.group != "reference"]),
                               ("PCL", [m.name for m in setting.methods if m.name not in ("MoCo v2", "PCL")]),
                               (no_sel, [m.name for m in setting.methods
                                         if m.group == "ablation" and m.name != no_sel]),
                               (setting.baseline, [m.name for m in setting.methods if m.group != "reference"
                                                   and m.name != setting.baseline])):
        base = _by_seed(by_method.get(base_name, []))
        if not base:
            continue
        lines = []
        for name in methods:
            pairs = [(r, base[r["seed"]]) for r in by_method[name] if r["seed"] in base]
            if not pairs:
                continue
            cells = []
            for k, _ in METRICS:
                d = [a[k] - b[k] for a, b in pairs]
                cells.append(_ms(d, _digits(k)) + " [" + ", ".join(f"{x:+.{_digits(k)}f}" for x in d) + "]")
            lines.append(f"| {name} | {len(pairs)} | " + " | ".join(cells) + " |")
        if lines:
            same = "every seed against its one row" if base_name == PIXELS else "same seed"
            out.append(f"#### Paired difference to {base_name} ({same}): method − {base_name}, "
                       "mean ± std [per seed]\n")
            out.append("| method | paired seeds | " + " | ".join(f"Δ {h}" for _, h in METRICS) + " |")
            out.append("|" + " --- |" * (len(METRICS) + 2))
            out += lines + [""]
    return "\n".join(out)


class _AtEverySeed(dict):
    """{any seed: the one row}: the raw pixels have no initialization to pair by."""

    def __init__(self, row: dict):
        super().__init__({row["seed"]: row})
        self.row = row

    def __contains__(self, seed) -> bool:
        return True

    def __getitem__(self, seed) -> dict:
        return self.row


def _by_seed(rows: list[dict]) -> dict:
    """{seed: row}; the raw pixels (one row) stand beside every seed."""
    if len(rows) == 1 and rows[0]["method"] == PIXELS:
        return _AtEverySeed(rows[0])
    return {r["seed"]: r for r in rows}


def verdicts(setting: Setting, rows: list[dict]) -> list[str]:
    """Plain sentences: where HCSC does / does not beat each baseline: the paired mean difference,
    its 95% t-interval over seeds and the number of seeds HCSC is ahead on."""
    from scipy import stats

    by = {m.name: _by_seed([r for r in rows if r["method"] == m.name]) for m in setting.methods}
    lines = ["#### Where HCSC wins and where it does not (paired over common seeds)", ""]
    for other in (PIXELS, "MoCo v2", "PCL"):
        if not by.get("HCSC") or not by.get(other):
            continue
        seeds = sorted(s for s in by["HCSC"] if s in by[other])
        if not seeds:
            continue
        for k, h in METRICS:
            d = np.array([by["HCSC"][s][k] - by[other][s][k] for s in seeds])
            wins, n, f = int((d > 0).sum()), len(d), _digits(k)
            if n > 1:
                half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)
                ci = f"95% CI [{d.mean() - half:+.{f}f}, {d.mean() + half:+.{f}f}]"
                clear = abs(d.mean()) > half
            else:
                ci, clear = "one seed, no interval", False
            verdict = ("HCSC higher" if d.mean() > 0 else "HCSC **not** higher") + (
                " (the interval excludes 0)" if clear else "; not distinguishable from seed noise")
            lines.append(f"- {h}: HCSC − {other} = {d.mean():+.{f}f}, {ci}, HCSC ahead on {wins}/{n} seeds: "
                         f"{verdict}")
    return lines if len(lines) > 2 else []


def figures(setting: Setting, rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    methods = [m.name for m in setting.methods if any(r["method"] == m.name for r in rows)]
    if not methods:
        return made
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.6))
    for ax, (k, h) in zip(axes, METRICS):
        vals = [[r[k] for r in rows if r["method"] == m] for m in methods]
        means = [np.mean(v) for v in vals]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals]
        x = np.arange(len(methods))
        ax.bar(x, means, yerr=stds, capsize=3, color=["C0" if m in ("MoCo v2", "PCL", "HCSC") else "C7"
                                                       for m in methods])
        for xi, v in zip(x, vals):
            ax.plot([xi] * len(v), v, "k.", ms=3)
        lo = min(min(v) for v in vals)
        hi = max(max(v) for v in vals)
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
        ax.set_xticks(x, [m.replace(", ", ",\n").replace(" (", "\n(") for m in methods], rotation=60,
                      ha="right", fontsize=6)
        ax.set_title(h, fontsize=8)
    fig.suptitle(f"{setting.name}: mean ± std over seeds (dots: seeds; y axes do not start at 0)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{setting.name}_bars.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    made.append(path)
    curves = [r for r in rows if r.get("knn_curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for i, m in enumerate(methods):
            for r in [r for r in curves if r["method"] == m]:
                e, v = zip(*r["knn_curve"])
                ax.plot(e, v, color=f"C{i}", alpha=0.6, label=m if r is curves[0] or True else None)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=6)
        ax.set_xlabel("epoch")
        ax.set_ylabel("kNN top-1")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{setting.name}_knn_curves.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        made.append(path)
    return made


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("jax", "flax", "faiss-cpu", "numpy", "scikit-learn", "optax"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = f"CPU: {cpu}, {os.cpu_count()} cores"
    try:
        out = subprocess.run([sys.executable, "-c",
                              "import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)"],
                             capture_output=True, text=True, timeout=120)
        device += f"; jax backend: {out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return dict(versions=versions, device=device, date=datetime.datetime.now(datetime.UTC).isoformat(
        timespec="minutes"))


def report(setting: Setting, archive: str, out_dir: str, failures: list[dict], command: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    rows = collect(setting, archive)
    env = environment()
    trained_on = sorted({_env_line(r["environment"]) for r in rows if r.get("environment")})
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(setting=setting.name, rows=rows, environment=env, failures=failures,
                       command=command), f, indent=2)
    text = tables(setting, rows)
    done = {m.name: sum(r["method"] == m.name for r in rows) for m in setting.methods}
    header = [f"Command: `{command}`", "", f"Report written {_env_line(env)}.", ""]
    if trained_on:
        header += ["Runs trained on (date of each run's start; machine; versions):", ""]
        header += [f"- {line}" for line in trained_on] + [""]
    header += ["Finished runs per method: " + ", ".join(f"{k} {v}" for k, v in done.items()), ""]
    if failures:
        header += ["Failed runs:", ""] + [f"- {f['run']} ({f['stage']}, exit {f['returncode']}): "
                                          f"see {f['log']}" for f in failures] + [""]
    text = "\n".join(header) + "\n" + text + "\n" + "\n".join(verdicts(setting, rows)) + "\n"
    with open(os.path.join(out_dir, "tables.md"), "w") as f:
        f.write(text)
    figs = figures(setting, rows, out_dir)
    return dict(rows=rows, text=text, figures=figs, env=env)


def _env_line(env: dict) -> str:
    return (f"{env['date'][:10]}; {env['device']}; "
            + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))


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
METRIC_NOTES = (
    "Metrics per run, all from `eval.py` on the final checkpoint unless said otherwise: kNN top-1 on the "
    "held-out split (k = 20 and 200, T = 0.07, pooled features of the query encoder); **linear_fast** top-1 "
    "(`eval.py --eval=linear_fast`: the linear protocol's classifier on cached center-crop features, no "
    "augmentation; not the full linear protocol); NMI / AMI of faiss k-means of the pooled train features "
    "with k = number of classes (`--eval=cluster`); for PCL and HCSC the NMI of each prototype level / "
    "clustering of the run's last `hierarchy/epoch_XXXX.npz` against the train labels. Means ± sample std "
    "over the seeds that finished; paired differences are taken seed by seed against MoCo v2 (same seed = "
    "same initialization and data order; and against PCL), listed per seed in brackets. Train wall time "
    "includes compilation, "
    "the final in-train evaluation, and contention: runs shared the machine with other jobs.")


def _sections(text: str) -> dict[str, str]:
    """The "## <name>" sections of a RESULTS.md text -> {name: the section's text, heading included}."""
    found = list(re.finditer(r"^## (\S+)\s*$", text, flags=re.M))
    return {m.group(1): text[m.start():found[i + 1].start() if i + 1 < len(found) else len(text)].strip()
            for i, m in enumerate(found)}


RESULTS_SECTIONS = ("fashion_mnist_cpu", "digits", "digits_converged", "digits_curve", "digits_recipe",
                    "fashion_mnist")


def results_md(archive: str, path: str, command: str, names=RESULTS_SECTIONS) -> str:
    """RESULTS.md: one section per setting from <archive>/<setting>/report (figures copied next to
    `path` under results/). A setting with no archived run keeps the section `path` already has
    (made by an earlier study whose runs were not archived), or gets a note saying it was not run."""
    fig_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "results")
    before = _sections(open(path).read()) if os.path.isfile(path) else {}
    parts = ["# Results: HCSC vs MoCo v2 and PCL, with the paper's ablations", "",
             f"Written by `{command}` from the runs' own outputs (see `experiments/study.py`).", "",
             METRIC_NOTES, ""]
    notes = os.path.join(REPO, "experiments", "RESULTS_NOTES.md")
    if os.path.isfile(notes):
        parts += [open(notes).read().strip(), ""]
    for name in names:
        setting = SETTINGS[name]
        report_dir = os.path.join(archive, name, "report")
        res_path = os.path.join(report_dir, "results.json")
        rows = json.load(open(res_path))["rows"] if os.path.isfile(res_path) else []
        if not rows and name in before and "**Not run yet.**" not in before[name]:
            parts += [before[name], ""]
            continue
        parts += [f"## {name}", "", DESCRIPTION.get(name, ""), ""]
        if not rows:
            parts += [
                "**Not run yet.**" + (" This setting needs a GPU (about 52 images/s on the 2-core CPU, "
                                      "i.e. days for 9 runs) and none was available to this study; "
                                      "it waits for one." if setting.needs_gpu else ""),
                "", f"Command: `python experiments/study.py --setting={name} --root=<runs dir> "
                    f"--results_md=RESULTS.md` (MoCo v2, PCL, HCSC x seeds "
                    f"{', '.join(map(str, setting.methods[0].seeds))}).", ""]
            continue
        parts += [open(os.path.join(report_dir, "tables.md")).read().strip(), ""]
        os.makedirs(fig_dir, exist_ok=True)
        for png in sorted(glob.glob(os.path.join(report_dir, "*.png"))):
            shutil.copy(png, fig_dir)
            rel = os.path.relpath(os.path.join(fig_dir, os.path.basename(png)),
                                  os.path.dirname(os.path.abspath(path)))
            parts += [f"![{os.path.basename(png)}]({rel})", ""]
    for name in EXTRA_SECTIONS:  # written by their own scripts into <archive>/<name>/report.md
        section = os.path.join(archive, name, "report.md")
        if os.path.isfile(section):
            parts += [open(section).read().strip(), ""]
        elif name in before:
            parts += [before[name], ""]
    text = "\n".join(parts)
    with open(path, "w") as f:
        f.write(text)
    return text



# RESULTS.md sections made by other scripts of experiments/ (authors_digits.py: the authors' code
# beside ours under :authors).
EXTRA_SECTIONS = ("authors_digits",)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="digits")
    p.add_argument("--root", default="runs/study", help="where the runs' workdirs go (checkpoints included)")
    p.add_argument("--archive", default=ARCHIVE,
                   help="where each finished run's small outputs are copied, and the report is read from")
    p.add_argument("--out", default=None, help="report folder (default <archive>/<setting>/report)")
    p.add_argument("--report_only", action="store_true",
                   help="only collect what finished and write the report")
    p.add_argument("--only", default="", help="comma-separated method slugs to run (e.g. moco_v2,hcsc)")
    p.add_argument("--extra", action="append", default=[], help="extra train.py flag for every run")
    p.add_argument("--results_md", default=None,
                   help="also write RESULTS.md (every setting's report under --archive)")
    args = p.parse_args(argv)
    setting = SETTINGS[args.setting]
    root, archive = os.path.abspath(args.root), os.path.abspath(args.archive)
    out_dir = os.path.abspath(args.out or os.path.join(archive, setting.name, "report"))
    command = "python experiments/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    fail_path = os.path.join(root, setting.name, "failures.json")
    failures = []
    if not args.report_only:
        os.makedirs(os.path.join(root, setting.name), exist_ok=True)
        only = {s for s in args.only.split(",") if s}
        failures = execute(setting, root, tuple(args.extra), only, log=lambda s: print(s, flush=True),
                           archive=archive)
        with open(fail_path, "w") as f:
            json.dump(failures, f, indent=2)
    elif os.path.isfile(fail_path):
        failures = json.load(open(fail_path))
    res = report(setting, archive, out_dir, failures, command)
    print(res["text"])
    print(f"report: {out_dir}")
    if args.results_md:
        results_md(archive, args.results_md, command)
        print(f"wrote {args.results_md}")
    if failures:
        print(f"{len(failures)} run(s) failed: " + "; ".join(f"{f['run']} ({f['stage']})" for f in failures),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
