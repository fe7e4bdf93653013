"""Selective contrastive losses: masked InfoNCE (ICSC) and ProtoNCE (PCSC), docs/method.md §2-§4.

How a negative that was not selected enters the loss is the `semantics` switch (docs/method.md §4):
- "paper": it is not in the sum at all (its logit is -inf in the log-sum-exp);
- "official": its logit is multiplied by 0 before the temperature division, so it stays in the
  denominator as exp(0) = 1 and carries no gradient (the authors' code).
A non-candidate (an invalid prototype, the positive itself, or in "official" mode a prototype
that is the positive of another query in the same group) is always left out entirely.

Only the query embedding receives gradients; keys, queue and prototypes are constants here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hcsc_jax.method import selection

SEMANTICS = ("paper", "official")


def check_semantics(semantics: str) -> None:
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")


def selective_cross_entropy(pos_logit, neg_logits, keep=None, candidates=None, semantics="paper"):
    """Cross-entropy with the positive at index 0 over a masked set of negatives.

    pos_logit (B,) and neg_logits (B, N), already divided by their temperatures;
    keep (..., B, N) bool selection masks, a sequence of L such (B, N) masks, or None (all
    kept); masks share the logits; candidates (B, N) bool or None (all candidates).
    Returns (loss (..., B), correct (..., B) bool: the positive scores at least as high as every
    logit left in the denominator, i.e. argmax == 0 as in torch).

    The exponentials are computed once per logit and shared by all masks: the log-sum-exp shift
    is max(positive, every candidate negative), selected or not, which bounds every term. That is
    exact and stable whenever logits span less than ~80 nats (|q.c| <= 1 for unit vectors, so
    any temperature above ~0.03 qualifies).
    """
    check_semantics(semantics)
    pos_logit = jnp.asarray(pos_logit, jnp.float32)
    neg_logits = jnp.asarray(neg_logits, jnp.float32)
    if candidates is not None:
        neg_logits = jnp.where(candidates, neg_logits, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.maximum(pos_logit, jnp.max(neg_logits, axis=-1)))  # (B,)
    exp_neg = jnp.exp(neg_logits - shift[:, None])  # (B, N), 0 for non-candidates
    if keep is None:
        return _loss_and_correct(pos_logit, shift, jnp.sum(exp_neg, axis=-1), neg_logits)
    # Unselected: dropped ("paper") or a zero logit, exp(0 - shift) ("official"). One mask at a
    # time: XLA then fuses mask, sum and its gradient into a single pass over (B, N).
    if semantics == "paper":
        dropped, zero_or_drop = 0.0, -jnp.inf
    else:
        dropped, zero_or_drop = jnp.exp(-shift)[:, None], 0.0
        if candidates is not None:
            dropped = jnp.where(candidates, dropped, 0.0)
    if isinstance(keep, (list, tuple)):  # one (B, N) mask per level, kept apart (see info_nce)
        lead, masks = (len(keep),), keep
    else:
        lead, masks = keep.shape[:-2], keep.reshape((-1,) + keep.shape[-2:])
    results = []
    for mask in masks:
        total = jnp.sum(jnp.where(mask, exp_neg, dropped), axis=-1)
        kept_logits = jnp.where(mask, neg_logits, zero_or_drop)
        if candidates is not None:
            kept_logits = jnp.where(candidates, kept_logits, -jnp.inf)
        results.append(_loss_and_correct(pos_logit, shift, total, kept_logits))
    loss, correct = (jnp.stack(r).reshape(lead + r[0].shape) for r in zip(*results))
    return loss, correct


def _loss_and_correct(pos_logit, shift, total, kept_logits):
    loss = shift + jnp.log(jnp.exp(pos_logit - shift) + total) - pos_logit
    return loss, pos_logit >= jnp.max(kept_logits, axis=-1)


def info_nce(q, k, queue, keep, temperature, semantics="paper"):
    """InfoNCE of q against its key k and the queue, with selected negatives (docs/method.md §2, Eq. (6)).

    q (B, d) queries (gradients flow here), k (B, d) positive keys, queue (K, d) negatives,
    keep (..., B, K) bool, a sequence of L (B, K) masks (one per level: on a CPU, XLA fuses
    separate masks much better than one stacked (L, B, K) array), or None. All masks share one
    q @ queue.T. Returns (loss (...) or (L,), accuracy likewise), means over the batch.
    """
    _check_pair(q, k, queue)
    for mask in keep if isinstance(keep, (list, tuple)) else [] if keep is None else [keep]:
        if mask.shape[-2:] != (q.shape[0], queue.shape[0]):
            raise ValueError(
                f"keep mask must end in (B, K) = {(q.shape[0], queue.shape[0])}, got {tuple(mask.shape)}"
            )
    k, queue = jax.lax.stop_gradient((k, queue))
    pos = jnp.sum(q * k, axis=-1) / temperature  # (B,)
    neg = (q @ queue.T) / temperature  # (B, K)
    loss, correct = selective_cross_entropy(pos, neg, keep, None, semantics)
    return loss.mean(axis=-1), correct.mean(axis=-1, dtype=jnp.float32)


def proto_nce(q, centroids, temperatures, labels, keep=None, semantics="paper", candidates=None):
    """ProtoNCE of q against its positive prototype and selected negatives (docs/method.md §3, Eq. (9)).

    Logit of prototype c is q.c / phi_c. q (B, d), centroids (M, d), temperatures (M,),
    labels (B,) positive prototype index, keep (B, M) bool or None, candidates (B, M) bool or
    None (from `proto_candidates`; the positive is always excluded from the negatives).
    Returns (loss, accuracy) scalars, means over the batch.
    """
    logits, pos = _prototype_logits(q, centroids, temperatures, labels)
    not_positive = ~_positive_one_hot(labels, centroids.shape[0])
    candidates = not_positive if candidates is None else candidates & not_positive
    loss, correct = selective_cross_entropy(pos, logits, keep, candidates, semantics)
    return loss.mean(), correct.mean(dtype=jnp.float32)


def _prototype_logits(q, centroids, temperatures, labels):
    """Logits q.c / phi_c of queries q (B, d) against centroids (M, d) with temperatures (M,)
    -> (logits (B, M), positive logits (B,) at labels (B,)). Prototypes get no gradient."""
    if q.ndim != 2 or centroids.ndim != 2 or q.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"q must be (B, d) and centroids (M, d) with the same d, got {tuple(q.shape)} and "
            f"{tuple(centroids.shape)}"
        )
    if temperatures.shape != centroids.shape[:1] or labels.shape != q.shape[:1]:
        raise ValueError(
            f"temperatures must be (M,) = ({centroids.shape[0]},) and labels (B,) = ({q.shape[0]},), "
            f"got {tuple(temperatures.shape)} and {tuple(labels.shape)}"
        )
    centroids, temperatures = jax.lax.stop_gradient((centroids, temperatures))
    logits = selection.similarity_logits(q, centroids, temperatures, None)
    return logits, jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]


def _positive_one_hot(labels, num_protos: int):
    """labels (B,) positive prototype of each query -> (B, M) bool, True at (i, labels[i])."""
    return labels[:, None] == jnp.arange(num_protos)[None, :]


def _groups(batch: int, group_size) -> int:
    group = batch if group_size is None else group_size
    if batch % group:
        raise ValueError(
            f"batch {batch} is not a multiple of group_size {group}: change the batch size or "
            "bn_group_size"
        )
    return group


def sample_negative_prototypes(key, labels, valid, num_negatives: int, semantics="paper", group_size=None):
    """PCL's random subset of r = `num_negatives` negative prototypes of one clustering.

    labels (B,) positive prototype of each query, valid (M,) bool -> (B, M) bool, True for the
    sampled negatives (uniform without replacement; fewer than r when fewer are eligible):
    - "paper" (PCL's eq. ProtoNCE): per query, from the valid prototypes but its own positive;
    - "official" (PCL's code, `sample(neg_proto_id, r)`): one draw per group of `group_size`
      consecutive queries (the code's per-GPU batch), from the valid prototypes that are no
      group member's positive (those enter `pcl_proto_nce` as the group's positive columns).
    """
    check_semantics(semantics)
    batch, num_protos = labels.shape[0], valid.shape[0]
    positive = _positive_one_hot(labels, num_protos)
    if semantics == "paper":
        excluded, repeat = positive | ~valid[None, :], 1
    else:
        repeat = _groups(batch, group_size)
        used = positive.reshape(batch // repeat, repeat, num_protos).any(axis=1)  # (G, M)
        excluded = used | ~valid[None, :]
    r = min(int(num_negatives), num_protos)
    scores = jnp.where(excluded, -1.0, jax.random.uniform(key, excluded.shape))  # eligible in [0, 1)
    top, idx = jax.lax.top_k(scores, r)  # a uniform random r-subset of the eligible ones
    rows = jnp.arange(excluded.shape[0])[:, None]
    sampled = jnp.zeros(excluded.shape, bool).at[rows, idx].set(top >= 0)
    return jnp.repeat(sampled, repeat, axis=0) if repeat > 1 else sampled


def pcl_proto_nce(q, centroids, temperatures, labels, sampled, semantics="paper", group_size=None):
    """PCL's ProtoNCE of one clustering (Li et al., ICLR 2021), `sampled` from
    `sample_negative_prototypes`. Logit of prototype c is q.c / phi_c.

    - "paper": -log exp(s_pos) / (exp(s_pos) + sum over the query's r sampled negatives).
    - "official" (PCL's code): the logits of query i are [its group's positive prototypes (one
      column per group member, duplicates included), the group's r sampled negatives] with
      target column i; so the denominator holds every group positive as often as it occurs.
    Returns (loss, accuracy) means over the batch; a query is correct when its positive scores at
    least as high as every other prototype in its denominator.
    """
    check_semantics(semantics)
    logits, pos = _prototype_logits(q, centroids, temperatures, labels)
    if sampled.shape != (q.shape[0], centroids.shape[0]):
        raise ValueError(f"sampled must be (B, M) = {(q.shape[0], centroids.shape[0])}, "
                         f"got {tuple(sampled.shape)}")
    batch, num_protos = q.shape[0], centroids.shape[0]
    positive = _positive_one_hot(labels, num_protos)
    if semantics == "paper":
        weight = (positive | (sampled & ~positive)).astype(jnp.float32)
    else:
        group = _groups(batch, group_size)
        counts = positive.reshape(batch // group, group, num_protos).sum(axis=1, dtype=jnp.float32)
        weight = jnp.repeat(counts, group, axis=0) + (sampled & (jnp.repeat(counts, group, axis=0) == 0))
    loss = jax.nn.logsumexp(logits, axis=-1, b=weight) - pos
    others = jnp.where((weight > 0) & ~positive, logits, -jnp.inf)
    return loss.mean(), (pos >= others.max(axis=-1)).mean(dtype=jnp.float32)


def proto_candidates(labels, valid, semantics="paper", group_size=None):
    """Candidate negative prototypes of each query (docs/method.md §3). labels (B,), valid (M,) -> (B, M).

    "paper": every valid prototype but the query's own positive. "official": additionally drops
    the positives of all queries in the same group of `group_size` consecutive samples (the
    authors' per-GPU batch of 32; here the BN group).
    """
    check_semantics(semantics)
    num_protos = valid.shape[0]
    positive = _positive_one_hot(labels, num_protos)
    candidates = valid[None, :] & ~positive
    if semantics == "paper":
        return candidates
    batch = labels.shape[0]
    group = _groups(batch, group_size)
    used = positive.reshape(batch // group, group, num_protos).any(axis=1)  # (G, M)
    return candidates & ~jnp.repeat(used, group, axis=0)


def _check_pair(q, k, queue):
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(
            f"q and k must both be (B, d), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must be (K, d) with d = {q.shape[1]}, got {tuple(queue.shape)}")
