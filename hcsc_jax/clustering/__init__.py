"""Hierarchical k-means between epochs (docs/method.md §1).

`hierarchy`: the `Hierarchy` of `Level`s, the concentration phi and `hierarchical_kmeans`, which
builds it level by level from one k-means backend: `faiss_backend` (faiss on the host) or
`jax_backend` (the same k-means on the devices); `resolve_backend` turns "auto" into one of them.
"""

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

__all__ = ["BACKENDS", "KMEANS", "MODES", "Hierarchy", "Level", "concentration", "hierarchical_kmeans",
           "resolve_backend"]
