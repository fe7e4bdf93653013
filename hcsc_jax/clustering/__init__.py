"""Hierarchical k-means between epochs (docs/method.md §1).

`hierarchy`: the `Hierarchy` of `Level`s, the concentration phi and `hierarchical_kmeans`, which
builds it level by level from one k-means backend: `faiss_backend` (faiss on the host) or
`jax_backend` (the same k-means on the devices); `resolve_backend` turns "auto" into one of them.
`cluster_from_config` runs it with a run's `config.clustering` settings on every process (the
trainer's clusterings and the "summary" evaluator's NMI hierarchy).
"""

from __future__ import annotations

import jax
import numpy as np

from hcsc_jax import distributed
from hcsc_jax.clustering.hierarchy import (
    BACKENDS,
    KMEANS,
    MODES,
    Hierarchy,
    Level,
    concentration,
    hierarchical_kmeans,
    resolve_backend,
)


def epoch_seed(c, seed: int, epoch: int) -> int:
    """The k-means seed of the training hierarchy of epoch `epoch` (level l adds l) under a run's
    `config.clustering` `c`: seed + 1000 * epoch, a new draw every epoch, or, with
    `c.seed_per_epoch` False, `seed` every epoch (the authors: 0, 1, 2 per level, as at seed 0)."""
    return seed + 1000 * epoch if c.get("seed_per_epoch", True) else seed


def cluster_from_config(c, proj: np.ndarray, seed: int, num_clusters=None, mesh=None) -> Hierarchy:
    """Hierarchy of the projections `proj` (N, D) with the settings of a run's `config.clustering`
    `c` (level sizes from it unless `num_clusters` is given) and k-means `seed`. Backend
    `c.backend` (resolved by `resolve_backend`): "faiss" runs on process 0 and the result is
    broadcast; "jax" runs on the devices of `mesh`, every process taking part. Every process gets
    the same hierarchy. `c.mode` ("hierarchical" or PCL's "independent") applies to the training
    clusterings; an evaluation's (`num_clusters` given) is always hierarchical."""
    backend = resolve_backend(c.backend)
    mode = c.get("mode", "hierarchical") if num_clusters is None else "hierarchical"

    def kmeans(**kw):
        return hierarchical_kmeans(
            np.ascontiguousarray(proj, np.float32), list(num_clusters or c.num_clusters),
            temperature=c.temperature, niter=c.niter, nredo=c.nredo, seed=seed,
            max_points_per_centroid=c.max_points_per_centroid,
            min_points_per_centroid=c.min_points_per_centroid, backend=backend, mode=mode, **kw)

    if backend == "jax":
        return kmeans(mesh=mesh)
    hierarchy = kmeans() if distributed.is_main() else None
    if jax.process_count() == 1:
        return hierarchy
    arrays = hierarchy.to_arrays() if hierarchy is not None else None
    return Hierarchy.from_arrays(distributed.broadcast_arrays(arrays))


__all__ = ["BACKENDS", "KMEANS", "MODES", "Hierarchy", "Level", "cluster_from_config", "concentration",
           "epoch_seed", "hierarchical_kmeans", "resolve_backend"]
