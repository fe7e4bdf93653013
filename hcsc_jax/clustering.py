"""Hierarchical k-means (HCSC spec §1), as in the authors' `run_hkmeans`.

Level 0 runs faiss k-means (exact `IndexFlatL2`, seed `seed`) on the N sample features and
assigns every sample to its nearest centroid. Each level l > 0 runs k-means (seed `seed + l`) on
the M_{l-1} L2-normalized centroids of the level below: those centroids are its members, and
their assignments are `parents` of level l-1. Sample assignments compose through the parents:
`assign_{l+1}[n] = parent_l[assign_l[n]]`.

Every cluster also gets a concentration phi (its temperature in the prototype softmax):
`mean(sqrt(D)) / log(n + 10)` over its n > 1 members, D the squared distance to the
un-normalized centroid; clusters with n <= 1 take the level's largest phi; then phi is clipped
to its 10th/90th percentiles and rescaled to mean `temperature`. Centroids are normalized last.
Everything is vectorised NumPy; the only Python loop is over levels.

Results are bit-identical across calls with the same faiss thread count. Another thread count
(`faiss.omp_set_num_threads`) gave the same assignments and centroids in our checks, but faiss's
final squared distances, hence phi, differ in the last float32 bits (BLAS blocking).
faiss would print "WARNING clustering n points to k centroids" to stderr whenever
n < k * min_points_per_centroid (always the case for upper levels; harmless): it is told 0 and
`hierarchical_kmeans` logs one line naming the under-filled levels instead.

backend="jax" replaces only the k-means of each level (the rest is shared): the same
`faiss.Clustering` algorithm (its subsample and random initialization, bit for bit, Lloyd
iterations, early stop on an unchanged objective, best of nredo by final objective, empty
clusters split from a donor) run with jitted chunked matmul assignments on the devices of a
1-D mesh, rows sharded over its "data" axis. The donor of an empty cluster is drawn from a JAX
RNG, not faiss's. Per-cluster sums are reduced over 8 fixed row blocks, so any device count
dividing 8 gives identical results; floating-point rounding differs from faiss's BLAS, so the
two backends agree closely but not bitwise. On GPUs the segment sums use atomics and are not
bitwise reproducible from run to run unless XLA's deterministic ops are on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import faiss
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from hcsc_jax import sharding
from hcsc_jax.models import l2_normalize
from hcsc_jax.sharding import DATA_AXIS

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "Hierarchy", "Level", "concentration", "hierarchical_kmeans"]

BACKENDS = ("faiss", "jax")

_FIELDS = ("centroids", "assignments", "temperatures", "valid", "parents", "counts")


@dataclasses.dataclass(frozen=True, eq=False)
class Level:
    """One level of the hierarchy, M_l clusters of N samples in d dimensions.

    centroids: (M_l, d) float32, L2-normalized.
    assignments: (N,) int32, every sample's cluster at this level.
    temperatures: (M_l,) float32, the concentration phi of spec §1.4.
    valid: (M_l,) bool, False for clusters without members.
    parents: (M_l,) int32, the level-(l+1) cluster of each centroid; None at the top level.
    counts: (M_l,) int32, members per cluster (samples at level 0, child centroids above).
    """

    centroids: np.ndarray
    assignments: np.ndarray
    temperatures: np.ndarray
    valid: np.ndarray
    parents: np.ndarray | None
    counts: np.ndarray

    def __post_init__(self):
        if self.centroids.ndim != 2 or self.assignments.ndim != 1:
            raise ValueError(
                f"Level: centroids must be (M_l, d) and assignments (N,), got shapes "
                f"{self.centroids.shape} and {self.assignments.shape}"
            )
        m = self.centroids.shape[0]
        expected = {
            "centroids": (np.float32, self.centroids.shape),
            "assignments": (np.int32, self.assignments.shape),
            "temperatures": (np.float32, (m,)),
            "valid": (np.bool_, (m,)),
            "counts": (np.int32, (m,)),
        }
        if self.parents is not None:
            expected["parents"] = (np.int32, (m,))
        for name, (dtype, shape) in expected.items():
            a = getattr(self, name)
            if a.dtype != dtype or a.shape != shape:
                raise ValueError(
                    f"Level.{name}: expected dtype {np.dtype(dtype)} and shape {shape} "
                    f"(M_l = number of centroids), got {a.dtype} {a.shape}"
                )

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class Hierarchy:
    """Levels from finest (0) to coarsest; all levels share the same N samples.

    Either a hierarchy (every level but the top has parents) or, with no parents at all,
    independent flat clusterings of the same samples (PCL's, `mode="independent"`).
    """

    levels: tuple[Level, ...]

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(self.levels))
        if not self.levels:
            raise ValueError("Hierarchy needs at least one level")
        independent = all(lv.parents is None for lv in self.levels)
        for l, (lo, hi) in enumerate(zip(self.levels[:-1], self.levels[1:])):
            if lo.parents is None and not independent:
                raise ValueError(f"level {l} is not the top level, so it needs parents")
            if lo.assignments.shape != hi.assignments.shape:
                raise ValueError(f"levels {l} and {l + 1} assign different numbers of samples")
        if self.levels[-1].parents is not None:
            raise ValueError("the top level must have parents=None")

    @property
    def is_hierarchical(self) -> bool:
        """False for independent clusterings (no parent links), True otherwise (one level: True)."""
        return len(self.levels) == 1 or self.levels[0].parents is not None

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def num_clusters(self) -> tuple[int, ...]:
        return tuple(level.num_clusters for level in self.levels)

    def assignments(self) -> np.ndarray:
        """(N, L) int32: column l is every sample's cluster at level l."""
        return np.stack([level.assignments for level in self.levels], axis=1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat dict `level{l}/{field}` -> array, for `np.savez` (top level has no parents)."""
        out = {}
        for l, level in enumerate(self.levels):
            for name in _FIELDS:
                value = getattr(level, name)
                if value is not None:
                    out[f"level{l}/{name}"] = value
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Hierarchy:
        """Inverse of `to_arrays` (also accepts the `NpzFile` returned by `np.load`)."""
        num_levels = 0
        while f"level{num_levels}/centroids" in arrays:
            num_levels += 1
        levels = []
        for l in range(num_levels):
            fields = {}
            for name in _FIELDS:
                key = f"level{l}/{name}"
                if key in arrays:
                    fields[name] = np.asarray(arrays[key])
                elif name == "parents" and (l == num_levels - 1 or "level0/parents" not in arrays):
                    fields[name] = None  # the top level, or independent clusterings
                else:
                    raise ValueError(f"from_arrays: missing key {key!r}")
            levels.append(Level(**fields))
        return cls(tuple(levels))


def concentration(
    sq_dists: np.ndarray, assignments: np.ndarray, num_clusters: int, temperature: float
) -> np.ndarray:
    """Per-cluster concentration phi of spec §1.4, (num_clusters,) float32.

    sq_dists: (n,) squared L2 distance (>= 0, as faiss clamps it) of each member to its
        un-normalized centroid.
    assignments: (n,) cluster of each member, in [0, num_clusters).
    Empty and singleton clusters get the largest phi of the n > 1 clusters (`temperature` if
    there is none); then clip to the 10th/90th percentiles and rescale to mean `temperature`.
    If every phi is 0 (all members sit on their centroids), every cluster gets `temperature`.
    """
    counts = np.bincount(assignments, minlength=num_clusters)
    dist = np.sqrt(sq_dists.astype(np.float64))
    dist_sum = np.bincount(assignments, weights=dist, minlength=num_clusters)
    multi = counts > 1
    phi = np.zeros(num_clusters, np.float64)
    phi[multi] = dist_sum[multi] / counts[multi] / np.log(counts[multi] + 10)
    phi[~multi] = phi[multi].max() if multi.any() else temperature
    phi = np.clip(phi, *np.percentile(phi, [10, 90]))
    mean = phi.mean()
    if mean == 0:
        return np.full(num_clusters, temperature, np.float32)
    return (temperature * phi / mean).astype(np.float32)


def _check_inputs(features, num_clusters, temperature, hierarchical=True) -> tuple[int, ...]:
    if not isinstance(features, np.ndarray) or features.ndim != 2:
        got = (f"shape {features.shape}" if isinstance(features, np.ndarray)
               else type(features).__name__)
        raise ValueError(f"features must be a 2-D np.ndarray (N, d); got {got}")
    if features.dtype != np.float32:
        raise ValueError(
            f"features must be float32, got dtype {features.dtype}; "
            "pass features.astype(np.float32)"
        )
    # max/min propagate NaN and expose +-inf, without an (N, d) temporary.
    finite = np.isfinite(features.max(axis=1)) & np.isfinite(features.min(axis=1))
    bad_rows = int(np.count_nonzero(~finite))
    if bad_rows:
        raise ValueError(
            f"features has {bad_rows} of {features.shape[0]} rows with NaN or inf values; "
            "remove or fix them before clustering"
        )
    if isinstance(num_clusters, (str, bytes)) or not isinstance(num_clusters, Iterable):
        raise ValueError(
            f"num_clusters must be a list of ints, one per level; got {num_clusters!r}"
        )
    entries = list(num_clusters)
    if not entries:
        raise ValueError("num_clusters is empty: give at least one level, e.g. [1000]")
    for m in entries:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"num_clusters entries must be ints >= 1; got {m!r} in {entries}")
    sizes = tuple(int(m) for m in entries)
    n = features.shape[0]
    if n < sizes[0]:
        raise ValueError(
            f"cannot cluster N={n} samples into M_0={sizes[0]} clusters; "
            "use fewer clusters than samples"
        )
    if not hierarchical and n < max(sizes):
        raise ValueError(
            f"cannot cluster N={n} samples into {max(sizes)} clusters; use fewer clusters than samples"
        )
    for l in range(len(sizes) - 1 if hierarchical else 0):
        if sizes[l + 1] >= sizes[l]:
            raise ValueError(
                f"num_clusters must be strictly decreasing: level {l + 1} has "
                f"M_{l + 1}={sizes[l + 1]} >= M_{l}={sizes[l]}. Upper levels cluster the "
                "centroids of the level below, so M_{l+1} < M_l is required"
            )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return sizes


def _kmeans_faiss(x, k, *, niter, nredo, seed, max_points_per_centroid, min_points_per_centroid,
                  mesh):
    """faiss k-means of x (n, d) float32: returns centroids (k, d), sq_dists (n,), assign (n,)."""
    del mesh, min_points_per_centroid
    d = x.shape[1]
    clus = faiss.Clustering(d, k)
    clus.niter = niter
    clus.nredo = nredo
    clus.seed = seed
    clus.max_points_per_centroid = max_points_per_centroid
    clus.min_points_per_centroid = 0  # its only use is a stderr warning; `_log_underfilled` logs it
    clus.verbose = False
    index = faiss.IndexFlatL2(d)
    clus.train(x, index)
    sq_dists, assign = index.search(x, 1)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d)
    return centroids, sq_dists[:, 0], assign[:, 0].astype(np.int32)


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


_BLOCKS = 8  # reduction blocks; sums are identical on any device count dividing it
_MAX_CHUNK = 4096  # rows per assignment matmul: a chunk costs (chunk, k) float32
_SPLIT_EPS = 1.0 / 1024  # faiss's split_clusters perturbation


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


def _kmeans_jax(x, k, *, niter, nredo, seed, max_points_per_centroid, min_points_per_centroid,
                mesh):
    """faiss.Clustering semantics on the devices of `mesh` (1-D axis "data"): same subsample and
    random initialization (faiss's RNG), Lloyd iterations with exact float32 L2 assignment, the
    restart with the lowest final objective. Only the donor choice for empty clusters uses another
    RNG. Returns centroids (k, d), sq_dists (n,), assign (n,) of all of x (n, d)."""
    del min_points_per_centroid  # faiss only warns with it
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


_KMEANS = {"faiss": _kmeans_faiss, "jax": _kmeans_jax}

MODES = ("hierarchical", "independent")


_UNDERFILLED_LOGGED: set[str] = set()  # the lines `_log_underfilled` gave already (once per process)


def _log_underfilled(n: int, sizes: Sequence[int], min_points_per_centroid: int, hierarchical: bool = True):
    """One log line, once per process (not at every epoch), for the levels whose k-means gets
    fewer than `min_points_per_centroid` points per centroid (faiss's warning): in a hierarchy
    level l clusters the M_{l-1} centroids below, independent clusterings all cluster the n samples."""
    points = [n, *sizes[:-1]] if hierarchical else [n] * len(sizes)
    low = [f"level {l}: {m} points for {k} centroids" for l, (m, k) in enumerate(zip(points, sizes))
           if m < k * min_points_per_centroid]
    line = (f"k-means under min_points_per_centroid={min_points_per_centroid} (harmless for upper "
            f"levels): {'; '.join(low)}")
    if low and line not in _UNDERFILLED_LOGGED:
        _UNDERFILLED_LOGGED.add(line)
        log.info("%s", line)


def hierarchical_kmeans(
    features: np.ndarray,
    num_clusters: Sequence[int],
    *,
    temperature: float = 0.2,
    niter: int = 20,
    nredo: int = 5,
    seed: int = 0,
    max_points_per_centroid: int = 1000,
    min_points_per_centroid: int = 10,
    backend: str = "faiss",
    mesh: jax.sharding.Mesh | None = None,
    mode: str = "hierarchical",
) -> Hierarchy:
    """Hierarchical k-means of features (N, d) float32 into levels of num_clusters[l] clusters.

    num_clusters must be strictly decreasing (upper levels cluster the centroids below).
    Level l uses seed `seed + l`. backend "faiss" runs faiss on the host; "jax" runs the same
    k-means on the devices of `mesh` (1-D axis "data"; None: all devices), rows sharded.
    mode "independent" (PCL): every level is its own k-means of the N features (seed `seed + l`,
    any sizes and order), with the same concentration phi and no parents.
    Returns a Hierarchy with len(num_clusters) levels.
    """
    if backend not in _KMEANS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    hierarchical = mode == "hierarchical"
    sizes = _check_inputs(features, num_clusters, temperature, hierarchical)
    if backend == "jax":
        mesh = mesh or sharding.make_mesh()
        if mesh.axis_names != (DATA_AXIS,):
            raise ValueError(f"mesh must have the single axis ({DATA_AXIS!r},), got {mesh.axis_names}")
    kmeans = functools.partial(
        _KMEANS[backend], niter=niter, nredo=nredo, max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=min_points_per_centroid, mesh=mesh,
    )
    features = x = np.ascontiguousarray(features)
    _log_underfilled(len(x), sizes, min_points_per_centroid, hierarchical)
    fields = []  # Level kwargs per level; parents are filled in by the level above
    for l, k in enumerate(sizes):
        if not hierarchical:
            x = features  # every clustering sees the samples, not the centroids below
        centroids, sq_dists, member_assign = kmeans(x, k, seed=seed + l)
        if l == 0 or not hierarchical:
            sample_assign = member_assign
        else:
            fields[l - 1]["parents"] = member_assign
            sample_assign = member_assign[sample_assign]
        counts = np.bincount(member_assign, minlength=k).astype(np.int32)
        x = np.ascontiguousarray(l2_normalize(centroids, axis=1), dtype=np.float32)
        fields.append(dict(
            centroids=x,
            assignments=np.ascontiguousarray(sample_assign, dtype=np.int32),
            temperatures=concentration(sq_dists, member_assign, k, temperature),
            valid=counts > 0,
            parents=None,
            counts=counts,
        ))
    return Hierarchy(tuple(Level(**f) for f in fields))
