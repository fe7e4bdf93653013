"""Times the HCSC head: selection masks, both losses and the gradient w.r.t. q, jitted.

Paper shapes by default (B=256, K=16384, d=128, levels 3000/2000/1000). A "step" is what the
train step does with the embeddings: positives, Bernoulli masks for every level, ICSC + PCSC
losses, d loss / d q, and the cached queue normalizers of the B new keys (written at enqueue).

  python benchmarks/head.py                      # both semantics, cached normalizers, hash masks
  python benchmarks/head.py --sampler=threefry --uncached
"""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hcsc_jax.method import device_prototypes, objective, selection

flags.DEFINE_integer("batch", 256, "B")
flags.DEFINE_integer("queue", 16384, "K")
flags.DEFINE_integer("dim", 128, "d")
flags.DEFINE_list("levels", ["3000", "2000", "1000"], "M_l per level")
flags.DEFINE_enum("sampler", "hash", selection.SAMPLERS, "Bernoulli sampler")
flags.DEFINE_bool("uncached", False, "recompute the queue normalizers every step (no cache)")
flags.DEFINE_integer("steps", 20, "timed steps (after 3 warm-up steps)")
FLAGS = flags.FLAGS


def unit(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(rng, batch, queue, dim, sizes):
    protos = device_prototypes.make_prototypes(
        [unit(rng, m, dim) for m in sizes],
        [rng.uniform(0.1, 0.3, m).astype(np.float32) for m in sizes],
        [np.ones(m, bool) for m in sizes],
        [rng.integers(0, sizes[l + 1], sizes[l]).astype(np.int32) for l in range(len(sizes) - 1)],
    )
    bottom = rng.integers(0, sizes[0], batch)
    labels = [bottom]
    for parents in protos.parents:
        labels.append(np.asarray(parents)[labels[-1]])
    return dict(
        q=jnp.asarray(unit(rng, batch, dim)), k=jnp.asarray(unit(rng, batch, dim)),
        queue=jnp.asarray(unit(rng, queue, dim)), protos=protos,
        labels=jnp.asarray(np.stack(labels, 1), jnp.int32),
    )


def head_step(cfg: objective.ObjectiveConfig, cached: bool):
    """jitted (q, k, queue, protos, labels, queue_lse, rng) -> (loss, dloss/dq, new-key normalizers)."""

    def step(q, k, queue, protos, labels, queue_lse, rng):
        lse = queue_lse if cached else None
        grad_fn = jax.value_and_grad(
            lambda q: objective.hcsc_objective(q, k, queue, protos, labels, rng, cfg, lse)[0])
        loss, grad = grad_fn(q)
        new_lse = device_prototypes.queue_log_normalizers(k, protos) if cached else None
        return loss, grad, new_lse

    return jax.jit(step)


def time_step(fn, args, steps):
    for i in range(3):
        jax.block_until_ready(fn(*args, jax.random.key(i)))
    times = []
    for i in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args, jax.random.key(100 + i)))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), 1e3 * float(np.percentile(times, 90))


def main(_):
    sizes = [int(m) for m in FLAGS.levels]
    inp = make_inputs(np.random.default_rng(0), FLAGS.batch, FLAGS.queue, FLAGS.dim, sizes)
    cached = not FLAGS.uncached
    lse = device_prototypes.queue_log_normalizers(inp["queue"], inp["protos"])
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"({platform.processor() or platform.machine()}), "
          f"B={FLAGS.batch} K={FLAGS.queue} d={FLAGS.dim} levels={sizes} sampler={FLAGS.sampler} "
          f"queue normalizers={'cached' if cached else 'recomputed'}")
    for semantics in ("paper", "official"):
        cfg = objective.ObjectiveConfig(semantics=semantics, sampler=FLAGS.sampler)
        fn = head_step(cfg, cached)
        args = (inp["q"], inp["k"], inp["queue"], inp["protos"], inp["labels"], lse)
        median, p90 = time_step(fn, args, FLAGS.steps)
        print(f"  {semantics:8s}: {median:7.1f} ms/step median, {p90:7.1f} ms p90")


if __name__ == "__main__":
    app.run(main)
