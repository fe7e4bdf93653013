"""Evaluation of a trained (or exported, or PyTorch-imported) encoder with the paper's protocols.

  python eval.py --mode=knn --checkpoint=runs/digits [--step=N]
  python eval.py --mode=linear --checkpoint=runs/digits --config.linear.epochs=100
  python eval.py --config=configs/eval_imagenet.py --mode=linear --checkpoint=/runs/hcsc_200ep \\
      --config.data_dir=~/tensorflow_datasets

--checkpoint is a train.py workdir (its newest readable step, or --step) or a directory written
by checkpoints.export_encoder / `convert import-torch`. Dataset, splits, crop size, normalization
and input pipeline come from the eval config; fields left unset there are read from
<checkpoint>/config.json. Modes (hcsc_jax/evaluators/, one module each):

  knn          weighted kNN, k in config.knn.ks, T = 0.07, chunked over the training features
  linear       the linear protocol (frozen encoder, crops + flips streamed, SGD lr 5.0, 100 epochs,
               x0.1 at 60 / 80), resumable: start the same command again after a kill
  linear_fast  the same classifier on cached center-crop features (a quick read, not the protocol)
  semisup      fine-tuning on a split file's images (config.semisup.split_file, e.g. 1percent.txt)
               or a class-balanced config.semisup.fraction
  cluster      k-means of the frozen features, NMI / AMI per k in config.cluster.ks
  voc          VOC07 classification with linear SVMs on frozen features (mAP), TFDS voc/2007

Results go to <checkpoint>/eval/<mode>_step<N>.json (or --out DIR); features are cached there
(features_step<N>_<dataset>_<split>.npz, keyed by a SHA-256 of the weights). Several processes
(one per host) take the flags of train.py; process 0 writes the results.
"""

import logging
import os
import sys

from absl import app, flags

from hcsc_jax import console

_CONFIG = console.define_config(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "eval_digits.py"),
    "Evaluation configuration (a Python file with get_config()).")
_MODE = flags.DEFINE_enum("mode", None, ["knn", "linear", "linear_fast", "cluster", "semisup", "voc"],
                          "Evaluation protocol.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or exported encoder directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "Directory for results and feature caches "
                           "(default: <checkpoint>/eval; e.g. when the checkpoint is read-only).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["mode", "checkpoint"])

# linear_fast shares the linear protocol's settings.
SECTION = {"linear_fast": "linear"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup()
    from hcsc_jax import distributed, evaluators, sharding  # after flag parsing, so --help is fast
    from hcsc_jax import workdir as workdir_lib
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not distributed.is_main():  # process 0 prints and writes the results
        logging.getLogger("hcsc_jax").setLevel(logging.WARNING)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    config, mode = _CONFIG.value, _MODE.value
    out = workdir_lib.path(_OUT.value or workdir_lib.path(_CHECKPOINT.value) / "eval")
    try:
        if distributed.is_main():
            workdir_lib.prepare(out, flag="--out")
        ctx = evaluators.common.from_checkpoint(config, _CHECKPOINT.value, _STEP.value, sharding.make_mesh(),
                                                out)
        result, line = evaluators.run(mode, ctx, config[SECTION.get(mode, mode)])
    except workdir_lib.WorkdirError as err:
        console.usage_error(err)
    except evaluators.EvalError as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    if not distributed.is_main():
        return
    result = dict(ctx.common(), checkpoint=os.fspath(workdir_lib.path(_CHECKPOINT.value)), mode=mode,
                  **result, config=config.to_dict())
    path = ctx.out_dir / f"{mode}_step{ctx.encoder.step}.json"
    workdir_lib.write_atomic(path, workdir_lib.dumps(result))
    print(line)
    print(f"results: {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=console.parse_flags)
