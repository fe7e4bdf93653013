"""Self-supervised pre-training with HCSC.

  python train.py                                   # HCSC on scikit-learn's digits
  python train.py --config configs/digits.py --workdir runs/digits --config.epochs=5
  python train.py --config configs/digits.py:pcl      # a variant of a config: runs/digits_pcl

A run resumes automatically from the newest readable checkpoint in --workdir.
Several processes (one per host): the same command on each, with --coordinator_address,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID); SLURM, Open MPI and Cloud TPU VMs are detected. See README "Multi-host and pods".
Outputs in --workdir (a local path or a bucket, gs://...): config.json, metrics.jsonl,
tensorboard/, hierarchy/epoch_*.npz, checkpoints/, summary.json (step, epochs and the result of
the config's `evals.summary` entry: kNN top-1 on the held-out split, NMI of each level of the key
encoder's hierarchy; printed at the end), figures/. On SIGTERM (preemption) or Ctrl-C the run saves a
checkpoint within a few steps (trainer.MAX_IN_FLIGHT) and exits 0; the same command resumes it.
A second Ctrl-C stops at once (exit status 130), also inside an XLA compile. A config that cannot
train, or a workdir another run holds (run.lock), is one line and exit status 2, before anything is
written; data that cannot be read (an unknown dataset or split, missing files) is one line and
exit status 1, before anything is written. --dry_run makes those checks and stops there.
"""

import json
import logging
import os
import sys

from absl import app, flags

from hcsc_jax.run import console

_CONFIG = console.define_config(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py"),
    "Training configuration (a Python file with get_config(); FILE:VARIANT picks a variant).")
flags.declare_key_flag("config")  # listed by --help, not only by --helpfull
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check the config, the data, the init encoder and the workdir "
                             "(and a checkpoint's config to resume) as the run would, write nothing, exit.")


def run_name(config_filename: str) -> str:
    """configs/digits.py -> digits; configs/digits.py:pcl,runlocal -> digits_pcl_runlocal."""
    path, _, arg = config_filename.partition(":")
    return "_".join([os.path.splitext(os.path.basename(path))[0]]
                    + [t.strip() for t in arg.split(",") if t.strip()])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    ours = console.setup()
    from hcsc_jax import distributed  # after flag parsing, so --help is fast
    from hcsc_jax.data.sources import DataError
    from hcsc_jax.run import failures, resume, trainer
    from hcsc_jax.run import workdir as workdir_lib
    from hcsc_jax.run.checkpoints import NoReadableStep
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not distributed.is_main():
        ours.setLevel(logging.WARNING)
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", run_name(flags.FLAGS["config"].config_filename))
    ours.info("workdir: %s", workdir)
    try:
        summary = trainer.train_and_evaluate(config, workdir, dry_run=_DRY_RUN.value)
    except (failures.DivergedError, failures.InputError, DataError, NoReadableStep) as err:
        ours.error("%s", err)  # one line; nothing written when it is the data's (DataError)
        sys.exit(1)
    except resume.Preempted as err:
        ours.warning("%s", err)
        sys.exit(0)
    except KeyboardInterrupt:
        ours.error("stopped by Ctrl-C before a checkpoint could be saved; the same command resumes "
                   "from the last one")
        sys.exit(130)
    except (workdir_lib.WorkdirError, resume.ConfigMismatch, trainer.ConfigError, ImportError) as err:
        ours.error("%s", err)  # one line: what to change
        sys.exit(2)
    if _DRY_RUN.value:
        ours.info("dry run: the config, the data and %s are ready; nothing was written", workdir)
    elif distributed.is_main():
        print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main, flags_parser=console.parse_flags)
