"""Evaluation of a trained (or exported) encoder with the spec §7 protocols.

  python eval.py --mode=knn --checkpoint=runs/digits [--step=N]
  python eval.py --mode=linear --checkpoint=runs/digits --config.linear.epochs=100
  python eval.py --mode=linear_fast --checkpoint=runs/digits   # no augmentation, cached features
  python eval.py --mode=cluster --checkpoint=runs/digits --config.cluster.ks="(10,50)"
  python eval.py --mode=semisup --checkpoint=runs/digits --config.semisup.fraction=0.01

--checkpoint is a train.py workdir (its newest readable step, or --step) or a directory written
by checkpoints.export_encoder. Dataset, splits, crop size and normalisation come from the eval
config (configs/eval_digits.py); fields left unset there are read from <checkpoint>/config.json.

Modes:
  knn          weighted kNN on L2-normalised pooled features, k in config.knn_ks, T = 0.07.
  linear       linear classifier on the frozen encoder (inference mode) with RandomResizedCrop
               + flip on the train split, center crop on the eval split (SGD lr 5.0 @ 256,
               momentum 0.9, no wd, config.linear.epochs, x0.1 at config.linear.milestones).
  linear_fast  the same classifier on cached center-crop features (no augmentation): faster,
               not the protocol's number.
  cluster      faiss k-means of the L2-normalised pooled features of the train split for each k in
               config.cluster.ks; NMI and AMI against the labels.
  semisup      fine-tune encoder + linear head on config.semisup.fraction of the train labels
               (class-balanced), trunk lr 0.005 / head lr 0.02 @ 256, 70 epochs, x0.1 at 30 / 60;
               top-1 / top-5 on the eval split.

Results go to <checkpoint>/eval/<mode>_step<N>.json (features are cached there as
features_step<N>_<split>.npz); training outputs are never overwritten. Several processes (one
per host) take the flags of train.py (--coordinator_address, --num_processes, --process_id);
process 0 writes the results (features are then recomputed rather than read from the cache).
"""

import json
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from hcsc_jax import console

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "eval_digits.py"),
    "Evaluation configuration (a Python file with get_config()).", lock_config=True)
_MODE = flags.DEFINE_enum("mode", None, ["knn", "linear", "linear_fast", "cluster", "semisup"], "Evaluation protocol.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or exported encoder directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the newest).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["mode", "checkpoint"])

log = logging.getLogger("hcsc_jax.eval")


class EvalError(Exception):
    """Bad input: reported as one line, exit code 1."""


def resolve_data_config(config, checkpoint: str) -> dict:
    """Dataset fields of the eval config, unset ones filled from <checkpoint>/config.json."""
    run = {}
    path = os.path.join(checkpoint, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            run = json.load(f)
    aug = run.get("augment", {})
    fallback = dict(dataset=run.get("dataset"), data_dir=run.get("data_dir"), train_split=run.get("train_split"),
                    eval_split=run.get("eval_split"), image_size=run.get("image_size"),
                    mean=aug.get("mean"), std=aug.get("std"))
    data = {k: (config[k] if config[k] is not None else v) for k, v in fallback.items()}
    missing = [k for k in ("dataset", "train_split", "eval_split", "image_size", "mean", "std") if data[k] is None]
    if missing:
        raise EvalError(
            f"{checkpoint} has no config.json to take {', '.join(missing)} from; set them with "
            + " ".join(f"--config.{k}=..." for k in missing))
    data["mean"], data["std"] = tuple(float(m) for m in data["mean"]), tuple(float(s) for s in data["std"])
    data["image_size"] = int(data["image_size"])
    return data


class Evaluator:
    """The restored encoder, the data and a feature cache for one (checkpoint, step)."""

    def __init__(self, config, checkpoint: str, step):
        import jax

        from hcsc_jax import checkpoints
        from hcsc_jax import train_step as ts

        self.config, self.checkpoint = config, os.path.abspath(checkpoint)
        if not os.path.exists(self.checkpoint):
            raise EvalError(f"checkpoint path {checkpoint} does not exist")
        try:
            model, meta = checkpoints.load_encoder(self.checkpoint, step)
        except FileNotFoundError as err:
            raise EvalError(f"no encoder found: {err}") from None
        except RuntimeError as err:  # every step of the workdir failed to restore
            raise EvalError(f"{err} (see the warnings above)") from None
        self.meta = meta
        self.step = int(meta.get("step", 0) if step is None else step)
        self.graphdef, self.params, self.stats = ts.split_model(model)
        self.mesh = ts.make_mesh()
        self.params, self.stats = jax.device_put((self.params, self.stats),
                                                 jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        self.data = resolve_data_config(config, self.checkpoint)
        channels = int(meta["in_channels"])
        if len(self.data["mean"]) != channels:
            self.data["mean"], self.data["std"] = self.data["mean"][:channels], self.data["std"][:channels]
        self.out_dir = os.path.join(self.checkpoint, "eval")
        self._sets = {}

    def dataset(self, split: str, need_labels: bool = True):
        from hcsc_jax.data import sources

        if split not in self._sets:
            ds = sources.load_dataset(self.data["dataset"], split, self.data["data_dir"])
            if ds.images.shape[-1] != self.meta["in_channels"]:
                raise EvalError(f"{self.data['dataset']}:{split} has {ds.images.shape[-1]} channels, the "
                                f"encoder expects {self.meta['in_channels']}")
            self._sets[split] = ds
        ds = self._sets[split]
        if need_labels and ds.labels is None:
            raise EvalError(f"dataset {self.data['dataset']} split {split!r} has no labels; "
                            "these evaluation protocols need labelled data")
        return ds

    def features(self, split: str):
        """Pooled center-crop features of a split (cached as .npz next to the results)."""
        import numpy as np

        from hcsc_jax import distributed, trainer

        ds = self.dataset(split)
        # Keyed by step + split in the name; the content check catches a changed dataset / crop /
        # normalisation or different weights under the same step (e.g. a re-exported encoder).
        import jax
        weights = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(self.params)))
        key = dict(dataset=self.data["dataset"], image_size=self.data["image_size"], mean=list(self.data["mean"]),
                   std=list(self.data["std"]), n=len(ds), weights=round(weights, 6))
        path = os.path.join(self.out_dir, f"features_step{self.step}_{split}.npz")
        if self.config.cache_features and jax.process_count() == 1 and os.path.isfile(path):
            with np.load(path) as z:
                if json.loads(str(z["key"])) == key:
                    log.info("features of %s from %s", split, path)
                    return z["features"]
        t0 = time.perf_counter()
        feats, _ = trainer.embed_dataset(self.graphdef, self.params, self.stats, ds.images, self.data["image_size"],
                                         self.data["mean"], self.data["std"], self.mesh, self.config.embed_batch)
        log.info("embedded %d images of %s in %.1fs", len(ds), split, time.perf_counter() - t0)
        if self.config.cache_features and distributed.is_main():
            os.makedirs(self.out_dir, exist_ok=True)
            tmp = path + ".tmp.npz"
            np.savez(tmp, features=feats, key=json.dumps(key))
            os.replace(tmp, path)
        return feats

    def common(self) -> dict:
        return dict(checkpoint=self.checkpoint, step=self.step, dataset=self.data["dataset"],
                    train_split=self.data["train_split"], eval_split=self.data["eval_split"],
                    image_size=self.data["image_size"], model=self.meta["model"])


def run_knn(ev: Evaluator) -> tuple[dict, str]:
    from hcsc_jax import evaluation

    c = ev.config
    train, test = ev.dataset(ev.data["train_split"]), ev.dataset(ev.data["eval_split"])
    too_big = [k for k in c.knn_ks if k > len(train)]
    if too_big:
        raise EvalError(f"kNN k = {too_big} larger than the {len(train)} training samples of "
                        f"{ev.data['dataset']}:{ev.data['train_split']}; set --config.knn_ks to smaller values")
    res = evaluation.knn_evaluate(ev.features(ev.data["train_split"]), train.labels, ev.features(ev.data["eval_split"]),
                                  test.labels, ks=tuple(c.knn_ks), temperature=c.knn_temperature,
                                  num_classes=train.num_classes)
    for k, r in res["per_k"].items():
        print(f"knn k={k:<4d} top1 {r['top1']:6.2f}  top5 {r['top5']:6.2f}")
    res["per_k"] = {str(k): v for k, v in res["per_k"].items()}
    return res, f"knn step {ev.step}: best top-1 {res['best_top1']:.2f}% (k={res['best_k']})"


def _linear_common(ev: Evaluator, fast: bool) -> tuple[dict, str]:
    import jax
    import numpy as np

    from hcsc_jax import distributed, evaluation
    from hcsc_jax import train_step as ts
    from hcsc_jax.data import augment as augment_lib

    c, lc = ev.config, ev.config.linear
    train, test = ev.dataset(ev.data["train_split"]), ev.dataset(ev.data["eval_split"])
    num_classes = int(train.num_classes or max(train.labels.max(), test.labels.max()) + 1)
    train_feats = ev.features(ev.data["train_split"])
    feat_dim = train_feats.shape[1]
    if fast:
        feats_dev = jax.device_put(train_feats)
        features_fn = lambda idx, key: feats_dev[idx]
    else:
        cfg = augment_lib.AugmentConfig(
            crop_size=ev.data["image_size"], scale=tuple(lc.scale), jitter_prob=0.0, grayscale_prob=0.0,
            blur_prob=0.0, flip=bool(lc.flip), mean=ev.data["mean"], std=ev.data["std"])
        graphdef, n_dev = ev.graphdef, ev.mesh.size
        sharded = jax.sharding.NamedSharding(ev.mesh, jax.sharding.PartitionSpec(ts.DATA_AXIS))
        images = train.images

        @jax.jit
        def embed_aug(params, stats, x, key, indices):
            views = augment_lib.augment(key, x, cfg, indices)
            return ts.apply_model(graphdef, params, stats, views, train=False)[0]

        def features_fn(idx, key):
            b = len(idx)
            padded = np.concatenate([idx, np.repeat(idx[:1], (-b) % n_dev)]).astype(np.int32)
            out = embed_aug(ev.params, ev.stats, jax.device_put(images[padded], sharded), key,
                            jax.device_put(padded.astype(np.uint32), sharded))
            return (out if out.is_fully_addressable else distributed.fetch(out))[:b]

    params, history = evaluation.train_linear(
        features_fn, train.labels, feat_dim, num_classes, epochs=lc.epochs, base_lr=lc.lr, batch_size=lc.batch_size,
        milestones=tuple(lc.milestones), gamma=lc.gamma, momentum=lc.momentum, seed=c.seed,
        progress=c.progress_bar, desc="linear_fast" if fast else "linear")
    res = evaluation.linear_evaluate(params, ev.features(ev.data["eval_split"]), test.labels)
    res.update(final_train_loss=history[-1]["loss"] if history else None, history=history,
               protocol=dict(lc.to_dict(), augmented=not fast))
    name = "linear_fast (cached center-crop features, no augmentation)" if fast else "linear"
    return res, f"{name} step {ev.step}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%"


def run_cluster(ev: Evaluator) -> tuple[dict, str]:
    from hcsc_jax import evaluation

    c = ev.config.cluster
    train = ev.dataset(ev.data["train_split"])
    too_big = [k for k in c.ks if k > len(train)]
    if too_big:
        raise EvalError(f"cluster k = {too_big} larger than the {len(train)} training samples; "
                        "set --config.cluster.ks to smaller values")
    per_k = evaluation.cluster_evaluate(ev.features(ev.data["train_split"]), train.labels, tuple(c.ks),
                                        niter=c.niter, nredo=c.nredo, seed=ev.config.seed)
    for k, r in per_k.items():
        print(f"cluster k={k:<6d} NMI {r['nmi']:.4f}  AMI {r['ami']:.4f}")
    summary = ", ".join(f"k={k}: NMI {r['nmi']:.3f} AMI {r['ami']:.3f}" for k, r in per_k.items())
    return {"per_k": {str(k): v for k, v in per_k.items()}}, f"cluster step {ev.step}: {summary}"


def run_semisup(ev: Evaluator) -> tuple[dict, str]:
    """Fine-tunes encoder + linear head on a labelled fraction of the train split (spec §7)."""
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from tqdm.auto import tqdm

    from hcsc_jax import checkpoints, distributed, evaluation, trainer
    from hcsc_jax import train_step as ts
    from hcsc_jax.data import augment as augment_lib

    c, sc = ev.config, ev.config.semisup
    train, test = ev.dataset(ev.data["train_split"]), ev.dataset(ev.data["eval_split"])
    num_classes = int(train.num_classes or max(train.labels.max(), test.labels.max()) + 1)
    subset = evaluation.label_subset(train.labels, sc.fraction, c.seed)
    if distributed.is_main():  # the labelled subset is saved for reuse and audit
        os.makedirs(ev.out_dir, exist_ok=True)
        np.save(os.path.join(ev.out_dir, f"semisup_subset_{sc.fraction:g}_seed{c.seed}.npy"), subset)
    n = len(subset)
    batch = min(int(sc.batch_size), n)
    steps_per_epoch = max(1, n // batch)  # drop the last partial batch
    trunk_sched = evaluation.linear_lr_schedule(sc.trunk_lr, batch, steps_per_epoch, tuple(sc.milestones), sc.gamma)
    head_sched = evaluation.linear_lr_schedule(sc.head_lr, batch, steps_per_epoch, tuple(sc.milestones), sc.gamma)
    tx = optax.multi_transform({"trunk": optax.sgd(trunk_sched, momentum=sc.momentum),
                                "head": optax.sgd(head_sched, momentum=sc.momentum)},
                               {"trunk": "trunk", "head": "head"})
    # Train-mode BN over the whole (possibly small) batch: the same weights, no BN groups.
    graphdef_ft = nnx.split(checkpoints.build_encoder(dict(ev.meta, bn_group_size=None), abstract=True),
                            nnx.Param, nnx.BatchStat)[0]
    cfg = augment_lib.AugmentConfig(
        crop_size=ev.data["image_size"], scale=tuple(sc.scale), jitter_prob=0.0, grayscale_prob=0.0,
        blur_prob=0.0, flip=bool(sc.flip), mean=ev.data["mean"], std=ev.data["std"])
    # Everything replicated over the mesh (as the restored weights are), so the step's inputs and
    # outputs carry the same shardings and it compiles once.
    dev = jax.sharding.NamedSharding(ev.mesh, jax.sharding.PartitionSpec())
    key = jax.random.PRNGKey(c.seed)
    key, init_key = jax.random.split(key)
    feat_dim = ev.features(ev.data["eval_split"]).shape[1]
    params = jax.device_put({"trunk": ev.params, "head": evaluation.init_linear(init_key, feat_dim, num_classes)}, dev)
    stats = jax.device_put(ev.stats, dev)
    opt_state = jax.device_put(tx.init(params), dev)

    @jax.jit
    def step(params, opt_state, stats, images, key, y):
        views = augment_lib.augment(key, images, cfg)

        def loss_fn(p):
            feats, _, new_stats = ts.apply_model(graphdef_ft, p["trunk"], stats, views, train=True)
            logits = evaluation.linear_logits(p["head"], feats)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_stats, loss

    rng = np.random.default_rng(c.seed)
    history, global_step = [], 0
    bar = tqdm(range(sc.epochs), desc=f"semisup {sc.fraction:g}", unit="epoch", dynamic_ncols=True,
               disable=not c.progress_bar)
    for epoch in bar:
        perm = subset[rng.permutation(n)]
        losses = []
        lrs = (float(trunk_sched(global_step)), float(head_sched(global_step)))
        for s in range(steps_per_epoch):
            idx = perm[s * batch : (s + 1) * batch]
            params, opt_state, stats, loss = step(params, opt_state, stats, jax.device_put(train.images[idx], dev),
                                                  jax.random.fold_in(key, global_step),
                                                  jax.device_put(train.labels[idx], dev))
            losses.append(loss)
            global_step += 1
        mean_loss = float(np.mean(jax.device_get(losses)))
        history.append(dict(epoch=epoch, loss=mean_loss, trunk_lr=lrs[0], head_lr=lrs[1]))
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lrs[0]:.3g}/{lrs[1]:.3g}")
    bar.close()
    test_feats, _ = trainer.embed_dataset(ev.graphdef, params["trunk"], stats, test.images, ev.data["image_size"],
                                          ev.data["mean"], ev.data["std"], ev.mesh, c.embed_batch)
    res = evaluation.linear_evaluate(params["head"], test_feats, test.labels)
    res.update(num_labelled=int(n), fraction=float(sc.fraction), history=history, protocol=sc.to_dict())
    return res, (f"semisup ({100 * sc.fraction:g}% labels, {n} samples) step {ev.step}: "
                 f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")


MODES = {"knn": run_knn, "linear": lambda ev: _linear_common(ev, False),
         "linear_fast": lambda ev: _linear_common(ev, True), "cluster": run_cluster,
         "semisup": run_semisup}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup()
    from hcsc_jax import distributed

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not distributed.is_main():  # process 0 prints and writes the results
        logging.getLogger("hcsc_jax").setLevel(logging.WARNING)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    mode = _MODE.value
    try:
        ev = Evaluator(_CONFIG.value, _CHECKPOINT.value, _STEP.value)
        result, line = MODES[mode](ev)
    except (EvalError, ValueError) as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    if not distributed.is_main():
        return
    result = dict(ev.common(), mode=mode, **result, config=_CONFIG.value.to_dict())
    os.makedirs(ev.out_dir, exist_ok=True)
    path = os.path.join(ev.out_dir, f"{mode}_step{ev.step}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
    print(line)
    print(f"results: {path}")


if __name__ == "__main__":
    app.run(main)
