"""Evaluation of frozen features (spec §7): weighted kNN, linear classifier, clustering NMI/AMI.

Features are L2-normalised here; kNN votes are weighted by exp(sim / T) (InstDisc / MoCo
protocol) and computed in blocks of test samples, so memory stays (block, N_train).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import metrics as skm
from tqdm.auto import tqdm


@jax.jit
def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(train_feats, train_labels, test_feats, *, k=20, temperature=0.07, num_classes=None,
                block=1024):
    """Weighted kNN class scores. train_feats (N, F), train_labels (N,) int, test_feats (T, F)
    -> (T, C) float32 vote totals (C = num_classes or max label + 1). `k` may also be a tuple of
    k values: then -> {k: (T, C)}, from one similarity pass and one top-k with the largest k."""
    ks = tuple(k) if isinstance(k, (tuple, list)) else (k,)
    train_labels = np.asarray(train_labels)
    if max(ks) > len(train_labels):
        raise ValueError(f"k = {max(ks)} is larger than the {len(train_labels)} training samples; use a smaller k")
    num_classes = int(num_classes or train_labels.max() + 1)
    train = _normalize(jnp.asarray(train_feats, jnp.float32))
    labels = jnp.asarray(train_labels, jnp.int32)

    @jax.jit
    def votes(test):
        sim = _normalize(test) @ train.T  # (b, N)
        top_sim, top_idx = jax.lax.top_k(sim, max(ks))  # sorted, so the first k are the k nearest
        weighted = jnp.exp(top_sim / temperature)[..., None] * jax.nn.one_hot(labels[top_idx], num_classes)
        return [weighted[:, :kk].sum(axis=1) for kk in ks]  # (b, C) per k

    test_feats = np.asarray(test_feats, np.float32)
    blocks = [jax.device_get(votes(jnp.asarray(test_feats[i : i + block])))
              for i in range(0, len(test_feats), block)]
    out = {kk: (np.concatenate([bl[j] for bl in blocks]) if blocks else np.zeros((0, num_classes), np.float32))
           for j, kk in enumerate(ks)}
    return out if isinstance(k, (tuple, list)) else out[k]


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, *, k=20, temperature=0.07,
                 num_classes=None) -> float:
    """Top-1 accuracy (in [0, 1]) of `knn_predict`."""
    scores = knn_predict(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                         num_classes=num_classes)
    return float(np.mean(scores.argmax(1) == np.asarray(test_labels)))


def nmi(assignments, labels) -> float:
    """Normalised mutual information between a clustering and the labels (scikit-learn)."""
    return float(skm.normalized_mutual_info_score(np.asarray(labels), np.asarray(assignments)))


# ----------------------------------------------------------------------------- eval.py protocols

KNN_KS = (10, 20, 100, 200)


def topk_accuracy(scores, labels, k: int) -> float:
    """Fraction of rows whose label is among the `k` highest scores (k clipped to the number of
    classes, so top-5 with fewer than 5 classes is 1)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == labels[:, None]).any(axis=1)))


def knn_evaluate(train_feats, train_labels, test_feats, test_labels, *, ks=KNN_KS, temperature=0.07,
                 num_classes=None) -> dict[str, Any]:
    """Weighted kNN (spec §7) for every k in `ks` -> {"per_k": {k: {"top1", "top5"}}, "best_k",
    "best_top1"} (accuracies in percent). Raises ValueError if any k exceeds the training set."""
    n = len(train_labels)
    too_big = [k for k in ks if k > n]
    if too_big:
        raise ValueError(f"k = {too_big} larger than the {n} training samples; use smaller knn_ks")
    test_labels = np.asarray(test_labels)
    all_scores = knn_predict(train_feats, train_labels, test_feats, k=tuple(ks), temperature=temperature,
                             num_classes=num_classes)
    per_k = {}
    for k, scores in all_scores.items():
        per_k[int(k)] = dict(top1=100 * topk_accuracy(scores, test_labels, 1),
                             top5=100 * topk_accuracy(scores, test_labels, 5))
    best = max(per_k, key=lambda k: per_k[k]["top1"])
    return dict(per_k=per_k, best_k=best, best_top1=per_k[best]["top1"], temperature=temperature)


def linear_lr_schedule(base_lr: float, batch_size: int, steps_per_epoch: int, milestones=(60, 80),
                       gamma: float = 0.1) -> optax.Schedule:
    """Step LR of the linear protocol: base_lr * batch / 256, times `gamma` from each milestone
    epoch on (the schedule is indexed by optimizer step)."""
    lr = base_lr * batch_size / 256
    return optax.piecewise_constant_schedule(lr, {int(m) * steps_per_epoch: gamma for m in milestones})


def init_linear(key, feat_dim: int, num_classes: int) -> dict:
    """Linear layer initialised N(0, 0.01) (std 0.01), bias 0 (MoCo linear protocol)."""
    return dict(w=0.01 * jax.random.normal(key, (feat_dim, num_classes), jnp.float32),
                b=jnp.zeros((num_classes,), jnp.float32))


def linear_logits(params, x):
    return x @ params["w"] + params["b"]


def train_linear(features_fn, labels, feat_dim: int, num_classes: int, *, epochs: int = 100,
                 base_lr: float = 5.0, batch_size: int = 256, milestones=(60, 80), gamma: float = 0.1,
                 momentum: float = 0.9, seed: int = 0, progress: bool = True, desc: str = "linear"):
    """Trains a linear classifier with SGD (momentum, no weight decay) on features of the training
    set. `features_fn(indices (B,) np.int32, key) -> (B, feat_dim)` gives the (possibly augmented)
    features of a batch; `labels` (N,) int. -> (params, history) with history a list of
    {"epoch", "loss", "lr"} per epoch."""
    labels = np.asarray(labels, np.int32)
    n = len(labels)
    if n == 0:
        raise ValueError("no training samples for the linear classifier")
    steps_per_epoch = math.ceil(n / batch_size)
    schedule = linear_lr_schedule(base_lr, batch_size, steps_per_epoch, milestones, gamma)
    tx = optax.sgd(schedule, momentum=momentum)
    key = jax.random.PRNGKey(seed)
    key, init_key = jax.random.split(key)
    params = init_linear(init_key, feat_dim, num_classes)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(linear_logits(p, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    history = []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", dynamic_ncols=True, disable=not progress)
    rng = np.random.default_rng(seed)
    global_step = 0
    for epoch in bar:
        perm = rng.permutation(n).astype(np.int32)
        losses = []
        lr = float(schedule(global_step))
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            x = features_fn(idx, jax.random.fold_in(key, global_step))
            params, opt_state, loss = step(params, opt_state, jnp.asarray(x, jnp.float32), jnp.asarray(labels[idx]))
            losses.append(loss)
            global_step += 1
        mean_loss = float(np.mean(jax.device_get(losses)))
        history.append(dict(epoch=epoch, loss=mean_loss, lr=lr))
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.4g}")
    bar.close()
    return params, history


def linear_evaluate(params, feats, labels, batch: int = 4096) -> dict[str, float]:
    """Top-1 / top-5 (percent) of a linear classifier on features."""
    feats = np.asarray(feats, np.float32)
    logits = np.concatenate([np.asarray(linear_logits(params, jnp.asarray(feats[i : i + batch])))
                             for i in range(0, len(feats), batch)]) if len(feats) else np.zeros((0, 1))
    return dict(top1=100 * topk_accuracy(logits, labels, 1), top5=100 * topk_accuracy(logits, labels, 5))


def cluster_evaluate(features, labels, ks, *, niter: int = 20, nredo: int = 1, seed: int = 0) -> dict[int, dict]:
    """faiss k-means on L2-normalised features for each k -> {k: {"nmi", "ami"}} against labels."""
    import faiss

    x = np.asarray(features, np.float32)
    x = np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    labels = np.asarray(labels)
    too_big = [k for k in ks if k > len(x)]
    if too_big:
        raise ValueError(f"k = {too_big} larger than the {len(x)} samples to cluster; use smaller cluster_ks")
    out = {}
    for k in ks:
        km = faiss.Kmeans(x.shape[1], int(k), niter=niter, nredo=nredo, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1_000_000)
        km.train(x)
        _, assign = km.index.search(x, 1)
        out[int(k)] = dict(nmi=nmi(assign[:, 0], labels),
                           ami=float(skm.adjusted_mutual_info_score(labels, assign[:, 0])))
    return out


def label_subset(labels, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced `fraction` of the labelled samples (semi-supervised protocol):
    round(fraction * n_c) per class, at least one, drawn with `seed`; sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picked.append(rng.choice(members, max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int32)
