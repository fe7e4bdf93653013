"""Weighted kNN on frozen features (the authors' eval_knn.py, InstDisc / DINO protocol).

L2-normalized pooled features, cosine similarity, the k nearest training samples vote for their
class with weight exp(sim / T); top-1 / top-5 of the vote totals, for every k in `ks` from one
similarity pass (the largest k's neighbours, sorted, hold every smaller k's).

Chunked so that device memory stays bounded whatever the training set: the test features stay
on the device, the training features stream through in chunks of `train_chunk` rows, and a
running top-k per test sample is merged with each chunk's, `test_block` test rows at a time.
Device memory, in float32 words: T x F (test) + 2 T x k_max (running top-k) + train_chunk x F
+ test_block x train_chunk (similarities) + test_block x C x len(ks) (votes). ImageNet (T = 50k,
F = 2048, k_max = 200, C = 1000) with the defaults: about 0.75 GB.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hcsc_jax.evaluators import common
from hcsc_jax.models import l2_normalize
from hcsc_jax.run import rules

KS = (10, 20, 100, 200)


@functools.partial(jax.jit, static_argnames=("kmax", "block"), donate_argnums=(0, 1))
def _merge_chunk(top_sim, top_idx, test, chunk, offset, n_train, *, kmax: int, block: int):
    """Running top-k (T, kmax) merged with a chunk of training rows (c, F) starting at `offset`
    (rows at or past `n_train` are padding)."""
    chunk = l2_normalize(chunk)
    valid = offset + jnp.arange(chunk.shape[0]) < n_train

    def merge(args):
        ts, ti, tb = args
        sim = jnp.where(valid[None], tb @ chunk.T, -jnp.inf)
        s, i = jax.lax.top_k(sim, kmax)
        cat_s, cat_i = jnp.concatenate([ts, s], 1), jnp.concatenate([ti, i.astype(jnp.int32) + offset], 1)
        s, j = jax.lax.top_k(cat_s, kmax)
        return s, jnp.take_along_axis(cat_i, j, 1)

    shape = lambda x: x.reshape((-1, block) + x.shape[1:])
    s, i = jax.lax.map(merge, (shape(top_sim), shape(top_idx), shape(test)))
    return s.reshape(top_sim.shape), i.reshape(top_idx.shape)


@functools.partial(jax.jit, static_argnames=("ks", "num_classes"))
def _votes(top_sim, top_idx, labels, temperature, *, ks: tuple, num_classes: int):
    """(b, kmax) sorted neighbours -> per k the (b, C) sums of exp(sim / T) per class."""
    w = jnp.exp(top_sim / temperature)
    cls = labels[top_idx]
    rows = jnp.arange(w.shape[0])[:, None]
    return [jnp.zeros((w.shape[0], num_classes), jnp.float32).at[rows, cls[:, :k]].add(w[:, :k]) for k in ks]


def chunking(t: int, ks, train_chunk: int, test_block: int) -> tuple[int, int, int, int]:
    """-> (k_max, training rows per chunk, test rows per block, test rows padded to whole blocks)
    of a similarity pass of `t` test rows (`knn_scores`)."""
    kmax = max(ks)
    block = max(1, min(test_block, t))
    return kmax, max(train_chunk, kmax), block, -(-t // block) * block


def abstract_merge_args(t: int, dim: int, ks, train_chunk: int, test_block: int, sharding) -> tuple:
    """(args, static kwargs) of one `_merge_chunk` call of the similarity pass of `t` test rows of
    `dim` features against one chunk of training rows, as `knn_scores` makes them, as
    `jax.ShapeDtypeStruct`s with `sharding`: for compiling it ahead of time (`hcsc_jax.aot`)."""
    kmax, chunk, block, t_pad = chunking(t, ks, train_chunk, test_block)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    args = (spec((t_pad, kmax), jnp.float32), spec((t_pad, kmax), jnp.int32), spec((t_pad, dim), jnp.float32),
            spec((chunk, dim), jnp.float32), spec((), jnp.int32), spec((), jnp.int32))
    return args, dict(kmax=kmax, block=block)


def knn_scores(train_feats, train_labels, test_feats, *, ks=KS, temperature: float = 0.07,
               num_classes: int | None = None, train_chunk: int = 16384, test_block: int = 1024
               ) -> dict[int, np.ndarray]:
    """Weighted kNN vote totals. train_feats (N, F), train_labels (N,) int, test_feats (T, F)
    (any norm; normalized here) -> {k: (T, C) float32}. Raises ValueError if a k exceeds N."""
    train_labels = np.asarray(train_labels)
    n, ks = len(train_labels), tuple(int(k) for k in ks)
    if max(ks) > n:
        raise ValueError(f"k = {[k for k in ks if k > n]} larger than the {n} training samples; "
                         "use smaller k")
    num_classes = int(num_classes or train_labels.max() + 1)
    test = np.asarray(test_feats, np.float32)
    t = len(test)
    kmax, chunk, block, t_pad = chunking(t, ks, train_chunk, test_block)
    test_dev = l2_normalize(jnp.asarray(np.pad(test, ((0, t_pad - t), (0, 0)))))
    top_sim = jnp.full((t_pad, kmax), -jnp.inf, jnp.float32)
    top_idx = jnp.zeros((t_pad, kmax), jnp.int32)
    train = np.asarray(train_feats)
    for start in range(0, n, chunk):
        part = np.asarray(train[start:start + chunk], np.float32)
        part = np.pad(part, ((0, chunk - len(part)), (0, 0)))
        top_sim, top_idx = _merge_chunk(top_sim, top_idx, test_dev, part, np.int32(start), np.int32(n),
                                        kmax=kmax, block=block)
    labels = jnp.asarray(train_labels, jnp.int32)
    out = {k: np.zeros((t, num_classes), np.float32) for k in ks}
    for s in range(0, t, block):
        for k, v in zip(ks, _votes(top_sim[s:s + block], top_idx[s:s + block], labels, temperature, ks=ks,
                                   num_classes=num_classes)):
            out[k][s:s + block] = np.asarray(v)[:t - s]
    return out


def evaluate(train_feats, train_labels, test_feats, test_labels, *, ks=KS, temperature: float = 0.07,
             num_classes: int | None = None, **chunking) -> dict[str, Any]:
    """`knn_scores` -> {"per_k": {k: {"top1", "top5"}}, "best_k", "best_top1", "temperature"},
    accuracies in percent."""
    scores = knn_scores(train_feats, train_labels, test_feats, ks=ks, temperature=temperature,
                        num_classes=num_classes, **chunking)
    per_k = {k: common.accuracies(s, test_labels) for k, s in scores.items()}
    best = max(per_k, key=lambda k: per_k[k]["top1"])
    return dict(per_k=per_k, best_k=best, best_top1=per_k[best]["top1"], temperature=temperature)


def run(ctx: common.Context, cfg) -> tuple[dict, str]:
    """kNN of the eval split against the train split (cfg: ks, temperature, train_chunk, test_block)."""
    d = ctx.data
    train_labels = ctx.labels(d.train_split)
    common.check_ks(cfg.ks, len(train_labels), "kNN", f"{d.dataset}:{d.train_split}", "--config.evals.knn.ks")
    res = evaluate(ctx.features(d.train_split), train_labels, ctx.features(d.eval_split),
                   ctx.labels(d.eval_split), ks=tuple(cfg.ks), temperature=cfg.temperature,
                   num_classes=ctx.num_classes(), train_chunk=cfg.get("train_chunk", 16384),
                   test_block=cfg.get("test_block", 1024))
    res["per_k"] = {str(k): v for k, v in res["per_k"].items()}
    per_k = "  ".join(f"k={k}: {v['top1']:.2f}" for k, v in res["per_k"].items())
    return res, (f"knn step {ctx.encoder.step}: top-1 {per_k} "
                 f"(best {res['best_top1']:.2f}% at k={res['best_k']})")


# The settings of a `config.evals` entry of this protocol (besides `type` and `every_epochs`):
# what each takes, those with a default here, and the counts the training set must cover.
SETTINGS = {"ks": rules.tuple_of(rules.CLUSTERS, 1), "temperature": rules.TEMPERATURE,
            "train_chunk": rules.integer(1, 2**24), "test_block": rules.integer(1, 2**20)}
DEFAULTED = ("train_chunk", "test_block")
SIZED = ("ks",)
PROTOCOLS = {"knn": run}
