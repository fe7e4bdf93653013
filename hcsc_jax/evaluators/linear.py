"""Linear classification on a frozen encoder (the authors' eval_lincls_imagenet.py, docs/method.md §7).

`run` is the protocol: the encoder in inference mode, RandomResizedCrop(image_size, scale
0.08-1) + flip of the training split (crops on the hosts when streamed, on the devices when
resident), a linear layer on the pooled features initialized N(0, 0.01), SGD momentum 0.9, no
weight decay, lr 5.0 x batch / 256, 100 epochs, x0.1 at epochs 60 and 80 (step schedule, no
cosine); top-1 / top-5 on center crops of the eval split. Each epoch visits
`loader.epoch_order(seed, epoch, ...)` in whole batches (the last partial batch is dropped).

It is resumable: head, optimizer state, step and history are saved with Orbax under
`<out_dir>/<mode>_step<N>_ckpt/` every `checkpoint_every_steps` steps and at each epoch's end;
the data order is a function of (seed, epoch) and the augmentation of (seed, step), so a run
killed at any point and started again ends with the same numbers. A finished run's checkpoint is
kept: running the command again only re-reads it.

`run_fast` trains the same classifier on cached center-crop features (no augmentation): a quick
read, not the protocol's number.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from hcsc_jax import distributed, models, sharding
from hcsc_jax.data import loader
from hcsc_jax.data.crops import CropSpec
from hcsc_jax.evaluators import common
from hcsc_jax.run import checkpoints, rules

log = logging.getLogger(__name__)


def lr_schedule(base_lr: float, batch_size: int, steps_per_epoch: int, milestones=(60, 80),
                gamma: float = 0.1) -> optax.Schedule:
    """Step LR: base_lr * batch / 256, times `gamma` from each milestone epoch on (indexed by
    optimizer step)."""
    lr = base_lr * batch_size / 256
    return optax.piecewise_constant_schedule(lr, {int(m) * steps_per_epoch: gamma for m in milestones})


def init_head(key, feat_dim: int, num_classes: int) -> dict:
    """w (F, C) ~ N(0, 0.01^2), b (C,) = 0 (MoCo's linear protocol)."""
    return dict(w=0.01 * jax.random.normal(key, (feat_dim, num_classes), jnp.float32),
                b=jnp.zeros((num_classes,), jnp.float32))


def logits(head, x):
    """(B, F) features -> (B, C) class scores."""
    return x @ head["w"] + head["b"]


def _sgd_update(tx, head, opt_state, x, y):
    loss, grads = jax.value_and_grad(
        lambda h: optax.softmax_cross_entropy_with_integer_labels(logits(h, x), y).mean())(head)
    updates, opt_state = tx.update(grads, opt_state, head)
    return optax.apply_updates(head, updates), opt_state, loss


def evaluate_head(head, feats, labels, batch: int = 4096) -> dict[str, float]:
    """Top-1 / top-5 (percent) of a linear head on (N, F) features."""
    feats = np.asarray(feats, np.float32)
    out = [np.asarray(logits(head, jnp.asarray(feats[i:i + batch]))) for i in range(0, len(feats), batch)]
    return common.accuracies(np.concatenate(out) if out else np.zeros((0, 1)), labels)


def train_head(ctx: common.Context, cfg, name: str, feat_dim: int, num_classes: int, steps_per_epoch: int,
               batches, step):
    """The epoch loop shared by both modes -> (head, history).

    `batches(epoch, first_step)` yields the step inputs of an epoch from `first_step` on;
    `step(head, opt_state, key, *inputs) -> (head, opt_state, loss)`. Resumable when ctx.out_dir
    is set (see the module docstring)."""
    total = steps_per_epoch * cfg.epochs
    schedule = lr_schedule(cfg.lr, cfg.batch_size, steps_per_epoch, tuple(cfg.milestones), cfg.gamma)
    tx = optax.sgd(schedule, momentum=cfg.momentum)
    key = jax.random.key(ctx.seed)
    replicated = sharding.replicated(ctx.mesh)
    head = init_head(jax.random.fold_in(key, 1 << 30), feat_dim, num_classes)
    state = jax.device_put(dict(head=head, opt=tx.init(head)), replicated)
    protocol = dict(cfg.to_dict(), mode=name, dataset=ctx.data.dataset, train_split=ctx.data.train_split,
                    image_size=ctx.data.image_size, seed=ctx.seed)
    meta = dict(global_step=0, history=[], epoch_losses=[])
    mngr = None
    if ctx.out_dir is not None:
        mngr = ocp.CheckpointManager(ctx.out_dir / f"{name}_step{ctx.encoder.step}_ckpt",
                                     options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
                                     item_names=("train", "meta"))
        if mngr.all_steps():
            state, meta = _restore(mngr, state, protocol, ctx.digest)
            log.info("%s: resumed at step %d of %d", name, meta["global_step"], total)

    def save(gstep):
        if mngr is not None:
            mngr.save(gstep, args=ocp.args.Composite(
                train=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(dict(meta, protocol=protocol, weights=ctx.digest))), force=True)

    gstep = meta["global_step"]
    bar = tqdm(total=total, initial=gstep, desc=name, unit="step", dynamic_ncols=True,
               disable=not (ctx.progress and distributed.is_main()))
    every = int(cfg.get("checkpoint_every_steps", 0) or 0)
    for epoch in range(gstep // steps_per_epoch if steps_per_epoch else cfg.epochs, cfg.epochs):
        first = gstep - epoch * steps_per_epoch
        losses = []
        for s, inputs in zip(range(first, steps_per_epoch), batches(epoch, first)):
            head, opt, loss = step(state["head"], state["opt"], jax.random.fold_in(key, gstep), *inputs)
            state = dict(head=head, opt=opt)
            losses.append(loss)
            gstep += 1
            bar.update(1)
            if every and gstep % every == 0 and s < steps_per_epoch - 1:
                meta = dict(meta, global_step=gstep, epoch_losses=meta["epoch_losses"] + _floats(losses))
                losses = []
                save(gstep)
        epoch_losses = meta["epoch_losses"] + _floats(losses)
        record = dict(epoch=epoch, loss=float(np.mean(epoch_losses)),
                      lr=float(schedule(epoch * steps_per_epoch)))
        meta = dict(global_step=gstep, history=meta["history"] + [record], epoch_losses=[])
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.4g}")
        save(gstep)
    bar.close()
    if mngr is not None:
        mngr.wait_until_finished()
    return state["head"], meta["history"]


def _floats(losses) -> list[float]:
    return [float(x) for x in jax.device_get(losses)]


def _restore(mngr, state, protocol: dict, digest: str):
    """(state, meta) of the newest readable step (`checkpoints.restore_newest`: a step that cannot
    be read, e.g. cut by a kill while saving, is skipped; when none can, the run starts afresh).
    EvalError if the run was made with other weights or settings."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

    def read(step):
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        train = mngr.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore(abstract)))["train"]
        return train, meta

    try:
        _, (restored, meta) = checkpoints.restore_newest(mngr, read)
    except checkpoints.NoReadableStep:
        return state, dict(global_step=0, history=[], epoch_losses=[])
    if meta.pop("weights") != digest or meta.pop("protocol") != json.loads(json.dumps(protocol)):
        raise common.EvalError(f"{mngr.directory} holds a run with other weights or settings; "
                               "delete it to start this one afresh")
    return restored, meta


def run(ctx: common.Context, cfg) -> tuple[dict, str]:
    """The linear protocol (cfg: epochs, lr, batch_size, milestones, gamma, momentum, scale, flip,
    checkpoint_every_steps)."""
    d = ctx.data
    labels = ctx.labels(d.train_split)
    aug = ctx.crop_config(cfg.scale, cfg.flip)
    train = ctx.input(d.train_split, crops=(CropSpec(d.image_size, tuple(cfg.scale)),),
                      batch=cfg.batch_size)
    if train.steps_per_epoch == 0:
        raise common.EvalError(f"linear batch_size {cfg.batch_size} is larger than the {train.num_examples} "
                               "training images; set a smaller --config.evals.linear.batch_size")
    e = ctx.encoder
    tx = optax.sgd(lr_schedule(cfg.lr, cfg.batch_size, train.steps_per_epoch, tuple(cfg.milestones),
                               cfg.gamma), momentum=cfg.momentum)

    @jax.jit
    def frozen_step(head, opt_state, key, params, stats, *inputs):
        x, y = common.labelled_views(key, inputs, aug)
        feats = jax.lax.stop_gradient(models.apply_model(e.graphdef, params, stats, x, train=False)[0])
        return _sgd_update(tx, head, opt_state, feats.astype(jnp.float32), y)

    step = lambda head, opt_state, key, *inputs: frozen_step(head, opt_state, key, e.params, e.stats, *inputs)

    assign = labels[:, None].astype(np.int32)
    feat_dim = ctx.feature_dim()
    head, history = train_head(ctx, cfg, "linear", feat_dim, ctx.num_classes(), train.steps_per_epoch,
                               lambda epoch, first: train.steps(epoch, first, assign), step)
    train.close()
    res = evaluate_head(head, ctx.features(d.eval_split), ctx.labels(d.eval_split))
    res.update(final_train_loss=history[-1]["loss"] if history else None, history=history,
               protocol=dict(cfg.to_dict(), augmented=True))
    return res, f"linear step {e.step}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%"


def run_fast(ctx: common.Context, cfg) -> tuple[dict, str]:
    """The same classifier and schedule on cached center-crop features, no augmentation."""
    d = ctx.data
    feats, labels = ctx.features(d.train_split), ctx.labels(d.train_split)
    n, b = len(labels), int(cfg.batch_size)
    if b > n:
        raise common.EvalError(f"linear batch_size {b} is larger than the {n} training images; set a smaller "
                               "--config.evals.linear.batch_size")
    spe = n // b
    tx = optax.sgd(lr_schedule(cfg.lr, b, spe, tuple(cfg.milestones), cfg.gamma), momentum=cfg.momentum)
    update = jax.jit(lambda head, opt_state, x, y: _sgd_update(tx, head, opt_state, x, y))
    step = lambda head, opt_state, key, x, y: update(head, opt_state, x, y)

    def batches(epoch, first):  # host gathers: the (N, F) features never sit on a device whole
        order = loader.epoch_order(ctx.seed, epoch, n, spe, b)
        for s in range(first, spe):
            idx = np.sort(order[s * b:(s + 1) * b])
            yield jnp.asarray(feats[idx], jnp.float32), jnp.asarray(labels[idx], jnp.int32)

    head, history = train_head(ctx, cfg, "linear_fast", feats.shape[1], ctx.num_classes(), spe, batches, step)
    res = evaluate_head(head, ctx.features(d.eval_split), ctx.labels(d.eval_split))
    res.update(final_train_loss=history[-1]["loss"] if history else None, history=history,
               protocol=dict(cfg.to_dict(), augmented=False))
    return res, (f"linear_fast (cached center-crop features, no augmentation) step {ctx.encoder.step}: "
                 f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")


# The settings of a `config.evals` entry of these protocols (besides `type` and `every_epochs`):
# what each takes, those with a default here, and the counts the training set must cover.
EPOCHS = rules.integer(1, rules.MAX_EPOCHS)
SETTINGS = {"epochs": EPOCHS, "lr": rules.LEARNING_RATE, "batch_size": rules.BATCH,
            "milestones": rules.tuple_of(EPOCHS), "gamma": rules.real(above=0, max=1),
            "momentum": rules.MOMENTUM, "scale": rules.SCALE, "flip": rules.boolean(),
            "checkpoint_every_steps": rules.STEPS}
DEFAULTED = ("checkpoint_every_steps",)
SIZED = ()
PROTOCOLS = {"linear": run, "linear_fast": run_fast}
