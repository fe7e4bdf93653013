"""Evaluation protocols of a frozen encoder, one module each (docs/method.md §7).

| module | protocol |
| --- | --- |
| `knn` | weighted kNN, chunked over the training features |
| `linear` | linear classifier, streamed crops, resumable (`linear`); on cached features (`linear_fast`) |
| `semisup` | fine-tuning on 1% / 10% of the labels (split files or class-balanced fractions) |
| `cluster` | k-means NMI / AMI |
| `voc` | VOC07 linear-SVM mAP (transfer) |

`common.Context` holds the encoder, the data and the features; `run(name, ctx, cfg)` runs one
protocol. eval.py runs one on a checkpoint; the trainer runs those of `config.evals` every
`every_epochs` epochs.
"""

from __future__ import annotations

from hcsc_jax.evaluators import cluster, common, knn, linear, semisup, voc
from hcsc_jax.evaluators.common import Context, DataSpec, Encoder, EvalError

PROTOCOLS = {
    "knn": knn.run,
    "linear": linear.run,
    "linear_fast": linear.run_fast,
    "semisup": semisup.run,
    "cluster": cluster.run,
    "voc": voc.run,
}


def run(name: str, ctx: Context, cfg) -> tuple[dict, str]:
    """Protocol `name` -> (result, one-line summary). Raises EvalError on bad input."""
    if name not in PROTOCOLS:
        raise EvalError(f"unknown evaluator {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name](ctx, cfg)


__all__ = ["PROTOCOLS", "Context", "DataSpec", "Encoder", "EvalError", "cluster", "common", "knn", "linear",
           "run", "semisup", "voc"]
