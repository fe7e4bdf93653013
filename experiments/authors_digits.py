"""The authors' own training on digits beside ours under `:authors`, over seeds (docs/method.md §9).

  python experiments/authors_digits.py                       # every missing run, then the table
  python experiments/authors_digits.py --only=authors_mocov2 --seeds=0  # one side, one method
  python experiments/authors_digits.py --report_only

"authors" runs their `pretrain.main()` unchanged (experiments/authors_code.py: the CPU shims),
one gloo process per ShuffleBN group of configs/digits.py (batch / bn_group_size: 4 of 8 images
now; the archived runs were made at its batch 128, 4 of 32), with the
recipe of `configs/digits.py:<method>,authors`: the same encoder (ResNet-18 at width 0.25 with
the small stem, in torchvision's layout), head, queue, lr, epochs, warm-up, levels and k-means
settings. Their data loaders are replaced by ours (their `torchvision` augmentation is not
installable here): the training views are hcsc-jax's augmentation of the digits recipe, the same
function as `train.py`'s, drawn per rank and step; the order of the images is their
`DistributedSampler`'s; the features they cluster are our center crops. Their runs seed torch
with seed * 1000 + rank (their code seeds nothing). "ours" is `python train.py --config
configs/digits.py:<method>,authors --config.seed=<seed>`.

Both sides are evaluated by the same command, `eval.py --eval=knn` (k = 20 and 200, T = 0.07),
theirs after `python -m hcsc_jax.convert import-torch` of their last checkpoint (its query
encoder, rank 0's BatchNorm buffers). Each finished run keeps result.json (and their log) in
experiments/runs/authors_digits/<side>_<method>_seed<seed>/; reruns skip what is there.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
ARCHIVE = os.path.join(REPO, "experiments", "runs", "authors_digits")
METHODS = ("mocov2", "hcsc")
SIDES = ("authors", "ours")


OVERRIDES: dict = {}  # --epochs / --warmup_epochs (smoke runs), on both sides


def digits_config(method: str):
    from configs import digits

    c = digits.get_config(f"{method},authors")
    c.update(OVERRIDES)
    return c


def authors_argv(c, data: str, exp_dir: str) -> list[str]:
    """Their pretrain.py options for the config `c` (4 ranks)."""
    world = c.batch_size // c.bn_group_size
    levels = tuple(c.clustering.num_clusters)
    return [
        "pretrain.py", data, "--dataset", "cifar10",  # their loader of that name is replaced by ours
        "-a", c.model.arch, "-j", "0", "--epochs", str(c.epochs), "-b", str(c.batch_size // world),
        "--lr", str(c.lr), "--momentum", str(c.sgd_momentum), "--wd", str(c.weight_decay),
        "-p", "1000000", "--dim", str(c.model.embed_dim), "--queue_length", str(c.queue_size),
        "--m", str(c.ema_momentum), "--T", str(c.objective.temperature), "--mlp", "1", "--cos", "1",
        "--num-cluster", ",".join(map(str, levels or (1,))),
        "--warmup-epoch", str(c.warmup_epochs if levels else c.epochs),
        "--instance_selection", str(int(c.objective.instance_selection)),
        "--proto_selection", str(int(c.objective.prototype_selection)),
        "--exp-dir", exp_dir, "--dist-url", "env://",
    ]


class _Views:
    """Their train loader: this rank's share of each epoch in their DistributedSampler's order,
    32 images a step, as (views [q, k] (B, C, S, S) float32, dataset indices)."""

    def __init__(self, images, sampler, batch, make, seed, rank):
        self.images, self.sampler, self.batch, self.make = images, sampler, batch, make
        self.seed, self.rank = seed, rank
        self.dataset = images

    def __len__(self):
        return len(self.sampler) // self.batch  # drop_last

    def __iter__(self):
        import jax
        import torch

        order = np.fromiter(iter(self.sampler), np.int64)
        root = jax.random.fold_in(jax.random.key(self.seed), self.rank)
        root = jax.random.fold_in(root, self.sampler.epoch)
        for b in range(len(self)):
            rows = order[b * self.batch:(b + 1) * self.batch]
            x_q, x_k = self.make(jax.random.fold_in(root, b), self.images[rows])
            yield [torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()) for x in (x_q, x_k)], \
                torch.from_numpy(rows)


class _CenterCrops:
    """Their eval loader: this rank's share of the center crops, (images, indices)."""

    def __init__(self, images, sampler, batch, crop):
        self.images, self.sampler, self.batch, self.crop = images, sampler, batch, crop
        self.dataset = images

    def __iter__(self):
        import torch

        order = np.fromiter(iter(self.sampler), np.int64)
        for b in range(0, len(order), self.batch):
            rows = order[b:b + self.batch]
            yield torch.from_numpy(np.asarray(self.crop(self.images[rows])).transpose(0, 3, 1, 2).copy()), \
                torch.from_numpy(rows)

    def __len__(self):
        return -(-len(self.sampler) // self.batch)


def _loaders(c, seed: int, rank: int):
    """Replaces their `hcsc.loader.cifar10(args)`: digits, our views, their samplers."""
    import jax
    import torch

    from hcsc_jax.data import augmentations, sources
    from hcsc_jax.data.batch import Images
    from hcsc_jax.method import train_step as ts
    from hcsc_jax.run import setup

    images = sources.load_dataset(c.dataset, c.train_split).images
    cfg = setup.step_config(c, images.shape[-1])
    mean, std = cfg.view_q.mean, cfg.view_q.std

    @jax.jit
    def make(key, x):
        kq, kk = jax.random.split(key)
        x_q, x_k, _ = ts.make_views(kq, kk, Images((x,), False), cfg)
        return x_q, x_k

    crop = jax.jit(lambda x: augmentations.center_crop(x, c.image_size, mean, std))

    def loaders(args):  # called by their main() once the process group is up
        train_sampler = torch.utils.data.distributed.DistributedSampler(range(len(images)))
        eval_sampler = torch.utils.data.distributed.DistributedSampler(range(len(images)), shuffle=False)
        train = _Views(images, train_sampler, args.batch_size, make, seed, rank)
        evaluation = _CenterCrops(images, eval_sampler, 5 * args.batch_size, crop)
        return train, evaluation, images, images, train_sampler

    return loaders


def run_authors_rank(method: str, seed: int, exp_dir: str) -> int:
    """One rank of their run (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set by `run_authors`)."""
    import torch

    from experiments import authors_code

    c = digits_config(method)
    authors_code.install_shims(c.model.arch, small_stem=c.model.small_stem, width=c.model.width,
                               in_channels=1)
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.manual_seed(seed * 1000 + rank)
    import hcsc.loader
    import pretrain

    hcsc.loader.cifar10 = _loaders(c, seed, rank)
    parse = pretrain.parse_args_main

    def parse_args_main():  # their main reads args.device, which their parser never sets
        args = parse()
        args.device = "cpu"
        return args

    pretrain.parse_args_main = parse_args_main
    sys.argv = authors_argv(c, "digits", exp_dir)
    pretrain.main()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, log_path, env=None) -> float:
    t0 = time.time()
    with open(log_path, "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    return time.time() - t0


def run_authors(method: str, seed: int, work: str) -> dict:
    """Their 4-rank run, then our kNN of its last checkpoint's query encoder."""
    c = digits_config(method)
    world = c.batch_size // c.bn_group_size
    exp_dir = os.path.join(work, "exp")
    os.makedirs(exp_dir, exist_ok=True)
    port, log = _free_port(), os.path.join(work, "train.log")
    procs = []
    t0 = time.time()
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu")
        out = open(log if r == 0 else os.devnull, "a")
        cmd = [sys.executable, __file__, "--rank_of", method, f"--seed={seed}", f"--exp_dir={exp_dir}",
               *(f"--{k}={v}" for k, v in OVERRIDES.items())]
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO))
    try:
        while all(p.poll() in (None, 0) for p in procs) and any(p.poll() is None for p in procs):
            time.sleep(5)
    finally:
        for p in procs:  # a failed rank leaves the others waiting in gloo
            if p.poll() is None:
                p.kill()
            p.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"their run failed: {log}")
    seconds = time.time() - t0
    last = sorted(glob.glob(os.path.join(exp_dir, "checkpoint_*.pth.tar")))[-1]
    encoder = os.path.join(work, "encoder")
    _run([sys.executable, "-m", "hcsc_jax.convert", "import-torch", last, encoder, "--embed-dim",
          str(c.model.embed_dim), "--image-size", str(c.image_size), "--mean", "0.5", "--std", "0.5",
          "--trust-pickle"], os.path.join(work, "eval.log"))
    knn = _knn(encoder, work, ("--config.dataset=digits", f"--config.image_size={c.image_size}",
                               '--config.mean=(0.5,)', '--config.std=(0.5,)'))
    return dict(knn, train_seconds=seconds, checkpoint=os.path.basename(last))


def run_ours(method: str, seed: int, work: str) -> dict:
    workdir = os.path.join(work, "run")
    seconds = _run([sys.executable, "train.py", f"--config=configs/digits.py:{method},authors",
                    f"--workdir={workdir}", f"--config.seed={seed}", "--config.progress_bar=False",
                    *(f"--config.{k}={v}" for k, v in OVERRIDES.items())],
                   os.path.join(work, "train.log"), env=dict(os.environ, JAX_PLATFORMS="cpu"))
    return dict(_knn(workdir, work, ()), train_seconds=seconds)


def _knn(checkpoint: str, work: str, extra) -> dict:
    _run([sys.executable, "eval.py", "--eval=knn", f"--checkpoint={checkpoint}", *extra],
         os.path.join(work, "eval.log"), env=dict(os.environ, JAX_PLATFORMS="cpu"))
    path = sorted(glob.glob(os.path.join(checkpoint, "eval", "knn_step*.json")))[-1]
    result = json.load(open(path))
    return {"knn": {k: v for k, v in result.items() if k != "config"}}


def report(archive: str) -> str:
    """RESULTS.md's section from the archive: per seed and mean ± std, their code against ours under
    `:authors`, and the difference of the means with Welch's 95% interval and p-value (the two
    sides draw their random numbers differently, so seeds do not pair)."""
    from scipy import stats

    found = {}
    for path in sorted(glob.glob(os.path.join(archive, "*_seed*", "result.json"))):
        r = json.load(open(path))
        found.setdefault((r["side"], r["method"]), []).append(r)
    seeds = sorted({r["seed"] for rs in found.values() for r in rs})
    lines = ["## authors_digits", "",
             "The authors' own training (`pretrain.main()` of their repository, 4 gloo processes of 32 "
             "images, CPU shims only) beside ours under `configs/digits.py:<method>,authors`, the same "
             "budget, encoder and recipe, both read by `eval.py --eval=knn` (T = 0.07) on digits' 360 test "
             "images. Command: `python experiments/authors_digits.py` (docstring: what is theirs and what is "
             "ours in their runs). kNN top-1 (%):", "",
             "| method | side | k | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "| --- | --- | --- |" + " --- |" * (len(seeds) + 1)]
    tests = []
    for method in METHODS:
        for k in (20, 200):
            by_side = {}
            for side in SIDES:
                rs = {r["seed"]: _top1(r["knn"], k) for r in found.get((side, method), [])}
                by_side[side] = [v for v in rs.values() if v is not None]
                cells = [f"{rs[s]:.2f}" if rs.get(s) is not None else "-" for s in seeds]
                lines.append(f"| {method} | {'theirs' if side == 'authors' else 'ours'} | {k} | "
                             + " | ".join(cells) + f" | {_ms(by_side[side])} |")
            a, b = np.array(by_side["ours"]), np.array(by_side["authors"])
            if len(a) > 1 and len(b) > 1:
                tests.append(_welch(method, k, a, b, stats))
    if tests:
        lines += ["", "Ours − theirs (Welch's t over seeds; 95% interval of the difference of means):", ""]
        lines += tests
    dates = sorted({r["date"] for rs in found.values() for r in rs})
    if dates:
        lines += ["", f"Runs of {dates[0]}–{dates[-1]} on a 2-core CPU (jax 0.10.2, torch 2.13.0 CPU), "
                      "at nice 19 beside other jobs."]
    return "\n".join(lines)


def _ms(xs) -> str:
    if not xs:
        return "-"
    return f"{np.mean(xs):.2f} ± {np.std(xs, ddof=1):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def _welch(method: str, k: int, ours: np.ndarray, theirs: np.ndarray, stats) -> str:
    d = ours.mean() - theirs.mean()
    va, vb = ours.var(ddof=1) / len(ours), theirs.var(ddof=1) / len(theirs)
    se = np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(ours) - 1) + vb ** 2 / (len(theirs) - 1)) if se > 0 else 1.0
    half = stats.t.ppf(0.975, dof) * se
    p = stats.ttest_ind(ours, theirs, equal_var=False).pvalue if se > 0 else float("nan")
    verdict = "the interval excludes 0" if abs(d) > half else "not distinguishable from seed noise"
    return (f"- {method}, k = {k}: {d:+.2f} points, 95% CI [{d - half:+.2f}, {d + half:+.2f}], p = {p:.3f} "
            f"({len(ours)} vs {len(theirs)} seeds): {verdict}")


def _top1(result: dict, k: int):
    """kNN top-1 (%) at k of an eval.py knn result, or None."""
    entry = result.get("per_k", {}).get(str(k))
    return None if entry is None else float(entry["top1"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--only", default="", help="comma-separated <side>_<method> (e.g. authors_hcsc)")
    p.add_argument("--root", default="runs/authors_digits", help="where the runs' work directories go")
    p.add_argument("--archive", default=ARCHIVE)
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--epochs", type=int, default=None, help="smoke runs: fewer epochs (both sides)")
    p.add_argument("--warmup_epochs", type=int, default=None, help="smoke runs: with --epochs")
    p.add_argument("--rank_of", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--exp_dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    smoke = {k: getattr(args, k) for k in ("epochs", "warmup_epochs")}
    if args.epochs is not None and args.epochs % 5:
        p.error("--epochs must be a multiple of 5: their code saves a checkpoint every 5 epochs")
    OVERRIDES.update({k: v for k, v in smoke.items() if v is not None})
    if args.rank_of:
        return run_authors_rank(args.rank_of, args.seed, args.exp_dir)
    only = {s for s in args.only.split(",") if s}
    if not args.report_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in METHODS:
                for side in SIDES:
                    name = f"{side}_{method}_seed{seed}"
                    dest = os.path.join(args.archive, name)
                    done = os.path.isfile(os.path.join(dest, "result.json"))
                    if done or (only and f"{side}_{method}" not in only):
                        continue
                    work = os.path.abspath(os.path.join(args.root, name))
                    shutil.rmtree(work, ignore_errors=True)
                    os.makedirs(work)
                    print(f"[run] {name}", flush=True)
                    result = (run_authors if side == "authors" else run_ours)(method, seed, work)
                    os.makedirs(dest, exist_ok=True)
                    with open(os.path.join(dest, "result.json"), "w") as f:
                        json.dump(dict(result, side=side, method=method, seed=seed,
                                       date=time.strftime("%Y-%m-%d")), f, indent=2)
                    shutil.copy(os.path.join(work, "train.log"), os.path.join(dest, "train.log"))
                    print(f"[done] {name}: {result['knn']}", flush=True)
    text = report(args.archive)
    with open(os.path.join(args.archive, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
