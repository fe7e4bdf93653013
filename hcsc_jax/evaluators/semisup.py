"""Semi-supervised fine-tuning on 1% / 10% of the labels (the authors' eval_semisup.py, docs/method.md §7).

The labelled subset is either a split file (`cfg.split_file`: the authors' / SimCLR's
1percent.txt or 10percent.txt, one training file name per line such as n01440764_10026.JPEG,
matched against the dataset's file names: an image folder's, or TFDS's "file_name") or a
class-balanced random `cfg.fraction` of the training split (any dataset). The encoder and a
linear head are fine-tuned on RandomResizedCrop + flip of the subset with BN in train mode over
the whole batch: SGD momentum 0.9, no weight decay, trunk lr 0.005 and head lr 0.02 (x batch /
256), 70 epochs, x0.1 at 30 and 60; top-1 / top-5 on center crops of the eval split.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from hcsc_jax import distributed, models, sharding
from hcsc_jax import features as features_lib
from hcsc_jax.data import pipeline, sources
from hcsc_jax.data.crops import CropSpec
from hcsc_jax.evaluators import common, linear
from hcsc_jax.run import rules
from hcsc_jax.run import workdir as workdir_lib


def read_split_file(path: str) -> list[str]:
    """The file names listed in a split file (local or a bucket), one per line (blank lines
    ignored). Names must be bare file names: a line with a folder part (`../val/x.JPEG`) would
    match the image of that name in another folder, so it is an error naming the line."""
    path = workdir_lib.path(path)
    if not path.is_file():
        raise common.EvalError(f"split file {path} does not exist; use the authors' "
                               "1percent.txt / 10percent.txt (--config.evals.semisup.split_file) "
                               "or a --config.evals.semisup.fraction without one")
    names = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        name = line.strip()
        if "/" in name or "\\" in name:
            raise common.EvalError(f"split file {path} line {number}: {name!r} is not a bare file name; list "
                                   "file names only (as the authors' 1percent.txt: n01440764_10026.JPEG)")
        if name:
            names.append(name)
    if not names:
        raise common.EvalError(f"split file {path} lists no file names")
    return names


def match_names(names: list[str], file_names, where: str) -> np.ndarray:
    """Sorted indices (M,) int32 of the examples whose file name is listed in `names`; every name
    must match exactly one example."""
    if file_names is None:
        raise common.EvalError(f"{where} has no file names to match a split file against "
                               "(image folders and TFDS datasets with a 'file_name' feature have); "
                               "use --config.evals.semisup.fraction")
    index = {os.path.basename(n): i for i, n in enumerate(file_names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise common.EvalError(f"{len(missing)} of the {len(names)} names in the split file match no "
                               f"image of {where}, e.g. {', '.join(missing[:5])}; "
                               "is it the right dataset and split?")
    return np.sort(np.unique([index[n] for n in names])).astype(np.int32)


def label_subset(labels, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced `fraction` of the samples: round(fraction * n_c) of each
    class c, at least one, drawn with `seed`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), max(1, round(fraction * np.sum(labels == c))),
                         replace=False)
              for c in np.unique(labels)]
    return np.sort(np.concatenate(picked)).astype(np.int32)


def labelled_subset(ctx: common.Context, cfg) -> np.ndarray:
    """The indices of the labelled training examples (split file, else class-balanced fraction)."""
    d = ctx.data
    if cfg.get("split_file"):
        names = read_split_file(cfg.split_file)
        inp = ctx.input(d.train_split)  # a streamed input has its source; a resident one keeps no names
        source = (inp.source if isinstance(inp, pipeline.StreamInput)
                  else sources.open_source(d.dataset, d.train_split, d.data_dir))
        return match_names(names, source.file_names, f"{d.dataset}:{d.train_split}")
    try:
        return label_subset(ctx.labels(d.train_split), cfg.fraction, ctx.seed)
    except ValueError as err:
        raise common.EvalError(f"{err} (--config.evals.semisup.fraction)") from None


def run(ctx: common.Context, cfg) -> tuple[dict, str]:
    """Fine-tunes encoder + linear head on the labelled subset; top-1 / top-5 on the eval split."""
    d, e = ctx.data, ctx.encoder
    subset = labelled_subset(ctx, cfg)
    labels = ctx.labels(d.train_split)[subset]
    n = len(subset)
    devices = ctx.mesh.size
    batch = min(int(cfg.batch_size), n) // devices * devices
    if batch == 0:
        raise common.EvalError(f"{n} labelled images are fewer than the {devices} devices; label more")
    if ctx.out_dir is not None and distributed.is_main():  # the labelled subset, for reuse and audit
        tag = (os.path.basename(cfg.split_file) if cfg.get("split_file")
               else f"{cfg.fraction:g}_seed{ctx.seed}")
        workdir_lib.save_npz(ctx.out_dir / f"semisup_subset_{tag}.npz", dict(indices=subset))
    train = ctx.input(d.train_split, crops=(CropSpec(d.image_size, tuple(cfg.scale)),),
                      batch=batch, indices=subset)
    spe = train.steps_per_epoch
    scheds = {part: linear.lr_schedule(lr, batch, spe, tuple(cfg.milestones), cfg.gamma)
              for part, lr in (("trunk", cfg.trunk_lr), ("head", cfg.head_lr))}
    tx = optax.multi_transform({p: optax.sgd(s, momentum=cfg.momentum) for p, s in scheds.items()},
                               {"trunk": "trunk", "head": "head"})
    # BN in train mode over the whole global batch (no BN groups): the same weights.
    graphdef_ft = nnx.split(models.build_encoder(dict(e.meta, bn_group_size=None), abstract=True),
                            nnx.Param, nnx.BatchStat)[0]
    aug = ctx.crop_config(cfg.scale, cfg.flip)
    replicated = sharding.replicated(ctx.mesh)
    key = jax.random.key(ctx.seed)
    feat_dim = ctx.feature_dim()
    head = linear.init_head(jax.random.fold_in(key, 1 << 30), feat_dim, ctx.num_classes())
    params = jax.device_put({"trunk": e.params, "head": head}, replicated)
    stats, opt_state = e.stats, jax.device_put(tx.init(params), replicated)

    @jax.jit
    def step(params, opt_state, stats, key, *inputs):
        x, y = common.labelled_views(key, inputs, aug)

        def loss_fn(p):
            feats, _, new_stats = models.apply_model(graphdef_ft, p["trunk"], stats, x, train=True)
            out = linear.logits(p["head"], feats.astype(jnp.float32))
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_stats, loss

    history, gstep = [], 0
    assign = labels[:, None].astype(np.int32)
    bar = tqdm(range(cfg.epochs), desc=f"semisup {n} labels", unit="epoch", dynamic_ncols=True,
               disable=not (ctx.progress and distributed.is_main()))
    for epoch in bar:
        lrs = tuple(float(s(gstep)) for s in scheds.values())
        losses = []
        for inputs in train.steps(epoch, 0, assign):
            params, opt_state, stats, loss = step(params, opt_state, stats, jax.random.fold_in(key, gstep),
                                                  *inputs)
            losses.append(loss)
            gstep += 1
        history.append(dict(epoch=epoch, loss=float(np.mean(jax.device_get(losses))), trunk_lr=lrs[0],
                            head_lr=lrs[1]))
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", lr=f"{lrs[0]:.3g}/{lrs[1]:.3g}")
    bar.close()
    train.close()
    mean, std = ctx.mean_std
    test_feats, _ = features_lib.embed_input(e.graphdef, params["trunk"], stats, ctx.input(d.eval_split),
                                             d.image_size, mean, std, ctx.batch)
    res = linear.evaluate_head(params["head"], test_feats, ctx.labels(d.eval_split))
    res.update(num_labelled=int(n), fraction=n / len(ctx.labels(d.train_split)), history=history,
               protocol=cfg.to_dict())
    return res, (f"semisup ({n} labelled images, {100 * res['fraction']:.3g}%) step {e.step}: "
                 f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")


# The settings of a `config.evals` entry of this protocol (besides `type` and `every_epochs`):
# what each takes, those with a default here, and the counts the training set must cover.
SETTINGS = {**{k: r for k, r in linear.SETTINGS.items() if k not in ("lr", "checkpoint_every_steps")},
            "split_file": rules.optional(rules.text(), note="None: a class-balanced fraction"),
            "fraction": rules.real(above=0, max=1), "trunk_lr": rules.real(0), "head_lr": rules.LEARNING_RATE}
DEFAULTED = ("split_file",)
SIZED = ()
PROTOCOLS = {"semisup": run}
