"""End to end: the real `train.py` loop beside the step benchmark of the same model, same run.

For each setting it runs `train.py` (a subprocess: the CLI a user runs, not a copy of its loop),
reads the run's metrics.jsonl, and runs `benchmarks/train_step.py` with the same model, image
size, batch, queue and prototype levels (taken from the resolved config). It prints per setting:
the step benchmark's pipelined images/s, train.py's images/s over the epochs after the second
(the warm-up epoch and the first prototype epoch each compile a step: images trained / the
epochs' wall time, clustering and in-training evaluation included), their ratio, and the
shares of that wall time spent waiting for input, clustering and evaluating (the epoch
records' `input_wait_seconds`, `clustering_seconds`, the eval records' `eval_seconds`).

Settings:
- imagenet: `configs/imagenet_hcsc_200ep.py` (streamed, host decoding) on a generated
  ImageNet-layout folder of --num_images 500x375 JPEGs (quality 90), --epochs epochs, the first
  one warm-up, levels scaled to the folder's size;
- imagenet_prepared: the same images through `python -m hcsc_jax.data.prepare` (longest side 256);
- fashion_mnist: `configs/fashion_mnist.py` (resident in device memory), --epochs epochs.

  # on a GPU host (the published model: ResNet-50, 224 px, batch 256, bf16):
  python benchmarks/end_to_end.py --num_images=25600 --epochs=4
  # this project's CPU machine: a small model so that it finishes in minutes
  python benchmarks/end_to_end.py --preset=cpu
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app, flags

if not __package__:  # run as a script (python benchmarks/x.py): the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.jpegs import write_folder  # noqa: E402

flags.DEFINE_enum("preset", "gpu", ["gpu", "cpu"], "gpu: the published settings; cpu: a small model")
flags.DEFINE_list("settings", ["imagenet", "imagenet_prepared", "fashion_mnist"], "which settings to run")
flags.DEFINE_integer("num_images", 0, "generated JPEGs (0: 25,600 gpu, 512 cpu)")
flags.DEFINE_integer("epochs", 4, "epochs per run, at least 3 (the first two compile the steps)")
flags.DEFINE_list("extra", [], "more --config.X=Y overrides for every train.py run")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {  # a small model on this project's 2-core CPU machine
    "imagenet": ["model.arch=resnet18", "model.width=0.25", "model.dtype=float32", "image_size=64",
                 "batch_size=32", "bn_group_size=8", "queue_size=256", "augment.local_views=()"],
    "fashion_mnist": ["data_dir=/tmp/fashion_mnist_tiny", "image_size=16", "batch_size=64", "bn_group_size=8",
                      "queue_size=128", "model.width=0.125", "model.embed_dim=16", "model.hidden_dim=32",
                      "clustering.num_clusters=(12,6,3)", "evals.summary.num_clusters=(10,)"],
}


def run(cmd: list[str], env: dict | None = None) -> str:
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def resolved_config(config: str, overrides: list[str]):
    """The config train.py will run: `get_config()` of the file, then the X=Y overrides (values as
    Python literals, else strings), as `--config.X=Y` sets them."""
    spec = importlib.util.spec_from_file_location("config_under_test", config)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    spec.loader.exec_module(module)
    c = module.get_config()
    for override in overrides:
        path, _, text = override.partition("=")
        *parents, name = path.split(".")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node = c
        for p in parents:
            node = node[p]
        node[name] = value
    return c


def step_benchmark(config) -> float:
    """benchmarks/train_step.py's pipelined images/s for the model, batch and levels of `config`."""
    m = config.model
    cmd = [sys.executable, "benchmarks/train_step.py", f"--arch={m.arch}", f"--width={m.width}",
           f"--image_size={config.image_size}", f"--batch={config.batch_size}",
           f"--bn_group_size={config.bn_group_size}", f"--queue={config.queue_size}",
           f"--levels={','.join(str(k) for k in config.clustering.num_clusters)}",
           f"--embed_dim={m.embed_dim}", f"--dtype={m.dtype}", f"--{'' if m.small_stem else 'no'}small_stem",
           f"--{'' if config.augment.local_views else 'no'}multicrop", "--steps=20", "--warmup_steps=3"]
    out = run(cmd, dict(os.environ, PYTHONPATH=ROOT))
    return float(re.search(r"pipelined .*?([\d.]+) images/s", out).group(1))


def train(config_arg: str, overrides: list[str], workdir: str) -> dict:
    """Runs train.py; -> its images/s after the second epoch and the shares of that wall time."""
    start = time.perf_counter()
    run([sys.executable, "train.py", f"--config={config_arg}", f"--workdir={workdir}",
         "--config.progress_bar=False"] + [f"--config.{o}" for o in overrides],
        dict(os.environ, PYTHONPATH=ROOT))
    total = time.perf_counter() - start
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    epochs = [r for r in records if r.get("type") == "epoch" and r["epoch"] >= 2]
    evals = [r for r in records if r.get("type") == "eval" and r["epoch"] >= 2]
    steps = {r["epoch"]: r["step"] for r in records if r.get("type") == "epoch"}
    spe = steps[0]
    batch = json.load(open(os.path.join(workdir, "config.json")))["batch_size"]
    wall = sum(r["epoch_seconds"] for r in epochs) + sum(r.get("eval_seconds", 0) for r in evals)
    return dict(images_per_s=len(epochs) * spe * batch / wall, wall=wall, total=total,
                input=sum(r["input_wait_seconds"] for r in epochs) / wall,
                clustering=sum(r["clustering_seconds"] for r in epochs) / wall,
                eval=sum(r.get("eval_seconds", 0) for r in evals) / wall)


def main(argv):
    del argv
    if FLAGS.epochs < 3:
        raise app.UsageError("--epochs must be at least 3: the first two epochs compile the steps")
    cpu = FLAGS.preset == "cpu"
    n = FLAGS.num_images or (512 if cpu else 25600)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in FLAGS.settings:
            common = [f"epochs={FLAGS.epochs}", "warmup_epochs=1", "checkpoint_every_steps=0",
                      "checkpoint_every_epochs=0"] + list(FLAGS.extra)
            if setting.startswith("imagenet"):
                folder = os.path.join(tmp, "jpeg")
                if not os.path.isdir(folder):
                    for split, count in (("train", n), ("val", max(n // 10, 64))):
                        write_folder(os.path.join(folder, split), count, 375, 500, 90)
                dataset = f"folder:{folder}"
                if setting == "imagenet_prepared":
                    dataset = f"prepared:{os.path.join(tmp, 'prepared')}"
                    for split in ("train", "val"):
                        run([sys.executable, "-m", "hcsc_jax.data.prepare", f"--source=folder:{folder}",
                             f"--split={split}", f"--out={os.path.join(tmp, 'prepared')}", "--max_side=256"],
                            dict(os.environ, PYTHONPATH=ROOT))
                levels = tuple(max(2, n // d) for d in (40, 80, 160))  # 3000/2000/1000 scaled to the data
                overrides = common + [f"dataset={dataset}", f"clustering.num_clusters={levels}",
                                      f"evals.summary.num_clusters={levels[-1:]}"]
                overrides += CPU["imagenet"] if cpu else []
                config_arg = "configs/imagenet_hcsc_200ep.py"
            else:
                if cpu and not os.path.isdir("/tmp/fashion_mnist_tiny"):
                    run([sys.executable, "tests/imagenet_like.py"])
                overrides = common + (CPU["fashion_mnist"] if cpu else [])
                config_arg = "configs/fashion_mnist.py"
            config = resolved_config(os.path.join(ROOT, config_arg), overrides)
            step = step_benchmark(config)
            result = train(config_arg, overrides, os.path.join(tmp, f"run_{setting}"))
            rows.append((setting, step, result))
            r = result
            print(f"{setting}: step benchmark {step:.1f} images/s; train.py {r['images_per_s']:.1f} images/s "
                  f"({r['images_per_s'] / step:.0%}); input wait {r['input']:.0%}, clustering "
                  f"{r['clustering']:.0%}, evaluation {r['eval']:.0%} of {r['wall']:.1f} s", flush=True)
    print(f"summary ({FLAGS.preset} preset, {n} images, {FLAGS.epochs} epochs, "
          f"{time.strftime('%Y-%m-%d')}):")
    print("  setting | step benchmark images/s | train.py images/s | ratio | input wait | clustering | "
          "evaluation")
    for setting, step, r in rows:
        print(f"  {setting} | {step:.1f} | {r['images_per_s']:.1f} | {r['images_per_s'] / step:.2f} | "
              f"{r['input']:.0%} | {r['clustering']:.0%} | {r['eval']:.0%}")


if __name__ == "__main__":
    app.run(main)
