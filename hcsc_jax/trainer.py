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
"""

from __future__ import annotations

import collections
import contextlib
import copy
import errno
import logging
import math
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from hcsc_jax import (
    checkpoints,
    clustering,
    config_checks,
    distributed,
    evaluators,
    features,
    models,
    objective,
    resume,
    setup,
    sharding,
    train_step,
    trees,
    visualize,
)
from hcsc_jax import metrics as metrics_lib
from hcsc_jax import workdir as workdir_lib
from hcsc_jax.config_checks import ConfigError
from hcsc_jax.data.decode import DecodeError
from hcsc_jax.data.loader import LoaderError
from hcsc_jax.data.sources import check_available

log = logging.getLogger(__name__)

# Steps the host dispatches ahead of the one it waits for: a stop signal saves within this many steps.
MAX_IN_FLIGHT = 2


class InputError(RuntimeError):
    """The input stopped the run (an image that cannot be decoded under input.bad_images="error",
    a loader worker that died); the message names the file and the checkpoint kept."""


class DivergedError(RuntimeError):
    """Training stopped on a loss or gradient it cannot recover from; the last good checkpoint is kept."""


class NonFiniteLossError(DivergedError):
    """The loss became NaN or inf."""


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


def uses_prototypes(config, epoch: int) -> bool:
    return bool(config.clustering.num_clusters) and epoch >= config.warmup_epochs


def itstime(count: int, every: int, *, final: bool = False) -> bool:
    """The loop's one "is it time?" predicate: whether a task done every `every` units (steps,
    epochs, logged steps; 0: never) is due after `count` of them, or forced by `final`."""
    return final or (every > 0 and count > 0 and count % every == 0)


def new_sums() -> dict[str, Any]:
    """Running sums of per-step metrics: {"count": steps, "sums": {key: sum}}. Checkpoints carry
    them (JSON keeps a float exactly), so a resumed run adds the same floats in the same order."""
    return {"count": 0, "sums": {}}


def add_steps(acc: dict[str, Any], per_step: list[dict]) -> None:
    """Adds the host metrics of some steps, in step order, to the running sums `acc`."""
    for m in per_step:
        acc["count"] += 1
        for k, v in m.items():
            acc["sums"][k] = acc["sums"].get(k, 0.0) + float(v)


def means(acc: dict[str, Any]) -> dict[str, float]:
    return {k: v / acc["count"] for k, v in acc["sums"].items()}


def fetch_checked(pending: list, step: int, divergence) -> list[dict]:
    """Waits for the metrics of the steps in `pending` (the last is `step`) -> their host copies;
    stops on a non-finite loss or a divergence (see `check_health`)."""
    per_step = jax.device_get(pending)
    check_health(per_step, step - len(per_step) + 1, divergence)
    return per_step


def flush_log(window: dict, step: int, epoch: int, lr: float, batch: int, since: float, writer, bar):
    """Writes the mean of the steps summed in `window` (the last is `step`, the first began after
    `since`) with `lr` and images/s."""
    ips = window["count"] * batch / (time.perf_counter() - since)
    record = dict(means(window), step=step, epoch=epoch, lr=lr, images_per_sec=ips)
    writer.write(record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{ips:.0f}")


def check_health(per_step: list[dict], first_step: int, divergence) -> None:
    """Raises NonFiniteLossError naming the first step (1-based, as in metrics.jsonl) whose loss
    is not finite, DivergedError for one whose loss or gradient norm is above
    `divergence.max_loss` / `divergence.max_grad_norm` (0: no limit). per_step[i] holds the
    metrics of step first_step + i."""
    limits = {"loss": divergence.max_loss, "grad_norm": divergence.max_grad_norm}
    for i, m in enumerate(per_step):
        if not math.isfinite(m["loss"]):
            raise NonFiniteLossError(
                f"loss is {m['loss']} at step {first_step + i}; stopping; lower the learning rate, "
                "check the data, or use float32 compute")
        for key, limit in limits.items():
            if limit and m.get(key, 0.0) > limit:
                raise DivergedError(
                    f"{key} is {m[key]:.4g} at step {first_step + i}, above config.divergence.max_{key} = "
                    f"{limit:g}: the run diverges; stopping; lower the learning rate")


# What a refused write says when Orbax's tensorstore raises it (a ValueError, the errno in its
# message: "RESOURCE_EXHAUSTED: Error writing ...: No space left on device [os_error_code='28']"),
# or the OS's own words for a full disk or quota, a read-only mount, a missing permission.
_WRITE_REFUSED = re.compile(r"^[A-Z_]+: Error writing |No space left on device|Disk quota exceeded|"
                            r"Read-only file system|Permission denied")
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def write_failure(err: BaseException) -> BaseException | None:
    """The refused write behind `err`: `err` itself when it is an OSError, else the first of it
    and its causes (`__cause__`, `__context__`) that is an OSError with a full-disk, quota,
    read-only or permission errno, or whose message says a write was refused (`_WRITE_REFUSED`:
    tensorstore's ValueErrors); None when there is none."""
    if isinstance(err, OSError):
        return err
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if (isinstance(err, OSError) and err.errno in _WRITE_ERRNOS) or _WRITE_REFUSED.search(str(err)):
            return err
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def keeping_saves(mngr):
    """Leaving the run for any error (a divergence, a full disk, a bug) first waits for the saves
    in flight, so the newest checkpoint is kept; a divergence's or a write error's message then
    names the checkpoint kept. A write error (`write_failure`: an OSError, or the ValueError
    Orbax's tensorstore raises for a full disk) becomes one line, a WorkdirError."""
    try:
        yield
    except Exception as err:
        try:
            mngr.wait_until_finished()
        except Exception as save_err:  # noqa: BLE001 - the save in flight failed too
            log.warning("the checkpoint save in flight failed: %s: %s", type(save_err).__name__, save_err)
        if isinstance(err, DivergedError):
            raise type(err)(f"{err}. {checkpoints.describe_latest(mngr)}") from None
        if isinstance(err, (DecodeError, LoaderError)):
            what = ("replace or remove that file, or set --config.input.bad_images=skip"
                    if isinstance(err, DecodeError) else "the same command resumes")
            raise InputError(f"{err}; {what}. {checkpoints.describe_latest(mngr)}") from None
        cause = write_failure(err)
        if cause is not None and not isinstance(err, workdir_lib.WorkdirError):
            what = f"{type(cause).__name__}: {' '.join(str(cause).split())}"
            raise workdir_lib.WorkdirError(
                f"writing the run failed ({what}); free space or make the workdir writable, then run the "
                f"same command. {checkpoints.describe_latest(mngr)}") from err
        raise


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


def _train_and_evaluate(config, workdir, mesh, preemption: resume.PreemptionWatch) -> dict[str, Any]:
    main = distributed.is_main()
    config_json = config.to_json_best_effort(indent=2, sort_keys=True)
    resume.check_config(workdir, config_json)

    # ---- Input ----
    batch = config.batch_size
    train_set = setup.make_input(config, config.train_split, mesh)
    n, steps_per_epoch = train_set.num_examples, train_set.steps_per_epoch
    config_checks.check_data(config, n, train_set.channels)  # (again with the channels, and for TFDS)
    num_levels = len(config.clustering.num_clusters)
    total_steps = steps_per_epoch * config.epochs

    # ---- Encoder, optimizer, train state, step functions ----
    parts = setup.build(config, train_set.channels, steps_per_epoch, mesh)
    state, graphdef = parts.state, parts.graphdef
    replicated = sharding.replicated(mesh)

    # ---- Resume from the newest readable checkpoint ----
    mngr = checkpoints.manager(workdir, config.keep_checkpoints)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = checkpoints.restore_latest(mngr, abstract)
    hierarchy, hierarchy_epoch, meta = None, -1, {}
    if restored is not None:
        state, meta, hierarchy = restored
        hierarchy_epoch = meta.get("hierarchy_epoch", -1)
        at = meta["epoch"] * steps_per_epoch + meta["step_in_epoch"]
        if at != int(state.step):
            raise ValueError(
                f"the checkpoint of step {int(state.step)} was written at step {meta['step_in_epoch']} of "
                f"epoch {meta['epoch']}, which is step {at} at {steps_per_epoch} steps per epoch: the "
                "training set has changed size; resume on the same data or use a new --workdir")
        done, into = meta["epoch"], meta["step_in_epoch"]  # (epochs counted from 1, as the log does)
        log.info("resumed from step %d (%s)", int(state.step),
                 f"epoch {done + 1}/{config.epochs}, after its step {into}/{steps_per_epoch}" if into
                 else f"after epoch {done}/{config.epochs}")
    if main:  # after the resume checks: a refused run leaves the config of its checkpoints
        workdir_lib.write_atomic(workdir / workdir_lib.CONFIG_FILE, config_json)
    first_step = int(state.step)  # the loop counts steps on the host: no device sync per step

    # ---- Metrics, checkpoints, evaluators ----
    writer = metrics_lib.MetricsWriter(workdir, first_step, config, enabled=main)
    redo_evals = evals_cut_off(config, workdir, first_step, steps_per_epoch)  # (of the file the writer kept)
    hierarchy_dir = workdir / workdir_lib.HIERARCHY_DIR
    eval_inputs = {config.train_split: train_set}  # splits opened for the feature passes of evaluators
    # The context of the last epoch's evaluators and their results, which the summary reuses.
    final_ctx, final_results = None, {}
    context = lambda step: eval_context(config, graphdef, state, parts.model_meta, step, mesh,
                                        eval_inputs)  # of the current encoders

    def save_checkpoint(step: int) -> None:  # of the state after `step` steps, with the running sums
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        meta = dict(epoch=epoch, step_in_epoch=step_in_epoch, hierarchy_epoch=hierarchy_epoch,
                    encoder=parts.model_meta, log_sums=copy.deepcopy(window),
                    epoch_sums=copy.deepcopy(epoch_sums))
        checkpoints.save(mngr, state, meta, hierarchy)

    def evaluate_epoch(epoch: int, step: int) -> None:  # the evaluators due after `epoch`
        nonlocal final_ctx, final_results
        t_eval = time.perf_counter()
        final_ctx = context(step)
        record, final_results = run_evals(config, final_ctx, epoch, step == total_steps)
        if record:
            writer.write(dict(record, type="eval", epoch=epoch, step=step,
                              eval_seconds=time.perf_counter() - t_eval))

    # The log window and the epoch's sums so far: those of a mid-epoch checkpoint, else empty.
    window, epoch_sums = meta.get("log_sums", new_sums()), meta.get("epoch_sums", new_sums())
    first_epoch, first_in_epoch = divmod(first_step, steps_per_epoch)
    pending, inflight = [], collections.deque()  # metrics not yet fetched; steps not yet waited for
    with keeping_saves(mngr), contextlib.closing(train_set):
        if redo_evals:  # a kill cut off the evaluators after the checkpoint of the last epoch's end
            evaluate_epoch(first_epoch - 1, first_step)
        if first_step == total_steps and mngr.latest_step() is None:
            save_checkpoint(0)  # epochs=0: keep the initial encoder

        for epoch in range(first_epoch, config.epochs):
            # ---- Start of epoch: its hierarchy, prototypes and the queue's cached normalizers ----
            start = first_in_epoch if epoch == first_epoch else 0  # a run resumed mid-epoch starts there
            cluster_seconds, input_wait, t_epoch = 0.0, 0.0, time.perf_counter()
            if uses_prototypes(config, epoch) and (hierarchy is None or hierarchy_epoch != epoch):
                seed = clustering.epoch_seed(config.clustering, config.seed, epoch)
                hierarchy = features.key_hierarchy(graphdef, state.k_params, state.k_stats, train_set,
                                                   config.image_size, parts.mean_std, config.clustering, seed,
                                                   mesh=mesh)
                hierarchy_epoch, cluster_seconds = epoch, time.perf_counter() - t_epoch
                if main:
                    workdir_lib.save_npz(hierarchy_dir / f"epoch_{epoch:04d}.npz", hierarchy.to_arrays())
            protos, assignments = None, np.zeros((n, max(num_levels, 1)), np.int32)
            if hierarchy is not None and hierarchy_epoch == epoch:
                protos = objective.prototypes_from_hierarchy(hierarchy, replicated)
                assignments = hierarchy.assignments()
                if start == 0:  # (resumed mid-epoch, the restored state already holds the cache)
                    state = parts.refresh_lse(state, protos)
            step_fn = parts.warmup_step if protos is None else parts.prototype_step
            batches = train_set.steps(epoch, start, assignments)
            if start == 0:
                epoch_sums = new_sums()
            bar = tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{config.epochs}",
                       unit="step", leave=False, dynamic_ncols=True,
                       disable=not (config.progress_bar and main))
            t_log = time.perf_counter()

            for i in range(start, steps_per_epoch):
                # ---- Step ----
                t_input = time.perf_counter()
                images, labels = next(batches)
                input_wait += time.perf_counter() - t_input  # the host waiting for the loader
                state, metrics = step_fn(state, images, labels, protos)
                inflight.append(metrics)
                if len(inflight) > MAX_IN_FLIGHT:  # the host waits for step s - MAX_IN_FLIGHT before s + 1
                    jax.block_until_ready(inflight.popleft())
                bar.update()

                # ---- What is due after it: log, checkpoint, stop ----
                step, done_in_epoch = epoch * steps_per_epoch + i + 1, i + 1
                epoch_end = done_in_epoch == steps_per_epoch
                stop = preemption.reached(step)
                save = (stop or step == total_steps or itstime(step, config.checkpoint_every_steps)
                        or epoch_end and itstime(epoch + 1, config.checkpoint_every_epochs))
                pending.append(metrics)
                log_due = itstime(done_in_epoch, config.log_every_steps, final=epoch_end)
                if log_due or save:  # a checkpoint only after every step since the last was checked
                    per_step = fetch_checked(pending, step, config.divergence)
                    add_steps(window, per_step)
                    add_steps(epoch_sums, per_step)
                    pending = []
                if log_due:
                    flush_log(window, step, epoch, float(parts.schedule(step - 1)), batch, t_log, writer, bar)
                    window, t_log = new_sums(), time.perf_counter()
                if not epoch_end:  # (at the epoch's end, the checkpoint follows the epoch's record)
                    if save:
                        save_checkpoint(step)
                    if stop:
                        raise resume.preempted(mngr, step, preemption.signal_name)

            # ---- End of epoch: its record, checkpoint and evaluators ----
            bar.close()
            record = dict(means(epoch_sums), step=step, epoch=epoch, type="epoch",
                          clustering_seconds=cluster_seconds, input_wait_seconds=input_wait,
                          epoch_seconds=time.perf_counter() - t_epoch)
            writer.write(record)
            log.info("epoch %d/%d: loss %.4f (%s)", epoch + 1, config.epochs, record["loss"],
                     "instance only" if protos is None else f"{num_levels} prototype levels")
            if save:
                save_checkpoint(step)
            if stop:
                raise resume.preempted(mngr, step, preemption.signal_name)
            if config.evals:  # after the save: evaluations a kill cuts short are redone on resume
                evaluate_epoch(epoch, step)
        train_set.close()  # (its training loader's workers; the summary's feature pass has its own)
        mngr.wait_until_finished()
        if preemption.received:  # after the last step: the same command computes the summary
            raise resume.preempted(mngr, int(state.step), preemption.signal_name)

        # ---- Summary of the final encoder ----
        if final_ctx is None or final_ctx.encoder.step != int(state.step):  # else: its features are reused
            final_ctx, final_results = context(int(state.step)), {}
        summary = final_summary(config, final_ctx, final_results)
        writer.close()
        if main:
            workdir_lib.write_atomic(workdir / workdir_lib.SUMMARY_FILE, workdir_lib.dumps(summary))
            if preemption.received:  # (during the summary)
                log.warning("%s received: summary.json written, figures left out (python -m "
                            "hcsc_jax.visualize %s draws them)", preemption.signal_name, workdir)
            elif config.figures_at_end:
                visualize.write_run_figures(workdir)
    return summary


def eval_context(config, graphdef, state, enc_meta: dict, step: int, mesh,
                 inputs: dict) -> evaluators.Context:
    """An evaluators.Context for the query encoder of `state` (its key encoder and `config` as the
    context's `key_encoder` and `run_config`) on the run's data; `inputs` maps split names to
    `pipeline` inputs already open (reused and filled, not re-read)."""
    data = evaluators.common.data_spec({}, run_config=config.to_dict())  # (the run's own data fields)
    encoder = lambda params, stats: evaluators.Encoder(graphdef, params, stats, enc_meta, step)
    return evaluators.Context(encoder(state.q_params, state.q_stats), data, mesh, None, progress=False,
                              seed=config.seed, inputs=inputs,
                              key_encoder=encoder(state.k_params, state.k_stats), run_config=config)


def evals_cut_off(config, workdir, step: int, steps_per_epoch: int) -> bool:
    """Whether a run resuming at `step` must redo the evaluators of `config.evals` due at the end
    of the epoch that ended there: a kill landed between that checkpoint and their record in
    metrics.jsonl. Process 0 reads the file and tells the others."""
    if not config.evals or step == 0 or step % steps_per_epoch:
        return False
    epoch, last = step // steps_per_epoch - 1, step == steps_per_epoch * config.epochs
    due = any(itstime(epoch + 1, cfg.every_epochs, final=last) for cfg in config.evals.values())
    missing = np.zeros((), np.int32)
    path = workdir / metrics_lib.METRICS_FILE
    if distributed.is_main() and due:
        records = metrics_lib.read_records(path) if path.exists() else []
        missing += not any(r.get("type") == "eval" and r.get("step") == step for r in records)
    if jax.process_count() > 1:
        missing = distributed.broadcast_arrays({"missing": missing})["missing"]
    return bool(missing)


def run_evals(config, ctx: evaluators.Context, epoch: int, final: bool) -> tuple[dict[str, Any], dict]:
    """The evaluators of `config.evals` due after `epoch` (every `every_epochs`, and at the end) ->
    (one flat record {"<name>/<metric>": value} of their scalar results, {name: result})."""
    record, results = {}, {}
    for name, cfg in config.evals.items():
        if not itstime(epoch + 1, cfg.every_epochs, final=final):
            continue
        results[name], line = evaluators.run(evaluators.protocol(name, cfg), ctx, cfg)
        log.info("%s", line)
        record.update(trees.numbers(results[name], name))
    return record, results


def final_summary(config, ctx: evaluators.Context, results: dict) -> dict[str, Any]:
    """summary.json: {"step", "epochs"} and the result of the `config.evals` entry of type
    "summary" (`evaluators.summary`: knn_top1, nmi_per_level, num_clusters), taken from `results`
    (the evaluators' results of the last epoch on `ctx`) or run here on `ctx`. Without a summary
    entry, only the step and the epochs."""
    summary: dict[str, Any] = {"step": ctx.encoder.step, "epochs": config.epochs}
    for name in config_checks.summary_entries(config):
        if name not in results:
            results[name], line = evaluators.run("summary", ctx, config.evals[name])
            log.info("%s", line)
        summary.update(results[name])
    return summary
