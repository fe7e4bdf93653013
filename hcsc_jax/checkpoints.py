"""Orbax checkpoints of a training run: state, progress metadata and the epoch's hierarchy.

Layout: `<workdir>/checkpoints/<global step>/{state, meta, hierarchy}`. `state` is the whole
`TrainState`; `meta` (JSON) holds the epoch and the position inside it (the data order is a
function of (seed, epoch), so this is all that is needed to continue mid-epoch); `hierarchy`
holds `clustering.Hierarchy.to_arrays()` when the epoch uses prototypes. Saves are
asynchronous; Orbax commits a step atomically, so a run killed while saving leaves the previous
step intact. A step that fails to restore (corrupt files) is reported and the one before used.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from hcsc_jax.clustering import Hierarchy

log = logging.getLogger(__name__)

_ITEMS = ("state", "meta", "hierarchy")


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """An asynchronous CheckpointManager keeping the last `max_to_keep` steps."""
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=_ITEMS,
    )


def save(mngr: ocp.CheckpointManager, state, meta: dict[str, Any], hierarchy: Hierarchy | None):
    """Starts an asynchronous save of the state at its global step."""
    step = int(jax.device_get(state.step))
    items = dict(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(meta, has_hierarchy=hierarchy is not None)),
    )
    if hierarchy is not None:
        items["hierarchy"] = ocp.args.PyTreeSave(hierarchy.to_arrays())
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
    """Restores the newest readable step -> (state, meta, hierarchy or None), or None if none.

    `abstract_state`: the state's structure with shapes, dtypes and shardings (e.g. from
    `jax.eval_shape` plus shardings). Unreadable steps are logged and skipped, newest first.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return _restore(mngr, step, abstract_state)
        except Exception as err:  # noqa: BLE001 - any failure means this step is unusable
            log.warning(
                "checkpoint at step %d in %s could not be restored (%s: %s); trying the previous one",
                step, mngr.directory, type(err).__name__, err,
            )
    if mngr.all_steps():
        raise RuntimeError(
            f"no checkpoint in {mngr.directory} could be restored (steps {mngr.all_steps()}); "
            "move the directory away to start afresh"
        )
    return None


def _restore(mngr, step, abstract_state):
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if meta.get("has_hierarchy"):
        items["hierarchy"] = ocp.args.PyTreeRestore()
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    hierarchy = Hierarchy.from_arrays(restored["hierarchy"]) if meta.get("has_hierarchy") else None
    return restored["state"], meta, hierarchy
