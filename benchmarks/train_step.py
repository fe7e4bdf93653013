"""Times the whole HCSC train step (`hcsc_jax.method.train_step`) on synthetic data resident on device.

One step, as in training after the warm-up epochs: gather the global batch of uint8 images by
index, two MoCo v2 views augmented on device, EMA of the key encoder, key forward with ShuffleBN,
query forward + backward, the HCSC objective with every prototype level (and the queue's cached
ICSC normalizers), SGD update, enqueue. The step is compiled ahead of time (compilation is timed
separately and excluded), run `--warmup_steps` times, then timed two ways over `--steps` steps:
  blocked:   each step dispatched, waited for (`jax.block_until_ready` on state and metrics) and
             timed on its own; median step time, images/s = batch / median (the headline figure);
  pipelined: the same number of steps dispatched back to back with one wait at the end, as the
             trainer runs them (host dispatch overlaps device work); mean step time.
`--profile_dir` then traces a few steps and prints the device time per kernel class (GPU).

FLOPs convention (model FLOPs, as in MFU): one step = 4 forward-equivalents per image (query
forward + backward = 3, key forward = 1). The forward cost is reported two ways:
  nominal: ResNet-50 4.1 GMACs = 8.2 GFLOP per image at 224 px (ResNet-18 1.82 / ResNet-34 3.67
           GMACs), scaled by (image_size / 224)^2 * width^2 (not valid with --small_stem); for a
           ViT the matmul MACs counted from its shapes (`vit_macs`: patch embedding, per block
           12 N D^2 for qkv, proj and MLP plus 2 N^2 D for attention, N tokens, D dims);
  XLA:     the FLOP count of XLA's cost analysis of the encoder forward (train mode), lowered
           for CPU (on the GPU host with jax 0.11.2 that cost analysis returned None: skipped).
MFU = achieved model TFLOP/s / --peak_tflops (default 989: H100 SXM bf16 dense tensor core).
Augmentation, BN, the objective and the optimizer are not counted as model FLOPs.

  # paper setting (ResNet-50, 224 px, batch 256, K = 16384, 3000/2000/1000 prototypes):
  python benchmarks/train_step.py --dtype=bfloat16
  # small CPU config (compilation dominates: 24-54 s of a 66-102 s run on 2 busy cores):
  python benchmarks/train_step.py --arch=resnet18 --width=0.25 --image_size=32 --small_stem \
      --batch=64 --bn_group_size=16 --queue=4096 --levels=300,100,30 --steps=10 --warmup_steps=2
  # ablations: no augmentation (images pre-cropped, only normalized), MoCo v2 objective,
  # one BN group per batch; kernel-time breakdown from a profiler trace
  python benchmarks/train_step.py --dtype=bfloat16 --noaugment
  python benchmarks/train_step.py --dtype=bfloat16 --objective=moco
  python benchmarks/train_step.py --dtype=bfloat16 --bn_group_size=256
  python benchmarks/train_step.py --dtype=bfloat16 --profile_dir=/tmp/prof
  python benchmarks/train_step.py --profile_dir=/tmp/prof --summarize_only  # re-read a trace
  # ViTs (no BatchNorm: no ShuffleBN; AdamW as MoCo v3): ViT-S/16 and ViT-B/16 at 224 px, and a
  # small CPU config (ViT-S/16 at width 1/8, 2 blocks, 32 px)
  python benchmarks/train_step.py --arch=vit_s16 --dtype=bfloat16
  python benchmarks/train_step.py --arch=vit_b16 --dtype=bfloat16
  python benchmarks/train_step.py --arch=vit_s16 --width=0.125 --depth=2 --image_size=32 \
      --batch=64 --bn_group_size=16 --queue=4096 --levels=300,100,30 --steps=10 --warmup_steps=2

The step is the trainer's: the flags become a training config (`train_config`: configs/default.py
with their changes) and `hcsc_jax.run.setup.build` makes the encoder, optimizer, state and step
functions from it, as train.py does. --noaugment feeds views cropped before the step (as a
streamed input does) with the photometric ops and the flip off. Run it from the repo root with the
package installed (`pip install -e .`) or with `PYTHONPATH=.`. Figures: BENCHMARKS.md.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from configs import apply_vit
from configs import default as default_config
from hcsc_jax import models, sharding
from hcsc_jax.data import pipeline
from hcsc_jax.data.batch import Images
from hcsc_jax.method import device_prototypes
from hcsc_jax.method import train_step as ts
from hcsc_jax.models import ARCHS, VIT_ARCHS
from hcsc_jax.run import setup

flags.DEFINE_enum("arch", "resnet50", list(ARCHS) + list(VIT_ARCHS), "backbone")
flags.DEFINE_float("width", 1.0, "channel width multiplier (ViT: embedding dim multiplier)")
flags.DEFINE_integer("depth", 0, "ViT blocks (0: the arch's 12)")
flags.DEFINE_enum("optimizer", "", ["", "sgd", "adamw"], "'' = sgd for a ResNet, adamw for a ViT")
flags.DEFINE_integer("image_size", 224, "crop size of both views")
flags.DEFINE_integer("source_size", 0, "side of the stored square uint8 images; 0 = "
                     "round(image_size * 256 / 224) (256 for 224), image_size with --noaugment")
flags.DEFINE_integer("num_images", 2048, "images resident on device (at least --batch are used)")
flags.DEFINE_integer("batch", 256, "global batch")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (params stay float32)")
flags.DEFINE_integer("steps", 20, "timed steps")
flags.DEFINE_integer("warmup_steps", 5, "untimed steps after compilation")
flags.DEFINE_integer("bn_group_size", 32, "samples per BN group")
flags.DEFINE_integer("queue", 16384, "queue size K")
flags.DEFINE_list("levels", ["3000", "2000", "1000"], "prototypes per hierarchy level")
flags.DEFINE_integer("embed_dim", 128, "projection dimension d")
flags.DEFINE_bool("small_stem", False, "3x3 stride-1 stem without max-pool (CIFAR-style)")
flags.DEFINE_bool("shuffle_bn", True, "ShuffleBN for the key forward (always off for a ViT: no BatchNorm)")
flags.DEFINE_enum("objective", "hcsc", ["hcsc", "moco"],
                  "hcsc: all prototype levels; moco: the warm-up step (plain InfoNCE, no prototypes)")
flags.DEFINE_bool("augment", True, "MoCo v2 augmentation on device; --noaugment replaces it "
                  "(ablation) by a top-left crop + normalization of images stored at the crop size")
flags.DEFINE_bool("multicrop", False, "add the published local views 192/160/128/96 (query encoder only)")
flags.DEFINE_bool("memory_only", False, "compile, print XLA's memory analysis of the step and stop")
flags.DEFINE_float("peak_tflops", 989.0, "peak TFLOP/s for MFU (989 = H100 SXM bf16 dense)")
flags.DEFINE_integer("seed", 0, "seed of the model, data and state")
flags.DEFINE_string("profile_dir", "", "if set: after timing, trace --profile_steps steps with "
                    "jax.profiler into this folder and print the device time per kernel class")
flags.DEFINE_integer("profile_steps", 3, "steps traced with --profile_dir")
flags.DEFINE_bool("summarize_only", False, "only print the summary of the newest trace already in "
                  "--profile_dir (e.g. a copied perfetto_trace.json.gz), as if --profile_steps were traced")
FLAGS = flags.FLAGS

NOMINAL_GMACS_224 = {"resnet18": 1.82, "resnet34": 3.67, "resnet50": 4.1}


def vit_macs(dim: int, depth: int, image_size: int, patch: int, in_channels: int = 3) -> float:
    """Matmul MACs of one ViT forward per image: the patch embedding, then per block qkv (3 N D^2),
    proj (N D^2), MLP (8 N D^2) and attention (2 N^2 D) over N = patches + 1 tokens."""
    grid = image_size // patch
    n = grid * grid + 1
    return grid * grid * dim * in_channels * patch * patch + depth * (12 * n * dim * dim + 2 * n * n * dim)


def train_config(f, levels) -> ml_collections.ConfigDict:
    """The flags as a training config (configs/default.py, the published ImageNet settings, with
    the flags' changes): what `setup.build` turns into the trainer's step. A ViT takes MoCo v3's
    recipe (`configs.apply_vit`: AdamW, no ShuffleBN); --noaugment turns the photometric ops and
    the flip off."""
    c = default_config.get_config()
    if f.arch in VIT_ARCHS:
        apply_vit(c, f.arch, width=f.width, depth=f.depth or 12)
    else:
        c.model.update(arch=f.arch, width=f.width, small_stem=f.small_stem)
        c.shuffle_bn = f.shuffle_bn
    c.model.update(embed_dim=f.embed_dim, dtype=f.dtype)
    c.update(image_size=f.image_size, batch_size=f.batch, bn_group_size=f.bn_group_size, queue_size=f.queue,
             seed=f.seed, optimizer=f.optimizer or c.optimizer)
    c.clustering.num_clusters = tuple(levels) if f.objective == "hcsc" else ()
    if f.multicrop:  # the published local views, scaled with the crop size
        c.augment.local_views = tuple((round(f.image_size * s / 224), sc) for s, sc in MULTICROP)
    if not f.augment:
        c.augment.update(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, flip=False)
    return c


def random_prototypes(rng, sizes, dim, sharding):
    """Unit-norm random centroids, temperatures in [0.1, 0.3], all valid, random parents."""
    def unit(m):
        x = rng.normal(size=(m, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    return device_prototypes.make_prototypes(
        [unit(m) for m in sizes],
        [rng.uniform(0.1, 0.3, m).astype(np.float32) for m in sizes],
        [np.ones(m, bool) for m in sizes],
        [rng.integers(0, sizes[l + 1], sizes[l]).astype(np.int32) for l in range(len(sizes) - 1)],
        sharding,
    )


def random_assignments(rng, protos, n, sizes):
    """(n, L) int32 k-means labels consistent with the prototypes' parents."""
    labels = [rng.integers(0, sizes[0], n)]
    for parents in protos.parents:
        labels.append(np.asarray(parents)[labels[-1]])
    return np.stack(labels, 1).astype(np.int32)


# Kernel classes by kernel name, first match wins (attributions are by name only).
_KERNEL_CLASSES = [
    ("f32 FFMA gemms (float32 HIGHEST-precision matmuls, e.g. the augmentation's resampling)",
     re.compile(r"gemm_f32f32_f32f32")),
    ("conv/matmul tensor-core kernels (cuDNN, cuBLAS, cutlass, triton gemm)",
     re.compile(r"xmma|cutlass|gemm|wgmma|cudnn|implicit_convolve|fprop|dgrad|wgrad|^sm\d\d_",
                re.IGNORECASE)),
    ("scatter fusions (max-pool backward)", re.compile(r"scatter")),
    ("reduce_window fusions (max-pool forward)", re.compile(r"reduce_window")),
    ("reduction fusions (BN statistics, objective reductions)", re.compile(r"reduce")),
    ("layout transposes", re.compile(r"nchwToNhwc|nhwcToNchw|transpose", re.IGNORECASE)),
    ("loop/elementwise fusions (BN normalize, ReLU, adds, casts, augmentation, SGD)", re.compile(r"")),
]


def summarize_trace(profile_dir: str, steps: int, top: int = 25):
    """Device time per kernel class and the top kernels, from the newest perfetto trace."""
    paths = sorted(glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
    if not paths:
        print(f"profile: no perfetto_trace.json.gz under {profile_dir}")
        return
    with gzip.open(paths[-1]) as fh:
        trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    device_pids = {p for p, n in procs.items() if "/device:" in n}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids
               and threads.get((e["pid"], e.get("tid")), "").lower().startswith("stream")]
    if not kernels:
        print(f"profile: no device kernel events on a 'Stream' line (processes: "
              f"{sorted(set(procs.values()))}; device lines: "
              f"{sorted({n for (p, _), n in threads.items() if p in device_pids})})")
        return
    total = sum(e["dur"] for e in kernels)
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    per_name, per_class = collections.Counter(), collections.Counter()
    for e in kernels:
        name = e["name"]
        op = (e.get("args") or {}).get("hlo_op", "")
        per_name[(name[:80], op[:40])] += e["dur"]
        per_class[next(c for c, rx in _KERNEL_CLASSES if rx.search(name))] += e["dur"]
    print(f"profile ({paths[-1]}): {len(kernels)} kernels in {steps} steps, kernel time "
          f"{total / 1e3 / steps:.2f} ms/step, first-to-last kernel span {span / 1e3 / steps:.2f} ms/step")
    for cls, t in per_class.most_common():
        print(f"  {100 * t / total:5.1f}%  {t / 1e3 / steps:8.2f} ms/step  {cls}")
    print(f"  top {top} kernels (name, hlo_op): ms/step")
    for (name, op), t in per_name.most_common(top):
        print(f"    {t / 1e3 / steps:7.3f}  {name}  [{op}]")


MULTICROP = ((192, (0.172, 0.86)), (160, (0.143, 0.715)), (128, (0.114, 0.571)), (96, (0.086, 0.429)))


def print_memory(compiled, state, images):
    """XLA's buffer assignment of the compiled step, per device: the state (donated, so its
    output aliases its input), the step's batch, and the temporaries (activations kept for the
    backward pass, gradients, workspace); the resident images live beside the step."""
    mem = compiled.memory_analysis()
    if mem is None:
        print("memory analysis: unavailable on this backend")
        return
    gib = 2.0 ** 30
    state_b = sum(x.nbytes for x in jax.tree.leaves(state))
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    print(f"memory per device (XLA buffer assignment): state {state_b / gib:.3f} GiB, resident images "
          f"{images.nbytes / gib:.3f} GiB | arguments {mem.argument_size_in_bytes / gib:.3f}, outputs "
          f"{mem.output_size_in_bytes / gib:.3f}, aliased (donated) {mem.alias_size_in_bytes / gib:.3f}, "
          f"temporaries {mem.temp_size_in_bytes / gib:.3f} GiB | peak (args + outputs - aliased + temps) "
          f"{peak / gib:.3f} GiB, with the resident images {(peak + images.nbytes) / gib:.3f} GiB")


def main(argv):
    del argv
    f = FLAGS
    if f.summarize_only:
        summarize_trace(f.profile_dir, f.profile_steps)
        return
    levels = [int(x) for x in f.levels]
    size = f.image_size
    source = f.source_size or (size if not f.augment else round(size * 256 / 224))
    if source < size:
        raise ValueError(f"source_size {source} is smaller than the crop size {size}")
    n = max(f.num_images, f.batch)
    is_vit = f.arch in VIT_ARCHS

    mesh = sharding.make_mesh()
    config = train_config(f, levels)
    ts.check_batch_config(f.batch, f.queue, f.bn_group_size, mesh.size)
    replicated, sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} x {mesh.size} ({dev.platform}); jax {jax.__version__}, "
          f"python {platform.python_version()}")
    print(f"config: {f.arch} width {f.width} small_stem {f.small_stem} | crop {size} from "
          f"{source}x{source}x3 uint8 (N={n} on device) | batch {f.batch} | {f.dtype} compute | "
          f"bn_group_size {f.bn_group_size} | shuffle_bn {config.shuffle_bn} | {config.optimizer} | "
          f"queue {f.queue} | objective {f.objective}"
          + (f" levels {levels} d={f.embed_dim}" if f.objective == "hcsc" else "")
          + f" | augment {'MoCo v2 on device' if f.augment else 'OFF (ablation)'}")

    # The trainer's own set-up: encoder, optimizer, state and the two step functions.
    parts = setup.build(config, channels=3, steps_per_epoch=max(n // f.batch, 1), mesh=mesh)
    state, graphdef = parts.state, parts.graphdef

    rng = np.random.default_rng(f.seed)
    if f.objective == "hcsc":
        protos = random_prototypes(rng, levels, f.embed_dim, replicated)
        assignments = jax.device_put(random_assignments(rng, protos, n, levels), replicated)
        state = parts.refresh_lse(state, protos)
        step = parts.prototype_step
    else:
        protos = None
        assignments = jax.device_put(np.zeros((n, 1), np.int32), replicated)
        step = parts.warmup_step

    images = jax.jit(
        lambda k: jax.random.randint(k, (n, source, source, 3), 0, 256, jnp.int32).astype(jnp.uint8),
        out_shardings=replicated)(jax.random.key(f.seed))
    total = f.warmup_steps + f.steps
    indices = [jax.device_put(rng.permutation(n)[: f.batch].astype(np.int32), sharded) for _ in range(total)]
    jax.block_until_ready((state, images, assignments, protos, indices))

    t0 = time.perf_counter()
    if f.augment:  # the resident input's per-step gather, timed with the step
        batch = pipeline.gather_batch(mesh)
    else:  # views cropped before the step, as a streamed input's arrive (here: their top-left corner)
        sizes = (size, size) + tuple(s for s, _ in config.augment.local_views)
        batch = jax.jit(lambda images, assign, idx: (
            Images(tuple(images[idx][:, :s, :s] for s in sizes), cropped=True), assign[idx]),
            out_shardings=sharded)
    lowered = step.lower(state, *batch(images, assignments, indices[0]), protos)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    print_memory(compiled, state, images)
    if f.memory_only:
        return

    # XLA's count of one encoder forward (train mode) on one BN group, per image. Counted on the
    # CPU lowering: on GPU, convolutions are cuDNN custom calls that the cost analysis skips.
    fwd = jax.jit(lambda p, s, x: models.apply_model(graphdef, p, s, x, train=True)[1])
    x_spec = jax.ShapeDtypeStruct((f.bn_group_size, size, size, 3), jnp.float32)
    fwd_flops, fwd_error = None, "cost analysis returned no 'flops'"
    try:
        traced = fwd.trace(state.q_params, state.q_stats, x_spec)
        cost = traced.lower(lowering_platforms=("cpu",)).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost is None:  # seen on GPU hosts (jax 0.11.2): no cost analysis of the CPU lowering
            fwd_error = "the CPU lowering's cost analysis returned None on this host"
        else:
            fwd_flops = float(cost["flops"])
    except Exception as e:  # noqa: BLE001 - best effort
        fwd_error = f"{type(e).__name__}: {str(e)[:120]}"

    for i in range(f.warmup_steps):
        state, metrics = compiled(state, *batch(images, assignments, indices[i]), protos)
    jax.block_until_ready((state, metrics))
    loss0 = float(metrics["loss"])
    # 1) Blocked: each step dispatched and waited for on its own (host dispatch time included).
    times = []
    for i in range(f.warmup_steps, total):
        start = time.perf_counter()
        state, metrics = compiled(state, *batch(images, assignments, indices[i]), protos)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    # 2) Pipelined: the same steps dispatched back to back, one wait at the end (as the trainer
    #    runs: the host dispatches step s+1 while the device runs step s).
    start = time.perf_counter()
    for i in range(f.warmup_steps, total):
        state, metrics = compiled(state, *batch(images, assignments, indices[i]), protos)
    jax.block_until_ready((state, metrics))
    pipelined = (time.perf_counter() - start) / f.steps
    if not (np.isfinite(loss0) and np.isfinite(loss) and np.isfinite(float(metrics["loss"]))):
        print(f"WARNING: non-finite loss ({loss0} after warm-up, {loss} after the blocked steps)")

    times = np.asarray(times)
    med = float(np.median(times))
    ips = f.batch / med
    ips_pipe = f.batch / pipelined
    print(f"compile: {compile_s:.1f} s (excluded) | warm-up {f.warmup_steps} steps, timed {f.steps} steps | "
          f"loss {loss0:.4f} -> {loss:.4f}")
    print(f"step time (each step blocked on): median {1e3 * med:.2f} ms, min {1e3 * times.min():.2f} ms, "
          f"p90 {1e3 * np.percentile(times, 90):.2f} ms, mean {1e3 * times.mean():.2f} ms")
    print(f"images/s: {ips:.1f} (batch {f.batch} / median step time)")
    print(f"pipelined ({f.steps} steps back to back, one block at the end): {1e3 * pipelined:.2f} ms/step, "
          f"{ips_pipe:.1f} images/s")

    peak = f.peak_tflops
    peak_note = ("default: H100 SXM bf16 dense" if peak == 989.0 else "from --peak_tflops")
    print(f"model FLOPs per image per step = 4 forward-equivalents (query fwd+bwd = 3, key fwd = 1); "
          f"MFU vs peak {peak:g} TFLOP/s ({peak_note}); median / pipelined")
    if is_vit:
        vit = models.build_encoder(parts.model_meta, abstract=True).backbone
        macs = vit_macs(vit.num_features, len(vit.blocks), size, vit.patch_size)
        nominal = 2 * macs
        nominal_label = (f"nominal fwd {nominal / 1e9:.4g} GFLOP/image (= 2 x {macs / 1e9:.4g} GMACs counted "
                         f"from the ViT's shapes: D {vit.num_features}, {len(vit.blocks)} blocks, "
                         f"{(size // vit.patch_size) ** 2 + 1} tokens)")
    else:
        nominal = 2e9 * NOMINAL_GMACS_224[f.arch] * (size / 224) ** 2 * f.width ** 2
        note = " [formula not valid with --small_stem]" if f.small_stem else ""
        nominal_label = (f"nominal fwd {nominal / 1e9:.3f} GFLOP/image (= 2 x {NOMINAL_GMACS_224[f.arch]} "
                         f"GMACs at 224 x ({size}/224)^2 x width^2 {f.width:g}^2){note}")
    rows = [(nominal_label, nominal)]
    if fwd_flops:
        per_image = fwd_flops / f.bn_group_size
        rows.append((f"XLA-counted fwd {per_image / 1e9:.3f} GFLOP/image", per_image))
    for label, per_image in rows:
        t1, t2 = 4 * per_image * ips / 1e12, 4 * per_image * ips_pipe / 1e12
        print(f"  {label}: {t1:.4g} / {t2:.4g} TFLOP/s, MFU {100 * t1 / peak:.4g}% / {100 * t2 / peak:.4g}%")
    if not fwd_flops:
        print(f"  XLA-counted fwd: unavailable ({fwd_error})")
    sys.stdout.flush()

    if f.profile_dir:
        with jax.profiler.trace(f.profile_dir, create_perfetto_trace=True):
            for i in range(f.profile_steps):
                state, metrics = compiled(state, *batch(images, assignments, indices[i % total]), protos)
                jax.block_until_ready((state, metrics))
        summarize_trace(f.profile_dir, f.profile_steps)


if __name__ == "__main__":
    app.run(main)
