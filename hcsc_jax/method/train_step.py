"""MoCo-style train state and the jitted HCSC train step (docs/method.md §6).

The state is one pytree: query and key encoder parameters and BN statistics, optimizer state,
the queue of keys (K, d) with its pointer, the ICSC normalizer cache (L, K), step and rng.
A step: EMA of the key encoder, two augmented views (plus any multi-crop local views), key
forward with ShuffleBN (off for encoders without BatchNorm: ViTs), query forward of the global and
local views, HCSC objective, SGD (or AdamW) update,
enqueue of the global batch's keys. It runs under `jax.jit` on a
mesh with a `data` axis: the batch is sharded over it, the state replicated. BN statistics are
per group of `bn_group_size` samples, so the numbers do not depend on the number of devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hcsc_jax import models, sharding
from hcsc_jax.data import augmentations
from hcsc_jax.method import device_prototypes, objective


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. Arrays are replicated over the mesh.

    queue (K, d) float32 keys; queue_ptr () int32 next write row; queue_lse (L, K) float32 ICSC
    normalizers of the queue under the current prototypes (zeros in warm-up; (1, K) when L = 0);
    step () int32 global step; rng (2,) uint32 raw key data of the run's root key.
    """

    q_params: Any
    q_stats: Any
    k_params: Any
    k_stats: Any
    opt_state: Any
    queue: jax.Array
    queue_ptr: jax.Array
    queue_lse: jax.Array
    step: jax.Array
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of a step (hashable). BN groups are a property of the model
    (`make_encoder(bn_group_size=...)`). `view_local`: the multi-crop local views (query
    encoder only, docs/method.md §6); local views of one crop size go through the encoder as one batch.
    `shuffle_gather` (`SHUFFLE_GATHERS`): how ShuffleBN permutes the key view across devices."""

    objective: objective.ObjectiveConfig
    view_q: augmentations.AugmentConfig
    view_k: augmentations.AugmentConfig
    view_local: tuple = ()
    ema_momentum: float = 0.999
    shuffle_bn: bool = True
    shuffle_gather: str = "views"


# ShuffleBN's permutation of the key view across devices. "views": the augmented view is permuted
# (x_k[perm]) and XLA partitions the permutation itself: a sum of the whole view over the devices,
# and the key encoder then runs on the whole global batch on every device; the same numbers on any
# number of processes (tests/test_multiprocess.py). "images": the uint8 images are gathered in the
# shuffled order (one all-gather, a byte a pixel), each device keeps its rows and augments them with
# each example's own randomness (`make_views`): the same views bit for bit and each device runs the
# key encoder on its share (1/32 of the FLOPs per chip on a 128-chip pod, BENCHMARKS.md), but
# 2 processes x 4 devices no longer give the run of 1 x 8 to the last bit.
SHUFFLE_GATHERS = ("views", "images")


def check_batch_config(global_batch: int, queue_size: int, bn_group_size: int, num_devices: int):
    """Raises ValueError with what to change when the batch, queue and BN groups do not fit."""
    if queue_size % global_batch:
        raise ValueError(
            f"queue_size {queue_size} is not a multiple of the global batch {global_batch}: the "
            f"queue is written one whole batch at a time; use e.g. queue_size="
            f"{max(1, queue_size // global_batch) * global_batch}"
        )
    if global_batch % (bn_group_size * num_devices):
        raise ValueError(
            f"global batch {global_batch} must be a multiple of bn_group_size x devices = "
            f"{bn_group_size} x {num_devices} = {bn_group_size * num_devices}, so that every device "
            "holds whole BN groups; change batch_size, bn_group_size or the number of devices"
        )


OPTIMIZERS = ("sgd", "adamw")
# How often the learning rate changes: every step (optax's schedules), or once per epoch, held at
# the value of the epoch's first step (the authors' `adjust_learning_rate`, docs/method.md §9).
LR_GRANULARITIES = ("step", "epoch")


def _held(schedule, every: int):
    """`schedule` evaluated at the first step of each run of `every` steps."""
    return lambda step: schedule(step // every * every)


def make_optimizer(base_lr: float, global_batch: int, total_steps: int, weight_decay=1e-4, momentum=0.9, *,
                   optimizer: str = "sgd", warmup_steps: int = 0, grad_clip: float = 0.0,
                   betas=(0.9, 0.999), hold_steps: int = 1):
    """-> (optax transformation, lr schedule). lr = base_lr * B / 256 (linear scaling, as MoCo v2
    and v3), rising linearly from 0 over `warmup_steps` (none by default), then cosine decay to 0
    at `total_steps`. `optimizer`:
      "sgd": MoCo v2's SGD with `momentum` and L2 weight decay added to the gradient, on every
        parameter (the default: without warm-up or clipping the same transformation as always);
      "adamw": MoCo v3's recipe for ViTs, torch's AdamW (`betas`, eps 1e-8, decoupled decay
        lr * `weight_decay` * p on every parameter).
    `grad_clip` > 0 first clips the gradients to that global L2 norm. `hold_steps` > 1 holds the
    lr for that many steps at the value of their first (steps per epoch: the authors' per-epoch
    cosine, `base * (1 + cos(pi * epoch / epochs)) / 2`)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    peak = base_lr * global_batch / 256
    total = max(total_steps, 1)
    if warmup_steps:
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, min(warmup_steps, total), total, 0.0)
    else:
        schedule = optax.cosine_decay_schedule(peak, total)
    if hold_steps > 1:
        schedule = _held(schedule, int(hold_steps))
    if optimizer == "sgd":
        tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))
    else:
        tx = optax.adamw(schedule, b1=betas[0], b2=betas[1], eps=1e-8, weight_decay=weight_decay)
    if grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    return tx, schedule


def init_state(model: nnx.Module, tx, queue_size: int, embed_dim: int, num_levels: int, seed: int):
    """The initial state: key encoder = copy of the query encoder, queue random-normal, unit rows."""
    _, params, stats = models.split_model(model)
    root = jax.random.key(seed)
    queue = jax.random.normal(jax.random.fold_in(root, 1), (queue_size, embed_dim), jnp.float32)
    # jnp.linalg.norm keeps the initial queue of earlier versions bit for bit (models.l2_normalize
    # differs in the last bit, enough to flip a selection draw in tests/test_multiprocess.py).
    queue = queue / jnp.linalg.norm(queue, axis=1, keepdims=True)
    copy = lambda t: jax.tree.map(jnp.array, t)
    return TrainState(
        q_params=params, q_stats=stats, k_params=copy(params), k_stats=copy(stats),
        opt_state=tx.init(params), queue=queue, queue_ptr=jnp.zeros((), jnp.int32),
        queue_lse=jnp.zeros((max(num_levels, 1), queue_size), jnp.float32),  # Orbax can't save size 0
        step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(root),
    )


def step_keys(state: TrainState):
    """Per-step keys derived from (root key, step): views, shuffle, objective. The steps draw
    from fold_in(root, 0), the initial queue from fold_in(root, 1)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0), state.step)
    return jax.random.split(key, 4)


def shuffle_permutation(key, batch: int):
    """ShuffleBN: a random permutation of the global batch (mixes samples across BN groups)."""
    perm = jax.random.permutation(key, batch)
    return perm, jnp.argsort(perm)


def enqueue(queue, ptr, keys):
    """Writes keys (B, d) at rows [ptr, ptr + B) of queue (K, d); -> (queue, (ptr + B) % K)."""
    queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, 0))
    return queue, (ptr + keys.shape[0]) % queue.shape[0]


def _gather(batch_sharding):
    """x[order] of a batch-sharded x: left to XLA without `batch_sharding`; with it, one all-gather
    of x (uint8 images: one byte a pixel), each device's rows taken locally, the result batch-
    sharded, so the key encoder runs on each device's share (XLA's own partitioning of the
    gather summed the whole batch over devices and ran the key encoder on all of it everywhere)."""
    if batch_sharding is None:
        return lambda x, order: x[order]
    whole = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    constrain = jax.lax.with_sharding_constraint
    return lambda x, order: constrain(constrain(x, whole)[order], batch_sharding)


def make_views(key_q, key_k, images, cfg: StepConfig, key_order=None, batch_sharding=None):
    """Augmented views -> (x_q, x_k, tuple of local views), float32 normalized.

    images: a `data.batch.Images` as a `data.pipeline` input yields it: whole uint8 images, from
    which every view is cropped here, or the 2 + len(cfg.view_local) uint8 views (B, S_v, S_v, C)
    the host already cropped (query, key, local views), which only get the flip and the
    photometric ops. Local view v draws from fold_in(key_q, v + 1). `key_order` (ShuffleBN's
    permutation): x_k comes in that order, x_k[i] the key view of example key_order[i], the same
    numbers as the key view permuted after the augmentation (`augmentations.augment_input`);
    with `batch_sharding` its uint8 images cross devices in one all-gather (`_gather`)."""
    configs = (cfg.view_q, cfg.view_k) + tuple(cfg.view_local)
    keys = [key_q, key_k] + [jax.random.fold_in(key_q, v + 1) for v in range(len(cfg.view_local))]
    orders = (None, key_order) + (None,) * len(cfg.view_local)
    views = augmentations.augment_input(keys, images, configs, orders, _gather(batch_sharding))
    return views[0], views[1], tuple(views[2:])


def _query_forward(graphdef, params, stats, x_q, x_local):
    """Query encoder in train mode on the global view, then on the local views with views of one
    crop size concatenated into one batch (BN groups stay within a view, the batch being a
    multiple of the group size). -> (q (B, d), tuple of local q (B, d), new stats)."""
    _, q, stats = models.apply_model(graphdef, params, stats, x_q, train=True)
    local_q = [None] * len(x_local)
    for size in sorted({x.shape[1] for x in x_local}, reverse=True):
        group = [v for v, x in enumerate(x_local) if x.shape[1] == size]
        x = jnp.concatenate([x_local[v] for v in group]) if len(group) > 1 else x_local[group[0]]
        _, proj, stats = models.apply_model(graphdef, params, stats, x, train=True)
        for v, part in zip(group, jnp.split(proj, len(group))):
            local_q[v] = part
    return q, tuple(local_q), stats


def train_step(graphdef, tx, cfg: StepConfig, state: TrainState, images, labels, prototypes,
               batch_sharding=None):
    """One HCSC step. images: a `data.batch.Images` (see `make_views`); labels (B, L) int32
    k-means assignments (ignored in warm-up);
    prototypes: `device_prototypes.Prototypes` or None (warm-up); batch_sharding: that of the batch under
    `jax.jit` (`jit_train_step`). -> (new state, metrics dict of scalars)."""
    key_q, key_k, key_shuffle, key_obj = step_keys(state)
    perm, unperm = shuffle_permutation(key_shuffle, images.batch_size) if cfg.shuffle_bn else (None, None)
    # shuffle_gather "images": the key view comes in the shuffled order (`make_views`: the uint8
    # images are permuted, one byte a pixel across devices, then augmented as each example's own view).
    gather_images = cfg.shuffle_bn and cfg.shuffle_gather == "images"
    x_q, x_k, x_local = make_views(key_q, key_k, images, cfg, key_order=perm if gather_images else None,
                                   batch_sharding=batch_sharding)

    # Momentum update of the key encoder, before the keys are computed (docs/method.md §6).
    m = cfg.ema_momentum
    k_params = jax.tree.map(lambda k, q: m * k + (1.0 - m) * q, state.k_params, state.q_params)
    if cfg.shuffle_bn:
        x_k = x_k if gather_images else x_k[perm]
        _, keys, k_stats = models.apply_model(graphdef, k_params, state.k_stats, x_k, train=True)
        keys = keys[unperm]
    else:
        _, keys, k_stats = models.apply_model(graphdef, k_params, state.k_stats, x_k, train=True)
    keys = jax.lax.stop_gradient(keys)

    queue_lse = state.queue_lse if prototypes is not None else None

    def loss_fn(params):
        q, local_q, q_stats = _query_forward(graphdef, params, state.q_stats, x_q, x_local)
        loss, metrics = objective.hcsc_objective(
            q, keys, state.queue, prototypes, labels, key_obj, cfg.objective, queue_lse, local_q=local_q)
        return loss, (metrics, q_stats)

    (loss, (metrics, q_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.q_params)
    updates, opt_state = tx.update(grads, state.opt_state, state.q_params)
    q_params = optax.apply_updates(state.q_params, updates)

    # Enqueue after the loss (docs/method.md §6); keep the ICSC cache in step with the queue.
    new_lse = state.queue_lse
    if prototypes is not None:
        new_lse = jax.lax.dynamic_update_slice(
            state.queue_lse, device_prototypes.queue_log_normalizers(keys, prototypes), (0, state.queue_ptr))
    queue, ptr = enqueue(state.queue, state.queue_ptr, keys)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    new_state = state.replace(
        q_params=q_params, q_stats=q_stats, k_params=k_params, k_stats=k_stats,
        opt_state=opt_state, queue=queue, queue_ptr=ptr, queue_lse=new_lse, step=state.step + 1,
    )
    return new_state, metrics


def jit_train_step(graphdef, tx, cfg: StepConfig, mesh, warmup: bool) -> Callable:
    """The jitted step (state, images, labels (B, L) int32, prototypes) -> (state, metrics), the
    state donated and replicated, `images` (see `make_views`) and `labels` batch-sharded as a
    `data.pipeline` input yields them. `warmup=True` compiles the instance-only variant
    (prototypes are ignored)."""
    replicated, sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def step(state, images, labels, prototypes):
        return train_step(graphdef, tx, cfg, state, images, labels, None if warmup else prototypes, sharded)

    return jax.jit(step, in_shardings=(replicated, sharded, sharded, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


def refresh_queue_lse(state: TrainState, prototypes) -> TrainState:
    """Recomputes the (L, K) ICSC cache for a new epoch's prototypes."""
    return state.replace(queue_lse=device_prototypes.queue_log_normalizers(state.queue, prototypes))
