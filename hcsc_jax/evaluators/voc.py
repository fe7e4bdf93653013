"""PASCAL VOC 2007 classification with linear SVMs on frozen features (transfer, docs/method.md §7).

The protocol of PCL / HCSC's transfer table (Goyal et al.'s benchmark): L2-normalized pooled
center-crop features of VOC07 trainval and test; for each of the 20 classes a linear SVM
(scikit-learn LinearSVC, squared hinge, class weight 2 on positives) with the cost chosen from
`costs` by `folds`-fold cross-validation on trainval (mean AP), trained on the whole of trainval;
AP on test (scikit-learn's average precision), mean over classes. Objects marked difficult only
are left out of a class's training and test samples. Data: TFDS `voc/2007` (features "labels"
and "labels_no_difficult"), read without decoding images for the labels.
"""

from __future__ import annotations

import numpy as np

from hcsc_jax.evaluators import common
from hcsc_jax.models import l2_normalize
from hcsc_jax.run import rules

NUM_CLASSES = 20


def class_targets(labels, labels_no_difficult, num_classes: int) -> np.ndarray:
    """(N, C) int8: +1 the class is present (not only as difficult objects), -1 absent, 0 only
    difficult (ignored)."""
    t = -np.ones((len(labels), num_classes), np.int8)
    for i, (every, easy) in enumerate(zip(labels, labels_no_difficult)):
        t[i, np.asarray(every, np.int64)] = 0
        t[i, np.asarray(easy, np.int64)] = 1
    return t


def _svm(cost: float, seed: int):
    from sklearn.svm import LinearSVC  # (scikit-learn is imported where it is used: 1-2 s)

    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, loss="squared_hinge", tol=1e-4, max_iter=2000,
                     random_state=seed)


def _cv_ap(x, y, cost: float, folds: int, seed: int) -> float:
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold

    aps = []
    for tr, va in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        scores = _svm(cost, seed).fit(x[tr], y[tr]).decision_function(x[va])
        aps.append(average_precision_score(y[va] == 1, scores))
    return float(np.mean(aps))


def evaluate(train_x, train_t, test_x, test_t, *, costs=(0.01, 0.1, 1.0, 10.0), folds: int = 3,
             seed: int = 0) -> dict:
    """Per-class SVMs -> {"map", "ap": per class, "cost": per class} (percent)."""
    from sklearn.metrics import average_precision_score

    train_x = l2_normalize(np.asarray(train_x, np.float32), axis=1)
    test_x = l2_normalize(np.asarray(test_x, np.float32), axis=1)
    aps, chosen = [], []
    for c in range(train_t.shape[1]):
        keep, keep_test = train_t[:, c] != 0, test_t[:, c] != 0
        x, y = train_x[keep], train_t[keep, c]
        if min(np.sum(y == 1), np.sum(y == -1)) < folds or not np.any(test_t[keep_test, c] == 1):
            raise common.EvalError(f"class {c} has too few positives for {folds}-fold SVM cross-validation")
        best = max(costs, key=lambda cost: _cv_ap(x, y, cost, folds, seed))
        scores = _svm(best, seed).fit(x, y).decision_function(test_x[keep_test])
        aps.append(100 * average_precision_score(test_t[keep_test, c] == 1, scores))
        chosen.append(float(best))
    return dict(map=float(np.mean(aps)), ap=[float(a) for a in aps], cost=chosen)


def targets(ctx: common.Context, split: str) -> np.ndarray:
    """(N, 20) +1 / -1 / 0 targets of a VOC split (see `class_targets`)."""
    source = ctx.input(split).source
    if not hasattr(source, "feature"):
        raise common.EvalError(f"{ctx.data.dataset} is not a TFDS dataset with 'labels' / "
                               "'labels_no_difficult'; VOC07 transfer reads tfds:voc/2007")
    try:
        return class_targets(source.feature("labels"), source.feature("labels_no_difficult"), NUM_CLASSES)
    except ValueError as err:
        raise common.EvalError(str(err)) from None


def run(ctx: common.Context, cfg) -> tuple[dict, str]:
    """VOC07 SVM mAP (cfg: dataset, train_split, test_split, image_size, costs, folds)."""
    voc = ctx.with_data(dataset=cfg.dataset, train_split=cfg.train_split, eval_split=cfg.test_split,
                        image_size=int(cfg.image_size or ctx.data.image_size), pipeline="stream")
    train_t, test_t = targets(voc, cfg.train_split), targets(voc, cfg.test_split)
    res = evaluate(voc.features(cfg.train_split), train_t, voc.features(cfg.test_split), test_t,
                   costs=tuple(cfg.costs), folds=int(cfg.folds), seed=ctx.seed)
    res.update(dataset=cfg.dataset, num_train=len(train_t), num_test=len(test_t))
    return res, f"voc07 SVM step {ctx.encoder.step}: mAP {res['map']:.2f}"


# The settings of a `config.evals` entry of this protocol (besides `type` and `every_epochs`):
# what each takes, those with a default here, and the counts the training set must cover.
SETTINGS = {"dataset": rules.text(), "train_split": rules.text(), "test_split": rules.text(),
            "image_size": rules.optional(rules.SIDE, note="None: the run's image_size"),
            "costs": rules.tuple_of(rules.real(above=0), 1), "folds": rules.integer(2, 100)}
DEFAULTED = ()
SIZED = ()
PROTOCOLS = {"voc": run}
