"""Evaluation of a trained (or exported, or PyTorch-imported) encoder with the paper's protocols.

  python eval.py --eval=knn --checkpoint=runs/digits [--step=N]
  python eval.py --eval=linear --checkpoint=runs/digits --config.evals.linear.epochs=100
  python eval.py --config=configs/eval_imagenet.py --eval=linear --checkpoint=/runs/hcsc_200ep \\
      --config.data_dir=~/tensorflow_datasets

--checkpoint is a train.py workdir (its newest readable step, or --step) or a directory written
by checkpoints.export_encoder / `convert import-torch`, or `pixels:<workdir>` (`pixels` with the
data flags): the raw-pixel reference on that run's data (hcsc_jax/models/pixels.py). Dataset,
splits, crop size, normalization and input pipeline come from the eval config; fields left unset
there are read from <checkpoint>/config.json or, for an exported or imported encoder, crop size
and normalization from the input recorded with its weights. --eval=NAME runs the entry NAME of
the eval config's `evals` (the schema of the training configs' `config.evals`: {type (default:
NAME), settings}); --mode is another name for --eval. The entries of configs/eval_digits.py and
eval_imagenet.py (hcsc_jax/evaluators/, one module per type):

  knn          weighted kNN, k in config.evals.knn.ks, T = 0.07, chunked over the training features
  linear       the linear protocol (frozen encoder, crops + flips streamed, SGD lr 5.0, 100 epochs,
               x0.1 at 60 / 80), resumable: start the same command again after a kill
  linear_fast  the same classifier on cached center-crop features (a quick read, not the protocol)
  semisup      fine-tuning on a split file's images (config.evals.semisup.split_file, e.g.
               1percent.txt) or a class-balanced config.evals.semisup.fraction
  cluster      k-means of the frozen features, NMI / AMI per k in config.evals.cluster.ks
  voc          VOC07 classification with linear SVMs on frozen features (mAP), TFDS voc/2007
  summary      a training run's summary.json (kNN top-1, NMI of the key encoder's hierarchy); needs
               a train.py workdir (its key encoder and config.json)

Results go to <checkpoint>/eval/<name>_step<N>.json (or --out DIR); features are cached there
(features_step<N>_<dataset>_<split>.npz, keyed by a SHA-256 of the weights). Several processes
(one per host) take the flags of train.py; process 0 writes the results.
"""

import logging
import os
import sys

from absl import app, flags

from hcsc_jax.run import console

_CONFIG = console.define_config(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "eval_digits.py"),
    "Evaluation configuration (a Python file with get_config()).")
flags.declare_key_flag("config")  # listed by --help, not only by --helpfull
_EVAL = flags.DEFINE_string("eval", None, "The evaluator to run: an entry of the config's `evals` "
                            "(configs/eval_digits.py: knn, linear, linear_fast, semisup, cluster, voc, "
                            "summary).")
_MODE = flags.DEFINE_string("mode", None, "Another name for --eval (earlier commands).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or exported encoder directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "Directory for results and feature caches "
                           "(default: <checkpoint>/eval; e.g. when the checkpoint is read-only).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check the eval config, the checkpoint, the data and --out as "
                             "the evaluation would, write nothing, exit.")
flags.mark_flags_as_required(["checkpoint"])


def chosen_entry(config) -> tuple[str, object]:
    """The `config.evals` entry that --eval (or --mode) names -> (name, its settings); a usage
    error saying what to pass otherwise."""
    if _EVAL.value and _MODE.value and _EVAL.value != _MODE.value:
        console.usage_error(f"--eval={_EVAL.value} and --mode={_MODE.value} disagree; pass one (--mode is "
                            "another name for --eval)")
    name, known = _EVAL.value or _MODE.value, ", ".join(config.evals)
    if not name:
        console.usage_error(f"pass --eval=NAME, an entry of the config's evals: {known}")
    if name not in config.evals:
        console.usage_error(f"--eval={name}: the config has no evals.{name}; known: {known}")
    return name, config.evals[name]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup()
    config = _CONFIG.value
    name, cfg = chosen_entry(config)
    from hcsc_jax.run import config_checks  # (after flag parsing, so --help is fast)
    try:
        config_checks.check_eval_entry(name, cfg)  # before anything is read or written
    except config_checks.ConfigError as err:
        console.usage_error(str(err))
    from hcsc_jax import distributed, evaluators, sharding  # after flag parsing, so --help is fast
    from hcsc_jax.data import sources
    from hcsc_jax.run import workdir as workdir_lib
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not distributed.is_main():  # process 0 prints and writes the results
        logging.getLogger("hcsc_jax").setLevel(logging.WARNING)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    try:
        protocol = evaluators.protocol(name, cfg)
        ctx = evaluators.common.from_checkpoint(config, _CHECKPOINT.value, _STEP.value, sharding.make_mesh(),
                                                _OUT.value, key_encoder=protocol == "summary")
        out = ctx.out_dir  # (--out, else <checkpoint>/eval, or <run>/eval/pixels for the pixels)
        if _DRY_RUN.value:  # the data of the protocol's splits readable, --out writable, nothing written
            d = ctx.data
            sources.check_available(d.dataset, (d.train_split, d.eval_split), d.data_dir)
            workdir_lib.check_writable(out, flag="--out")
            logging.getLogger("hcsc_jax").info("dry run: the checkpoint, the data and %s are ready; nothing "
                                               "was written", out)
            return
        if distributed.is_main():  # after the checkpoint was found: a path that is not one gets no eval/
            workdir_lib.prepare(out, flag="--out")
        result, line = evaluators.run(protocol, ctx, cfg)
    except workdir_lib.WorkdirError as err:
        console.usage_error(err)
    except (evaluators.EvalError, sources.DataError) as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    if not distributed.is_main():
        return
    result = dict(ctx.common(), checkpoint=os.fspath(workdir_lib.path(_CHECKPOINT.value)), eval=name,
                  type=protocol, **result, config=config.to_dict())
    path = ctx.out_dir / f"{name}_step{ctx.encoder.step}.json"
    workdir_lib.write_atomic(path, workdir_lib.dumps(result))
    print(line)
    print(f"results: {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=console.parse_flags)
