"""The "jax" k-means backend of hcsc_jax.clustering against faiss, and across device counts."""
import jax
import numpy as np
import pytest
from test_clustering import BLOB_MEANS, BLOB_SIZES, blob_to_cluster

from hcsc_jax.clustering import concentration, hierarchical_kmeans, resolve_backend
from hcsc_jax.clustering.jax_backend import _split_empty
from hcsc_jax.evaluators.cluster import nmi

T = 0.2
SIZES = [40, 12, 4]


def mixture(n, d, k, seed, spread=4.0):
    """Gaussian mixture: n points (n, d) float32 around k random means, and the labels."""
    rng = np.random.default_rng(seed)
    means = spread * rng.standard_normal((k, d))
    labels = rng.integers(0, k, n)
    return (means[labels] + rng.standard_normal((n, d))).astype(np.float32), labels


def one_device_mesh():
    return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:1])


def inertia(members, assign, k):
    """k-means objective: sum of squared distances of members (n, d) to their cluster's mean."""
    counts = np.bincount(assign, minlength=k)[:, None]
    sums = np.zeros((k, members.shape[1]))
    np.add.at(sums, assign, members.astype(np.float64))
    means = sums / np.maximum(counts, 1)
    return float(((members - means[assign]) ** 2).sum())


def members_per_level(x, h):
    """Members clustered at each level: the samples, then the normalized centroids below."""
    return [x] + [level.centroids for level in h.levels[:-1]]


def member_assign(h, l):
    return h.levels[l].assignments if l == 0 else h.levels[l - 1].parents


def assert_same(h1, h2):
    a1, a2 = h1.to_arrays(), h2.to_arrays()
    assert a1.keys() == a2.keys()
    for key in a1:
        np.testing.assert_array_equal(a1[key], a2[key], err_msg=key)


def assert_consistent(x, h, temperature=T, subsampled=False):
    """Parents compose, counts / valid / phi agree with the assignments, centroids are unit.
    subsampled: level 0 was trained on a subsample, so its centroids are not the members' means."""
    for l, level in enumerate(h.levels):
        members = members_per_level(x, h)[l]
        assign = member_assign(h, l)
        np.testing.assert_array_equal(level.counts, np.bincount(assign, minlength=level.num_clusters))
        np.testing.assert_array_equal(level.valid, level.counts > 0)
        assert level.valid[level.assignments].all()
        np.testing.assert_allclose(np.linalg.norm(level.centroids, axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(level.temperatures.mean(), temperature, rtol=1e-5)
        assert np.isfinite(level.temperatures).all() and np.isfinite(level.centroids).all()
        if l + 1 < h.num_levels:
            np.testing.assert_array_equal(h.levels[l + 1].assignments,
                                          level.parents[level.assignments])
        if subsampled and l == 0:
            continue
        # phi from the members' distances to their own cluster mean (the converged centroid).
        sums = np.zeros((level.num_clusters, members.shape[1]))
        np.add.at(sums, assign, members.astype(np.float64))
        means = sums / np.maximum(level.counts, 1)[:, None]
        sq = ((members - means[assign]) ** 2).sum(1)
        np.testing.assert_allclose(level.temperatures,
                                   concentration(sq, assign, level.num_clusters, temperature),
                                   rtol=2e-3)


@pytest.fixture(scope="module")
def separated():
    x, labels = mixture(3001, 32, SIZES[0], seed=0)  # not a multiple of 8: padding matters
    kw = {"niter": 10, "nredo": 2, "seed": 5, "temperature": T}
    return x, labels, kw, hierarchical_kmeans(x, SIZES, backend="jax", **kw)


def test_jax_matches_faiss_quality(separated):
    x, labels, kw, hj = separated
    hf = hierarchical_kmeans(x, SIZES, backend="faiss", **kw)
    for l, k in enumerate(SIZES):
        ij = inertia(members_per_level(x, hj)[l], member_assign(hj, l), k)
        i_f = inertia(members_per_level(x, hf)[l], member_assign(hf, l), k)
        assert abs(ij - i_f) <= 0.01 * i_f, (l, ij, i_f)
    # Well-separated data (means 4 sigma apart per dimension): both find the mixture.
    assert nmi(hj.levels[0].assignments, hf.levels[0].assignments) >= 0.9
    assert nmi(hj.levels[0].assignments, labels) >= 0.9
    assert_consistent(x, hj)


def test_random_mixture_in_128d_matches_faiss():
    # Overlapping clusters (spread 0.3): many local optima, still within 1% of faiss.
    x, _ = mixture(2000, 128, 30, seed=1, spread=0.3)
    kw = {"niter": 20, "nredo": 2, "seed": 0}
    hj = hierarchical_kmeans(x, [30, 5], backend="jax", **kw)
    hf = hierarchical_kmeans(x, [30, 5], backend="faiss", **kw)
    for l, k in enumerate([30, 5]):
        ij = inertia(members_per_level(x, hj)[l], member_assign(hj, l), k)
        i_f = inertia(members_per_level(x, hf)[l], member_assign(hf, l), k)
        assert abs(ij - i_f) <= 0.01 * i_f, (l, ij, i_f)
    assert_consistent(x, hj)


def test_blobs_tree_recovered():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), BLOB_SIZES)
    x = (BLOB_MEANS[labels] + 0.1 * rng.standard_normal((len(labels), 8))).astype(np.float32)
    h = hierarchical_kmeans(x, [4, 2], nredo=20, temperature=T, backend="jax")
    cluster_of = blob_to_cluster(h.levels[0].assignments, labels)
    np.testing.assert_array_equal(h.levels[0].counts[cluster_of], BLOB_SIZES)
    group = h.levels[0].parents[cluster_of]
    assert group[0] == group[1] and group[2] == group[3] and group[0] != group[2]
    assert_consistent(x, h)


def test_initialization_and_subsample_are_faiss_s():
    # niter=0: the centroids are the initial ones, faiss's random sample of k points of its
    # random subsample of k * max_points_per_centroid points (here 12 * 20 = 240 of 1000).
    x, _ = mixture(1000, 16, 12, seed=2)
    for mppc in [1000, 20]:
        kw = {"niter": 0, "nredo": 1, "seed": 7, "max_points_per_centroid": mppc}
        hj = hierarchical_kmeans(x, [12], backend="jax", **kw)
        hf = hierarchical_kmeans(x, [12], backend="faiss", **kw)
        np.testing.assert_array_equal(hj.levels[0].centroids, hf.levels[0].centroids)


def test_subsampled_training_assigns_every_point():
    x, labels = mixture(2000, 16, 10, seed=3)
    kw = {"niter": 10, "nredo": 2, "seed": 1, "max_points_per_centroid": 30}  # trains on 300 points
    hj = hierarchical_kmeans(x, [10, 3], backend="jax", **kw)
    hf = hierarchical_kmeans(x, [10, 3], backend="faiss", **kw)
    full = hierarchical_kmeans(x, [10, 3], backend="jax", **{**kw, "max_points_per_centroid": 1000})
    assert hj.levels[0].counts.sum() == 2000 and hj.levels[0].assignments.shape == (2000,)
    # Same subsample and Lloyd iterations as faiss: same centroids; the full set gives others.
    np.testing.assert_allclose(hj.levels[0].centroids, hf.levels[0].centroids, atol=1e-5)
    assert not np.allclose(hj.levels[0].centroids, full.levels[0].centroids, atol=1e-4)
    assert nmi(hj.levels[0].assignments, labels) >= 0.9
    assert_consistent(x, hj, subsampled=True)


def test_one_and_eight_devices_identical(separated):
    x, _, kw, h8 = separated
    assert jax.device_count() == 8
    assert_same(h8, hierarchical_kmeans(x, SIZES, backend="jax", mesh=one_device_mesh(), **kw))


def test_deterministic_for_a_seed(separated):
    x, _, kw, h = separated
    assert_same(h, hierarchical_kmeans(x, SIZES, backend="jax", **kw))
    other = hierarchical_kmeans(x, SIZES, backend="jax", **{**kw, "seed": 6})
    assert not np.array_equal(h.levels[0].centroids, other.levels[0].centroids)


def test_duplicated_points_split_empty_clusters():
    # 5 distinct points, 20 copies each, 8 clusters: duplicate initial centroids leave clusters
    # empty at every iteration, and splits must not create NaN centroids.
    x = np.repeat(np.random.default_rng(4).standard_normal((5, 16)), 20, axis=0).astype(np.float32)
    level = hierarchical_kmeans(x, [8], backend="jax", niter=5, nredo=2).levels[0]
    assert np.isfinite(level.centroids).all() and np.isfinite(level.temperatures).all()
    assert level.valid.sum() == 5 and level.counts.sum() == 100
    np.testing.assert_array_equal(level.counts[level.valid], 20)
    assert level.temperatures[~level.valid].max() == level.temperatures.max()


def test_split_empty_copies_and_perturbs_the_donor():
    c = np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32)
    c[0] = 0  # empty cluster: compute_centroids leaves it at 0
    out = np.asarray(_split_empty(c, np.array([0, 5, 1, 1], np.float32), jax.random.key(0)))
    sign = np.where(np.arange(6) % 2 == 0, 1, -1) / 1024  # cluster 1 is the only donor (n > 1)
    np.testing.assert_allclose(out[0], c[1] * (1 + sign), rtol=1e-6)
    np.testing.assert_allclose(out[1], c[1] * (1 - sign), rtol=1e-6)
    np.testing.assert_array_equal(out[2:], c[2:])


def test_bad_backend_raises():
    x, _ = mixture(100, 4, 3, seed=0)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'faiss', 'jax'\), got 'torch'"):
        hierarchical_kmeans(x, [3], backend="torch")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'faiss', 'jax'\), got 'gpu'"):
        resolve_backend("gpu")


@pytest.mark.parametrize("platform, want", [("gpu", "jax"), ("tpu", "jax"), ("cpu", "faiss")])
def test_auto_backend_follows_the_platform(monkeypatch, platform, want):
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    assert resolve_backend("auto") == want
    assert resolve_backend("faiss") == "faiss" and resolve_backend("jax") == "jax"


def test_hierarchical_kmeans_resolves_auto(monkeypatch):
    """"auto" runs the backend it resolves to: here the jax k-means with accelerators, faiss without
    (the two differ in the last float32 bits, so the results tell them apart)."""
    x, _ = mixture(300, 8, 6, seed=2)
    kw = dict(niter=5, nredo=1, seed=1)
    jax_h, faiss_h = (hierarchical_kmeans(x, [6, 2], backend=b, **kw) for b in ("jax", "faiss"))
    a_jax, a_faiss = jax_h.to_arrays(), faiss_h.to_arrays()
    assert any(a_jax[key].tobytes() != a_faiss[key].tobytes() for key in a_jax)
    for platform, want in (("gpu", jax_h), ("cpu", faiss_h)):
        monkeypatch.setattr(jax, "default_backend", lambda platform=platform: platform)
        assert_same(hierarchical_kmeans(x, [6, 2], backend="auto", **kw), want)
