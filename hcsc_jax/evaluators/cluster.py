"""k-means of frozen features against the labels (docs/method.md §7): NMI and AMI for each k.

faiss k-means on the L2-normalized pooled features of the training split (ImageNet: k = 1000 and
25000). At that scale faiss trains on `max_points_per_centroid` x k sampled points (its default
256) and then assigns every point.
"""

from __future__ import annotations

import numpy as np

from hcsc_jax.evaluators import common
from hcsc_jax.models import l2_normalize
from hcsc_jax.run import rules


def nmi(assignments, labels) -> float:
    """Normalized mutual information between a clustering and the labels (scikit-learn)."""
    from sklearn import metrics as skm  # (here: 1-2 s of imports a usage error does not need)

    return float(skm.normalized_mutual_info_score(np.asarray(labels), np.asarray(assignments)))


def evaluate(features, labels, ks, *, niter: int = 20, nredo: int = 1, seed: int = 0,
             max_points_per_centroid: int = 256) -> dict[int, dict]:
    """faiss k-means of L2-normalized (N, F) features for each k -> {k: {"nmi", "ami"}}."""
    import faiss
    from sklearn import metrics as skm

    x = np.asarray(features, np.float32)
    x = np.ascontiguousarray(l2_normalize(x, axis=1))
    labels = np.asarray(labels)
    too_big = [k for k in ks if k > len(x)]
    if too_big:
        raise ValueError(f"k = {too_big} larger than the {len(x)} samples to cluster; use smaller ks")
    out = {}
    for k in ks:
        km = faiss.Kmeans(x.shape[1], int(k), niter=niter, nredo=nredo, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max_points_per_centroid)
        km.train(x)
        _, assign = km.index.search(x, 1)
        out[int(k)] = dict(nmi=nmi(assign[:, 0], labels),
                           ami=float(skm.adjusted_mutual_info_score(labels, assign[:, 0])))
    return out


def run(ctx: common.Context, cfg) -> tuple[dict, str]:
    """NMI / AMI of k-means of the train split's features (cfg: ks, niter, nredo, max_points_per_centroid)."""
    d = ctx.data
    labels = ctx.labels(d.train_split)
    common.check_ks(cfg.ks, len(labels), "cluster", f"{d.dataset}:{d.train_split}",
                    "--config.evals.cluster.ks")
    per_k = evaluate(ctx.features(d.train_split), labels, tuple(cfg.ks), niter=cfg.niter, nredo=cfg.nredo,
                     seed=ctx.seed, max_points_per_centroid=cfg.get("max_points_per_centroid", 256))
    summary = ", ".join(f"k={k}: NMI {r['nmi']:.3f} AMI {r['ami']:.3f}" for k, r in per_k.items())
    return {"per_k": {str(k): v for k, v in per_k.items()}}, f"cluster step {ctx.encoder.step}: {summary}"


# The settings of a `config.evals` entry of this protocol (besides `type` and `every_epochs`):
# what each takes, those with a default here, and the counts the training set must cover.
SETTINGS = {"ks": rules.tuple_of(rules.CLUSTERS, 1), "niter": rules.NITER, "nredo": rules.NREDO,
            "max_points_per_centroid": rules.integer(1)}
DEFAULTED = ("max_points_per_centroid",)
SIZED = ("ks",)
PROTOCOLS = {"cluster": run}
