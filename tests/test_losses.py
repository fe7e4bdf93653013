"""Masked InfoNCE / ProtoNCE against the NumPy reference and the spec's invariants (§2-§4)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from numpy_reference import unit

from hcsc_jax.method import losses

T = 0.2


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    b, k, d = 6, 13, 8
    return dict(
        q=unit(rng, b, d), k=unit(rng, b, d), queue=unit(rng, k, d),
        keep=rng.random((3, b, k)) < 0.6,  # three levels, odd sizes
    )


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_info_nce_matches_reference_per_level(batch, semantics):
    b = batch
    loss, acc = losses.info_nce(b["q"], b["k"], b["queue"], b["keep"], T, semantics)
    for l in range(3):
        want_loss, want_acc = ref.info_nce(b["q"], b["k"], b["queue"], b["keep"][l], T, semantics)
        np.testing.assert_allclose(loss[l], want_loss, rtol=1e-5)
        np.testing.assert_allclose(acc[l], want_acc)
    plain, _ = losses.info_nce(b["q"], b["k"], b["queue"], None, T, semantics)
    want_plain = ref.info_nce(b["q"], b["k"], b["queue"], None, T, semantics)[0]
    np.testing.assert_allclose(plain, want_plain, rtol=1e-5)


def test_accuracy_counts_correct_queries():
    # Query 0 matches its key; query 1's key is orthogonal while a queue entry equals the query.
    q = np.eye(3, dtype=np.float32)[:2]
    k = np.array([[1, 0, 0], [0, 0, 1]], np.float32)
    queue = np.array([[0, 1, 0], [-1, 0, 0]], np.float32)
    _, acc = losses.info_nce(q, k, queue, None, T)
    assert float(acc) == 0.5
    # Dropping the offending entry for query 1 in paper mode makes it correct;
    # in official mode it becomes a zero logit, which ties with the positive's 0: argmax -> 0.
    keep = np.array([[True, True], [False, True]])
    assert float(losses.info_nce(q, k, queue, keep, T, "paper")[1]) == 1.0
    assert float(losses.info_nce(q, k, queue, keep, T, "official")[1]) == 1.0


def test_paper_loss_ignores_unselected_negatives(batch):
    b = batch
    # Queue entries 0..3 are unselected for every query: change them arbitrarily.
    keep = b["keep"][0].copy()
    keep[:, :4] = False
    base, _ = losses.info_nce(b["q"], b["k"], b["queue"], keep, T, "paper")
    moved = b["queue"].copy()
    moved[:4] = -b["q"][0]  # would be the hardest negatives if they counted
    moved[:2] = b["q"][1]
    changed, _ = losses.info_nce(b["q"], b["k"], moved, keep, T, "paper")
    np.testing.assert_allclose(changed, base, rtol=1e-6)
    # ... and equals the loss over the queue with those entries removed.
    removed, _ = losses.info_nce(b["q"], b["k"], b["queue"][4:], keep[:, 4:], T, "paper")
    np.testing.assert_allclose(removed, base, rtol=1e-6)


def test_official_equals_zero_logit_softmax(batch):
    b = batch
    keep = b["keep"][1]
    got, _ = losses.info_nce(b["q"], b["k"], b["queue"], keep, T, "official")
    logits = np.concatenate([np.sum(b["q"] * b["k"], 1, keepdims=True), b["q"] @ b["queue"].T], 1) / T
    logits[:, 1:][~keep] = 0.0
    want = -jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=1)[:, 0].mean()
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_gradients_flow_to_q_only(batch, semantics):
    b = batch
    keep = jnp.asarray(b["keep"])
    f = lambda q, k, queue: losses.info_nce(q, k, queue, keep, T, semantics)[0].sum()
    gq, gk, gqueue = jax.grad(f, argnums=(0, 1, 2))(b["q"], b["k"], b["queue"])
    assert float(jnp.abs(gq).sum()) > 0
    assert float(jnp.abs(gk).sum()) == 0 and float(jnp.abs(gqueue).sum()) == 0
    # The gradient is the reference's: finite differences of the NumPy loss.
    eps = 1e-3
    dq = np.zeros_like(b["q"])
    dq[2, 3] = eps
    num = sum(
        ref.info_nce(b["q"] + dq, b["k"], b["queue"], b["keep"][l], T, semantics)[0]
        - ref.info_nce(b["q"] - dq, b["k"], b["queue"], b["keep"][l], T, semantics)[0]
        for l in range(3)
    ) / (2 * eps)
    np.testing.assert_allclose(gq[2, 3], num, rtol=2e-3)


def test_unselected_official_negatives_carry_no_gradient(batch):
    b = batch
    keep = np.ones((6, 13), bool)
    keep[:, 5] = False
    g = jax.grad(lambda queue: losses.selective_cross_entropy(
        jnp.zeros(6), b["q"] @ queue.T, keep, None, "official")[0].sum())(b["queue"])
    assert float(jnp.abs(g[5]).sum()) == 0 and float(jnp.abs(g[4]).sum()) > 0


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("with_keep", [False, True])
def test_proto_nce_matches_reference(semantics, with_keep):
    rng = np.random.default_rng(2)
    b, m, d, group = 8, 11, 5, 4
    q, c = unit(rng, b, d), unit(rng, m, d)
    phi = rng.uniform(0.05, 0.5, m).astype(np.float32)
    valid = np.ones(m, bool)
    valid[[3, 9]] = False
    labels = np.array([0, 1, 1, 4, 5, 6, 10, 2], np.int32)  # group 0 shares label 1
    keep = rng.random((b, m)) < 0.5 if with_keep else None
    cand = losses.proto_candidates(labels, valid, semantics, group)
    loss, acc = losses.proto_nce(q, c, phi, labels, keep, semantics, cand)
    want_loss, want_acc = ref.proto_nce(q, c, phi, labels, keep, valid, semantics, group)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, want_acc)


def test_official_candidates_drop_group_positives():
    labels = np.array([0, 1, 2, 2], np.int32)
    cand = np.asarray(losses.proto_candidates(labels, np.ones(4, bool), "official", group_size=2))
    np.testing.assert_array_equal(cand, [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 1], [1, 1, 0, 1]])
    paper = np.asarray(losses.proto_candidates(labels, np.array([1, 1, 1, 0], bool), "paper"))
    np.testing.assert_array_equal(paper, [[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]])


def test_trace_time_errors(batch):
    b = batch
    with pytest.raises(ValueError, match=r"q and k must both be \(B, d\)"):
        losses.info_nce(b["q"], b["k"][:3], b["queue"], None, T)
    with pytest.raises(ValueError, match=r"queue must be \(K, d\) with d = 8"):
        losses.info_nce(b["q"], b["k"], b["queue"][:, :4], None, T)
    with pytest.raises(ValueError, match=r"keep mask must end in \(B, K\)"):
        losses.info_nce(b["q"], b["k"], b["queue"], b["keep"][..., :5], T)
    with pytest.raises(ValueError, match="semantics must be one of"):
        losses.info_nce(b["q"], b["k"], b["queue"], None, T, "pytorch")
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        losses.proto_candidates(np.zeros(6, np.int32), np.ones(3, bool), "official", 4)


# ------------------------------------------------------------------------------------------
# PCL's ProtoNCE with r sampled negative prototypes (baseline)


def _pcl_batch(seed=0, b=8, m=11, d=6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, m, b).astype(np.int32)
    labels[1] = labels[0]  # a duplicate positive inside the first group
    valid = np.ones(m, bool)
    valid[m - 1] = False
    valid[labels] = True
    return dict(q=unit(rng, b, d), centroids=unit(rng, m, d),
                phi=rng.uniform(0.05, 0.4, m).astype(np.float32), labels=labels, valid=valid)


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("r", [3, 100])
def test_pcl_proto_nce_matches_reference(semantics, r):
    b = _pcl_batch()
    group = 4
    sampled = losses.sample_negative_prototypes(
        jax.random.key(1), jnp.asarray(b["labels"]), jnp.asarray(b["valid"]), r, semantics, group)
    sampled = np.asarray(sampled)
    loss, acc = losses.pcl_proto_nce(b["q"], b["centroids"], b["phi"], jnp.asarray(b["labels"]), sampled,
                                     semantics, group)
    want_loss, want_acc = ref.pcl_proto_nce(b["q"], b["centroids"], b["phi"], b["labels"], sampled, semantics,
                                            group)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, want_acc)
    # Gradients reach q only, and are finite.
    g = jax.grad(lambda q: losses.pcl_proto_nce(q, b["centroids"], b["phi"], jnp.asarray(b["labels"]),
                                                sampled, semantics, group)[0])(jnp.asarray(b["q"]))
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_pcl_negative_sampling(semantics):
    b = _pcl_batch(b=16, m=40)
    labels, valid, group, r = jnp.asarray(b["labels"]), jnp.asarray(b["valid"]), 8, 5
    draws = np.stack([
        np.asarray(losses.sample_negative_prototypes(jax.random.key(s), labels, valid, r, semantics,
                                                     group))
        for s in range(200)])  # (S, B, M)
    positive = b["labels"][:, None] == np.arange(40)[None, :]
    if semantics == "official":
        excluded = np.repeat(positive.reshape(2, group, 40).any(1), group, axis=0)
        per_group = draws.reshape(200, 2, group, 40)
        assert (per_group == per_group[:, :, :1]).all()  # one per group
    else:
        excluded = positive
    excluded = excluded | ~b["valid"][None, :]
    assert not (draws & excluded[None]).any()  # never a positive (of the group) or an invalid one
    assert (draws.sum(-1) == np.minimum(r, (~excluded).sum(-1))[None]).all()  # exactly r (or all eligible)
    # Uniform over the eligible prototypes: each is drawn with probability r / #eligible.
    freq = draws.mean(0)[~excluded]
    expect = (r / (~excluded).sum(-1, keepdims=True) * np.ones((1, 40)))[~excluded]
    np.testing.assert_allclose(freq, expect, atol=0.12)
    # r larger than the eligible set: every eligible prototype is a negative.
    everything = np.asarray(losses.sample_negative_prototypes(jax.random.key(0), labels, valid, 1000,
                                                              semantics, group))
    np.testing.assert_array_equal(everything, ~excluded)
