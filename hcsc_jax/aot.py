"""Will my config fit? Compile a training config for a TPU pod on this machine, ahead of time.

  python -m hcsc_jax.aot --config=configs/imagenet_hcsc_200ep.py --topology=v5p:4x4x8
  python -m hcsc_jax.aot --config=configs/imagenet_hcsc_200ep.py --topology=v5e:16x16 \\
      --config.batch_size=4096 --json=aot.json

XLA compiles for a chip it does not have: with `libtpu` installed (`pip install -e ".[tpu]"`),
`jax.experimental.topologies.get_topology_desc` describes every chip of a pod and its hosts, and a
function jitted over a mesh of those devices lowers and compiles on a CPU. This command builds the
trainer's own functions abstractly (`setup.build(..., abstract=True)`: the train state from
`jax.eval_shape`, inputs as `jax.ShapeDtypeStruct`s with the trainer's shardings on a mesh of the
topology's devices, each host's share of the batch as the trainer splits it) and compiles

  warmup_step     the instance-only step of the warm-up epochs,
  prototype_step  the step with the config's prototype levels,
  feature_pass    the inference-mode pass of the clustering and of every evaluator (`features`),
  kmeans_lloyd    one Lloyd iteration of the "jax" k-means backend on the first level's training
                  rows at the dataset's size, and kmeans_assign, the assignment of every row,
  knn_similarity  one chunk of the kNN evaluator's similarity pass (on one chip, as it runs),

then prints per chip the argument / output / temporary bytes of each against the chip's HBM
(with what stays resident beside it: the train state, a resident dataset), the FLOPs and bytes
the cost analysis counts per call, every collective of the compiled HLO, a roofline bound on the
step time, and a verdict. Exit status: 0 fits, 1 does not fit (the verdict says what to change),
2 a usage error (an unknown topology, a config that cannot train on it, no libtpu).

What it does not promise: it compiles, it does not time. The roofline is a lower bound from the
published peak FLOP/s and HBM bandwidth, not a measurement; the memory is XLA's own plan for the
compiled program (what a real chip reserves for the runtime is not in it, hence the 5% margin);
the input pipeline's host memory and the faiss backend are not compiled (they run on the hosts).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable

# Compile-only: the default backend stays the CPU, libtpu only describes the target chips. Set
# before jax initializes a backend; libtpu's lock file is for processes that run on a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")

GiB = 1024**3
MARGIN = 0.95  # of a chip's HBM a compiled program may plan for (the runtime keeps some)


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: its HBM per device and the published peak bf16 FLOP/s and HBM bandwidth
    per chip (Cloud TPU documentation, "System architecture"), and how libtpu describes it."""

    name: str
    device_kind: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    chip_config: str = "default"  # "megacore": one device per chip of two TensorCores (v4, v5p)
    single_host_chips: int = 4  # slices up to this many chips have one host (v5e / v6e: 8)


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1228e9, "megacore"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, single_host_chips=8),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, "megacore"),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, single_host_chips=8),
}

# GPUs: compiled by jax's CUDA plugin without a GPU from XLA's description of the card (a
# GpuTargetConfigProto in text format; XLA ships them as xla/backends/gpu/target_config/specs/
# <card>.txtpb), given with --gpu_target_config. HBM as CUDA reports it, dense bf16 peak.
GPUS = {
    "h100": Chip("h100", "NVIDIA H100 80GB HBM3", 84_942_979_072, 989e12, 3352e9),
    "h200": Chip("h200", "NVIDIA H200", 150_754_820_096, 989e12, 4800e9),
}

# The sizes of well-known splits, for a dataset this machine does not hold (ImageNet on a laptop):
# (training examples, held-out examples, channels). A dataset that can be read is measured instead.
PUBLISHED_SPLITS = {
    "tfds:imagenet2012": (1_281_167, 50_000, 3),
    "tfds:cifar10": (50_000, 10_000, 3),
    "cifar10": (50_000, 10_000, 3),
    "fashion_mnist": (60_000, 10_000, 1),
    "digits": (1_437, 360, 1),
}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")


class AotError(ValueError):
    """A usage error: one line saying what to change (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A topology's devices and what they are."""

    topology: str
    chip: Chip
    devices: tuple
    num_hosts: int


def gpu_target(topology: str, target_config: str | None) -> Target:
    """The devices of `topology` = "h100:8" (one node of 8) or "h100:2x8" (2 nodes of 8) from jax's
    CUDA plugin and XLA's description of the card (`target_config`: a file), without a GPU."""
    m = re.fullmatch(r"(h100|h200):(?:(\d+)x)?(\d+)", topology)
    if not m:
        raise AotError(f"--topology {topology!r}: give <card>:<GPUs per node> or <card>:<nodes>x<GPUs per "
                       "node>, e.g. h100:8")
    chip, nodes, per_node = GPUS[m.group(1)], int(m.group(2) or 1), int(m.group(3))
    if not target_config or not os.path.isfile(target_config):
        raise AotError(f"--topology {topology}: give --gpu_target_config=<XLA's {chip.name}_sxm.txtpb "
                       "(xla/backends/gpu/target_config/specs/)>, the card XLA compiles for")
    try:
        from jax.experimental import topologies
        devices = topologies.get_topology_desc(platform="cuda", topology_name="",
                                               topology=f"1x{nodes}x{per_node}",
                                               target_config=open(target_config).read()).devices
    except Exception as err:  # noqa: BLE001 - no CUDA plugin, or a config it cannot read
        text = " ".join(str(err).split())[:300]
        raise AotError(f"cannot describe {topology} with jax's CUDA plugin ({text}); install it with "
                       'pip install "jax[cuda12]" (the installed jax\'s version)') from None
    return Target(topology, chip, tuple(devices), nodes)


def target(topology: str, gpu_target_config: str | None = None) -> Target:
    """The devices of a TPU `topology` ("v5p:4x4x8": generation, then chips per dimension) from
    libtpu, or of GPUs (`gpu_target`), without the hardware."""
    if topology.split(":")[0] in GPUS:
        return gpu_target(topology, gpu_target_config)
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", topology)
    if not m:
        raise AotError(f"--topology {topology!r}: give <generation>:<chips per dimension>, e.g. v5p:4x4x8, "
                       f"v5e:16x16, v4:2x2x1; generations: {', '.join(CHIPS)}")
    chip, dims = CHIPS[m.group(1)], [int(x) for x in m.group(2).split("x")]
    kw = dict(chip_config_name=chip.chip_config)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.name}-{math.prod(dims)}")  # (else libtpu warns)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if math.prod(dims) <= chip.single_host_chips:  # one host holds the whole slice (e.g. v5e-8)
        kw["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
    if importlib.util.find_spec("libtpu") is None:
        raise AotError(f"libtpu describes {topology} and is not installed: pip install -e \".[tpu]\" "
                       "(jax[tpu] of the installed jax)")
    try:
        from jax.experimental import topologies
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw).devices
    except Exception as err:  # noqa: BLE001 - libtpu refusing the topology
        text = " ".join(str(err).split())[:300]
        raise AotError(f"--topology {topology}: libtpu refused it: {text}") from None
    if devices[0].device_kind != chip.device_kind:
        raise AotError(f"--topology {topology}: libtpu describes {devices[0].device_kind!r}, "
                       f"expected {chip.device_kind!r}")
    return Target(topology, chip, tuple(devices), len({d.process_index for d in devices}))


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What a compile needs of the dataset: its split sizes, channels, and for a resident input
    ("memory") the shape (H, W) of its images; `source` says where they came from."""

    num_train: int
    num_eval: int
    channels: int
    image_hw: tuple | None
    source: str


def data_shape(config, num_train: int | None = None, num_eval: int | None = None,
               channels: int | None = None) -> DataShape:
    """The dataset of `config` as the trainer would see it: read from the data when this machine
    holds it, else `PUBLISHED_SPLITS`; the arguments override either."""
    from hcsc_jax.data import sources

    measured, image_hw, source = None, None, "given"
    if None in (num_train, num_eval, channels) or config.input.pipeline == "memory":
        try:
            train = sources.open_source(config.dataset, config.train_split, config.get("data_dir"))
            evals = sources.open_source(config.dataset, config.eval_split, config.get("data_dir"))
            measured = (train.num_examples, evals.num_examples, train.channels)
            if config.input.pipeline == "memory":
                image_hw = tuple(train.load(0).shape[:2])
            source = f"read from {config.dataset}"
        except Exception:  # noqa: BLE001 - not on this machine: the published sizes
            measured = PUBLISHED_SPLITS.get(config.dataset)
            source = f"published sizes of {config.dataset}"
    if config.input.pipeline == "memory" and image_hw is None:
        raise AotError(f"config.input.pipeline='memory' keeps {config.dataset} on every chip, and its "
                       "image size is needed: run where the data is, or use --config.input.pipeline=stream")
    values = [given if given is not None else (measured[i] if measured else None)
              for i, given in enumerate((num_train, num_eval, channels))]
    if None in values:
        raise AotError(f"{config.dataset} cannot be read here and its sizes are not known: give "
                       "--num_train, --num_eval and --channels")
    return DataShape(*values, image_hw, source)


@dataclasses.dataclass
class Program:
    """One compiled function: `compiled` (a `jax.stages.Compiled`), the bytes per chip that stay
    resident beside it while it runs (`resident`: what it does not take as arguments), a note."""

    name: str
    compiled: object
    resident: int = 0
    note: str = ""
    fixed: int = 0  # of its total, the bytes that do not grow with the batch (state, prototypes, dataset)
    _analysis: dict | None = None
    refused: str = ""  # the compiler's own out-of-memory message, when it refused to compile

    @property
    def analysis(self) -> dict:
        if self._analysis is None:
            self._analysis = analyze(self.compiled)
        return self._analysis


def nbytes(tree, per_chip: bool = False) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in `tree`, random keys left out: whole (per chip
    when replicated), or with `per_chip` a sharded one's shard on one chip."""
    import jax
    import numpy as np

    def shape(x):
        sharding = getattr(x, "sharding", None) if per_chip else None
        return x.shape if sharding is None else sharding.shard_shape(x.shape)

    return sum(int(np.prod(shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, "dtype") and not str(x.dtype).startswith("key"))


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}


def refused(name: str, err: Exception, args: int, resident: int, note: str, fixed: int) -> Program:
    """The Program of a compile that XLA refused because it does not fit the chip ("RESOURCE_EXHAUSTED:
    Ran out of memory on HBM, the total memory required for HLO temporaries (41.74G) exceeds
    available HBM (15.75G)"): its memory is the arguments plus what the message says it needs.
    Any other compile error is raised."""
    text = " ".join(str(err).split())
    if "RESOURCE_EXHAUSTED" not in text:
        raise err
    sizes = [float(v) * _UNITS[u] for v, u in re.findall(r"\((\d+(?:\.\d+)?)([KMGT]?)\)", text)]
    temp = int(sizes[0]) if sizes else 0
    memory = dict(argument=args, output=0, alias=0, temp=temp, code=0, total=args + temp)
    message = text[text.index("RESOURCE_EXHAUSTED"):][:300]
    return Program(name, None, resident, note, fixed,
                   dict(memory=memory, flops=0.0, bytes_accessed=0.0, collectives=[]), refused=message)


def step_inputs(config, data: DataShape, mesh):
    """The step's (images, labels) as the trainer's input hands them over: the views cropped on
    the hosts ("stream": query, key, then the local views, (B, S, S, C) uint8) or the whole images
    of a resident dataset ("memory"), and the (B, L) int32 assignments, batch-sharded."""
    import jax
    import jax.numpy as jnp

    from hcsc_jax import sharding
    from hcsc_jax.data.batch import Images

    b, c, rows = config.batch_size, data.channels, sharding.batch_sharded(mesh)
    spec = lambda shape, dtype=jnp.uint8: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
    if config.input.pipeline == "memory":
        images = Images((spec((b, *data.image_hw, c)),), cropped=False)
    else:
        sizes = [config.image_size] * 2 + [size for size, _ in config.augment.local_views]
        images = Images(tuple(spec((b, s, s, c)) for s in sizes), cropped=True)
    labels = spec((b, max(len(config.clustering.num_clusters), 1)), jnp.int32)
    return images, labels


PROGRAMS = ("warmup_step", "prototype_step", "feature_pass", "kmeans_lloyd", "kmeans_assign",
            "knn_similarity")


def compile_programs(config, tgt: Target, data: DataShape, log: Callable = print,
                     only=()) -> tuple[list[Program], dict]:
    """Compiles the trainer's functions of `config` for the devices of `tgt` (see the module doc);
    `only`: those of `PROGRAMS` named (default all). -> (programs, {what: bytes per chip} of the
    train state's parts, the prototypes and a resident dataset)."""
    import jax
    import jax.numpy as jnp

    from hcsc_jax import features, sharding
    from hcsc_jax.clustering import jax_backend
    from hcsc_jax.data import pipeline
    from hcsc_jax.data.batch import Images
    from hcsc_jax.evaluators import knn
    from hcsc_jax.method import device_prototypes
    from hcsc_jax.run import setup

    # An executable compiled for devices this process does not have cannot be read back from XLA's
    # persistent cache (a warning each time), so none is written.
    jax.config.update("jax_enable_compilation_cache", False)
    mesh = sharding.make_mesh(tgt.devices)
    steps_per_epoch = max(data.num_train // config.batch_size, 1)
    parts = setup.build(config, data.channels, steps_per_epoch, mesh, abstract=True)
    state, replicated = parts.state, sharding.replicated(mesh)
    n_dev = len(tgt.devices)
    state_bytes = nbytes(state)
    dataset_bytes = (data.num_train * math.prod(data.image_hw) * data.channels
                     if config.input.pipeline == "memory" else 0)  # replicated on every chip
    images, labels = step_inputs(config, data, mesh)
    levels = tuple(config.clustering.num_clusters)
    programs = []

    def compile_one(name, fn, args, resident=0, note="", fixed=0, **kw):
        if only and name not in only:
            return
        t0 = time.perf_counter()
        lowered = fn.lower(*args, **kw)
        try:
            programs.append(Program(name, lowered.compile(), resident, note, fixed))
        except Exception as err:  # noqa: BLE001 - XLA's out-of-memory is a JaxRuntimeError
            programs.append(refused(name, err, nbytes(args, per_chip=True), resident, note, fixed))
        log(f"compiled {name} in {time.perf_counter() - t0:.1f} s")

    compile_one("warmup_step", parts.warmup_step, (state, images, labels, None), dataset_bytes,
                f"global batch {config.batch_size}", state_bytes + dataset_bytes)
    protos = None
    if levels:
        hierarchical = config.clustering.get("mode", "hierarchical") == "hierarchical"
        protos = device_prototypes.abstract_prototypes(levels, config.model.embed_dim, hierarchical,
                                                       replicated)
    proto_bytes = nbytes(protos) if protos is not None else 0
    if levels:
        compile_one("prototype_step", parts.prototype_step, (state, images, labels, protos), dataset_bytes,
                    f"levels {'/'.join(map(str, levels))}", state_bytes + proto_bytes + dataset_bytes)

    # The feature pass (clustering and evaluators): the key encoder in inference mode.
    fb = pipeline.feature_batch(config.input.pipeline, 256, n_dev, tgt.num_hosts)
    crop = config.image_size
    shape = (fb, *data.image_hw, data.channels) if config.input.pipeline == "memory" else (fb, crop, crop,
                                                                                           data.channels)
    batch = Images((jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=sharding.batch_sharded(mesh)),),
                   cropped=config.input.pipeline != "memory")
    weights = nbytes((state.k_params, state.k_stats))
    compile_one("feature_pass", features.embed_fn(parts.graphdef, crop, *map(tuple, parts.mean_std)),
                (state.k_params, state.k_stats, batch), state_bytes - weights + dataset_bytes + proto_bytes,
                f"batch {fb}")

    # One Lloyd iteration and the assignment of the "jax" k-means at the first level's size.
    cl = config.clustering
    if levels:
        k = levels[0]
        n = min(data.num_train, k * cl.max_points_per_centroid)
        x, mask, init, key = jax_backend.abstract_lloyd_args(n, config.model.embed_dim, k, mesh)
        beside = state_bytes + dataset_bytes
        compile_one("kmeans_lloyd", jax_backend._lloyd_fn(mesh, 1), (x, mask, init, key), beside,
                    f"{n:,} rows x {k} centroids")
        xa, mask_a, _, _ = jax_backend.abstract_lloyd_args(data.num_train, config.model.embed_dim, k, mesh)
        compile_one("kmeans_assign", jax_backend._assign_fn(mesh, mask_a.shape[-1]), (xa, init), beside,
                    f"{data.num_train:,} rows")

    # The kNN evaluator's similarity pass: on one chip (it runs on the default device).
    knn_cfg = next(((name, c) for name, c in config.evals.items()
                    if c.get("type", name) in ("knn", "summary")), None)
    if knn_cfg is not None:
        name, c = knn_cfg
        ks = tuple(c.ks) if "ks" in c else (c.knn_k,)
        one = jax.sharding.SingleDeviceSharding(tgt.devices[0])
        dim = _feature_dim(parts.graphdef, state, crop, data)
        args, static = knn.abstract_merge_args(data.num_eval, dim, ks, c.get("train_chunk", 16384),
                                               c.get("test_block", 1024), one)
        compile_one("knn_similarity", knn._merge_chunk, args, state_bytes + dataset_bytes,
                    f"evals.{name}: {data.num_eval:,} test rows, k <= {max(ks)}", **static)
    sizes = dict(q_params=nbytes(state.q_params), batch_stats=nbytes((state.q_stats, state.k_stats)),
                 k_params=nbytes(state.k_params), opt_state=nbytes(state.opt_state),
                 queue=nbytes((state.queue, state.queue_lse)), state=state_bytes, prototypes=proto_bytes,
                 dataset=dataset_bytes)
    return programs, sizes


def _feature_dim(graphdef, state, crop: int, data: DataShape) -> int:
    """The encoder's pooled feature dimension (what the evaluators compare)."""
    import jax
    import jax.numpy as jnp

    from hcsc_jax import models
    x = jax.ShapeDtypeStruct((1, crop, crop, data.channels), jnp.float32)
    feats = jax.eval_shape(lambda p, s, x: models.apply_model(graphdef, p, s, x, train=False)[0],
                           state.k_params, state.k_stats, x)
    return feats.shape[-1]


def analyze(compiled) -> dict:
    """Memory per chip, cost per call and collectives of a `jax.stages.Compiled`."""
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()  # (None for a GPU compiled without one)
    cost = cost[0] if isinstance(cost, list) else (cost or {})
    mem = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)
    mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["code"]
    hlo = compiled.as_text()
    return dict(memory=mem, flops=float(cost.get("flops", 0.0)),
                bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                collectives=collectives(hlo), has_loops=" while(" in hlo)


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.-]+) [({]")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape (an array `f32[8,128]{1,0}` or a tuple of them)."""
    return sum(_DTYPE_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in _ARRAY.findall(shape))


def collectives(hlo: str) -> list[dict]:
    """Every collective of a compiled module's HLO text: {kind, name, bytes (of its result on one
    chip; an async start's operands left out), computation (ENTRY's name or the loop body's),
    op (the jax operation it came from)}. The TPU compiler splits a collective over several
    "async collective fusions" that overlap it with compute, each holding a copy of the
    instruction with the collective's one channel_id: a channel is counted once."""
    found, computation, channels = [], "", set()
    for line in hlo.splitlines():
        c = _COMPUTATION.match(line)
        if c and not line.startswith(" "):
            computation = "ENTRY" if c.group(1) else c.group(2)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        channel = re.search(r"channel_id=(\d+)", line)
        if channel:
            if channel.group(1) in channels:
                continue
            channels.add(channel.group(1))
        size = shape_bytes(m.group(2))
        if m.group(4):  # (operands, results, ...) of an async start
            size //= 2
        op = re.search(r'op_name="([^"]*)"', line)
        found.append(dict(kind=m.group(3), name=m.group(1), bytes=size, computation=computation,
                          op=op.group(1) if op else ""))
    return found


def collective_totals(found: list[dict]) -> dict[str, dict]:
    """{kind: {"count", "bytes"}} of `collectives`' list."""
    totals: dict[str, dict] = {}
    for c in found:
        t = totals.setdefault(c["kind"], dict(count=0, bytes=0))
        t["count"] += 1
        t["bytes"] += c["bytes"]
    return totals


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def roofline(flops: float, accessed: float, chip: Chip) -> dict:
    """Lower bounds on a call's time on `chip` from its FLOPs and HBM bytes (not a measurement)."""
    compute, memory = flops / chip.peak_flops, accessed / chip.hbm_bandwidth
    return dict(compute_s=compute, memory_s=memory, bound_s=max(compute, memory),
                bound_by="compute" if compute >= memory else "HBM")


def verdict(config, tgt: Target, programs: list[Program]) -> tuple[bool, list[str]]:
    """(fits, lines): whether every program fits the chip's HBM with what stays resident beside it,
    and, when not, what to change: the largest batch that fits (linear in the batch from the
    compiled steps: the state does not grow with it, the rest does), bfloat16 compute, more chips."""
    limit = tgt.chip.hbm_bytes * MARGIN
    need = {p.name: p.analysis["memory"]["total"] + p.resident for p in programs}
    worst = max(need, key=need.get)
    if need[worst] <= limit:
        return True, [f"fits: the largest, {worst}, needs {fmt_bytes(need[worst])} of the "
                      f"{fmt_bytes(tgt.chip.hbm_bytes)} of a {tgt.chip.name} chip "
                      f"({100 * need[worst] / tgt.chip.hbm_bytes:.0f}%)"]
    over = [f"{n} {fmt_bytes(v)}" for n, v in need.items() if v > limit]
    lines = [f"does not fit: {', '.join(over)} > {MARGIN:.0%} of the {fmt_bytes(tgt.chip.hbm_bytes)} of a "
             f"{tgt.chip.name} chip"]
    steps = [p for p in programs if p.name.endswith("_step")]
    if worst in {p.name for p in steps}:
        p = next(p for p in steps if p.name == worst)
        fixed = p.fixed
        per_image = (need[worst] - fixed) / config.batch_size
        unit = config.bn_group_size * len(tgt.devices)
        largest = int((limit - fixed) // per_image) // unit * unit if per_image > 0 else 0
        if largest >= unit:
            lines.append(f"largest global batch that fits: about {largest} (a multiple of bn_group_size x "
                         f"chips = {unit}; linear estimate from this compile: set --config.batch_size and "
                         "a queue_size that is a multiple of it, then run this again)")
        else:
            lines.append("even one BN group per chip does not fit: the state alone needs "
                         f"{fmt_bytes(fixed)}")
    if str(config.model.dtype) == "float32":
        lines.append("bfloat16 compute (--config.model.dtype=bfloat16) halves the activations")
    lines.append("or more chips: a larger topology splits the batch further (activation rematerialization "
                 "is not implemented in hcsc-jax's encoders)")
    return False, lines


def report(config, tgt: Target, data: DataShape, programs: list[Program], sizes: dict) -> tuple[str, dict]:
    """The per-chip tables (text) and the same as a JSON-able dict."""
    chip, n_dev = tgt.chip, len(tgt.devices)
    b = config.batch_size
    rows, lines = [], []
    lines.append(f"{config_name(config)} on {tgt.topology}: {n_dev} {chip.device_kind} chips, "
                 f"{tgt.num_hosts} host(s); global batch {b} ({b // n_dev} per chip, "
                 f"{b // tgt.num_hosts} per host); "
                 f"data: {data.num_train:,} train / {data.num_eval:,} held-out images, {data.source}")
    lines.append(f"assumed per chip: HBM {fmt_bytes(chip.hbm_bytes)}, peak bf16 {chip.peak_flops / 1e12:.0f} "
                 f"TFLOP/s, HBM {chip.hbm_bandwidth / 1e9:.0f} GB/s (published figures)")
    lines.append("resident per chip: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sizes.items() if v))
    lines.append("")
    head = (f"{'program':<16} {'arguments':>11} {'outputs':>11} {'temporary':>11} {'resident':>11} "
            f"{'total':>11} {'of HBM':>7} {'GFLOP':>9} {'GB accessed':>11} {'bound':>10}  note")
    lines += [head, "-" * len(head)]
    for p in programs:
        a = p.analysis
        m = a["memory"]
        total = m["total"] + p.resident
        r = roofline(a["flops"], a["bytes_accessed"], chip)
        out = m["output"] - m["alias"]
        cost = (f"{a['flops'] / 1e9:>9.2f} {a['bytes_accessed'] / 1e9:>11.3f} {1e3 * r['bound_s']:>7.2f} ms"
                if r["bound_s"] else f"{'n/a':>9} {'n/a':>11} {'n/a':>10}")
        if p.refused:
            lines.append(f"{p.name:<16} {fmt_bytes(m['argument']):>11} {'-':>11} {fmt_bytes(m['temp']):>11} "
                         f"{fmt_bytes(p.resident):>11} {fmt_bytes(total):>11} "
                         f"{100 * total / chip.hbm_bytes:>6.1f}%  XLA refused to compile it: {p.refused}")
            rows.append(dict(name=p.name, note=p.note, memory=m, resident=p.resident, total=total,
                             refused=p.refused, collectives=[], collective_totals={}))
            continue
        lines.append(f"{p.name:<16} {fmt_bytes(m['argument']):>11} {fmt_bytes(out):>11} "
                     f"{fmt_bytes(m['temp']):>11} {fmt_bytes(p.resident):>11} {fmt_bytes(total):>11} "
                     f"{100 * total / chip.hbm_bytes:>6.1f}% {cost}  {p.note}"
                     + ("; loops: FLOPs, bytes counted once per loop body" if a.get("has_loops") else ""))
        rows.append(dict(name=p.name, note=p.note, memory=m, resident=p.resident, total=total,
                         flops=a["flops"], bytes_accessed=a["bytes_accessed"], roofline=r,
                         collectives=a["collectives"], collective_totals=collective_totals(a["collectives"])))
    lines += ["", "collectives per call (bytes of each result on one chip):"]
    for p, row in zip(programs, rows):
        totals = row["collective_totals"]
        text = ", ".join(f"{k} x{v['count']} {fmt_bytes(v['bytes'])}" for k, v in sorted(totals.items()))
        loops = {c["computation"] for c in row["collectives"] if c["computation"] != "ENTRY"}
        loops = " (some in a loop body: per iteration)" if loops else ""
        lines.append(f"  {p.name:<16} {text or 'none'}{loops}")
        for c in sorted(row["collectives"], key=lambda c: -c["bytes"])[:8]:  # the largest, with their source
            lines.append(f"  {'':<16}   {c['kind']:<14} {fmt_bytes(c['bytes']):>11}  {c['op'] or c['name']}")
    step = next((r for r in rows[::-1] if r["name"].endswith("_step") and "roofline" in r), None)
    if step is not None and not step["roofline"]["bound_s"]:
        lines += ["", "no cost analysis for this target (XLA gives none for a GPU compiled without one): "
                  "no roofline bound"]
    elif step is not None:
        r = step["roofline"]
        lines += ["", f"{step['name']}: at least {1e3 * r['bound_s']:.2f} ms per step "
                  f"({r['bound_by']}-bound roofline; compute {1e3 * r['compute_s']:.2f} ms, "
                  f"HBM {1e3 * r['memory_s']:.2f} ms), "
                  f"at most {b / r['bound_s']:,.0f} images/s on the pod, {b / r['bound_s'] / n_dev:,.0f} per "
                  "chip: a bound from the cost analysis, not a measurement; collectives not included"]
    fits, why = verdict(config, tgt, programs)
    lines += [""] + why
    result = dict(config=config_name(config), topology=tgt.topology, chip=dataclasses.asdict(chip),
                  chips=n_dev, hosts=tgt.num_hosts, batch_size=b, data=dataclasses.asdict(data),
                  sizes=sizes, programs=rows, fits=fits, verdict=why)
    return "\n".join(lines), result


def config_name(config) -> str:
    return f"{config.model.arch} ({config.model.dtype}, {config.dataset})"


def main(argv=None) -> int:
    from absl import app, flags

    from hcsc_jax.run import console

    config_flag = console.define_config(
        "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                               "imagenet_hcsc_200ep.py"),
        "Training configuration (as train.py: FILE:VARIANT, --config.FIELD=VALUE overrides).")
    flags.declare_key_flag("config")
    topology = flags.DEFINE_string("topology", None, "TPU topology to compile for: <generation>:<chips per "
                                   f"dimension>, e.g. v5p:4x4x8, v5e:16x16, v4:2x2x1 ({', '.join(CHIPS)}).")
    json_out = flags.DEFINE_string("json", None, "Also write the tables as JSON to this file.")
    num_train = flags.DEFINE_integer("num_train", None, "Training examples (default: read from the data "
                                     "when it is here, else the published size of the dataset).")
    num_eval = flags.DEFINE_integer("num_eval", None, "Held-out examples (the kNN evaluator's test rows).")
    channels = flags.DEFINE_integer("channels", None, "Image channels (default: as num_train).")
    only = flags.DEFINE_list("programs", [], f"Compile only these ({', '.join(PROGRAMS)}); default all.")
    hlo_dir = flags.DEFINE_string("hlo_dir", None, "Also write each program's compiled HLO text there.")
    gpu_config = flags.DEFINE_string("gpu_target_config", None, "GPU topologies (h100:8): XLA's description "
                                     "of the card, e.g. xla/backends/gpu/target_config/specs/h100_sxm.txtpb.")

    def run(args):
        if len(args) > 1:
            console.usage_error(f"unexpected arguments: {args[1:]}")
        if not topology.value:
            console.usage_error("give --topology, e.g. --topology=v5p:4x4x8")
        bad = sorted(set(only.value) - set(PROGRAMS))
        if bad:
            console.usage_error(f"--programs: unknown {', '.join(bad)}; known: {', '.join(PROGRAMS)}")
        ours = console.setup()
        from hcsc_jax.run import config_checks, trainer
        config = config_flag.value
        try:
            tgt = target(topology.value, gpu_config.value)
            trainer.check_values(config, len(tgt.devices))
            data = data_shape(config, num_train.value, num_eval.value, channels.value)
            config_checks.check_data(config, data.num_train, data.channels)
            if config.batch_size % tgt.num_hosts:
                raise AotError(f"config.batch_size {config.batch_size} is not a multiple of the "
                               f"{tgt.num_hosts} hosts of {tgt.topology}")
        except (AotError, config_checks.ConfigError) as err:
            console.usage_error(str(err))
        try:
            programs, sizes = compile_programs(config, tgt, data, log=ours.info, only=tuple(only.value))
        except ValueError as err:  # a shape the step refuses while tracing (e.g. the sampler's size)
            console.usage_error(f"the step cannot be built for this config: {err}")
        if not programs:
            console.usage_error(f"--programs={','.join(only.value)}: this config has none of them (no "
                                "prototype levels, or no kNN evaluator)")
        text, result = report(config, tgt, data, programs, sizes)
        if hlo_dir.value:
            os.makedirs(hlo_dir.value, exist_ok=True)
            for p in programs:
                if p.compiled is not None:
                    with open(os.path.join(hlo_dir.value, f"{p.name}.hlo.txt"), "w") as f:
                        f.write(p.compiled.as_text())
        print(text)
        if json_out.value:
            with open(json_out.value, "w") as f:
                json.dump(dict(result, command=" ".join(sys.argv), versions=versions()), f, indent=1)
        sys.exit(0 if result["fits"] else 1)

    app.run(run, argv=argv, flags_parser=console.parse_flags)
    return 0


def versions() -> dict:
    from importlib import metadata
    out = {}
    for name in ("jax", "jaxlib", "libtpu", "flax", "optax"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
