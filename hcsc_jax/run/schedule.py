"""What a run does when: the loop's one "is it time?" predicate (`itstime`), the epochs that use
prototypes, and the evaluators of `config.evals` in a run: those due after an epoch (`run_evals`,
on the `eval_context` of the current encoders), those a kill cut off (`evals_cut_off`, redone on
resume), and the summary of the final encoder (`final_summary`, summary.json).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from hcsc_jax import distributed, evaluators, trees
from hcsc_jax.run import config_checks
from hcsc_jax.run import metrics as metrics_lib

log = logging.getLogger(__name__)


def uses_prototypes(config, epoch: int) -> bool:
    return bool(config.clustering.num_clusters) and epoch >= config.warmup_epochs


def itstime(count: int, every: int, *, final: bool = False) -> bool:
    """The loop's one "is it time?" predicate: whether a task done every `every` units (steps,
    epochs, logged steps; 0: never) is due after `count` of them, or forced by `final`."""
    return final or (every > 0 and count > 0 and count % every == 0)


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
