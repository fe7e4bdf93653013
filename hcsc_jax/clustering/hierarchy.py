"""The hierarchy of prototypes and how it is built (docs/method.md §1), as the authors' `run_hkmeans`.

Level 0 runs k-means (seed `seed`) on the N sample features and assigns every sample to its
nearest centroid. Each level l > 0 runs k-means (seed `seed + l`) on the M_{l-1} L2-normalized
centroids of the level below: those centroids are its members, and their assignments are
`parents` of level l-1. Sample assignments compose through the parents:
`assign_{l+1}[n] = parent_l[assign_l[n]]`.

Every cluster also gets a concentration phi (its temperature in the prototype softmax):
`mean(sqrt(D)) / log(n + 10)` over its n > 1 members, D the squared distance to the
un-normalized centroid; clusters with n <= 1 take the level's largest phi; then phi is clipped
to its 10th/90th percentiles and rescaled to mean `temperature`. Centroids are normalized last.
Everything is vectorised NumPy; the only Python loop is over levels.

Each level's k-means comes from a backend (`KMEANS`): "faiss" on the host (`faiss_backend`) or
"jax", the same algorithm on the devices (`jax_backend`); "auto" picks one (`resolve_backend`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import numbers
from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np

from hcsc_jax.clustering import faiss_backend, jax_backend
from hcsc_jax.models import l2_normalize

log = logging.getLogger(__name__)

# Backend name -> one level's k-means: kmeans(x (n, d), k, *, niter, nredo, seed,
# max_points_per_centroid, mesh) -> (centroids (k, d), sq_dists (n,), assign (n,) int32).
KMEANS = {"faiss": faiss_backend.kmeans, "jax": jax_backend.kmeans}
BACKENDS = ("auto", *KMEANS)
MODES = ("hierarchical", "independent")

_FIELDS = ("centroids", "assignments", "temperatures", "valid", "parents", "counts")


@dataclasses.dataclass(frozen=True, eq=False)
class Level:
    """One level of the hierarchy, M_l clusters of N samples in d dimensions.

    centroids: (M_l, d) float32, L2-normalized.
    assignments: (N,) int32, every sample's cluster at this level.
    temperatures: (M_l,) float32, the concentration phi of docs/method.md §1.4.
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
    """Per-cluster concentration phi of docs/method.md §1.4, (num_clusters,) float32.

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


def resolve_backend(name: str) -> str:
    """The k-means backend that `name` (a config's `clustering.backend`) stands for: "faiss" and
    "jax" as given; "auto" is "jax" when JAX runs on accelerators (`jax.default_backend()` is not
    "cpu") and "faiss" on CPU-only hosts."""
    if name not in BACKENDS:
        raise ValueError(f"clustering backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "faiss" if jax.default_backend() == "cpu" else "jax"
    return name


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
    k-means on the devices of `mesh` (1-D axis "data"; None: all devices), rows sharded; "auto"
    is one of them (`resolve_backend`).
    mode "independent" (PCL): every level is its own k-means of the N features (seed `seed + l`,
    any sizes and order), with the same concentration phi and no parents.
    Returns a Hierarchy with len(num_clusters) levels.
    """
    backend = resolve_backend(backend)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    hierarchical = mode == "hierarchical"
    sizes = _check_inputs(features, num_clusters, temperature, hierarchical)
    if backend == "jax":
        mesh = jax_backend.device_mesh(mesh)
    kmeans = functools.partial(
        KMEANS[backend], niter=niter, nredo=nredo, max_points_per_centroid=max_points_per_centroid, mesh=mesh,
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
