"""Evaluation protocols (hcsc_jax.evaluation) and eval.py end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hcsc_jax import evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blobs(n_per_class=30, num_classes=5, dim=16, spread=0.05, seed=0):
    """Well-separated clusters: class c sits around the c-th basis vector."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class).astype(np.int32)
    centers = np.eye(num_classes, dim, dtype=np.float32) * 3.0
    feats = centers[labels] + spread * rng.standard_normal((len(labels), dim)).astype(np.float32)
    return feats, labels


# ----------------------------------------------------------------------------- kNN

def test_knn_separable_features_are_perfect():
    train, ytrain = blobs(seed=0)
    test, ytest = blobs(n_per_class=10, seed=1)
    res = evaluation.knn_evaluate(train, ytrain, test, ytest, ks=(10, 20, 100), num_classes=5)
    for k in (10, 20, 100):
        assert res["per_k"][k]["top1"] == 100.0
        assert res["per_k"][k]["top5"] == 100.0
    assert res["best_top1"] == 100.0 and res["best_k"] in (10, 20, 100)


def test_knn_shuffled_labels_are_near_chance():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((2000, 32)).astype(np.float32)
    test = rng.standard_normal((1000, 32)).astype(np.float32)
    ytrain = rng.integers(0, 10, 2000).astype(np.int32)
    ytest = rng.integers(0, 10, 1000).astype(np.int32)
    res = evaluation.knn_evaluate(train, ytrain, test, ytest, ks=(20,), num_classes=10)
    assert 5.0 < res["per_k"][20]["top1"] < 16.0
    assert 40.0 < res["per_k"][20]["top5"] < 60.0


def test_knn_weighted_vote_matches_hand_case():
    # 2-D vectors (of different norms) at angles; test point at angle 0. The 3 nearest: a
    # (class 0, 0 rad), b and c (class 1, 0.5 / 0.55 rad). Unweighted majority would say 1; with
    # T = 0.07: exp(1/T) > exp(cos(.5)/T) + exp(cos(.55)/T) -- checked against a NumPy reference.
    angles = np.array([0.0, 0.5, 0.55, 2.0, 2.5])
    train = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32) * np.array([[1], [2], [3], [1], [1]])
    ytrain = np.array([0, 1, 1, 2, 2], np.int32)
    test = np.array([[5.0, 0.0]], np.float32)
    T = 0.07
    sims = np.cos(angles)
    top = np.argsort(-sims)[:3]
    ref = np.zeros(3)
    for i in top:
        ref[ytrain[i]] += np.exp(sims[i] / T)
    got = evaluation.knn_predict(train, ytrain, test, k=3, temperature=T, num_classes=3)
    np.testing.assert_allclose(got[0], ref, rtol=1e-4)
    assert got[0].argmax() == ref.argmax() == 0  # the weighting decides: 2 votes of class 1 lose
    # With T large the weights flatten and the two class-1 neighbours win.
    flat = evaluation.knn_predict(train, ytrain, test, k=3, temperature=100.0, num_classes=3)
    assert flat[0].argmax() == 1


def test_topk_accuracy():
    scores = np.array([[0.9, 0.05, 0.03, 0.01, 0.005, 0.004, 0.001],
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                       [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    labels = np.array([0, 2, 6])
    # row 0: top-1 hit. row 1: label 2 has rank 5 (0.3 after .7,.6,.5,.4) -> top-5 hit only.
    # row 2: label 6 is last -> miss.
    assert evaluation.topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert evaluation.topk_accuracy(scores, labels, 5) == pytest.approx(2 / 3)
    assert evaluation.topk_accuracy(scores, np.array([0, 1, 6]), 4) == pytest.approx(1 / 3)


def test_knn_k_larger_than_train_set_is_an_error():
    train, ytrain = blobs(n_per_class=2)
    with pytest.raises(ValueError, match="larger than the 10 training samples"):
        evaluation.knn_evaluate(train, ytrain, train, ytrain, ks=(5, 20))


# ----------------------------------------------------------------------------- linear

def test_linear_fast_separable_reaches_100():
    feats, labels = blobs(n_per_class=40, num_classes=4, seed=0)
    test, ytest = blobs(n_per_class=10, num_classes=4, seed=1)
    feats_fn = lambda idx, key: feats[idx]
    params, hist = evaluation.train_linear(feats_fn, labels, feats.shape[1], 4, epochs=5, base_lr=5.0,
                                           batch_size=32, milestones=(3,), progress=False)
    assert params["w"].shape == (16, 4) and params["b"].shape == (4,)
    res = evaluation.linear_evaluate(params, test, ytest)
    assert res["top1"] == 100.0 and res["top5"] == 100.0
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_linear_init_and_lr_schedule():
    import jax
    p = evaluation.init_linear(jax.random.PRNGKey(0), 512, 100)
    assert abs(float(p["w"].std()) - 0.01) < 0.001 and float(np.abs(p["b"]).max()) == 0.0
    spe = 7
    sched = evaluation.linear_lr_schedule(5.0, 128, spe, milestones=(60, 80))
    assert float(sched(0)) == pytest.approx(2.5)            # 5.0 * 128 / 256
    assert float(sched(60 * spe - 1)) == pytest.approx(2.5)
    assert float(sched(60 * spe)) == pytest.approx(0.25)
    assert float(sched(80 * spe - 1)) == pytest.approx(0.25)
    assert float(sched(80 * spe)) == pytest.approx(0.025)
    # The per-epoch lr recorded by train_linear follows the milestones.
    feats, labels = blobs(n_per_class=8, num_classes=2)
    _, hist = evaluation.train_linear(lambda idx, key: feats[idx], labels, 16, 2, epochs=5, base_lr=1.0,
                                      batch_size=8, milestones=(2, 4), progress=False)
    lrs = [h["lr"] for h in hist]
    np.testing.assert_allclose(lrs, [1 / 32, 1 / 32, 1 / 320, 1 / 320, 1 / 3200], rtol=1e-5)


# ----------------------------------------------------------------------------- clustering

def test_cluster_nmi_ami_perfect_and_random():
    feats, labels = blobs(n_per_class=50, num_classes=5, spread=0.02)
    res = evaluation.cluster_evaluate(feats, labels, (5,), nredo=3)
    assert res[5]["nmi"] == pytest.approx(1.0, abs=1e-6) and res[5]["ami"] == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(0)
    res = evaluation.cluster_evaluate(feats, rng.integers(0, 5, len(labels)), (5,), nredo=3)
    assert res[5]["ami"] < 0.05 and res[5]["nmi"] < 0.1
    with pytest.raises(ValueError, match="larger than the 250 samples"):
        evaluation.cluster_evaluate(feats, labels, (300,))


# ----------------------------------------------------------------------------- eval.py

def _random_weights(abstract_state, seed=0):
    """NumPy weights for an abstract state (no XLA compiles, unlike the eager initialisers):
    He-normal kernels, unit BN scale / variance, zero biases / means."""
    import jax
    from flax import nnx

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1])
        if len(leaf.shape) >= 2:
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))).astype(leaf.dtype)
        return (np.ones if ("scale" in name or "var" in name) else np.zeros)(leaf.shape, leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract_state))
    nnx.replace_by_pure_dict(abstract_state, pure)
    return abstract_state


@pytest.fixture(scope="module")
def exported_encoder(tmp_path_factory):
    from flax import nnx

    from hcsc_jax import checkpoints

    meta = checkpoints.encoder_meta(
        dict(arch="resnet18", width=0.0625, small_stem=True, embed_dim=16, hidden_dim=32, dtype="float32"),
        in_channels=1, bn_group_size=8)
    _, params, stats = nnx.split(checkpoints.build_encoder(meta, abstract=True), nnx.Param, nnx.BatchStat)
    path = str(tmp_path_factory.mktemp("enc") / "encoder")
    checkpoints.export_encoder(path, meta, _random_weights(params), _random_weights(stats, 1))
    return path


DATA = ["--config.dataset=digits", "--config.train_split=train", "--config.eval_split=test",
        "--config.image_size=8", "--config.mean=(0.5,)", "--config.std=(0.5,)", "--config.progress_bar=False"]


def run_eval(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *args], cwd=REPO, env=env, check=False,
                          capture_output=True, text=True, timeout=300)


def test_eval_py_knn_writes_json(exported_encoder):
    proc = run_eval("--mode=knn", f"--checkpoint={exported_encoder}", "--config.knn_ks=(10,20)", *DATA)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = os.path.join(exported_encoder, "eval", "knn_step0.json")
    with open(path) as f:
        res = json.load(f)
    assert set(res["per_k"]) == {"10", "20"} and res["mode"] == "knn"
    assert 10.0 < res["best_top1"] <= 100.0  # random features still beat chance on digits
    assert os.path.isfile(os.path.join(exported_encoder, "eval", "features_step0_train.npz"))
    assert "knn step 0: best top-1" in proc.stdout


def test_eval_py_bad_inputs(exported_encoder, tmp_path):
    missing = str(tmp_path / "nope")
    proc = run_eval("--mode=knn", f"--checkpoint={missing}", *DATA)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_eval("--mode=knn", f"--checkpoint={empty}", *DATA)
    assert proc.returncode != 0 and "no encoder found" in proc.stderr and "Traceback" not in proc.stderr
    result = os.path.join(exported_encoder, "eval", "knn_step0.json")
    before = os.stat(result).st_mtime_ns if os.path.exists(result) else None
    proc = run_eval("--mode=knn", f"--checkpoint={exported_encoder}", "--config.knn_ks=(10,5000)", *DATA)
    assert proc.returncode != 0 and "larger than the 1437 training samples" in proc.stderr
    assert (os.stat(result).st_mtime_ns if os.path.exists(result) else None) == before  # nothing written
    proc = run_eval("--mode=nope", f"--checkpoint={exported_encoder}", *DATA)
    assert proc.returncode != 0 and "mode" in proc.stderr


def test_label_subset_is_class_balanced():
    labels = np.repeat(np.arange(4), [100, 50, 20, 3]).astype(np.int32)
    idx = evaluation.label_subset(labels, 0.1, seed=0)
    assert len(np.unique(idx)) == len(idx)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [10, 5, 2, 1])  # >= 1 per class
    np.testing.assert_array_equal(idx, evaluation.label_subset(labels, 0.1, seed=0))
    with pytest.raises(ValueError, match="fraction"):
        evaluation.label_subset(labels, 0.0)


def test_eval_py_semisup_and_linear(exported_encoder):
    proc = run_eval("--mode=semisup", f"--checkpoint={exported_encoder}", "--config.semisup.fraction=0.05",
                    "--config.semisup.epochs=2", "--config.semisup.milestones=(1,)", *DATA)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(exported_encoder, "eval", "semisup_step0.json")) as f:
        res = json.load(f)
    assert res["num_labelled"] == 72 and 0 <= res["top1"] <= res["top5"] <= 100
    h = res["history"]
    scale = 72 / 256  # one batch of all 72 labelled samples
    assert h[0]["trunk_lr"] == pytest.approx(0.005 * scale) and h[0]["head_lr"] == pytest.approx(0.02 * scale)
    assert h[1]["trunk_lr"] == pytest.approx(0.0005 * scale) and h[1]["head_lr"] == pytest.approx(0.002 * scale)
    for mode, augmented in (("linear_fast", False), ("linear", True)):
        proc = run_eval(f"--mode={mode}", f"--checkpoint={exported_encoder}", "--config.linear.epochs=2",
                        "--config.linear.milestones=(1,)", *DATA)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(os.path.join(exported_encoder, "eval", f"{mode}_step0.json")) as f:
            res = json.load(f)
        assert res["protocol"]["augmented"] is augmented and [h["lr"] for h in res["history"]] == [5.0, 0.5]
        assert 0 <= res["top1"] <= res["top5"] <= 100
        assert ("linear_fast (cached center-crop features, no augmentation)" in proc.stdout) is not augmented
