"""The whole HCSC objective for one batch (docs/method.md §2-§5), against one epoch's
`device_prototypes.Prototypes`. `hcsc_objective` returns the loss and the metrics a user watches;
it is pure and jittable.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from hcsc_jax.method import losses, selection
from hcsc_jax.method.device_prototypes import Prototypes

POSITIVES = ("assignment", "nearest")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Static switches of the objective. MoCo v2 and PCL-like baselines are settings of these.

    semantics: "paper" | "official" (docs/method.md §4, §5); positive: "assignment" (k-means assignment
    of the epoch, the authors' code) | "nearest" (argmax_c q.c/phi_c, the paper);
    temperature: instance temperature T; group_size: group whose positives are removed from
    the prototype candidates in "official" mode; sampler: see `selection.bernoulli_mask`;
    selection_on_local: multi-crop local views use the global query's instance masks (one
    InfoNCE per level and view) instead of one plain InfoNCE per view (docs/method.md §6);
    proto_negatives: PCL's r, 0 = every candidate prototype is a negative (HCSC). r > 0 replaces
    the prototype term by PCL's ProtoNCE against r randomly sampled negative prototypes per
    level (`losses.sample_negative_prototypes`, `losses.pcl_proto_nce`; "official" = PCL's
    code, "paper" = PCL's equation); it excludes prototype selection.
    skip_last_prototype: the authors' off-by-one (docs/method.md §9): on every level the highest
    cluster id that has members is never a negative prototype (their code, and PCL's, take the
    negatives from `range(im2cluster.max())`); it stays a positive and a selection candidate.
    """

    semantics: str = "paper"
    positive: str = "assignment"
    temperature: float = 0.2
    instance_selection: bool = True
    prototype_selection: bool = True
    instance_loss: bool = True
    proto_loss: bool = True
    group_size: int | None = 32
    sampler: str = "hash"
    selection_on_local: bool = False
    proto_negatives: int = 0
    skip_last_prototype: bool = False

    def __post_init__(self):
        losses.check_semantics(self.semantics)
        if self.positive not in POSITIVES:
            raise ValueError(f"positive must be one of {POSITIVES}, got {self.positive!r}")
        if self.sampler not in selection.SAMPLERS:
            raise ValueError(f"sampler must be one of {selection.SAMPLERS}, got {self.sampler!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not (self.instance_loss or self.proto_loss):
            raise ValueError("at least one of instance_loss and proto_loss must be on")
        if self.proto_negatives < 0:
            raise ValueError(f"proto_negatives must be >= 0, got {self.proto_negatives}")
        if self.proto_negatives and self.prototype_selection:
            raise ValueError(
                "proto_negatives > 0 (PCL's sampled negative prototypes) replaces prototype selection; "
                "set prototype_selection=False"
            )


def positive_prototypes(q, prototypes: Prototypes, labels, positive: str) -> list[jax.Array]:
    """Positive prototype of every query, per level: L arrays (B,) int32.

    "assignment": labels[:, l] (the epoch's k-means assignment); "nearest": argmax over valid
    prototypes of q.c/phi_c (no gradient).
    """
    if positive == "assignment":
        return [labels[:, l] for l in range(prototypes.num_levels)]
    q = jax.lax.stop_gradient(q)
    return [
        jnp.argmax(selection.similarity_logits(q, c, t, v), axis=-1).astype(jnp.int32)
        for c, t, v in zip(prototypes.centroids, prototypes.temperatures, prototypes.valid)
    ]


def negative_valid(valid, skip_last: bool):
    """The prototypes of one level that may be negatives: `valid` (M,), without the highest valid
    id when `skip_last` (`ObjectiveConfig.skip_last_prototype`: the authors' `range(im2cluster.max())`;
    valid = has members, so that id is their `im2cluster.max()`)."""
    if not skip_last:
        return valid
    ids = jnp.arange(valid.shape[0])
    return valid & (ids != jnp.max(jnp.where(valid, ids, -1)))


def instance_masks(queue, prototypes: Prototypes, positives, rng, cfg: ObjectiveConfig, queue_lse=None):
    """ICSC keep masks of one batch (docs/method.md §2), drawn once per step for the global query.

    queue (K, d); positives: L arrays (B,); rng the objective's jax.random key; queue_lse (L, K)
    or None. Returns L masks (B, K) bool, or None when instance selection is off.
    """
    if not cfg.instance_selection:
        return None
    p = prototypes
    inst_key, _ = jax.random.split(rng)
    return tuple(
        selection.bernoulli_mask(
            jax.random.fold_in(inst_key, l),
            selection.instance_selection_probs(
                queue, p.centroids[l], p.temperatures[l], positives[l], p.valid[l],
                None if queue_lse is None else queue_lse[l],
            ),
            cfg.sampler,
        )
        for l in range(p.num_levels)
    )


def prototype_masks(prototypes: Prototypes, positives, rng, cfg: ObjectiveConfig, num_views: int = 1):
    """PCSC keep masks (docs/method.md §3) of `num_views` views, drawn independently from one set of
    probabilities (the positives are the global query's, so the probabilities are shared).

    positives: L arrays (B,); rng the objective's jax.random key. View 0 is the global query;
    view v >= 1 (local view v - 1) draws fresh masks from fold_in(prototype key, v). Returns
    num_views lists of L entries (B, M_l) bool, None at the top level or when prototype
    selection is off.
    """
    p, num_levels = prototypes, prototypes.num_levels
    if not cfg.prototype_selection:
        return tuple([None] * num_levels for _ in range(num_views))
    if num_levels > 1 and not p.parents:
        raise ValueError(
            "prototype selection needs a hierarchy (parents); these are independent clusterings "
            "(clustering.mode='independent'): set prototype_selection=False"
        )
    _, proto_key = jax.random.split(rng)
    probs = [
        selection.prototype_selection_probs(
            p.centroids[l], p.centroids[l + 1], p.temperatures[l + 1], p.parents[l],
            positives[l], p.valid[l + 1], table=p.selection_tables[l],
        )
        for l in range(num_levels - 1)
    ]

    def draw(key):  # one view: L-1 masks (B, M_l), None at the top level
        draw_level = lambda l, x: selection.bernoulli_mask(jax.random.fold_in(key, l), x, cfg.sampler)
        return [draw_level(l, x) for l, x in enumerate(probs)] + [None]

    return tuple(draw(proto_key if v == 0 else jax.random.fold_in(proto_key, v)) for v in range(num_views))


def _instance_term(q, k, queue, keep, cfg: ObjectiveConfig):
    """ICSC of q (B, d) against k (B, d) and queue (K, d) with the L masks `keep` (or None: one
    plain InfoNCE). Returns (total: sum over levels "official", mean "paper"; losses, accuracies:
    (L,) or scalars when keep is None)."""
    loss, acc = losses.info_nce(q, k, queue, keep, cfg.temperature, cfg.semantics)
    if keep is None:
        return loss, loss, acc
    return (loss.sum() if cfg.semantics == "official" else loss.mean()), loss, acc


def pcl_negative_masks(prototypes: Prototypes, positives, rng, cfg: ObjectiveConfig, view: int = 0):
    """PCL's sampled negative prototypes (cfg.proto_negatives per level) of one view: L masks
    (B, M_l) bool (`losses.sample_negative_prototypes`). rng: the objective's key; view 0 is the
    global query, view v >= 1 the local view v - 1 (a fresh draw)."""
    key = jax.random.fold_in(jax.random.split(rng)[1], 0x9C1)
    if view:
        key = jax.random.fold_in(key, view)
    return [
        losses.sample_negative_prototypes(jax.random.fold_in(key, l), positives[l],
                                          negative_valid(prototypes.valid[l], cfg.skip_last_prototype),
                                          cfg.proto_negatives, cfg.semantics, cfg.group_size)
        for l in range(prototypes.num_levels)
    ]


def _proto_term(q, prototypes: Prototypes, positives, masks, candidates, cfg: ObjectiveConfig):
    """The prototype term of q (B, d): the mean over levels of PCSC (`losses.proto_nce`, masks:
    the L keep masks of `prototype_masks`, candidates: L entries (B, M_l)) or, when
    cfg.proto_negatives, of PCL's ProtoNCE (`losses.pcl_proto_nce`, masks: the L sampled
    negatives of `pcl_negative_masks`, candidates unused).
    Returns (mean over levels, L losses, L accuracies)."""
    p = prototypes

    def level(l):
        args = (q, p.centroids[l], p.temperatures[l], positives[l], masks[l], cfg.semantics)
        if cfg.proto_negatives:
            return losses.pcl_proto_nce(*args, cfg.group_size)
        return losses.proto_nce(*args, candidates[l])

    level_losses, accs = zip(*(level(l) for l in range(p.num_levels)))
    return jnp.mean(jnp.stack(level_losses)), level_losses, accs


def _check_local(q, local_q) -> None:
    for v, x in enumerate(local_q):
        if x.shape != q.shape:
            raise ValueError(f"local_q[{v}] must be (B, d) = {tuple(q.shape)} like q, got {tuple(x.shape)}")


def hcsc_objective(
    q, k, queue, prototypes: Prototypes | None, labels, rng, cfg: ObjectiveConfig, queue_lse=None, local_q=()
) -> tuple[jax.Array, dict[str, Any]]:
    """HCSC loss of one batch and its metrics.

    q (B, d) L2-normalized query embeddings (with local_q, the only inputs that receive
    gradients); k (B, d) keys; queue (K, d); prototypes: this epoch's `Prototypes`, or None
    during warm-up (then the loss is plain InfoNCE, as in MoCo v2); labels (B, L) int32 k-means
    assignments per level (ignored when cfg.positive == "nearest" or prototypes is None); rng a
    jax.random key; queue_lse (L, K) optional `queue_log_normalizers(queue, prototypes)` cache;
    local_q: V arrays (B, d), the L2-normalized query embeddings of V local (multi-crop) views.

    Each local view adds (docs/method.md §6) an InfoNCE term against k and the queue (with the global
    query's per-level instance masks, reduced over levels like the global term, when
    cfg.selection_on_local; else plain) and a PCSC term with the global query's positives and
    candidates and fresh selection masks (`prototype_masks`); local terms are summed over views.
    In warm-up every view adds a plain InfoNCE term.

    Returns (loss scalar, metrics dict of scalars): loss, loss_instance, loss_proto,
    loss_local_instance and loss_local_proto (when V > 0) and, per level l, instance_loss/l,
    instance_acc/l, instance_keep/l (mean selection rate of queue entries), proto_loss/l,
    proto_acc/l, proto_keep/l (of candidate prototypes), all of the global query. Without
    instance selection the instance term is one plain InfoNCE (instance_loss, instance_acc).
    """
    local_q = tuple(local_q)
    _check_local(q, local_q)
    if prototypes is None:
        loss, acc = losses.info_nce(q, k, queue, None, cfg.temperature, cfg.semantics)
        metrics = {"loss_instance": loss, "instance_acc": acc}
        if local_q:
            metrics["loss_local_instance"] = sum(_instance_term(x, k, queue, None, cfg)[0] for x in local_q)
            loss = loss + metrics["loss_local_instance"]
        metrics["loss"] = loss
        return loss, metrics

    num_levels = prototypes.num_levels
    if labels.ndim != 2 or labels.shape != (q.shape[0], num_levels):
        raise ValueError(
            f"labels must be (B, L) = ({q.shape[0]}, {num_levels}) k-means assignments, got "
            f"{tuple(labels.shape)}"
        )
    if queue_lse is not None and queue_lse.shape != (num_levels, queue.shape[0]):
        raise ValueError(
            f"queue_lse must be (L, K) = ({num_levels}, {queue.shape[0]}), got {tuple(queue_lse.shape)}"
        )
    p = prototypes
    positives = positive_prototypes(q, p, labels, cfg.positive)
    metrics: dict[str, Any] = {}
    terms = []

    if cfg.instance_loss:
        inst_keep = instance_masks(queue, p, positives, rng, cfg, queue_lse)
        inst_total, inst_loss, inst_acc = _instance_term(q, k, queue, inst_keep, cfg)
        if inst_keep is None:  # one plain InfoNCE term, the same for every level
            metrics["instance_loss"], metrics["instance_acc"] = inst_loss, inst_acc
        else:
            for l in range(num_levels):
                metrics[f"instance_loss/{l}"] = inst_loss[l]
                metrics[f"instance_acc/{l}"] = inst_acc[l]
                metrics[f"instance_keep/{l}"] = inst_keep[l].mean(dtype=jnp.float32)
        metrics["loss_instance"] = inst_total
        terms.append(inst_total)
        if local_q:
            local_keep = inst_keep if cfg.selection_on_local else None
            metrics["loss_local_instance"] = sum(
                _instance_term(x, k, queue, local_keep, cfg)[0] for x in local_q
            )
            terms.append(metrics["loss_local_instance"])

    if cfg.proto_loss:
        if cfg.proto_negatives:  # PCL: r sampled negatives per view, no selection
            masks = [pcl_negative_masks(p, positives, rng, cfg, v) for v in range(1 + len(local_q))]
            candidates = None
        else:
            masks = prototype_masks(p, positives, rng, cfg, 1 + len(local_q))
            candidates = [
                losses.proto_candidates(positives[l], negative_valid(p.valid[l], cfg.skip_last_prototype),
                                        cfg.semantics, cfg.group_size)
                for l in range(num_levels)
            ]
        metrics["loss_proto"], level_losses, accs = _proto_term(q, p, positives, masks[0], candidates, cfg)
        for l in range(num_levels):
            if candidates is not None and masks[0][l] is not None:
                kept = (masks[0][l] & candidates[l]).sum(dtype=jnp.float32)
                metrics[f"proto_keep/{l}"] = kept / jnp.maximum(candidates[l].sum(dtype=jnp.float32), 1.0)
            metrics[f"proto_loss/{l}"], metrics[f"proto_acc/{l}"] = level_losses[l], accs[l]
        terms.append(metrics["loss_proto"])
        if local_q:
            metrics["loss_local_proto"] = sum(
                _proto_term(x, p, positives, m, candidates, cfg)[0] for x, m in zip(local_q, masks[1:])
            )
            terms.append(metrics["loss_local_proto"])

    loss = sum(terms)
    metrics["loss"] = loss
    return loss, metrics
