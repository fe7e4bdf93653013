"""Tests for hcsc_jax.clustering: hierarchical k-means and the concentration phi (docs/method.md §1)."""
import io

import faiss
import numpy as np
import pytest

from hcsc_jax.clustering import Hierarchy, Level, concentration, hierarchical_kmeans

T = 0.2


def reference_phi(sq_dists, assignments, num_clusters, temperature):
    """docs/method.md §1.4 written out with plain per-cluster loops (float64)."""
    members = [[] for _ in range(num_clusters)]
    for dist, cluster in zip(sq_dists, assignments):
        members[cluster].append(float(dist))
    phi = np.zeros(num_clusters)
    for i, dists in enumerate(members):
        if len(dists) > 1:
            phi[i] = np.mean(np.sqrt(dists)) / np.log(len(dists) + 10)
    multi = [i for i in range(num_clusters) if len(members[i]) > 1]
    fill = max(phi[i] for i in multi) if multi else temperature
    for i in range(num_clusters):
        if len(members[i]) <= 1:
            phi[i] = fill
    phi = np.clip(phi, np.percentile(phi, 10), np.percentile(phi, 90))
    return temperature * phi / phi.mean()


def reference_hkmeans(x, sizes, *, seed, niter, nredo, temperature):
    """The authors' run_hkmeans, level by level with faiss, loops for everything else."""
    out, inputs = [], x
    for l, k in enumerate(sizes):
        clus = faiss.Clustering(x.shape[1], k)
        clus.niter, clus.nredo, clus.seed = niter, nredo, seed + l
        clus.max_points_per_centroid, clus.min_points_per_centroid = 1000, 10
        clus.verbose = False
        index = faiss.IndexFlatL2(x.shape[1])
        clus.train(inputs, index)
        dists, ids = index.search(inputs, 1)
        raw = faiss.vector_to_array(clus.centroids).reshape(k, -1)
        phi = reference_phi(dists[:, 0], ids[:, 0], k, temperature)
        centroids = np.stack([c / np.linalg.norm(c) for c in raw]).astype(np.float32)
        out.append(dict(member_assign=ids[:, 0], centroids=centroids, phi=phi))
        inputs = centroids
    sample_assign = out[0]["member_assign"]
    for l in range(len(sizes)):
        if l > 0:
            sample_assign = np.array([out[l]["member_assign"][a] for a in sample_assign])
        out[l]["sample_assign"] = sample_assign
    return out


# Four tight blobs in two far-apart super-groups; sizes differ so sample and child counts differ.
BLOB_MEANS = np.zeros((4, 8), np.float32)
BLOB_MEANS[0, :2] = [10, 3]
BLOB_MEANS[1, :2] = [10, -3]
BLOB_MEANS[2, [0, 2]] = [-10, 5]
BLOB_MEANS[3, [0, 2]] = [-10, -5]
BLOB_SIZES = [20, 30, 80, 70]


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), BLOB_SIZES)
    x = (BLOB_MEANS[labels] + 0.1 * rng.standard_normal((len(labels), 8))).astype(np.float32)
    # nredo=20: a single random init lands two centroids in one blob about half the time.
    return x, labels, hierarchical_kmeans(x, [4, 2], nredo=20, temperature=T)


@pytest.fixture(scope="module")
def random_features():
    return np.random.default_rng(1).standard_normal((600, 16)).astype(np.float32)


def blob_to_cluster(assignments, labels):
    """Map blob -> cluster, asserting the assignment is a relabelling of the blobs."""
    pairs = set(zip(labels.tolist(), assignments.tolist()))
    assert len(pairs) == 4 and len({c for _, c in pairs}) == 4, pairs
    return np.array([c for _, c in sorted(pairs)])


def test_blobs_recovered_at_both_levels(blobs):
    x, labels, h = blobs
    lvl0, lvl1 = h.levels
    assert h.num_levels == 2 and h.num_clusters == (4, 2)
    cluster_of = blob_to_cluster(lvl0.assignments, labels)
    np.testing.assert_array_equal(lvl0.counts[cluster_of], BLOB_SIZES)
    # Parents group blobs {0, 1} and {2, 3}.
    group = lvl0.parents[cluster_of]
    assert group[0] == group[1] and group[2] == group[3] and group[0] != group[2]
    np.testing.assert_array_equal(lvl1.assignments, lvl0.parents[lvl0.assignments])
    np.testing.assert_array_equal(lvl1.counts, [2, 2])
    assert lvl1.parents is None
    assert all(level.valid.all() for level in h.levels)
    np.testing.assert_array_equal(h.assignments(), np.stack([lvl0.assignments,
                                                             lvl1.assignments], 1))
    # Centroids: unit norm, close to the normalized blob / super-group means.
    for level in h.levels:
        np.testing.assert_allclose(np.linalg.norm(level.centroids, axis=1), 1, atol=1e-6)
    unit = BLOB_MEANS / np.linalg.norm(BLOB_MEANS, axis=1, keepdims=True)
    np.testing.assert_allclose(lvl0.centroids[cluster_of], unit, atol=1e-2)
    groups = np.stack([unit[:2].mean(0), unit[2:].mean(0)])
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    np.testing.assert_allclose(lvl1.centroids[group[[0, 2]]], groups, atol=1e-2)


def test_level0_phi_matches_formula_on_samples(blobs):
    x, labels, h = blobs
    lvl0 = h.levels[0]
    # k-means converged: the un-normalized centroid of each cluster is its members' mean.
    means = np.stack([x[lvl0.assignments == c].mean(0) for c in range(4)])
    sq = ((x - means[lvl0.assignments]) ** 2).sum(1)
    expected = reference_phi(sq, lvl0.assignments, 4, T)
    np.testing.assert_allclose(lvl0.temperatures, expected, rtol=1e-3)
    assert lvl0.temperatures.dtype == np.float32
    np.testing.assert_allclose(lvl0.temperatures.mean(), T, rtol=1e-6)


def test_upper_phi_uses_child_centroids_not_samples(blobs):
    x, labels, h = blobs
    lvl0, lvl1 = h.levels
    cluster_of = blob_to_cluster(lvl0.assignments, labels)
    # Each super-group has two children; both sit half their distance from the group mean.
    half = np.array([np.linalg.norm(lvl0.centroids[cluster_of[a]] - lvl0.centroids[cluster_of[b]])
                     for a, b in [(0, 1), (2, 3)]]) / 2
    raw = half / np.log(2 + 10)
    lo, hi = raw.min() + 0.1 * np.ptp(raw), raw.min() + 0.9 * np.ptp(raw)  # 2-point percentiles
    clipped = np.clip(raw, lo, hi)
    expected = T * clipped / clipped.mean()
    group = lvl0.parents[cluster_of[[0, 2]]]
    np.testing.assert_allclose(lvl1.temperatures[group], expected, rtol=1e-4)
    # Counting samples (50 and 150) instead of children would give a clearly different answer.
    wrong = half / np.log(np.array([50, 150]) + 10)
    wrong = np.clip(wrong, wrong.min() + 0.1 * np.ptp(wrong), wrong.min() + 0.9 * np.ptp(wrong))
    assert not np.allclose(T * wrong / wrong.mean(), expected, rtol=1e-2)


def test_matches_reference_run_hkmeans(random_features):
    sizes = [30, 8, 3]
    h = hierarchical_kmeans(random_features, sizes, niter=10, nredo=2, seed=3, temperature=T)
    ref = reference_hkmeans(random_features, sizes, seed=3, niter=10, nredo=2, temperature=T)
    for l, (level, r) in enumerate(zip(h.levels, ref)):
        np.testing.assert_array_equal(level.assignments, r["sample_assign"])
        np.testing.assert_allclose(level.centroids, r["centroids"], atol=1e-6)
        np.testing.assert_allclose(level.temperatures, r["phi"], rtol=1e-5)
        np.testing.assert_array_equal(level.counts,
                                      np.bincount(r["member_assign"], minlength=sizes[l]))
        if l + 1 < len(sizes):
            np.testing.assert_array_equal(level.parents, ref[l + 1]["member_assign"])
        # Members: samples at level 0, child centroids above.
        assert level.counts.sum() == (600 if l == 0 else sizes[l - 1])
    assert all(level.assignments.dtype == np.int32 and level.assignments.flags.c_contiguous
               for level in h.levels)


def test_concentration_hand_computed():
    # cluster 0: distances 1, 2; cluster 1: 3, 3, 3; cluster 2: singleton; cluster 3: empty;
    # cluster 4: 0.5 x 4.
    sq = np.array([1, 4, 9, 9, 9, 100, 0.25, 0.25, 0.25, 0.25], np.float32)
    assign = np.array([0, 0, 1, 1, 1, 2, 4, 4, 4, 4])
    raw = np.array([1.5 / np.log(12), 3 / np.log(13), 3 / np.log(13), 3 / np.log(13),
                    0.5 / np.log(14)])  # n <= 1 -> the largest phi (cluster 1's)
    lo = raw[4] + 0.4 * (raw[0] - raw[4])  # 10th percentile of 5 values
    clipped = np.clip(raw, lo, raw.max())
    expected = T * clipped / clipped.mean()
    phi = concentration(sq, assign, 5, T)
    assert phi.dtype == np.float32
    np.testing.assert_allclose(phi, expected, rtol=1e-6)
    np.testing.assert_allclose(phi, reference_phi(sq, assign, 5, T), rtol=1e-6)
    assert phi[2] == phi[3] == phi.max()


def test_concentration_random_against_loop_reference():
    rng = np.random.default_rng(0)
    m = 50
    assign = rng.integers(0, m - 5, 2000)  # clusters 45..49 empty
    assign[:3] = [45, 46, 47]  # ...and 45..47 singletons
    sq = rng.gamma(2.0, 0.3, 2000).astype(np.float32)
    phi = concentration(sq, assign, m, T)
    ref = reference_phi(sq, assign, m, T)
    np.testing.assert_allclose(phi, ref, rtol=1e-5)
    np.testing.assert_allclose(phi.mean(), T, rtol=1e-6)
    # Clipped to the 10th/90th percentiles: at least 10% of clusters sit on each bound.
    assert (phi <= phi.min() * (1 + 1e-6)).sum() >= m // 10
    assert (phi >= phi.max() * (1 - 1e-6)).sum() >= m // 10
    assert (phi[45:] == phi.max()).all()


def test_concentration_degenerate_levels_get_temperature():
    # No cluster has more than one member.
    np.testing.assert_array_equal(concentration(np.zeros(3), np.array([0, 1, 2]), 4, T),
                                  np.full(4, T, np.float32))
    # Every member sits exactly on its centroid: phi would be 0/0.
    np.testing.assert_array_equal(concentration(np.zeros(6), np.array([0, 0, 1, 1, 2, 2]), 3, T),
                                  np.full(3, T, np.float32))


def test_empty_cluster_is_invalid_with_max_phi():
    # Two distinct points and three clusters: some cluster must end up empty.
    x = np.repeat(np.eye(4, dtype=np.float32)[:2], 6, axis=0)
    level = hierarchical_kmeans(x, [3]).levels[0]
    np.testing.assert_array_equal(level.valid, level.counts > 0)
    assert level.valid.sum() == 2 and level.counts.sum() == 12
    assert level.valid[level.assignments].all()
    assert level.temperatures[~level.valid] == level.temperatures.max()
    np.testing.assert_allclose(level.temperatures.mean(), T, rtol=1e-6)


def _assert_same(h1, h2):
    a1, a2 = h1.to_arrays(), h2.to_arrays()
    assert a1.keys() == a2.keys()
    for key in a1:
        assert a1[key].dtype == a2[key].dtype, key
        np.testing.assert_array_equal(a1[key], a2[key], err_msg=key)


def test_deterministic_for_a_seed(random_features):
    run = lambda seed: hierarchical_kmeans(random_features, [20, 5], niter=10, nredo=1, seed=seed)
    _assert_same(run(0), run(0))
    h0, h1 = run(0), run(1)
    assert not np.array_equal(h0.levels[0].centroids, h1.levels[0].centroids)


def test_round_trip_through_npz(random_features):
    h = hierarchical_kmeans(random_features, [20, 6, 2], niter=5, nredo=1)
    arrays = h.to_arrays()
    assert "level2/parents" not in arrays and "level1/parents" in arrays
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf) as loaded:
        back = Hierarchy.from_arrays(loaded)
    _assert_same(h, back)
    assert back.levels[-1].parents is None and back.num_clusters == (20, 6, 2)
    _assert_same(h, Hierarchy.from_arrays(arrays))


def test_level_rejects_wrong_dtype():
    good = dict(centroids=np.zeros((2, 3), np.float32), assignments=np.zeros(5, np.int32),
                temperatures=np.zeros(2, np.float32), valid=np.ones(2, bool), parents=None,
                counts=np.zeros(2, np.int32))
    Level(**good)
    with pytest.raises(ValueError, match="Level.counts: expected dtype int32"):
        Level(**{**good, "counts": np.zeros(2, np.int64)})


X = np.random.default_rng(2).standard_normal((50, 4)).astype(np.float32)
X_BAD = X.copy()
X_BAD[[3, 7], 1] = np.nan
X_BAD[9, 0] = -np.inf


@pytest.mark.parametrize("features, num_clusters, temperature, match", [
    (X.tolist(), [4], T, r"2-D np.ndarray"),
    (X[:, 0], [4], T, r"2-D np.ndarray.*shape \(50,\)"),
    (X.astype(np.float64), [4], T, r"got dtype float64.*features\.astype\(np\.float32\)"),
    (X_BAD, [4], T, r"3 of 50 rows with NaN or inf"),
    (X, [], T, r"num_clusters is empty"),
    (X, 4, T, r"list of ints"),
    (X, [4, 2.0], T, r"ints >= 1; got 2.0"),
    (X, [0], T, r"ints >= 1; got 0"),
    (X, [60], T, r"N=50 samples into M_0=60 clusters; use fewer clusters"),
    (X, [10, 20], T, r"strictly decreasing: level 1 has M_1=20 >= M_0=10"),
    (X, [10, 5, 5], T, r"level 2 has M_2=5 >= M_1=5"),
    (X, [4], 0.0, r"temperature must be > 0"),
    (X, [4], -1.0, r"temperature must be > 0"),
])
def test_bad_input_raises(features, num_clusters, temperature, match):
    with pytest.raises(ValueError, match=match):
        hierarchical_kmeans(features, num_clusters, temperature=temperature)


def test_faiss_warnings_become_one_log_line(capfd, caplog):
    """faiss's "please provide at least N training points" goes to the log once per process (not
    at every epoch's clustering), not to stderr."""
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    with caplog.at_level("INFO", logger="hcsc_jax.clustering"):
        for seed in (0, 1):  # two epochs
            hierarchical_kmeans(x, [40, 20, 5], niter=5, nredo=1, seed=seed, min_points_per_centroid=10)
    assert "please provide" not in capfd.readouterr().err
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("hcsc_jax.clustering")]
    assert lines == ["k-means under min_points_per_centroid=10 (harmless for upper levels): "
                     "level 0: 200 points for 40 centroids; level 1: 40 points for 20 centroids; "
                     "level 2: 20 points for 5 centroids"]


# ------------------------------------------------------------------------------------------
# PCL's independent clusterings (mode="independent")


def test_independent_clusterings_are_independent(random_features):
    x = random_features
    kw = dict(niter=10, nredo=1, seed=3, temperature=T)
    h = hierarchical_kmeans(x, [12, 12, 40], mode="independent", **kw)  # any sizes, any order
    assert h.num_clusters == (12, 12, 40) and not h.is_hierarchical
    assert all(lv.parents is None for lv in h.levels)  # no parent links
    # Same k, different seeds (seed + l): different centroids and partitions.
    assert not np.allclose(h.levels[0].centroids, h.levels[1].centroids)
    assert not np.array_equal(h.levels[0].assignments, h.levels[1].assignments)
    for l, lv in enumerate(h.levels):
        # Each level is exactly a flat k-means of the samples with seed + l, on its own.
        flat = hierarchical_kmeans(x, [lv.num_clusters], niter=10, nredo=1, seed=3 + l,
                                   temperature=T).levels[0]
        np.testing.assert_array_equal(lv.centroids, flat.centroids)
        np.testing.assert_array_equal(lv.assignments, flat.assignments)
        np.testing.assert_array_equal(lv.temperatures, flat.temperatures)  # same concentration estimate
        assert lv.counts.sum() == len(x)  # members are samples, not centroids
        np.testing.assert_allclose(lv.temperatures.mean(), T, rtol=1e-5)
    # The npz round trip keeps them independent.
    back = Hierarchy.from_arrays(h.to_arrays())
    _assert_same(h, back)
    assert not back.is_hierarchical
    # A hierarchy still needs strictly decreasing sizes; independent ones still need <= N clusters.
    with pytest.raises(ValueError, match="strictly decreasing"):
        hierarchical_kmeans(x, [12, 40], **kw)
    with pytest.raises(ValueError, match="fewer clusters than samples"):
        hierarchical_kmeans(x, [12, 601], mode="independent", **kw)
    with pytest.raises(ValueError, match="mode must be one of"):
        hierarchical_kmeans(x, [12], mode="flat", **kw)
    # Mixed parents (some levels with, some without) are not a valid Hierarchy.
    lv = h.levels
    with pytest.raises(ValueError, match="needs parents"):
        Hierarchy((lv[0], Level(**{**_fields(lv[1]), "parents": np.zeros(12, np.int32)}), lv[2]))


def _fields(level):
    return {f: getattr(level, f)
            for f in ("centroids", "assignments", "temperatures", "valid", "parents", "counts")}
