"""One epoch's prototypes on the devices: the hierarchy's levels as arrays of static shape, the
PCSC selection tables computed from them, and the ICSC cache of the queue (docs/method.md §3-§4).

`Prototypes` holds one tuple entry per hierarchy level, so every level keeps its own static
shape (M_l) and a new epoch's prototypes never trigger a recompilation.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hcsc_jax.method import selection


@flax.struct.dataclass
class Prototypes:
    """One epoch's hierarchy on device. Level l has M_l prototypes of dimension d.

    centroids[l] (M_l, d) L2-normalized; temperatures[l] (M_l,) phi; valid[l] (M_l,) bool;
    parents[l] (M_l,) int32 for l < L-1; selection_tables[l] (M_l, M_{l+1}) the PCSC table of
    `selection.prototype_selection_table`, for l < L-1. Independent clusterings (PCL) have no
    parents and no tables (empty tuples).
    """

    centroids: tuple[jax.Array, ...]
    temperatures: tuple[jax.Array, ...]
    valid: tuple[jax.Array, ...]
    parents: tuple[jax.Array, ...]
    selection_tables: tuple[jax.Array, ...]

    @property
    def num_levels(self) -> int:
        return len(self.centroids)


@jax.jit
def _selection_tables(centroids, temperatures, valid):
    return tuple(
        selection.prototype_selection_table(centroids[l], centroids[l + 1], temperatures[l + 1], valid[l + 1])
        for l in range(len(centroids) - 1)
    )


def make_prototypes(centroids, temperatures, valid, parents, sharding=None) -> Prototypes:
    """Builds `Prototypes` from per-level host arrays (as in `clustering.Hierarchy`).

    centroids/temperatures/valid: sequences of L arrays; parents: L-1 arrays (levels below the
    top), or none for independent clusterings. `sharding` (e.g. a replicated NamedSharding)
    places every array; None = default device.
    """
    if not (len(centroids) == len(temperatures) == len(valid) and len(parents) in (0, len(centroids) - 1)):
        raise ValueError(
            f"need L centroids/temperatures/valid and L-1 parents (or none: independent clusterings), "
            f"got {len(centroids)}, {len(temperatures)}, {len(valid)}, {len(parents)}"
        )
    put = (lambda x: jax.device_put(x, sharding)) if sharding is not None else jnp.asarray
    c = tuple(put(np.asarray(x, np.float32)) for x in centroids)
    t = tuple(put(np.asarray(x, np.float32)) for x in temperatures)
    v = tuple(put(np.asarray(x, bool)) for x in valid)
    p = tuple(put(np.asarray(x, np.int32)) for x in parents)
    return Prototypes(c, t, v, p, _selection_tables(c, t, v) if p else ())


def abstract_prototypes(num_clusters, dim: int, hierarchical: bool = True, sharding=None) -> Prototypes:
    """The `jax.ShapeDtypeStruct`s of the `Prototypes` that `make_prototypes` builds for levels of
    `num_clusters` prototypes of dimension `dim` (no parents or tables for independent
    clusterings), each with `sharding`: for compiling a step ahead of time (`hcsc_jax.aot`)."""
    m = [int(k) for k in num_clusters]
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return Prototypes(
        tuple(spec((k, dim), jnp.float32) for k in m), tuple(spec((k,), jnp.float32) for k in m),
        tuple(spec((k,), jnp.bool_) for k in m),
        tuple(spec((k,), jnp.int32) for k in m[:-1]) if hierarchical else (),
        tuple(spec((a, b), jnp.float32) for a, b in zip(m, m[1:])) if hierarchical else ())


def prototypes_from_hierarchy(hierarchy, sharding=None) -> Prototypes:
    """`Prototypes` of a `clustering.Hierarchy`."""
    levels = hierarchy.levels
    return make_prototypes(
        [lv.centroids for lv in levels],
        [lv.temperatures for lv in levels],
        [lv.valid for lv in levels],
        [lv.parents for lv in levels[:-1]] if hierarchy.is_hierarchical else [],
        sharding,
    )


@jax.jit
def queue_log_normalizers(queue, prototypes: Prototypes):
    """The ICSC cache: queue (K, d) -> (L, K) `selection.queue_log_normalizer` per level."""
    return jnp.stack([
        selection.queue_log_normalizer(queue, c, t, v)
        for c, t, v in zip(prototypes.centroids, prototypes.temperatures, prototypes.valid)
    ])
