"""Evaluation protocols (hcsc_jax/evaluators/) against references, on streamed and resident data,
eval.py end to end on a generated ImageNet-layout folder and TFDS builds, resume after SIGKILL."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import imagenet_like
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import eval_digits, eval_imagenet
from hcsc_jax import models, sharding
from hcsc_jax.data import sources
from hcsc_jax.evaluators import EvalError, cluster, common, knn, linear, semisup, voc
from hcsc_jax.run import checkpoints, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blobs(n_per_class=30, num_classes=5, dim=16, spread=0.05, seed=0):
    """Well-separated clusters: class c sits around the c-th basis vector."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class).astype(np.int32)
    centers = np.eye(num_classes, dim, dtype=np.float32) * 3.0
    feats = centers[labels] + spread * rng.standard_normal((len(labels), dim)).astype(np.float32)
    return feats, labels


def knn_reference(train, ytrain, test, k, T, num_classes):
    """Float64 NumPy weighted kNN written from the spec: cosine, k nearest, exp(sim / T) votes."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit(test.astype(np.float64)) @ unit(train.astype(np.float64)).T
    out = np.zeros((len(test), num_classes))
    for i, row in enumerate(sim):
        for j in np.argsort(-row, kind="stable")[:k]:
            out[i, ytrain[j]] += np.exp(row[j] / T)
    return out


# ----------------------------------------------------------------------------- kNN

@pytest.mark.parametrize("train_chunk,test_block", [(16384, 1024), (7, 4), (50, 3)])
def test_knn_chunked_equals_reference(train_chunk, test_block):
    rng = np.random.default_rng(0)
    train = rng.standard_normal((203, 12)).astype(np.float32)
    test = rng.standard_normal((37, 12)).astype(np.float32)
    ytrain = rng.integers(0, 6, 203).astype(np.int32)
    got = knn.knn_scores(train, ytrain, test, ks=(1, 5, 20), temperature=0.1, num_classes=6,
                         train_chunk=train_chunk, test_block=test_block)
    for k in (1, 5, 20):
        np.testing.assert_allclose(got[k], knn_reference(train, ytrain, test, k, 0.1, 6), rtol=2e-4)


def test_knn_separable_and_shuffled():
    train, ytrain = blobs(seed=0)
    test, ytest = blobs(n_per_class=10, seed=1)
    res = knn.evaluate(train, ytrain, test, ytest, ks=(10, 20, 100), num_classes=5, train_chunk=32)
    assert all(res["per_k"][k] == dict(top1=100.0, top5=100.0) for k in (10, 20, 100))
    rng = np.random.default_rng(0)
    res = knn.evaluate(rng.standard_normal((2000, 32)), rng.integers(0, 10, 2000),
                       rng.standard_normal((1000, 32)), rng.integers(0, 10, 1000), ks=(20,), num_classes=10)
    assert 5.0 < res["per_k"][20]["top1"] < 16.0 and 40.0 < res["per_k"][20]["top5"] < 60.0


def test_knn_weighted_vote_matches_hand_case():
    # Test point at angle 0; the 3 nearest: a (class 0, 0 rad), b and c (class 1, 0.5 / 0.55 rad).
    # Unweighted majority says 1; with T = 0.07, exp(1/T) > exp(cos(.5)/T) + exp(cos(.55)/T).
    angles = np.array([0.0, 0.5, 0.55, 2.0, 2.5])
    train = (np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
             * np.array([[1], [2], [3], [1], [1]]))
    ytrain = np.array([0, 1, 1, 2, 2], np.int32)
    test = np.array([[5.0, 0.0]], np.float32)
    got = knn.knn_scores(train, ytrain, test, ks=(3,), temperature=0.07, num_classes=3)[3]
    np.testing.assert_allclose(got, knn_reference(train, ytrain, test, 3, 0.07, 3), rtol=1e-4)
    assert got[0].argmax() == 0
    assert knn.knn_scores(train, ytrain, test, ks=(3,), temperature=100.0, num_classes=3)[3][0].argmax() == 1
    with pytest.raises(ValueError, match="larger than the 5 training samples"):
        knn.knn_scores(train, ytrain, test, ks=(3, 6))


def test_topk_accuracy():
    scores = np.array([[0.9, 0.05, 0.03, 0.01, 0.005, 0.004, 0.001],
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                       [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    # row 0: top-1 hit; row 1: label 2 has rank 5 -> top-5 only; row 2: label 6 is last -> miss.
    assert common.topk_accuracy(scores, np.array([0, 2, 6]), 1) == pytest.approx(1 / 3)
    assert common.topk_accuracy(scores, np.array([0, 2, 6]), 5) == pytest.approx(2 / 3)
    assert common.topk_accuracy(scores, np.array([0, 1, 6]), 4) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- linear, cluster, subsets

def test_linear_init_and_lr_schedule():
    p = linear.init_head(jax.random.key(0), 512, 100)
    assert abs(float(p["w"].std()) - 0.01) < 0.001 and float(np.abs(p["b"]).max()) == 0.0
    spe = 7
    sched = linear.lr_schedule(5.0, 128, spe, milestones=(60, 80))
    assert float(sched(0)) == pytest.approx(2.5)            # 5.0 * 128 / 256
    assert float(sched(60 * spe - 1)) == pytest.approx(2.5)
    assert float(sched(60 * spe)) == pytest.approx(0.25)
    assert float(sched(80 * spe)) == pytest.approx(0.025)


def test_linear_checkpoint_that_cannot_be_read_falls_back_then_starts_afresh(tmp_path, caplog):
    def manager():
        return ocp.CheckpointManager(tmp_path / "ckpt", item_names=("train", "meta"),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))

    state, protocol = dict(head=jax.numpy.zeros(3)), dict(mode="linear")
    with manager() as mngr:
        for step in (1, 2):
            mngr.save(step, args=ocp.args.Composite(
                train=ocp.args.StandardSave(dict(head=jax.numpy.full(3, float(step)))),
                meta=ocp.args.JsonSave(dict(global_step=step, history=[], epoch_losses=[], protocol=protocol,
                                            weights="w"))), force=True)
        mngr.wait_until_finished()

    def corrupt(step):  # empty the index files of its state, as a cut write would leave them
        for root, _, files in os.walk(tmp_path / "ckpt" / str(step) / "train"):
            for name in files:
                if "manifest" in name or name.startswith("_METADATA"):
                    open(os.path.join(root, name), "w").close()

    corrupt(2)
    restored, meta = linear._restore(manager(), state, protocol, "w")
    assert meta["global_step"] == 1 and float(restored["head"][0]) == 1.0
    assert "checkpoint at step 2 in" in caplog.text and "trying the previous one" in caplog.text
    corrupt(1)
    restored, meta = linear._restore(manager(), state, protocol, "w")
    assert meta == dict(global_step=0, history=[], epoch_losses=[]) and restored is state
    # A readable step of other weights is an error, not a step to skip.
    with manager() as mngr:
        mngr.save(3, args=ocp.args.Composite(
            train=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(dict(global_step=3, protocol=protocol, weights="other"))), force=True)
        mngr.wait_until_finished()
    with pytest.raises(EvalError, match="other weights or settings"):
        linear._restore(manager(), state, protocol, "w")


def test_cluster_nmi_ami_perfect_and_random():
    feats, labels = blobs(n_per_class=50, num_classes=5, spread=0.02)
    res = cluster.evaluate(feats, labels, (5,), nredo=3)
    assert res[5]["nmi"] == pytest.approx(1.0, abs=1e-6) and res[5]["ami"] == pytest.approx(1.0, abs=1e-6)
    res = cluster.evaluate(feats, np.random.default_rng(0).integers(0, 5, len(labels)), (5,), nredo=3)
    assert res[5]["ami"] < 0.05 and res[5]["nmi"] < 0.1
    with pytest.raises(ValueError, match="larger than the 250 samples"):
        cluster.evaluate(feats, labels, (300,))


def test_label_subset_is_class_balanced():
    labels = np.repeat(np.arange(4), [100, 50, 20, 3]).astype(np.int32)
    idx = semisup.label_subset(labels, 0.1, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [10, 5, 2, 1])  # >= 1 per class
    np.testing.assert_array_equal(idx, semisup.label_subset(labels, 0.1, seed=0))
    with pytest.raises(ValueError, match="fraction"):
        semisup.label_subset(labels, 0.0)


def test_split_file_selects_exactly_the_listed_images(tmp_path):
    names = ["n01_1.JPEG", "n01_2.JPEG", "n02_7.JPEG", "n02_8.JPEG"]
    split = tmp_path / "1percent.txt"
    split.write_text("n02_8.JPEG\n\nn01_1.JPEG\n")
    np.testing.assert_array_equal(
        semisup.match_names(semisup.read_split_file(str(split)), names, "x"), [0, 3])
    listed = [f"n09_{i}.JPEG" for i in range(8)] + ["n01_2.JPEG"]
    with pytest.raises(EvalError,
                       match=r"8 of the 9 names .* match no image of x, e\.g\. n09_0\.JPEG, n09_1"):
        semisup.match_names(listed, names, "x")
    # A folder part would select the image of that name in another folder (the train image).
    split.write_text("n01_1.JPEG\n../val/n02_8.JPEG\n")
    with pytest.raises(EvalError, match=r"1percent.txt line 2: '../val/n02_8.JPEG' is not a bare file name"):
        semisup.read_split_file(str(split))
    with pytest.raises(EvalError, match="split file .* does not exist"):
        semisup.read_split_file(str(tmp_path / "nope.txt"))
    with pytest.raises(EvalError, match="no file names to match"):
        semisup.match_names(["a"], None, "digits:train")


# ----------------------------------------------------------------------------- VOC07

def test_voc_targets_and_svm_map():
    t = voc.class_targets([[0, 3], [1], [3]], [[0], [1], [3]], 4)
    # Class 3 of row 0: difficult.
    np.testing.assert_array_equal(t, [[1, -1, -1, 0], [-1, 1, -1, -1], [-1, -1, -1, 1]])
    rng = np.random.default_rng(0)
    def split(n):
        y = rng.integers(0, 2, (n, 3)) * 2 - 1
        y[:3] = 1  # every class has positives
        x = y.astype(np.float32) + 0.1 * rng.standard_normal((n, 3)).astype(np.float32)
        return x, y.astype(np.int8)
    (xa, ya), (xb, yb) = split(60), split(30)
    res = voc.evaluate(xa, ya, xb, yb, costs=(0.1, 1.0), folds=3)
    assert res["map"] == pytest.approx(100.0) and len(res["ap"]) == 3 and set(res["cost"]) <= {0.1, 1.0}
    noisy = voc.evaluate(rng.standard_normal((60, 3)), ya, rng.standard_normal((30, 3)), yb, costs=(1.0,))
    assert noisy["map"] < 90.0
    # A test sample marked 0 (difficult only) counts as if it were not there.
    ignored = yb.copy()
    ignored[:10, 0] = 0
    kept = voc.evaluate(xa[:, :1], ya[:, :1], xb[10:, :1], yb[10:, :1], costs=(1.0,))
    assert voc.evaluate(xa[:, :1], ya[:, :1], xb[:, :1], ignored[:, :1], costs=(1.0,))["ap"] == kept["ap"]


# ----------------------------------------------------------------------------- encoders and data

def _random_weights(abstract_state, seed=0):
    """NumPy weights for an abstract state (no XLA compiles): He-normal kernels, unit BN scale /
    variance, zero biases / means."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if len(leaf.shape) >= 2:
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) * std).astype(leaf.dtype)
        name = str(path[-1])
        return (np.ones if ("scale" in name or "var" in name) else np.zeros)(leaf.shape, leaf.dtype)

    nnx.replace_by_pure_dict(
        abstract_state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract_state)))
    return abstract_state


def export_random_encoder(path, channels):
    meta = models.encoder_meta(
        dict(arch="resnet18", width=0.0625, small_stem=True, embed_dim=16, hidden_dim=32, dtype="float32"),
        in_channels=channels, bn_group_size=8)
    _, params, stats = nnx.split(models.build_encoder(meta, abstract=True), nnx.Param, nnx.BatchStat)
    checkpoints.export_encoder(str(path), meta, _random_weights(params), _random_weights(stats, 1))
    return str(path)


@pytest.fixture(scope="module")
def gray_encoder(tmp_path_factory):
    return export_random_encoder(tmp_path_factory.mktemp("enc") / "gray", 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(color encoder, ImageNet-layout folder of varied sizes, same-size folder, TFDS data_dir)."""
    root = tmp_path_factory.mktemp("data")
    return dict(encoder=export_random_encoder(root / "rgb", 3),
                folder=imagenet_like.make_folder(str(root / "imagenet")),
                same_size=imagenet_like.make_folder(str(root / "same"), same_size=True),
                tfds=imagenet_like.make_tfds(str(root / "tfds")))


def _ctx(encoder_dir, tmp_path, **overrides):
    cfg = eval_imagenet.get_config("runlocal")
    cfg.progress_bar = False
    cfg.update(overrides)
    out = common.from_checkpoint(cfg, encoder_dir, None, sharding.make_mesh())
    out.out_dir = None if tmp_path is None else workdir.path(tmp_path)
    return out, cfg


def test_tfds_labels_and_file_names_without_decoding_images(data, monkeypatch):
    import tensorflow_datasets as tfds

    src = sources.open_source("tfds:hcsc_tiny_imagenet", "train", data["tfds"])
    decoded = [src.load(i) for i in range(3)]
    monkeypatch.setattr(tfds.features.Image, "decode_example_np",
                        lambda *a, **k: pytest.fail("an image was decoded to read labels"))
    assert src.num_examples == 30 and src.labels.dtype == np.int32
    by_name = {name: label for name, label, _ in imagenet_like.examples("train", 10)}
    assert [by_name[n] for n in src.file_names] == src.labels.tolist()
    assert decoded[0].ndim == 3 and decoded[0].shape[-1] == 3


@pytest.mark.slow
def test_streamed_equals_resident(data, tmp_path):
    """Same images both ways: the host's center crop (Pillow) and the device's give the same
    features to uint8 rounding, hence the same kNN, clustering and linear_fast numbers."""
    ctxs = {p: _ctx(data["encoder"], None, dataset=f"folder:{data['same_size']}", pipeline=p)[0]
            for p in ("memory", "stream")}
    feats = {p: c.features("train") for p, c in ctxs.items()}
    scale = np.abs(feats["memory"]).max()
    np.testing.assert_allclose(feats["stream"], feats["memory"], atol=0.05 * scale)
    cfg = eval_imagenet.get_config("runlocal")
    for name, fn in (("knn", knn.run), ("cluster", cluster.run), ("linear", linear.run_fast)):
        results = [fn(ctxs[p], cfg.evals[name])[0] for p in ("memory", "stream")]
        key = {"knn": "per_k", "cluster": "per_k", "linear": "top1"}[name]
        assert results[0][key] == results[1][key], name


def test_bad_input_stops_with_what_to_change(data, gray_encoder, tmp_path):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    folder = f"folder:{data['folder']}"
    with pytest.raises(EvalError, match=r"3-channel images, the encoder takes 1"):
        _ctx(gray_encoder, tmp_path, dataset=folder)[0].features("train")
    with pytest.raises(EvalError, match=r"holds a resnet18 encoder, this eval config is for resnet50"):
        _ctx(data["encoder"], tmp_path, dataset=folder, expect_arch="resnet50")
    ctx, cfg = _ctx(data["encoder"], tmp_path, dataset=folder)
    cfg.evals.knn.ks = (2, 500)
    with pytest.raises(EvalError, match=r"k = \[500\] larger than the 30 training samples"):
        knn.run(ctx, cfg.evals.knn)
    cfg.evals.semisup.split_file = str(tmp_path / "missing.txt")
    with pytest.raises(EvalError, match="does not exist"):
        semisup.run(ctx, cfg.evals.semisup)
    unlabelled, _ = _ctx(data["encoder"], tmp_path, dataset="tfds:hcsc_tiny_voc", data_dir=data["tfds"])
    with pytest.raises(EvalError, match="has no labels"):
        knn.run(unlabelled, cfg.evals.knn)
    empty = tmp_path.parent / "empty"
    empty.mkdir()
    with pytest.raises(EvalError, match=r"not prepared .*tfds build hcsc_tiny_imagenet"):
        _ctx(data["encoder"], tmp_path, dataset="tfds:hcsc_tiny_imagenet",
             data_dir=str(empty))[0].features("train")
    assert os.listdir(tmp_path) == []  # nothing written


# ----------------------------------------------------------------------------- eval.py

def run_eval(*args, popen=False):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, os.path.join(REPO, "eval.py"), *args]
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=600)


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_readme_commands_on_generated_imagenet(data, tmp_path):
    """Every row of docs/evaluation.md's "Reproduce the paper's evaluation", on the generated folder
    and TFDS builds."""
    enc = data["encoder"]
    split = tmp_path / "1percent.txt"
    split.write_text("".join(f"{n}\n" for n, _, _ in imagenet_like.examples("train", 10)[::5]))
    common_args = ["--config=configs/eval_imagenet.py:runlocal", f"--checkpoint={enc}",
                   f"--config.dataset=folder:{data['folder']}", f"--config.data_dir={data['tfds']}",
                   "--config.progress_bar=False"]
    runs = {"knn": [], "linear": [], "cluster": [], "semisup": [f"--config.evals.semisup.split_file={split}"],
            "voc": ["--config.evals.voc.dataset=tfds:hcsc_tiny_voc"]}
    for mode, extra in runs.items():
        proc = run_eval(f"--eval={mode}", *common_args, *extra)
        assert proc.returncode == 0, (mode, proc.stderr[-3000:])
        res = read(os.path.join(enc, "eval", f"{mode}_step0.json"))
        assert res["eval"] == mode and res["model"]["arch"] == "resnet18"
    eval_dir = os.path.join(enc, "eval")
    assert read(os.path.join(eval_dir, "knn_step0.json"))["per_k"]["2"]["top1"] > 60  # colored squares: easy
    assert read(os.path.join(eval_dir, "semisup_step0.json"))["num_labelled"] == 6
    assert len(read(os.path.join(eval_dir, "voc_step0.json"))["ap"]) == 20
    assert read(os.path.join(eval_dir, "linear_step0.json"))["protocol"]["augmented"] is True
    proc = run_eval("--eval=knn", *common_args, "--config.evals.knn.ks=(2,5000)")
    assert (proc.returncode == 1
            and proc.stderr.strip().splitlines()[-1].startswith("eval.py: error: kNN k = [5000]"))
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_linear_sigkilled_and_restarted_equals_uninterrupted(gray_encoder, tmp_path):
    args = ["--eval=linear", "--config.dataset=digits", "--config.train_split=train",
            "--config.eval_split=test", "--config.image_size=8", "--config.mean=(0.5,)",
            "--config.std=(0.5,)", "--config.progress_bar=False", "--config.evals.linear.epochs=3",
            "--config.evals.linear.milestones=(2,)", "--config.evals.linear.checkpoint_every_steps=2"]
    dirs = [str(tmp_path / name) for name in ("whole", "killed")]
    for d in dirs:
        subprocess.run(["cp", "-r", gray_encoder, d], check=True)
    proc = run_eval(f"--checkpoint={dirs[0]}", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = os.path.join(dirs[1], "eval", "linear_step0_ckpt")
    killed = run_eval(f"--checkpoint={dirs[1]}", *args, popen=True)
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None and not os.path.isdir(os.path.join(ckpt, "6")):
        time.sleep(0.02)
    assert killed.poll() is None, "the linear run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)  # mid-epoch 2 (5 steps per epoch, saved at step 6)
    killed.wait()
    assert not os.path.exists(os.path.join(dirs[1], "eval", "linear_step0.json"))
    proc = run_eval(f"--checkpoint={dirs[1]}", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (read(os.path.join(d, "eval", "linear_step0.json")) for d in dirs)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"]) and len(a["history"]) == 3
    # Settings changed under a kept checkpoint: refused, not silently mixed.
    proc = run_eval(f"--checkpoint={dirs[1]}", *args[:-1], "--config.evals.linear.checkpoint_every_steps=3")
    assert proc.returncode == 1 and "other weights or settings; delete it" in proc.stderr


@pytest.mark.slow
def test_unwritable_checkpoint_is_one_line_and_out_takes_the_results(gray_encoder, tmp_path):
    """A checkpoint whose eval/ cannot be written (here a file in its place; a read-only mount
    alike): exit 2 with one line naming --out, nothing written; with --out the results go there."""
    enc = str(tmp_path / "enc")
    subprocess.run(["cp", "-r", gray_encoder, enc], check=True)
    with open(os.path.join(enc, "eval"), "w"):
        pass
    args = ["--config=configs/eval_digits.py:runlocal", f"--checkpoint={enc}", "--eval=knn",
            "--config.dataset=digits", "--config.train_split=train", "--config.eval_split=test",
            "--config.image_size=8", "--config.mean=(0.5,)", "--config.std=(0.5,)"]
    proc = run_eval(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(r"eval.py: error: cannot write to .*/eval .*; pass a --out that exists",
                     proc.stderr.strip().splitlines()[-1])
    proc = run_eval(*args, f"--out={tmp_path / 'results'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read(tmp_path / "results" / "knn_step0.json")["eval"] == "knn"


@pytest.mark.slow
def test_the_summary_of_an_exported_encoder_says_what_it_needs(gray_encoder, tmp_path):
    """An exported encoder has no training config.json to take the summary's settings from, nor a
    key encoder: `--eval=summary` is one line naming what to set (exit 1), before any feature
    pass; nothing written."""
    enc = str(tmp_path / "enc")
    subprocess.run(["cp", "-r", gray_encoder, enc], check=True)
    args = ["--eval=summary", f"--checkpoint={enc}", "--config.dataset=digits", "--config.train_split=train",
            "--config.eval_split=test", "--config.image_size=8", "--config.mean=(0.5,)",
            "--config.std=(0.5,)", "--config.progress_bar=False"]
    proc = run_eval(*args, "--config.evals.summary.knn_k=20")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "eval.py: error: the summary's knn_temperature, num_clusters are not set and the checkpoint has no "
        "training config.json to take them from; set --config.evals.summary.knn_temperature=... "
        "--config.evals.summary.num_clusters=...")
    proc = run_eval(*args, "--config.evals.summary.knn_k=20", "--config.evals.summary.knn_temperature=0.07",
                    "--config.evals.summary.num_clusters=(10,)")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "eval.py: error: the summary's NMI needs the key encoder and the training run's config.json: pass a "
        "train.py workdir as --checkpoint, or set --config.evals.summary.num_clusters=()")
    assert os.listdir(os.path.join(enc, "eval")) == []


@pytest.mark.slow
def test_semisup_fraction_lr_history(gray_encoder, tmp_path):
    ctx, cfg = _ctx(gray_encoder, tmp_path, dataset="digits", train_split="train", eval_split="test",
                    image_size=8, mean=(0.5,), std=(0.5,), pipeline="memory", embed_batch=256)
    cfg.evals.semisup.update(split_file=None, fraction=0.05, epochs=2, milestones=(1,), batch_size=256)
    res, line = semisup.run(ctx, cfg.evals.semisup)
    assert res["num_labelled"] == 72 and 0 <= res["top1"] <= res["top5"] <= 100
    scale = 72 / 256  # one batch of all 72 labelled samples (a multiple of the 8 devices)
    h = res["history"]
    assert h[0]["trunk_lr"] == pytest.approx(0.005 * scale) and h[0]["head_lr"] == pytest.approx(0.02 * scale)
    assert (h[1]["trunk_lr"] == pytest.approx(0.0005 * scale)
            and h[1]["head_lr"] == pytest.approx(0.002 * scale))
    assert os.path.isfile(tmp_path / "semisup_subset_0.05_seed0.npz") and "72 labelled images" in line


def test_eval_configs_load():
    assert eval_digits.get_config().evals.knn.ks == (10, 20, 100, 200)
    c = eval_imagenet.get_config("semisup10")
    assert (c.evals.semisup.split_file == "splits/10percent.txt" and c.evals.linear.lr == 5.0
            and c.evals.linear.epochs == 100)
    c.split_dir = "/data/splits"  # the split file follows its folder
    assert c.evals.semisup.split_file == "/data/splits/10percent.txt"
    assert c.evals.linear.milestones == (60, 80) and c.evals.linear.momentum == 0.9
    assert c.evals.knn.temperature == 0.07
    # linear_fast: the linear protocol's settings under its own entry (no remapping)
    assert dict(c.evals.linear_fast) == dict(c.evals.linear, type="linear_fast")
    from hcsc_jax import evaluators  # every entry of the eval configs names a protocol (no remapping)
    for config in (eval_digits.get_config(), c, eval_imagenet.get_config("runlocal")):
        assert {evaluators.protocol(n, e) for n, e in config.evals.items()} == set(evaluators.PROTOCOLS)
    with pytest.raises(ValueError, match="unknown variant"):
        eval_imagenet.get_config("nope")
    assert isinstance(c, ml_collections.ConfigDict)


def test_an_imported_encoder_evaluates_on_a_dataset_named_alone_with_its_standard_splits():
    """`eval.py --checkpoint=runs/hcsc_imported --config.dataset=digits` (README) stopped asking for
    train_split and eval_split: a dataset with standard splits gets them; one without is asked.
    The input settings no config gives are a training config's defaults."""
    from configs import default

    enc = dict(image_size=16, mean=[0.5], std=[0.5])
    for dataset, splits in (("digits", ("train", "test")), ("folder:/data/imagenet", ("train", "val")),
                            ("tfds:imagenet2012", ("train", "validation"))):
        d = common.data_spec(ml_collections.ConfigDict(dict(dataset=dataset)), None, enc)
        assert (d.train_split, d.eval_split) == splits, dataset
    inputs = ("pipeline", "num_workers", "prefetch", "bad_images", "max_pixels")  # a training config's
    assert [getattr(d, k) for k in inputs] == [default.get_config().input[k] for k in inputs]
    given = common.data_spec(ml_collections.ConfigDict(dict(dataset="digits", eval_split="train")), None, enc)
    assert (given.train_split, given.eval_split) == ("train", "train")  # what is given wins
    with pytest.raises(common.EvalError, match=r"give train_split, eval_split; set them with "
                                               r"--config.train_split=\.\.\. --config.eval_split=\.\.\."):
        common.data_spec(ml_collections.ConfigDict(dict(dataset="prepared:/data/copy")), None, enc)


def test_the_raw_pixel_reference_is_the_center_crop_through_the_same_evaluators(tmp_path):
    """--checkpoint=pixels: features are the flattened, normalized center crops the encoders see,
    and its kNN is the weighted vote of cosine similarities of those pixels (NumPy, by hand)."""
    from hcsc_jax.data import augmentations

    config = eval_digits.get_config()
    config.update(dataset="digits", image_size=16, mean=(0.5,), std=(0.5,), progress_bar=False)
    ctx = common.from_checkpoint(config, "pixels", None, sharding.make_mesh(), out=str(tmp_path))
    crop = lambda split: np.asarray(augmentations.center_crop(
        sources.load_dataset("digits", split).images, 16, (0.5,), (0.5,))).reshape(-1, 256)
    train, test = crop("train"), crop("test")
    np.testing.assert_allclose(ctx.features("train"), train, atol=1e-6)
    res, _ = knn.run(ctx, ml_collections.ConfigDict(dict(ks=(20,), temperature=0.07)))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit(test.astype(np.float64)) @ unit(train.astype(np.float64)).T
    top = np.argsort(-sim, axis=1)[:, :20]
    labels = ctx.labels("train")
    votes = np.zeros((len(test), 10))
    for i in range(len(test)):
        np.add.at(votes[i], labels[top[i]], np.exp(sim[i, top[i]] / 0.07))
    want = 100 * np.mean(votes.argmax(1) == ctx.labels("test"))
    assert abs(res["per_k"]["20"]["top1"] - want) < 1e-6
    with pytest.raises(common.EvalError, match="has no config.json"):
        common.from_checkpoint(config, f"pixels:{tmp_path}", None, sharding.make_mesh())
