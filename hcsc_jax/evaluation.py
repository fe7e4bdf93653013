"""Evaluation of frozen features (spec §7): weighted kNN and clustering NMI.

Features are L2-normalised here; kNN votes are weighted by exp(sim / T) (InstDisc / MoCo
protocol) and computed in blocks of test samples, so memory stays (block, N_train).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import metrics as skm


@jax.jit
def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(train_feats, train_labels, test_feats, *, k=20, temperature=0.07, num_classes=None,
                block=1024) -> np.ndarray:
    """Weighted kNN class scores. train_feats (N, F), train_labels (N,) int, test_feats (T, F)
    -> (T, C) float32 vote totals (C = num_classes or max label + 1)."""
    train_labels = np.asarray(train_labels)
    if k > len(train_labels):
        raise ValueError(f"k = {k} is larger than the {len(train_labels)} training samples; use a smaller k")
    num_classes = int(num_classes or train_labels.max() + 1)
    train = _normalize(jnp.asarray(train_feats, jnp.float32))
    labels = jnp.asarray(train_labels, jnp.int32)

    @jax.jit
    def votes(test):
        sim = _normalize(test) @ train.T  # (b, N)
        top_sim, top_idx = jax.lax.top_k(sim, k)
        weights = jnp.exp(top_sim / temperature)
        onehot = jax.nn.one_hot(labels[top_idx], num_classes)  # (b, k, C)
        return jnp.einsum("bk,bkc->bc", weights, onehot)

    test_feats = np.asarray(test_feats, np.float32)
    out = [np.asarray(votes(jnp.asarray(test_feats[i : i + block]))) for i in range(0, len(test_feats), block)]
    return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, *, k=20, temperature=0.07,
                 num_classes=None) -> float:
    """Top-1 accuracy (in [0, 1]) of `knn_predict`."""
    scores = knn_predict(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                         num_classes=num_classes)
    return float(np.mean(scores.argmax(1) == np.asarray(test_labels)))


def nmi(assignments, labels) -> float:
    """Normalised mutual information between a clustering and the labels (scikit-learn)."""
    return float(skm.normalized_mutual_info_score(np.asarray(labels), np.asarray(assignments)))
