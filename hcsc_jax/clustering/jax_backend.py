"""The "jax" k-means backend: faiss's k-means run on the devices of a 1-D mesh.

It replaces only each level's k-means (the hierarchy around it is shared with the "faiss"
backend): the same `faiss.Clustering` algorithm (its subsample and random initialization, bit
for bit, Lloyd iterations, early stop on an unchanged objective, best of nredo by final
objective, empty clusters split from a donor) run with jitted chunked matmul assignments, rows
sharded over the mesh's "data" axis. The donor of an empty cluster is drawn from a JAX RNG, not
faiss's. Per-cluster sums are reduced over 8 fixed row blocks, so any device count dividing 8
gives identical results; floating-point rounding differs from faiss's BLAS, so the two backends
agree closely but not bitwise. On GPUs the segment sums use atomics and are not bitwise
reproducible from run to run unless XLA's deterministic ops are on.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from hcsc_jax import sharding
from hcsc_jax.sharding import DATA_AXIS

_BLOCKS = 8  # reduction blocks; sums are identical on any device count dividing it
_MAX_CHUNK = 4096  # rows per assignment matmul: a chunk costs (chunk, k) float32
_SPLIT_EPS = 1.0 / 1024  # faiss's split_clusters perturbation


def device_mesh(mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh:
    """The mesh the k-means runs on: `mesh` (checked to have the single axis "data") or, for
    None, all devices."""
    mesh = mesh or sharding.make_mesh()
    if mesh.axis_names != (DATA_AXIS,):
        raise ValueError(f"mesh must have the single axis ({DATA_AXIS!r},), got {mesh.axis_names}")
    return mesh


def _faiss_rand_perm(n: int, m: int, seed: int) -> np.ndarray:
    """First m entries (m <= n) of faiss's `rand_perm(n, seed)`: Fisher-Yates with std::mt19937.

    Only the first m swaps matter (entry i is final after swap i), so this costs O(n + m).
    """
    bits = np.random.MT19937(0)
    bits._legacy_seeding(seed % 2**32)  # std::mt19937(seed) seeding (init_genrand)
    steps = min(m, n - 1)
    i = np.arange(steps, dtype=np.uint64)
    other = (i + bits.random_raw(steps) % (np.uint64(n) - i)).tolist()
    perm = list(range(n))
    for a, b in enumerate(other):
        perm[a], perm[b] = perm[b], perm[a]
    return np.asarray(perm[:m], np.int64)


def _layout(n: int, num_devices: int) -> tuple[int, int, int]:
    """-> (blocks, chunks per block, chunk rows): n rows padded to blocks * chunks * chunk."""
    blocks = math.lcm(_BLOCKS, num_devices)
    per_block = -(-n // blocks)
    chunk = min(_MAX_CHUNK, per_block)
    return blocks, -(-per_block // chunk), chunk


def _assign_chunk(x, centroids, c_sq):
    """Exact float32 L2 argmin of x (C, d) against centroids (k, d) -> assign (C,), sq_dist (C,)."""
    dots = jnp.dot(x, centroids.T, precision=jax.lax.Precision.HIGHEST)
    dist = jnp.sum(x * x, axis=1, keepdims=True) - 2 * dots + c_sq
    assign = jnp.argmin(dist, axis=1).astype(jnp.int32)
    return assign, jnp.maximum(jnp.take_along_axis(dist, assign[:, None], axis=1)[:, 0], 0)


def _block_stats(x, mask, centroids):
    """Per-block sums of x (b, nc, C, d) masked by mask (b, nc, C) -> (sums (b, k, d),
    counts (b, k), objective (b,)), each block summed chunk by chunk in order."""
    k, d = centroids.shape
    c_sq = jnp.sum(centroids * centroids, axis=1)

    def chunk_step(carry, xm):
        sums, counts, obj = carry
        xc, mc = xm
        assign, dist = _assign_chunk(xc, centroids, c_sq)
        sums = sums + jax.ops.segment_sum(xc * mc[:, None], assign, k)
        counts = counts + jax.ops.segment_sum(mc, assign, k)
        return (sums, counts, obj + jnp.sum(dist * mc)), None

    zeros = (jnp.zeros((k, d), jnp.float32), jnp.zeros(k, jnp.float32), jnp.zeros((), jnp.float32))
    return jax.lax.map(lambda xm: jax.lax.scan(chunk_step, zeros, xm)[0], (x, mask))


def _split_empty(centroids, counts, key):
    """faiss's split_clusters: each empty cluster, in index order, takes a copy of a donor cluster
    drawn with probability ~ (count - 1), both perturbed by (1 +- 1/1024) on alternate dimensions;
    the donor's count is shared between them. centroids (k, d), counts (k,) float32."""
    sign = jnp.where(jnp.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0) * _SPLIT_EPS

    def split(state):
        c, h, i = state
        ci = jnp.argmax(h == 0)
        cj = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(jnp.maximum(h - 1, 0)))
        c = c.at[ci].set(c[cj] * (1 + sign)).at[cj].set(c[cj] * (1 - sign))
        half = h[cj] / 2
        return c, h.at[ci].set(half).at[cj].add(-half), i + 1

    return jax.lax.while_loop(lambda s: jnp.any(s[1] == 0), split, (centroids, counts, 0))[0]


@functools.cache
def _lloyd_fn(mesh, niter: int):
    """jitted (x (n_pad, d), mask (blocks, chunks, chunk), init (k, d), key) -> (centroids (k, d),
    objective ()): x and mask sharded over "data"; up to niter Lloyd iterations as faiss.Clustering,
    stopping early when the objective repeats exactly. objective: of the last assignment."""

    def local(x, mask, centroids, key):
        b, nc, c = mask.shape[0], *mask.shape[1:]
        x = x.reshape(b, nc, c, -1)

        def stats(cent):
            sums, counts, obj = jax.lax.all_gather(_block_stats(x, mask, cent), DATA_AXIS, tiled=True)
            return sums.sum(0), counts.sum(0), obj.sum()

        def body(state):
            i, cent, obj, _ = state
            sums, counts, new_obj = stats(cent)
            cent = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], 0)
            return i + 1, _split_empty(cent, counts, jax.random.fold_in(key, i)), new_obj, obj

        def more(state):
            i, _, obj, prev = state
            return (i < niter) & ((i < 2) | (prev == 0) | (obj != prev))

        inf = jnp.full((), jnp.inf, jnp.float32)
        _, centroids, obj, _ = jax.lax.while_loop(more, body, (0, centroids, inf, inf))
        return centroids, obj

    data = P(DATA_AXIS)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(data, data, P(), P()),
                                 out_specs=(P(), P()), check_vma=False))


@functools.cache
def _assign_fn(mesh, chunk: int):
    """jitted (x (n_pad, d) sharded over "data", centroids (k, d)) -> (assign, sq_dist), each
    (n_pad / chunk, chunk), replicated (so every process can read them)."""

    def local(x, centroids):
        c_sq = jnp.sum(centroids * centroids, axis=1)
        out = jax.lax.map(lambda xc: _assign_chunk(xc, centroids, c_sq), x.reshape(-1, chunk, x.shape[1]))
        return jax.lax.all_gather(out, DATA_AXIS, tiled=True)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P()), out_specs=(P(), P()),
                                 check_vma=False))


def abstract_lloyd_args(n: int, d: int, k: int, mesh) -> tuple:
    """The `jax.ShapeDtypeStruct`s of the arguments `kmeans` gives `_lloyd_fn(mesh, niter)` for
    n training rows of dimension d and k centroids (x and mask sharded over "data" as
    `_shard_rows` makes them, the initial centroids and the key replicated): for compiling the
    k-means ahead of time (`hcsc_jax.aot`). The assignment pass (`_assign_fn(mesh, chunk)`) takes
    the same x with the mask's last dimension as its chunk."""
    layout = _layout(n, mesh.size)
    rows, whole = sharding.batch_sharded(mesh), sharding.replicated(mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return (jax.ShapeDtypeStruct((math.prod(layout), d), jnp.float32, sharding=rows),
            jax.ShapeDtypeStruct(layout, jnp.float32, sharding=rows),
            jax.ShapeDtypeStruct((k, d), jnp.float32, sharding=whole),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=whole))


def _shard_rows(x: np.ndarray, mesh) -> tuple[jax.Array, jax.Array]:
    """Pads x (n, d) with zero rows to the `_layout` and shards it over "data" ->
    (x (n_pad, d), mask (blocks, chunks, chunk): 1 for real rows)."""
    n = x.shape[0]
    layout = _layout(n, mesh.size)
    n_pad = math.prod(layout)
    mask = (np.arange(n_pad) < n).astype(np.float32).reshape(layout)
    x = np.concatenate([x, np.zeros((n_pad - n, x.shape[1]), np.float32)])
    sharded = sharding.batch_sharded(mesh)
    return jax.device_put(x, sharded), jax.device_put(mask, sharded)


def kmeans(x, k, *, niter, nredo, seed, max_points_per_centroid, mesh):
    """faiss.Clustering semantics on the devices of `mesh` (from `device_mesh`): same subsample and
    random initialization (faiss's RNG), Lloyd iterations with exact float32 L2 assignment, the
    restart with the lowest final objective. Only the donor choice for empty clusters uses another
    RNG. x (n, d) float32 -> centroids (k, d), sq_dists (n,) (squared L2 distance of each point to
    its centroid), assign (n,) int32, as `faiss_backend.kmeans`."""
    n = x.shape[0]
    train = x
    if n > k * max_points_per_centroid:
        train = x[_faiss_rand_perm(n, k * max_points_per_centroid, seed)]
    xt, mask = _shard_rows(train, mesh)
    lloyd = _lloyd_fn(mesh, niter)
    best, best_obj = None, np.inf
    for redo in range(nredo):
        init = train[_faiss_rand_perm(len(train), k, seed + 1 + redo * 15486557)]
        key = jax.random.fold_in(jax.random.key(seed % 2**31), redo)
        centroids, obj = lloyd(xt, mask, init, key)
        if best is None or float(obj) < best_obj:
            best, best_obj = centroids, float(obj)
    if train is not x:
        xt, mask = _shard_rows(x, mesh)
    assign, sq_dists = _assign_fn(mesh, mask.shape[-1])(xt, best)
    return (np.asarray(best), np.asarray(sq_dists).reshape(-1)[:n],
            np.asarray(assign).reshape(-1)[:n])
