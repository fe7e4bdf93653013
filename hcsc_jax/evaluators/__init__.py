"""Evaluation protocols of a frozen encoder, one module each (docs/method.md §7).

| module | protocol |
| --- | --- |
| `knn` | weighted kNN, chunked over the training features |
| `linear` | linear classifier, streamed crops, resumable (`linear`); on cached features (`linear_fast`) |
| `semisup` | fine-tuning on 1% / 10% of the labels (split files or class-balanced fractions) |
| `cluster` | k-means NMI / AMI |
| `voc` | VOC07 linear-SVM mAP (transfer) |
| `summary` | a training run's summary.json: kNN top-1 and the NMI of the key encoder's hierarchy |

`common.Context` holds the encoder, the data and the features; `run(name, ctx, cfg)` runs one
protocol. Every config names its evaluators in one schema, `config.evals = {name: {type,
every_epochs, ...settings}}` (`type`, the protocol, defaults to the name: `protocol`). eval.py
runs one entry on a checkpoint (`--eval=NAME`); the trainer runs those of its config every
`every_epochs` epochs (0: after the last epoch only) and after the last epoch.
"""

from __future__ import annotations

from hcsc_jax.evaluators import cluster, common, knn, linear, semisup, summary, voc
from hcsc_jax.evaluators.common import Context, DataSpec, Encoder, EvalError

# The registry, from what each module declares: its protocols (PROTOCOLS: name -> run), the
# settings of their `config.evals` entries and the rule of each (SETTINGS), those it has defaults
# for (DEFAULTED), and the counts the training set must cover (SIZED). A new evaluator is one
# module added here.
MODULES = (knn, linear, semisup, cluster, voc, summary)
PROTOCOLS = {name: fn for m in MODULES for name, fn in m.PROTOCOLS.items()}
SETTINGS = {name: m.SETTINGS for m in MODULES for name in m.PROTOCOLS}
DEFAULTED = {name: m.DEFAULTED for m in MODULES for name in m.PROTOCOLS}
SIZED = {name: m.SIZED for m in MODULES for name in m.PROTOCOLS}


def protocol(name: str, cfg) -> str:
    """The protocol of the `config.evals` entry `name`: its `type`, by default its name."""
    return cfg.get("type", name)


def run(name: str, ctx: Context, cfg) -> tuple[dict, str]:
    """Protocol `name` -> (result, one-line summary). Raises EvalError on bad input."""
    if name not in PROTOCOLS:
        raise EvalError(f"unknown evaluator {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name](ctx, cfg)


__all__ = ["DEFAULTED", "MODULES", "PROTOCOLS", "SETTINGS", "SIZED", "Context", "DataSpec", "Encoder",
           "EvalError", "cluster", "common", "knn", "linear", "protocol", "run", "semisup", "summary", "voc"]
