"""Pair selection of HCSC: which negatives each query is contrasted with.

docs/method.md §2 (instance-wise, ICSC) and §3 (prototypical, PCSC). Everything here is a pure,
jittable function of fixed-shape arrays; prototypes that do not exist this epoch (empty
clusters) are masked out through a boolean `valid` vector instead of being removed.

Two exact shortcuts keep the per-step cost low (both give the same numbers as the direct
formulas, and the tests check that):
- ICSC needs, for every queue entry j, the normalizer log sum_c exp(Q_j . c / phi_c) over all
  M_l prototypes. It depends only on Q_j and the epoch's prototypes, so the train step keeps a
  (L, K) cache of it, refreshed once per epoch and written for the B new keys at each enqueue
  (`queue_log_normalizer`). Without the cache it costs a K x M_l matmul per level per step.
- PCSC's probabilities depend only on (candidate prototype, parent of the positive), so the
  (M_l, M_{l+1}) table of `prototype_selection_table` is computed once per epoch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Clamps of the authors' code (docs/method.md §2, §3).
MIN_INSTANCE_PHI = 1e-3
MAX_INSTANCE_PROB = 0.999
PROTO_PROB_RANGE = (1e-4, 0.999)

SAMPLERS = ("hash", "threefry")


def _check_rank(name: str, x: jax.Array, rank: int, shape_doc: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {tuple(x.shape)}")


def similarity_logits(x, centroids, temperatures, valid):
    """x (N, d), centroids (M, d), temperatures (M,), valid (M,) -> (N, M) x.c/phi, -inf if invalid."""
    logits = (x @ centroids.T) / temperatures[None, :]
    if valid is None:
        return logits
    return jnp.where(valid[None, :], logits, -jnp.inf)


def queue_log_normalizer(queue, centroids, temperatures, valid=None):
    """Log-partition of each queue entry over a level's prototypes (docs/method.md §2 denominator).

    queue (K, d), centroids (M, d), temperatures (M,), valid (M,) bool or None -> (K,) float32:
    log sum_{c valid} exp(Q_j . c / max(phi_c, 1e-3)).
    """
    _check_rank("queue", queue, 2, "(K, d)")
    phi = jnp.maximum(temperatures, MIN_INSTANCE_PHI)
    return jax.nn.logsumexp(similarity_logits(queue, centroids, phi, valid), axis=-1)


def instance_selection_probs(queue, centroids, temperatures, labels, valid=None, queue_lse=None):
    """ICSC keep probability of every queue entry for every query (docs/method.md §2, Eq. (4)).

    p[i, j] = 1 - softmax_c(Q_j . c / phi_c)[labels[i]], softmax over the valid prototypes, phi
    clamped to >= 1e-3, p clamped to [0, 0.999].

    queue (K, d), centroids (M, d), temperatures (M,), labels (B,) int positive prototype of each
    query, valid (M,) bool or None, queue_lse (K,) precomputed `queue_log_normalizer` or None.
    Returns (B, K) float32.
    """
    _check_rank("labels", labels, 1, "(B,)")
    if queue.shape[-1] != centroids.shape[-1]:
        raise ValueError(
            f"queue dim {queue.shape[-1]} != centroid dim {centroids.shape[-1]}: the prototypes "
            "must come from the same embedding as the queue"
        )
    if queue_lse is None:
        queue_lse = queue_log_normalizer(queue, centroids, temperatures, valid)
    phi = jnp.maximum(temperatures, MIN_INSTANCE_PHI)
    positive = centroids[labels] / phi[labels][:, None]  # (B, d)
    log_softmax_at_positive = positive @ queue.T - queue_lse[None, :]  # (B, K)
    probs = 1.0 - jnp.exp(log_softmax_at_positive)
    return jnp.clip(probs, 0.0, MAX_INSTANCE_PROB)


def prototype_selection_table(centroids, upper_centroids, upper_temperatures, upper_valid=None):
    """softmax over the upper level of c_j . u / phi_u, for every prototype c_j (docs/method.md §3, Eq. (7)).

    centroids (M_l, d), upper_centroids (M_{l+1}, d), upper_temperatures (M_{l+1},),
    upper_valid (M_{l+1},) bool or None -> (M_l, M_{l+1}) float32, rows sum to 1.
    """
    logits = similarity_logits(centroids, upper_centroids, upper_temperatures, upper_valid)
    return jax.nn.softmax(logits, axis=-1)


def prototype_selection_probs(
    centroids, upper_centroids, upper_temperatures, parents, labels, upper_valid=None, table=None
):
    """PCSC keep probability of every level-l prototype for every query (docs/method.md §3, Eq. (7)).

    p[i, j] = 1 - table[j, parents[labels[i]]], clamped to [1e-4, 0.999]. `table` is
    `prototype_selection_table(centroids, upper_centroids, upper_temperatures, upper_valid)`;
    pass it to skip recomputing it (the train step computes it once per epoch).

    centroids (M_l, d), upper_centroids (M_{l+1}, d), upper_temperatures (M_{l+1},),
    parents (M_l,) int, labels (B,) int -> (B, M_l) float32.
    """
    _check_rank("labels", labels, 1, "(B,)")
    if parents.shape != centroids.shape[:1]:
        raise ValueError(
            f"parents has shape {tuple(parents.shape)} but there are {centroids.shape[0]} "
            "prototypes at this level: parents[i] must be the upper cluster of prototype i"
        )
    if table is None:
        table = prototype_selection_table(centroids, upper_centroids, upper_temperatures, upper_valid)
    parent_of_positive = parents[labels]  # (B,)
    probs = 1.0 - jnp.take(table, parent_of_positive, axis=1).T  # (B, M_l)
    return jnp.clip(probs, *PROTO_PROB_RANGE)


def _fmix32(x):
    """MurmurHash3's 32-bit finalizer: a bijection on uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _hash_uniform(key, shape):
    """Uniform [0, 1) floats with 24 random bits, keyed by a jax.random key (see bernoulli_mask)."""
    size = int(np.prod(shape))
    if size >= 2**32:
        raise ValueError(f"hash sampler draws at most 2**32 values per call, asked for {size}")
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    counter = lax.iota(jnp.uint32, size).reshape(shape)
    bits = _fmix32(_fmix32(counter * jnp.uint32(0x9E3779B9) ^ seeds[0]) ^ seeds[1])
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def bernoulli_mask(key, probs, sampler: str = "hash"):
    """Keep mask with P(keep[idx]) = probs[idx], independently per entry. probs (...) -> bool (...).

    sampler="threefry": `jax.random.bernoulli` (the reference; on CPU it costs ~12 ns per draw,
    which dominates an ICSC step: 3 x 256 x 16384 draws). sampler="hash": a counter-based hash
    (two keyed rounds of MurmurHash3's finalizer over the flat index) seeded with 64 bits from
    `key`; ~50x cheaper, 2**-24 resolution. Both depend on the global index only, so the mask is
    the same on 1 or N devices.
    """
    if sampler == "threefry":
        return jax.random.bernoulli(key, probs)
    if sampler == "hash":
        return _hash_uniform(key, probs.shape) < probs
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
