"""Independent NumPy (float64, loop-based) reference of the HCSC objective, written from
docs/method.md §2-§5 and nothing else. Deliberately slow and literal."""

import numpy as np


def unit(rng, *shape):
    """Random L2-normalized float32 rows (a test input, not part of the reference)."""
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def log_softmax_at(logits, index):
    logits = np.asarray(logits, np.float64)
    m = logits.max()
    return logits[index] - (m + np.log(np.exp(logits - m).sum()))


def instance_probs(queue, centroids, phi, labels, valid):
    """docs/method.md §2: p[i, j] = 1 - softmax_c(Q_j.c/phi_c)[c(i)], phi >= 1e-3, p in [0, 0.999]."""
    phi = np.maximum(phi, 1e-3)
    members = np.flatnonzero(valid)
    p = np.zeros((len(labels), len(queue)))
    for i, label in enumerate(labels):
        for j, entry in enumerate(queue):
            logits = [entry @ centroids[c] / phi[c] for c in members]
            p[i, j] = 1 - np.exp(log_softmax_at(logits, list(members).index(label)))
    return np.clip(p, 0.0, 0.999)


def proto_probs(centroids, upper, upper_phi, parents, labels, upper_valid):
    """docs/method.md §3: p[i, j] = 1 - softmax_u(c_j.u/phi_u)[parent(c(i))], p in [1e-4, 0.999]."""
    members = list(np.flatnonzero(upper_valid))
    p = np.zeros((len(labels), len(centroids)))
    for i, label in enumerate(labels):
        for j, c in enumerate(centroids):
            logits = [c @ upper[u] / upper_phi[u] for u in members]
            p[i, j] = 1 - np.exp(log_softmax_at(logits, members.index(parents[label])))
    return np.clip(p, 1e-4, 0.999)


def _ce(pos, negs_kept, n_zero):
    """-log softmax[0] of [pos, *negs_kept, 0 (n_zero times)] and whether argmax == 0."""
    logits = np.array([pos] + list(negs_kept) + [0.0] * n_zero)
    return -log_softmax_at(logits, 0), bool(np.argmax(logits) == 0)


def info_nce(q, k, queue, keep, temperature, semantics):
    """docs/method.md §2/§4 for one mask (B, K) (None = all kept): mean loss and accuracy."""
    out = []
    for i in range(len(q)):
        pos = q[i] @ k[i] / temperature
        kept, zeros = [], 0
        for j in range(len(queue)):
            if keep is None or keep[i, j]:
                kept.append(q[i] @ queue[j] / temperature)
            elif semantics == "official":
                zeros += 1
        out.append(_ce(pos, kept, zeros))
    loss, acc = zip(*out)
    return np.mean(loss), np.mean(acc)


def proto_nce(q, centroids, phi, labels, keep, valid, semantics, group_size):
    """docs/method.md §3/§4: candidates = valid prototypes but the positive ("paper") or but every
    positive of the query's group ("official"); unselected dropped or zero logits."""
    out = []
    for i in range(len(q)):
        g0 = (i // group_size) * group_size
        group_positives = set(labels[g0 : g0 + group_size].tolist())
        pos = q[i] @ centroids[labels[i]] / phi[labels[i]]
        kept, zeros = [], 0
        for c in range(len(centroids)):
            if not valid[c] or c == labels[i]:
                continue
            if semantics == "official" and c in group_positives:
                continue
            if keep is None or keep[i, c]:
                kept.append(q[i] @ centroids[c] / phi[c])
            elif semantics == "official":
                zeros += 1
        out.append(_ce(pos, kept, zeros))
    loss, acc = zip(*out)
    return np.mean(loss), np.mean(acc)


def hcsc_loss(q, k, queue, levels, labels, inst_keep, proto_keep, temperature, semantics, group_size):
    """docs/method.md §5. levels: list of dicts (centroids, phi, valid); inst_keep[l] (B, K);
    proto_keep[l] (B, M_l) or None (top level: all candidates)."""
    inst = [info_nce(q, k, queue, inst_keep[l], temperature, semantics)[0] for l in range(len(levels))]
    proto = [
        proto_nce(q, lv["centroids"], lv["phi"], labels[:, l], proto_keep[l], lv["valid"], semantics,
                  group_size)[0]
        for l, lv in enumerate(levels)
    ]
    inst_total = np.sum(inst) if semantics == "official" else np.mean(inst)
    return inst_total + np.mean(proto)


def local_terms(local_q, k, queue, levels, labels, inst_keep, local_proto_keep, temperature, semantics,
                group_size, selection_on_local):
    """docs/method.md §6 multi-crop: the summed local (instance, prototype) terms of V views.

    local_q: V arrays (B, d); inst_keep[l] (B, K): the global query's masks, used by every view
    when selection_on_local (one InfoNCE per level, reduced over levels as docs/method.md §5), else one
    plain InfoNCE per view; local_proto_keep[v][l] (B, M_l) or None: view v's own PCSC masks;
    positives labels[:, l] are the global query's. PCSC is the mean over levels per view."""
    inst, proto = 0.0, 0.0
    for v, x in enumerate(local_q):
        if selection_on_local:
            per_level = [info_nce(x, k, queue, m, temperature, semantics)[0] for m in inst_keep]
            inst += np.sum(per_level) if semantics == "official" else np.mean(per_level)
        else:
            inst += info_nce(x, k, queue, None, temperature, semantics)[0]
        proto += np.mean([
            proto_nce(x, lv["centroids"], lv["phi"], labels[:, l], local_proto_keep[v][l], lv["valid"],
                      semantics, group_size)[0]
            for l, lv in enumerate(levels)
        ])
    return inst, proto


def pcl_proto_nce(q, centroids, phi, labels, sampled, semantics, group_size):
    """PCL's ProtoNCE (Li et al., ICLR 2021) of one clustering, literally as its code builds it.

    sampled (B, M) bool: the drawn negatives (per query for "paper"; for "official" the rows of a
    group are equal and exclude every group positive). "official" (PCL's code): per group of
    `group_size` queries, logits of query i = [q_i.c/phi_c for c in (positives of the group's
    queries, in order), then the group's sampled negatives], target = i's own column. "paper":
    [positive, the query's sampled negatives], target 0. Mean loss and accuracy (correct: the
    positive is >= every other prototype's logit in the row; duplicates of the positive do not
    count against it)."""
    out = []
    for i in range(len(q)):
        if semantics == "official":
            g0 = (i // group_size) * group_size
            columns = list(labels[g0 : g0 + group_size]) + [c for c in range(len(centroids)) if sampled[i, c]]
            target = i - g0
        else:
            columns = [labels[i]] + [c for c in range(len(centroids)) if sampled[i, c] and c != labels[i]]
            target = 0
        logits = np.array([q[i] @ centroids[c] / phi[c] for c in columns], np.float64)
        others = [logits[j] for j, c in enumerate(columns) if c != labels[i]]
        out.append((-log_softmax_at(logits, target), bool(not others or logits[target] >= max(others))))
    loss, acc = zip(*out)
    return np.mean(loss), np.mean(acc)
