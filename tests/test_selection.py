"""Pair-selection probabilities and Bernoulli masks against the spec (§2, §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from numpy_reference import unit

from hcsc_jax.method import selection


@pytest.fixture
def level():
    rng = np.random.default_rng(0)
    m, d = 7, 5
    return dict(
        queue=unit(rng, 11, d),
        centroids=unit(rng, m, d),
        # one tiny phi checks the 1e-3 clamp; spread so softmax is not uniform
        phi=np.array([0.05, 0.2, 0.0001, 0.5, 0.1, 0.3, 0.07], np.float32),
        valid=np.array([1, 1, 1, 0, 1, 1, 1], bool),
        labels=np.array([0, 2, 6, 4, 1], np.int32),
    )


@pytest.mark.parametrize("cached", [False, True])
def test_instance_probs_match_reference(level, cached):
    lv = level
    lse = None
    if cached:
        lse = selection.queue_log_normalizer(lv["queue"], lv["centroids"], lv["phi"], lv["valid"])
    got = selection.instance_selection_probs(
        lv["queue"], lv["centroids"], lv["phi"], lv["labels"], lv["valid"], queue_lse=lse
    )
    want = ref.instance_probs(lv["queue"], lv["centroids"], lv["phi"], lv["labels"], lv["valid"])
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_instance_probs_clamped_and_ignore_invalid(level):
    lv = level
    # A queue entry equal to a prototype with tiny phi: softmax ~1 there, p clamps to 0, not < 0.
    queue = np.concatenate([lv["queue"], lv["centroids"][2:3]])
    p = selection.instance_selection_probs(queue, lv["centroids"], lv["phi"], lv["labels"], lv["valid"])
    assert float(p[1, -1]) == 0.0 and float(p.max()) == np.float32(0.999)
    # The invalid prototype's centroid can be anything.
    c = lv["centroids"].copy()
    c[3] = 100.0
    p2 = selection.instance_selection_probs(queue, c, lv["phi"], lv["labels"], lv["valid"])
    np.testing.assert_array_equal(p, p2)


def test_proto_probs_match_reference_and_table():
    rng = np.random.default_rng(1)
    d, m, mu = 6, 9, 4
    c, u = unit(rng, m, d), unit(rng, mu, d)
    phi_u = rng.uniform(0.05, 0.4, mu).astype(np.float32)
    valid_u = np.array([1, 1, 0, 1], bool)
    parents = np.array([0, 1, 3, 3, 0, 1, 1, 3, 0], np.int32)
    labels = np.array([0, 3, 8, 5, 2, 2], np.int32)
    want = ref.proto_probs(c, u, phi_u, parents, labels, valid_u)
    direct = selection.prototype_selection_probs(c, u, phi_u, parents, labels, valid_u)
    table = selection.prototype_selection_table(c, u, phi_u, valid_u)
    cached = selection.prototype_selection_probs(c, u, phi_u, parents, labels, valid_u, table=table)
    np.testing.assert_allclose(direct, want, atol=2e-6)
    np.testing.assert_array_equal(direct, cached)
    assert table.shape == (m, mu)
    np.testing.assert_allclose(np.asarray(table).sum(1), 1.0, atol=1e-6)
    assert float(jnp.max(table[:, 2])) == 0.0  # invalid upper prototype takes no mass


def test_proto_probs_clamp_lower_bound():
    # A prototype identical to its own parent with a tiny phi: softmax ~1 -> p clamps to 1e-4.
    c = np.eye(3, dtype=np.float32)[:2]
    u = np.eye(3, dtype=np.float32)[:2]
    p = selection.prototype_selection_probs(c, u, np.full(2, 0.01, np.float32), np.array([0, 1]),
                                            np.array([0]))
    np.testing.assert_allclose(p, [[1e-4, 0.999]], rtol=1e-6)


def test_parents_shape_error():
    c = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="parents.*4 prototypes"):
        selection.prototype_selection_probs(c, c[:2], np.ones(2), np.zeros(3, np.int32),
                                            np.zeros(2, np.int32))


@pytest.mark.parametrize("sampler", ["hash", "threefry"])
def test_bernoulli_keep_rate_matches_probability(sampler):
    probs = jnp.broadcast_to(jnp.array([0.0, 0.01, 0.3, 0.5, 0.9, 0.999], jnp.float32)[:, None], (6, 200_000))
    keep = selection.bernoulli_mask(jax.random.key(3), probs, sampler)
    rate = np.asarray(keep.mean(axis=1, dtype=jnp.float32))
    p = np.asarray(probs[:, 0])
    sigma = np.sqrt(p * (1 - p) / probs.shape[1])
    assert rate[0] == 0.0
    np.testing.assert_array_less(np.abs(rate - p), 5 * sigma + 1e-9)


def test_hash_sampler_is_independent_across_positions_and_keys():
    shape = (4, 256, 1024)
    probs = jnp.full(shape, 0.5)
    a = np.asarray(selection.bernoulli_mask(jax.random.key(0), probs), np.float64)
    b = np.asarray(selection.bernoulli_mask(jax.random.key(1), probs), np.float64)
    tol = 5 / np.sqrt(a.size)
    corr = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]
    assert abs(corr(a, b)) < tol  # different steps
    assert abs(corr(a[..., 1:], a[..., :-1])) < tol  # neighbouring queue entries
    assert abs(corr(a[1], a[0])) < tol  # different levels
    assert abs(corr(a[:, 1:], a[:, :-1])) < tol  # neighbouring queries
    # same key, same mask: the mask is a function of (key, global index)
    again = np.asarray(selection.bernoulli_mask(jax.random.key(0), probs), np.float64)
    np.testing.assert_array_equal(a, again)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="sampler must be one of"):
        selection.bernoulli_mask(jax.random.key(0), jnp.ones(3), "philox")
