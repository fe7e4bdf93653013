"""A training run's end-of-run summary (summary.json): kNN top-1 and the NMI of a hierarchy.

kNN top-1 (a fraction) of the eval split against the train split with the query encoder's pooled
features (`knn.run`, k = `knn_k`, temperature `knn_temperature`), and the NMI against the training
labels of every level of a hierarchical k-means (level sizes `num_clusters`; the run's
`config.clustering` settings, seed `config.seed + 1000 * config.epochs`) of the KEY encoder's
projections of the train split's center crops. It needs `Context.key_encoder` and
`Context.run_config`: the trainer's context, or eval.py on a train.py workdir (not on an
exported encoder). Parts whose labels are missing are left out.
"""

from __future__ import annotations

import ml_collections

from hcsc_jax import features
from hcsc_jax.evaluators import cluster, common, knn
from hcsc_jax.run import rules

# The settings of a `config.evals` entry of this protocol (besides `type` and `every_epochs`):
# what each takes, those with a default here, and the counts the training set must cover.
SETTINGS = {"knn_k": rules.CLUSTERS, "knn_temperature": rules.TEMPERATURE,
            "num_clusters": rules.tuple_of(rules.CLUSTERS)}
DEFAULTED = ()
SIZED = ("knn_k", "num_clusters")


def settings(ctx: common.Context, cfg) -> ml_collections.ConfigDict:
    """The entry's `SETTINGS`, those left unset (None, as in the eval configs) taken from the
    summary entry of the training run's config (`ctx.run_config`; a config.json written before
    `evals` held it: its `eval` section). EvalError naming the flag when neither has one."""
    run, own = ctx.run_config, {}
    if run is not None:
        entries = [e for n, e in run.get("evals", {}).items() if e.get("type", n) == "summary"]
        own = entries[0] if entries else run.get("eval", {})
    out = {key: own.get(key) if cfg.get(key) is None else cfg.get(key) for key in SETTINGS}
    missing = [key for key, value in out.items() if value is None]
    if missing:
        raise common.EvalError(f"the summary's {', '.join(missing)} are not set and the checkpoint has no "
                               "training config.json to take them from; set "
                               + " ".join(f"--config.evals.summary.{key}=..." for key in missing))
    return ml_collections.ConfigDict(out)


def run(ctx: common.Context, cfg) -> tuple[dict, str]:
    """-> ({"knn_top1": fraction, "nmi_per_level": [...], "num_clusters": [...]}, one line)
    (cfg: knn_k, knn_temperature, num_clusters, see `settings`; empty num_clusters: no NMI)."""
    cfg = settings(ctx, cfg)
    missing = [what for what, v in (("the key encoder", ctx.key_encoder),
                                    ("the training run's config.json", ctx.run_config)) if v is None]
    if cfg.num_clusters and missing:  # (before any feature pass)
        raise common.EvalError(f"the summary's NMI needs {' and '.join(missing)}: pass a train.py "
                               "workdir as --checkpoint, or set --config.evals.summary.num_clusters=()")
    d, result = ctx.data, {}
    train = ctx.input(d.train_split)
    if train.labels is not None and ctx.input(d.eval_split).labels is not None:
        knn_cfg = ml_collections.ConfigDict(dict(ks=(cfg.knn_k,), temperature=cfg.knn_temperature))
        res, _ = knn.run(ctx, knn_cfg)
        result["knn_top1"] = res["best_top1"] / 100
    if train.labels is not None and cfg.num_clusters:
        k, run = ctx.key_encoder, ctx.run_config  # (the seed of the epoch after the run's last)
        final = features.key_hierarchy(k.graphdef, k.params, k.stats, train, ctx.data.image_size,
                                       ctx.mean_std, run.clustering, run.seed + 1000 * run.epochs,
                                       tuple(cfg.num_clusters), ctx.mesh, ctx.batch)
        result["nmi_per_level"] = [cluster.nmi(lv.assignments, train.labels) for lv in final.levels]
        result["num_clusters"] = list(final.num_clusters)
    parts = [f"knn top-1 {100 * result['knn_top1']:.2f}% (k={cfg.knn_k})"] if "knn_top1" in result else []
    if "nmi_per_level" in result:
        parts.append("NMI " + " / ".join(f"{v:.3f}" for v in result["nmi_per_level"])
                     + f" (k {'/'.join(map(str, result['num_clusters']))})")
    return result, f"summary step {ctx.encoder.step}: {', '.join(parts) or 'no labels, nothing to report'}"


PROTOCOLS = {"summary": run}
