"""What the ResNet and ViT mappings share: key listings, shape and value checks, a fresh head."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hcsc_jax.models import ProjectionHead

log = logging.getLogger("hcsc_jax.convert")


def get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def fmt_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)}: {shown}" + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def has_head(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("fc.0.", "fc.2.")) for k in sd)


def fresh_head(num_features: int, meta: dict[str, Any], seed: int) -> dict:
    """Pure-dict parameters of a freshly initialized head (for a state dict without fc.0/fc.2)."""
    m = meta["model"]
    head = ProjectionHead(num_features, m.get("hidden_dim"), m["embed_dim"],
                          dtype=jnp.dtype(m.get("dtype", "float32")), rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(head, nnx.Param))


def check_values(sd: Mapping[str, Any], keys) -> None:
    """ValueError naming the first tensor of `keys` that the model cannot take as weights: not
    floating-point (e.g. an int64 tensor where a weight belongs), NaN or inf values, or a BatchNorm
    ``running_var`` with a negative variance."""
    for key in keys:
        x = np.asarray(sd[key])
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{key} is a {x.dtype} tensor; the model needs floating-point values there")
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise ValueError(f"{key} holds NaN or inf ({bad} of {x.size} values)")
        if key.endswith("running_var") and (x < 0).any():
            raise ValueError(f"{key} holds negative variances (min {x.min():.4g}): not a BatchNorm's running "
                             "variance")


def key_mismatch(meta, expected: list[str], sd: Mapping[str, Any], optional=()) -> None:
    """ValueError naming the missing and unexpected keys (first 20 of each, with counts)."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in set(expected) | set(optional)]
    if missing or unexpected:
        msg = [f"state dict does not match {meta['model']['arch']} (meta {meta['model']})"]
        if missing:
            msg.append(f"missing keys ({fmt_keys(missing)})")
        if unexpected:
            msg.append(f"unexpected keys ({fmt_keys(unexpected)})")
        raise ValueError("; ".join(msg))


def read_keys(normalized: tuple[dict, list[str]], meta, infer, seed: int):
    """(state dict, meta, whether it has the projection head) from a `normalize_*_keys` result:
    its notes logged, `meta` inferred by `infer` when None, a missing head said."""
    sd, notes = normalized
    for n in notes:
        log.warning("torch_to_encoder: %s", n)
    with_head = has_head(sd)
    if not with_head:
        log.warning("torch_to_encoder: no projection head (fc.0/fc.2) in the state dict; the head keeps its "
                    "fresh initialization (ProjectionHead, nnx.Rngs(%d))", seed)
    return sd, infer(sd) if meta is None else meta, with_head
