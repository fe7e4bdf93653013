"""The run, read top to bottom: set-up, then epochs x steps, then the summary of the final encoder.

Set-up: the training input (`setup.make_input`), the encoder, optimizer, train state and step
functions (`setup.build`), the newest readable checkpoint, the metrics writer. Each epoch then
has three parts:
  start: after the warm-up epochs, the key encoder (inference mode) embeds a center crop of every
    training image and k-means builds the hierarchy (faiss on the host, or the "jax" backend on
    the devices); its prototypes go to every device and the queue's cached normalizers are
    recomputed. The epoch's step function is `warmup_step` without prototypes, else
    `prototype_step`.
  steps: a step, then what one predicate, `itstime`, says is due: a log line, the checkpoint (one
    save call), a stop on SIGTERM or Ctrl-C. The host dispatches at most `MAX_IN_FLIGHT` steps
    ahead of the device, so a stop saves within that many steps; any stop waits for the save in
    flight.
  end: the epoch's record, its checkpoint, the evaluators of `config.evals` that are due.
Checkpoints carry the running metric sums of the log window and of the epoch, so a resumed run
writes the metrics.jsonl of an uninterrupted one; evaluations a kill cut off are redone.
The images reach the step through a `data.pipeline` input (`config.input.pipeline`): "memory"
keeps the dataset on the devices and gathers each global batch there; "stream" decodes and crops
on the host, each process its share. Both yield the step's `(images, labels)`, the labels being
the batch's k-means assignments.

With several processes (`distributed.initialize`) every process runs this loop over one global
mesh; faiss runs on process 0 and its hierarchy is broadcast, process 0 writes the logs,
metrics and summaries, and all processes write the checkpoints together.

Everything the loop changes as it goes is one `Loop`. The other ideas live in the modules named
for them: what is due when and the run's evaluators in `schedule`, the running means in
`metrics`, a failure turned into one line that names the checkpoint kept in `failures`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from hcsc_jax import clustering, distributed, evaluators, features, models, sharding, visualize
from hcsc_jax.data.sources import check_available
from hcsc_jax.method import device_prototypes, train_step
from hcsc_jax.run import checkpoints, config_checks, failures, resume, schedule, setup
from hcsc_jax.run import metrics as metrics_lib
from hcsc_jax.run import workdir as workdir_lib
from hcsc_jax.run.config_checks import ConfigError
from hcsc_jax.run.schedule import itstime

log = logging.getLogger(__name__)

# Steps the host dispatches ahead of the one it waits for: a stop signal saves within this many steps.
MAX_IN_FLIGHT = 2


def check_values(config, num_devices: int) -> None:
    """Raises ConfigError naming the field and what to change for a config that cannot train: a
    value that breaks its rule or a relation (`config_checks.check`), a batch, queue and BN groups
    that do not fit `num_devices`, objective switches that exclude each other, a model that cannot
    take the image or view sizes. Runs before anything is written."""
    config_checks.check(config)
    try:
        train_step.check_batch_config(config.batch_size, config.queue_size, config.bn_group_size, num_devices)
        setup.objective_config(config)
        models.check_model_config(config.model, config.image_size, config.shuffle_bn,
                                  [size for size, _ in config.augment.local_views])
    except ValueError as err:
        raise ConfigError(str(err)) from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dry_run: bool = False) -> dict[str, Any] | None:
    """Trains (resuming from `workdir` if it holds checkpoints), then evaluates. -> summary dict.
    The config and the data (DataError: the dataset, its training split and, with evaluators, its
    eval split can be read) are checked before anything is written; the workdir is locked while
    the run lasts, and SIGTERM or Ctrl-C, from the lock on, stops it at the next step boundary with
    a checkpoint (`resume.Preempted`); after the last step, once its checkpoint is committed (the
    summary is then left to the same command), or, during the summary, after summary.json (figures
    left out). A second Ctrl-C ends the process at once (exit status 130), releasing the lock.
    `dry_run`: the checks only (the workdir writable, its config the same as its checkpoints'),
    nothing written, None returned."""
    main = distributed.is_main()
    mesh = sharding.make_mesh()
    check_values(config, mesh.size)
    for line in config_checks.warnings_for(config) if main else ():
        log.warning("%s", line)
    if config.get("init_encoder") and workdir_lib.path(config.init_encoder) == workdir_lib.path(workdir):
        raise ConfigError(f"config.init_encoder is {config.init_encoder}, the workdir this run would write "
                          "(and resume from); pass another --workdir")
    try:
        setup.check_init_encoder(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    metrics_lib.check_wandb(config)
    splits = (config.train_split, *([config.eval_split] if config.evals else []))
    num_train = check_available(config.dataset, splits, config.get("data_dir"))
    if num_train is not None:  # (the sizes the training set must give, before anything is written)
        config_checks.check_data(config, num_train)
    if dry_run:  # (train.py --dry_run) the checks a run makes before it writes, and nothing written
        workdir_lib.check_writable(workdir)
        if (path := workdir_lib.path(workdir)).exists():
            resume.check_config(path, config.to_json_best_effort(indent=2, sort_keys=True))
        return None
    workdir = workdir_lib.prepare(workdir) if main else workdir_lib.path(workdir)
    release = (lambda: (workdir / workdir_lib.LOCK_FILE).unlink(missing_ok=True)) if main else None
    with workdir_lib.locked(workdir, enabled=main), resume.PreemptionWatch(on_abort=release) as preemption:
        return _train_and_evaluate(config, workdir, mesh, preemption)


@dataclasses.dataclass
class Loop:
    """What the loop changes as it runs, in one place: the train state; the hierarchy and the epoch
    it was built for; the running sums of the log window and of the epoch; the metrics of the steps
    not yet fetched from the device, and the steps dispatched and not yet waited for; the context and
    results of the last evaluators. A checkpoint holds the first five (`meta`), so a resumed run
    continues the same sums."""
    state: Any
    hierarchy: clustering.Hierarchy | None = None
    hierarchy_epoch: int = -1
    window: dict = dataclasses.field(default_factory=metrics_lib.new_sums)
    epoch_sums: dict = dataclasses.field(default_factory=metrics_lib.new_sums)
    pending: list = dataclasses.field(default_factory=list)
    inflight: collections.deque = dataclasses.field(default_factory=collections.deque)
    evaluated: tuple | None = None  # the last evaluators' (context, results): the summary reuses them

    def dispatched(self, metrics) -> None:
        """A step was dispatched with these (device) metrics: the host waits for the step
        MAX_IN_FLIGHT before it, not for this one."""
        self.pending.append(metrics)
        self.inflight.append(metrics)
        if len(self.inflight) > MAX_IN_FLIGHT:
            jax.block_until_ready(self.inflight.popleft())

    def fetch(self, step: int, divergence) -> None:
        """Waits for the metrics of the pending steps (the last is `step`), stops on a divergence
        (`failures.check_health`), and adds them to the window's and the epoch's sums."""
        per_step = failures.fetched_and_checked(self.pending, step, divergence)
        metrics_lib.add_steps(self.window, per_step)
        metrics_lib.add_steps(self.epoch_sums, per_step)
        self.pending = []

    def meta(self, step: int, steps_per_epoch: int, encoder: dict) -> dict[str, Any]:
        """The checkpoint's metadata after `step` steps (with the encoder's own metadata)."""
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        return dict(epoch=epoch, step_in_epoch=step_in_epoch, hierarchy_epoch=self.hierarchy_epoch,
                    encoder=encoder, log_sums=copy.deepcopy(self.window),
                    epoch_sums=copy.deepcopy(self.epoch_sums))


def restore(mngr, state, steps_per_epoch: int, epochs: int) -> Loop:
    """The loop as the newest readable checkpoint of `mngr` left it (state, hierarchy, running
    sums); a new loop from `state` when there is none. Raises ValueError when the checkpoint's
    step does not match `steps_per_epoch` (the training set changed size)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = checkpoints.restore_latest(mngr, abstract)
    if restored is None:
        return Loop(state)
    state, meta, hierarchy = restored
    at = meta["epoch"] * steps_per_epoch + meta["step_in_epoch"]
    if at != int(state.step):
        raise ValueError(
            f"the checkpoint of step {int(state.step)} was written at step {meta['step_in_epoch']} of "
            f"epoch {meta['epoch']}, which is step {at} at {steps_per_epoch} steps per epoch: the "
            "training set has changed size; resume on the same data or use a new --workdir")
    done, into = meta["epoch"], meta["step_in_epoch"]  # (epochs counted from 1, as the log does)
    log.info("resumed from step %d (%s)", int(state.step),
             f"epoch {done + 1}/{epochs}, after its step {into}/{steps_per_epoch}" if into
             else f"after epoch {done}/{epochs}")
    # (a checkpoint at an epoch's end holds no window or epoch sums: both start empty)
    return Loop(state, hierarchy, meta.get("hierarchy_epoch", -1),
                meta.get("log_sums", metrics_lib.new_sums()), meta.get("epoch_sums", metrics_lib.new_sums()))


def epoch_prototypes(config, loop: Loop, parts: setup.TrainingSetup, train_set, epoch: int,
                     resumed_mid_epoch: bool, mesh, hierarchy_dir) -> tuple[Any, np.ndarray, float]:
    """The start of `epoch`: after the warm-up, the key encoder's hierarchy of the training set
    (unless the checkpoint brought this epoch's), saved under `hierarchy_dir` by process 0; its
    prototypes on every device and the queue's cached normalizers refreshed (unless resumed mid
    epoch: the state holds them). -> (prototypes or None, the images' assignments, clustering s)."""
    t0, n, num_levels = time.perf_counter(), train_set.num_examples, len(config.clustering.num_clusters)
    cluster_seconds = 0.0
    if schedule.uses_prototypes(config, epoch) and (loop.hierarchy is None or loop.hierarchy_epoch != epoch):
        seed = clustering.epoch_seed(config.clustering, config.seed, epoch)
        loop.hierarchy = features.key_hierarchy(parts.graphdef, loop.state.k_params, loop.state.k_stats,
                                                train_set, config.image_size, parts.mean_std,
                                                config.clustering, seed, mesh=mesh)
        loop.hierarchy_epoch, cluster_seconds = epoch, time.perf_counter() - t0
        if distributed.is_main():
            workdir_lib.save_npz(hierarchy_dir / f"epoch_{epoch:04d}.npz", loop.hierarchy.to_arrays())
    if loop.hierarchy is None or loop.hierarchy_epoch != epoch:
        return None, np.zeros((n, max(num_levels, 1)), np.int32), cluster_seconds
    protos = device_prototypes.prototypes_from_hierarchy(loop.hierarchy, sharding.replicated(mesh))
    if not resumed_mid_epoch:
        loop.state = parts.refresh_lse(loop.state, protos)
    return protos, loop.hierarchy.assignments(), cluster_seconds


def _train_and_evaluate(config, workdir, mesh, preemption: resume.PreemptionWatch) -> dict[str, Any]:
    main = distributed.is_main()
    config_json = config.to_json_best_effort(indent=2, sort_keys=True)
    resume.check_config(workdir, config_json)

    # ---- Input; encoder, optimizer, train state, step functions; the newest checkpoint ----
    train_set = setup.make_input(config, config.train_split, mesh)
    steps_per_epoch, batch = train_set.steps_per_epoch, config.batch_size
    config_checks.check_data(config, train_set.num_examples, train_set.channels)  # (with the channels; TFDS)
    total_steps = steps_per_epoch * config.epochs
    parts = setup.build(config, train_set.channels, steps_per_epoch, mesh)
    mngr = checkpoints.manager(workdir, config.keep_checkpoints)
    loop = restore(mngr, parts.state, steps_per_epoch, config.epochs)
    if main:  # after the resume checks: a refused run leaves the config of its checkpoints
        workdir_lib.write_atomic(workdir / workdir_lib.CONFIG_FILE, config_json)
    first_step = int(loop.state.step)  # the loop counts steps on the host: no device sync per step

    # ---- Metrics, checkpoints, evaluators ----
    writer = metrics_lib.MetricsWriter(workdir, first_step, config, enabled=main)
    redo_evals = schedule.evals_cut_off(config, workdir, first_step, steps_per_epoch)  # (of the file kept)
    eval_inputs = {config.train_split: train_set}  # splits opened for the feature passes of evaluators

    def save(step: int) -> None:  # the state after `step` steps, with the running sums
        checkpoints.save(mngr, loop.state, loop.meta(step, steps_per_epoch, parts.model_meta), loop.hierarchy)

    def context(step: int) -> evaluators.Context:  # of the current encoders
        return schedule.eval_context(config, parts.graphdef, loop.state, parts.model_meta, step, mesh,
                                     eval_inputs)

    def evaluate(epoch: int, step: int) -> None:  # the evaluators due after `epoch`
        t_eval, ctx = time.perf_counter(), context(step)
        record, results = schedule.run_evals(config, ctx, epoch, step == total_steps)
        loop.evaluated = (ctx, results)
        if record:
            writer.write(dict(record, type="eval", epoch=epoch, step=step,
                              eval_seconds=time.perf_counter() - t_eval))

    first_epoch, first_in_epoch = divmod(first_step, steps_per_epoch)
    with failures.keeping_saves(mngr), contextlib.closing(train_set):
        if redo_evals:  # a kill cut off the evaluators after the checkpoint of the last epoch's end
            evaluate(first_epoch - 1, first_step)
        if first_step == total_steps and mngr.latest_step() is None:
            save(0)  # epochs=0: keep the initial encoder

        for epoch in range(first_epoch, config.epochs):
            # ---- Start of epoch: its hierarchy, prototypes and the queue's cached normalizers ----
            start = first_in_epoch if epoch == first_epoch else 0  # a run resumed mid-epoch starts there
            input_wait, t_epoch = 0.0, time.perf_counter()
            protos, assignments, cluster_seconds = epoch_prototypes(
                config, loop, parts, train_set, epoch, start > 0, mesh, workdir / workdir_lib.HIERARCHY_DIR)
            step_fn = parts.warmup_step if protos is None else parts.prototype_step
            batches = train_set.steps(epoch, start, assignments)
            if start == 0:
                loop.epoch_sums = metrics_lib.new_sums()
            bar = tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{config.epochs}",
                       unit="step", leave=False, dynamic_ncols=True,
                       disable=not (config.progress_bar and main))
            t_log = time.perf_counter()

            for i in range(start, steps_per_epoch):
                # ---- Step ----
                t_input = time.perf_counter()
                images, labels = next(batches)
                input_wait += time.perf_counter() - t_input  # the host waiting for the loader
                loop.state, metrics = step_fn(loop.state, images, labels, protos)
                loop.dispatched(metrics)
                bar.update()

                # ---- What is due after it: log, checkpoint, stop ----
                step, done_in_epoch = epoch * steps_per_epoch + i + 1, i + 1
                epoch_end = done_in_epoch == steps_per_epoch
                stop = preemption.reached(step)
                checkpoint_due = (stop or step == total_steps or itstime(step, config.checkpoint_every_steps)
                                  or epoch_end and itstime(epoch + 1, config.checkpoint_every_epochs))
                log_due = itstime(done_in_epoch, config.log_every_steps, final=epoch_end)
                if log_due or checkpoint_due:  # a checkpoint only after every step since the last was checked
                    loop.fetch(step, config.divergence)
                if log_due:
                    lr = float(parts.schedule(step - 1))
                    metrics_lib.write_window(writer, loop.window, step, epoch, lr, batch, t_log, bar)
                    loop.window, t_log = metrics_lib.new_sums(), time.perf_counter()
                if not epoch_end:  # (at the epoch's end, the checkpoint follows the epoch's record)
                    if checkpoint_due:
                        save(step)
                    if stop:
                        raise resume.preempted(mngr, step, preemption.signal_name)

            # ---- End of epoch: its record, checkpoint and evaluators ----
            bar.close()
            record = dict(metrics_lib.means(loop.epoch_sums), step=step, epoch=epoch, type="epoch",
                          clustering_seconds=cluster_seconds, input_wait_seconds=input_wait,
                          epoch_seconds=time.perf_counter() - t_epoch)
            writer.write(record)
            log.info("epoch %d/%d: loss %.4f (%s)", epoch + 1, config.epochs, record["loss"], "instance only"
                     if protos is None else f"{len(config.clustering.num_clusters)} prototype levels")
            if checkpoint_due:
                save(step)
            if stop:
                raise resume.preempted(mngr, step, preemption.signal_name)
            if config.evals:  # after the save: evaluations a kill cuts short are redone on resume
                evaluate(epoch, step)
        train_set.close()  # (its training loader's workers; the summary's feature pass has its own)
        mngr.wait_until_finished()
        if preemption.received:  # after the last step: the same command computes the summary
            raise resume.preempted(mngr, int(loop.state.step), preemption.signal_name)

        # ---- Summary of the final encoder ----
        ctx, results = loop.evaluated or (None, {})
        if ctx is None or ctx.encoder.step != int(loop.state.step):  # else: its features are reused
            ctx, results = context(int(loop.state.step)), {}
        summary = schedule.final_summary(config, ctx, results)
        writer.close()
        if main:
            workdir_lib.write_atomic(workdir / workdir_lib.SUMMARY_FILE, workdir_lib.dumps(summary))
            if preemption.received:  # (during the summary)
                log.warning("%s received: summary.json written, figures left out (python -m "
                            "hcsc_jax.visualize %s draws them)", preemption.signal_name, workdir)
            elif config.figures_at_end:
                visualize.write_run_figures(workdir)
    return summary
