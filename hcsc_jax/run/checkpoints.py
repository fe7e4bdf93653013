"""Orbax checkpoints of a training run: state, progress metadata and the epoch's hierarchy.

Layout: `<workdir>/checkpoints/<global step>/{state, meta, hierarchy}`. `state` is the whole
`TrainState`; `meta` (JSON) holds the epoch and the position inside it (the data order is a
function of (seed, epoch), so this is all that is needed to continue mid-epoch); `hierarchy`
holds `clustering.Hierarchy.to_arrays()` when the epoch uses prototypes. Saves are
asynchronous; Orbax commits a step atomically, so a run killed while saving leaves the previous
step intact. A step that fails to restore (corrupt files) is reported and the one before used:
`restore_newest` is that loop, for the training state (`restore_latest`), the encoders
(`restore_encoder`) and the linear probe's own checkpoints (`evaluators.linear`).
With several processes every process calls `save` and `restore_latest` (Orbax coordinates the
writes); encoders load on any number of devices and processes, whatever topology saved them.
A restored training state that differs from the SHA-256 digest saved with it, or holds NaN or
inf, counts as unreadable, for training and for `restore_encoder` alike (which restores it as a tree
of dicts and hashes it in the saved order, `saved_order`); an exported encoder carries the digest
of its weights too. Unreadable training steps are moved aside (`<step>.unusable`) once an older
one restores, so the run continues past them; `restore_encoder` only skips them.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from hcsc_jax import sharding
from hcsc_jax.clustering import Hierarchy
from hcsc_jax.models import Encoder, build_encoder
from hcsc_jax.run import workdir as workdir_lib

log = logging.getLogger(__name__)

_ITEMS = ("state", "meta", "hierarchy")

T = TypeVar("T")
M = TypeVar("M", bound=nnx.Module)


def manager(workdir: str | os.PathLike, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """An asynchronous CheckpointManager keeping the last `max_to_keep` steps."""
    return ocp.CheckpointManager(
        workdir_lib.path(workdir) / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=_ITEMS,
    )


def digest(tree) -> str:
    """SHA-256 of the bytes of every array of `tree` (leaf order; this process's copy of each)."""
    h = hashlib.sha256()
    for x in jax.tree.leaves(tree):
        h.update(np.ascontiguousarray(x.addressable_data(0) if isinstance(x, jax.Array) else x).tobytes())
    return h.hexdigest()


def save(mngr: ocp.CheckpointManager, state, meta: dict[str, Any], hierarchy: Hierarchy | None):
    """Starts an asynchronous save of the state at its global step, with the state's `digest` in
    the metadata (checked on restore)."""
    step = int(jax.device_get(state.step))
    items = dict(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(meta, has_hierarchy=hierarchy is not None, digest=digest(state))),
    )
    if hierarchy is not None:
        items["hierarchy"] = ocp.args.PyTreeSave(hierarchy.to_arrays())
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


class NoReadableStep(RuntimeError):
    """No step of a checkpoint directory could be restored (see `restore_newest`)."""


def restore_newest(mngr: ocp.CheckpointManager, restore_one: Callable[[int], T],
                   what: str = "checkpoint") -> tuple[int, T]:
    """Tries `restore_one(step)` on the steps of `mngr`, newest first -> (step, what it returned)
    of the first that returns. Any exception from `restore_one` makes that step unreadable: it is
    logged as a warning ("`what` at step N in <directory> could not be restored (...); trying the
    previous one") and the step before it tried. Raises NoReadableStep (a RuntimeError) naming
    the directory and its steps when none restores, or when there are none."""
    steps, newest = sorted(mngr.all_steps(), reverse=True), None
    for step in steps:
        try:
            return step, restore_one(step)
        except Exception as err:  # noqa: BLE001 - any failure means this step is unreadable
            why = f"{type(err).__name__}: {_first_line(err)}"
            newest = newest or f"; step {step}: {why}"
            log.warning("%s at step %d in %s could not be restored (%s); trying the previous one",
                        what, step, mngr.directory, why)
    raise NoReadableStep(f"no {what} in {mngr.directory} could be restored "
                         f"(steps {steps[::-1]}{newest or ''})")


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
    """Restores the newest readable step -> (state, meta, hierarchy or None), or None if none.

    `abstract_state`: the state's structure with shapes, dtypes and shardings (e.g. from
    `jax.eval_shape` plus shardings). Unreadable steps, those whose restored state differs from
    the digest written at save time and those holding NaN or inf, are logged and skipped, newest
    first (`restore_newest`); once an older one restores they are moved aside (`set_aside`), so
    the run saves those steps again. When none restores, nothing is moved and NoReadableStep is
    raised.
    """
    if not mngr.all_steps():
        return None
    try:
        step, restored = restore_newest(mngr, lambda s: _restore(mngr, s, abstract_state))
    except NoReadableStep as err:
        raise NoReadableStep(f"{err}; if config.model changed since they were written, resume with the "
                             "model that wrote them, else move the directory away to start afresh") from None
    for bad in sorted((s for s in mngr.all_steps() if s > step), reverse=True):
        log.warning("moved the unusable checkpoint of step %d to %s", bad, set_aside(mngr, bad))
    return restored


def describe_latest(mngr: ocp.CheckpointManager) -> str:
    """A sentence naming the newest committed checkpoint, or saying that there is none."""
    step = mngr.latest_step()
    if step is None:
        return f"No checkpoint was saved in {mngr.directory}"
    return f"The last checkpoint kept is step {step} in {mngr.directory}; the same command resumes from it"


def check_restored(tree, meta: dict[str, Any], step: int, leaves: list | None = None) -> None:
    """Raises ValueError when the restored `tree` is not what was saved (its `digest` differs
    from the one in `meta`, when the checkpoint has one) or a floating-point array holds NaN or inf.
    `leaves`: the arrays of `tree` in the order `digest` hashed them at save time, when `tree` was
    restored in another structure than the one saved (`saved_order`); default: `tree`'s own."""
    if "digest" in meta and digest(tree if leaves is None else leaves) != meta["digest"]:
        raise ValueError(f"the restored state of step {step} differs from the one saved (SHA-256 digest)")
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.isfinite(x).all()):
            raise ValueError(f"{jax.tree_util.keystr(path)} of step {step} holds NaN or inf")


def saved_order(mngr: ocp.CheckpointManager, step: int, item: str, tree) -> list:
    """The arrays of `tree`, `item` of `step` restored as a tree of dicts and lists
    (`restore_replicated`), in the order of `jax.tree.leaves` of the pytree that was saved (a
    `TrainState`: its fields, then each `nnx.State` by key, integers by value), which is the order
    `digest` hashed them in. Orbax's `_METADATA` of the item lists the saved key paths in that
    order (it writes them from `jax.tree_util.tree_flatten_with_path`); entries that hold no array
    (an empty optimizer state, a ViT's empty BN statistics) are skipped. ValueError when they do
    not match `tree`'s arrays."""
    metadata_file = epath.Path(mngr.directory) / str(step) / item / "_METADATA"
    entries = workdir_lib.read_json(metadata_file)["tree_metadata"]
    ordered = []
    for keypath in entries:
        node = tree
        for key in ast.literal_eval(keypath):
            node = node[int(key)] if isinstance(node, list | tuple) else node[key]
        if node is not None and not isinstance(node, dict | list | tuple):
            ordered.append(node)
    if len(ordered) != len(jax.tree.leaves(tree)):
        raise ValueError(f"the {item} of step {step} lists {len(ordered)} arrays in its _METADATA, "
                         f"{len(jax.tree.leaves(tree))} were restored")
    return ordered


def set_aside(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
    """Renames the directory of `step` to `<step>.unusable[.N]` beside it (kept for a look, no
    longer a step) -> the new path. Process 0 renames; every process then sees the new list."""
    source = epath.Path(mngr.directory) / str(step)
    target = source.with_name(f"{step}.unusable")
    for n in range(1, 1000):
        if not target.exists():
            break
        target = source.with_name(f"{step}.unusable.{n}")
    if jax.process_index() == 0:
        source.rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside step {step}")
    mngr.reload()
    return target


def _restore(mngr, step, abstract_state):
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if meta.get("has_hierarchy"):
        items["hierarchy"] = ocp.args.PyTreeRestore()
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    check_restored(restored["state"], meta, step)
    hierarchy = Hierarchy.from_arrays(restored["hierarchy"]) if meta.get("has_hierarchy") else None
    return restored["state"], meta, hierarchy


# ----------------------------------------------------------------------------- encoders

_ENCODER_ITEMS = ("encoder", "meta")


def export_encoder(directory: str, meta: dict[str, Any], params, stats) -> None:
    """Writes an encoder-only Orbax checkpoint: parameters and BN statistics (pure dicts) and
    `meta` (from `models.encoder_meta`) as JSON, with the `digest` of the two pure dicts.
    `restore_encoder` reads it back and checks it."""
    pure = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
    with ocp.CheckpointManager(workdir_lib.path(directory), item_names=_ENCODER_ITEMS) as mngr:
        mngr.save(0, args=ocp.args.Composite(encoder=ocp.args.StandardSave(pure),
                                             meta=ocp.args.JsonSave(dict(meta, digest=digest(pure)))),
                  force=True)
        mngr.wait_until_finished()


def restore_encoder(path: str, step: int | None = None, which: str = "query",
                    meta_only: bool = False) -> tuple[Encoder | None, dict[str, Any]]:
    """Restores an encoder from a training workdir (its newest readable step, or `step`; the
    query encoder, or the momentum encoder with which="key") or from an `export_encoder`
    directory. -> (Encoder with the restored weights, meta). The weights are checked as training
    checks a state it resumes from (`check_restored`): a workdir step whose restored state differs
    from its SHA-256 digest or holds NaN or inf is unreadable, as is an exported encoder whose
    weights differ from the digest written at export (one exported without a digest, by an earlier
    version, is only checked for NaN and inf, with a note). Raises FileNotFoundError with what was
    expected when `path` holds neither (or not `step`); NoReadableStep (a RuntimeError) when no
    step of the workdir restores (each unreadable one logged as a warning, newest first), when the
    given `step` does not (one line naming it and why), or when an exported encoder does not.
    `meta_only`: (None, the meta) of that step or export, its weights not read."""
    path = workdir_lib.path(path)
    workdir_lib.check_reachable(path)  # (a bucket without gcsfs or network: one line, not minutes)
    if (path / "checkpoints").is_dir():
        mngr = manager(path)
        if not mngr.all_steps() or (step is not None and step not in mngr.all_steps()):
            raise FileNotFoundError(
                f"{path}/checkpoints has no step {step if step is not None else ''} "
                f"(steps: {mngr.all_steps()})")
        prefix = {"query": "q", "key": "k"}[which]

        def read(s):
            meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if meta_only:
                return None, dict(meta["encoder"], step=s)
            state = restore_replicated(mngr, s, "state")
            check_restored(state, meta, s, saved_order(mngr, s, "state", state))
            return (fill(build_encoder(meta["encoder"], abstract=True), state[f"{prefix}_params"],
                         state[f"{prefix}_stats"]),
                    dict(meta["encoder"], step=s))

        if step is None:
            return restore_newest(mngr, read, what="encoder")[1]
        try:
            return read(step)
        except Exception as err:  # noqa: BLE001 - any failure means the step is unreadable
            raise NoReadableStep(f"the encoder at step {step} in {mngr.directory} could not be restored "
                                 f"({type(err).__name__}: {_first_line(err)})") from None
    if not path.is_dir() or not any(path.iterdir()):
        raise FileNotFoundError(
            f"{path} is neither a training workdir (with checkpoints/) nor an exported encoder; "
            "pass the --workdir of a train.py run or a directory written by export_encoder")
    tree, meta = read_export(path, meta_only)
    if CLASSES in meta:
        raise ValueError(f"{path} holds a fine-tuned classifier, not an encoder: read it with "
                         "hcsc_jax.load_classifier")
    if meta_only:
        return None, meta
    return fill(build_encoder(meta, abstract=True), tree["params"], tree["batch_stats"]), meta


# An exported classifier's meta holds its number of classes under this key (`pretrained.save_classifier`).
CLASSES = "num_classes"


def read_export(path, meta_only: bool = False) -> tuple[dict | None, dict[str, Any]]:
    """The weights ({"params", "batch_stats"} pure dicts) and meta of an `export_encoder`
    directory, the weights checked against the digest written at export and for NaN / inf
    (NoReadableStep when they fail); (None, meta) if `meta_only`."""
    path = workdir_lib.path(path)
    with ocp.CheckpointManager(path, item_names=_ENCODER_ITEMS) as mngr:
        if mngr.latest_step() is None:
            raise FileNotFoundError(f"{path} holds no encoder checkpoint")
        meta = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta_only:
            return None, meta
        tree = _unwrap(restore_replicated(mngr, mngr.latest_step(), "encoder"))
    if "digest" not in meta:
        log.warning("%s was exported without a weight digest (by an earlier version): its weights are only "
                    "checked for NaN and inf", path)
    try:
        check_restored(tree, meta, mngr.latest_step())
    except ValueError as err:
        what = "classifier" if CLASSES in meta else "encoder"
        raise NoReadableStep(f"the {what} in {path} cannot be used: {err}") from None
    return tree, meta


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ""


def restore_replicated(mngr: ocp.CheckpointManager, step: int, item: str):
    """A `StandardSave`d item of `step` as a pytree of dicts, replicated over all devices of this
    run: also when the checkpoint was written by another number of devices or processes."""
    tree = ocp.StandardCheckpointHandler().metadata(mngr.directory / str(step) / item)
    everywhere = sharding.replicated(sharding.make_mesh())
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=everywhere), tree)
    return mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]


def _unwrap(tree):
    """Orbax restores NNX Variables as {'value': array}; pure dicts hold the arrays themselves."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _unwrap(v) for k, v in tree.items()}
    return tree


def fill(abstract: M, params, stats) -> M:
    """The NNX module `abstract` (shapes only, e.g. from `nnx.eval_shape`) with restored weights:
    its parameters and BatchNorm statistics from the pure (or Orbax-restored) dicts."""
    graphdef, p, s = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    nnx.replace_by_pure_dict(p, _unwrap(params))
    nnx.replace_by_pure_dict(s, _unwrap(stats))
    return nnx.merge(graphdef, p, s)
