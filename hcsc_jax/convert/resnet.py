"""ResNet encoders: torchvision / the authors' key layouts <-> the NNX encoder (the table in
the package docstring)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hcsc_jax import models
from hcsc_jax.convert.common import (
    check_values,
    fmt_keys,
    fresh_head,
    get_path,
    has_head,
    key_mismatch,
    read_keys,
)
from hcsc_jax.convert.vit import infer_vit_meta, is_vit_state_dict, vit_encoder_to_torch, vit_torch_to_encoder
from hcsc_jax.models import Encoder, VisionTransformer
from hcsc_jax.models.resnet import Bottleneck

log = logging.getLogger("hcsc_jax.convert")

_BN_KEYS = ("weight", "bias", "running_mean", "running_var")
_IGNORED_TOP = ("encoder_k.", "queue")  # momentum encoder and negative queue (queue, queue_ptr)


# ----------------------------------------------------------------------------- layout


def _layout(model: Encoder, with_head: bool = True) -> Iterator[tuple[str, str, tuple]]:
    """(torch module name, kind in {'conv', 'bn', 'linear'}, NNX path) in torchvision's order."""
    bb = model.backbone
    yield "conv1", "conv", ("backbone", "conv1")
    yield "bn1", "bn", ("backbone", "bn1")
    for i in range(1, 5):
        for j, blk in enumerate(getattr(bb, f"layer{i}")):
            base = ("backbone", f"layer{i}", j)
            for k in range(1, 4 if isinstance(blk, Bottleneck) else 3):
                yield f"layer{i}.{j}.conv{k}", "conv", base + (f"conv{k}",)
                yield f"layer{i}.{j}.bn{k}", "bn", base + (f"bn{k}",)
            if blk.downsample is not None:
                yield f"layer{i}.{j}.downsample.0", "conv", base + ("downsample", 0)
                yield f"layer{i}.{j}.downsample.1", "bn", base + ("downsample", 1)
    if with_head:
        yield "fc.0", "linear", ("head", "fc0")
        yield "fc.2", "linear", ("head", "fc2")


def _expected_keys(model: Encoder, with_head: bool = True) -> list[str]:
    keys = []
    for name, kind, _ in _layout(model, with_head):
        keys += [
            f"{name}.{s}"
            for s in (_BN_KEYS if kind == "bn" else ("weight",) if kind == "conv" else ("weight", "bias"))
        ]
    return keys






# ----------------------------------------------------------------------------- key layouts


def normalize_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Strips the authors' / MoCo / DataParallel prefixes -> ({torchvision-style key: array}, notes).

    Keys of ``encoder_q`` are kept (prefix removed); ``encoder_k.*``, ``queue*`` and any other key
    outside ``encoder_q`` are dropped; ``num_batches_tracked`` is dropped; a single-layer
    ``fc.weight``/``fc.bias`` (classifier) is dropped. Every drop but the expected ones is noted.
    """
    notes: list[str] = []
    sd = {str(k): v for k, v in state_dict.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if any(k.startswith("encoder_q.") for k in sd):
        other = [k for k in sd if not k.startswith("encoder_q.")]
        expected_other = [k for k in other if k.startswith(_IGNORED_TOP)]
        if expected_other:
            notes.append(
                f"ignored {len(expected_other)} momentum-encoder/queue entries (encoder_k.*, queue*)"
            )
        extra = [k for k in other if not k.startswith(_IGNORED_TOP)]
        if extra:
            notes.append(f"ignored entries outside encoder_q: {fmt_keys(extra)}")
        sd = {k[len("encoder_q.") :]: v for k, v in sd.items() if k.startswith("encoder_q.")}
    else:
        dropped = [k for k in sd if k.startswith(_IGNORED_TOP)]
        if dropped:
            notes.append(f"ignored {len(dropped)} momentum-encoder/queue entries (encoder_k.*, queue*)")
            sd = {k: v for k, v in sd.items() if not k.startswith(_IGNORED_TOP)}
    for k in ("fc.weight", "fc.bias"):
        if k in sd:
            notes.append(f"ignored {k} {tuple(np.shape(sd[k]))}: a single-layer classifier, not the MLP head")
            del sd[k]
    sd = {k: np.asarray(v) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    return sd, notes




def infer_meta(
    state_dict: Mapping[str, Any],
    *,
    embed_dim: int = 128,
    hidden_dim: int | None = None,
    bn_group_size: int | None = 32,
    dtype: str = "float32",
    arch: str | None = None,
    image_size: int | None = None,
    encoder: str = "base",
    **extra,
) -> dict[str, Any]:
    """`models.encoder_meta` for a (normalized or raw) torch state dict, from tensor shapes:
    arch (resnet18/34/50 from block type and counts), width (stem channels / 64), small_stem (3x3
    stem), in_channels, and the head's hidden/out dims (``embed_dim``/``hidden_dim`` are used only
    when the dict has no head). A ViT's is :func:`infer_vit_meta` (``arch``, ``image_size`` and
    ``encoder`` are for ViTs only)."""
    if is_vit_state_dict(state_dict):
        return infer_vit_meta(state_dict, embed_dim=embed_dim, hidden_dim=hidden_dim, dtype=dtype, arch=arch,
                              image_size=image_size, encoder=encoder, bn_group_size=bn_group_size, **extra)
    sd, _ = normalize_keys(state_dict)
    if "conv1.weight" not in sd:
        raise ValueError(
            "cannot infer the architecture: no conv1.weight (is this a ResNet state dict?); "
            f"keys: {fmt_keys(sorted(sd))}"
        )
    stem = np.shape(sd["conv1.weight"])
    if len(stem) != 4 or stem[2] != stem[3] or stem[2] not in (3, 7):
        raise ValueError(
            f"conv1.weight has shape {stem}; expected [C, in, 7, 7] or [C, in, 3, 3] (small stem)"
        )
    counts = []
    for i in range(1, 5):
        j = 0
        while f"layer{i}.{j}.conv1.weight" in sd:
            j += 1
        counts.append(j)
    bottleneck = "layer1.0.conv3.weight" in sd
    archs = {
        (False, (2, 2, 2, 2)): "resnet18",
        (False, (3, 4, 6, 3)): "resnet34",
        (True, (3, 4, 6, 3)): "resnet50",
    }
    arch = archs.get((bottleneck, tuple(counts)))
    if arch is None:
        raise ValueError(
            f"unsupported ResNet: {'bottleneck' if bottleneck else 'basic'} blocks {tuple(counts)} per "
            "stage (supported: resnet18, resnet34, resnet50)"
        )
    if has_head(sd):
        if "fc.0.weight" not in sd or "fc.2.weight" not in sd:
            raise ValueError("the projection head is incomplete: need fc.0.weight and fc.2.weight")
        hidden_dim = int(np.shape(sd["fc.0.weight"])[0])
        embed_dim = int(np.shape(sd["fc.2.weight"])[0])
    model = {
        "arch": arch,
        "width": stem[0] / 64.0,
        "small_stem": stem[2] == 3,
        "embed_dim": int(embed_dim),
        "hidden_dim": None if hidden_dim is None else int(hidden_dim),
        "dtype": dtype,
    }
    return models.encoder_meta(model, int(stem[1]), bn_group_size, **extra)


# ----------------------------------------------------------------------------- conversion


def _to_flax(kind: str, torch_name: str, x: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    if kind == "linear" and torch_name.endswith("weight"):
        return x.T
    return x








def torch_to_encoder(
    state_dict: Mapping[str, Any], meta: dict[str, Any] | None = None, *, seed: int = 0,
    interpolate_pos_embed: str | None = None, encoder: str = "base",
) -> Encoder:
    """An :class:`Encoder` holding the weights of a torch state dict (values: NumPy arrays or
    anything ``np.asarray`` takes). ``meta``: a `models.encoder_meta` dict; inferred from the
    shapes (:func:`infer_meta`) when None. Without head keys the head is freshly initialized as
    ``ProjectionHead(F, hidden_dim, embed_dim, rngs=nnx.Rngs(seed))``. Raises ValueError listing
    missing / unexpected keys (first 20 of each, with counts) and shape mismatches, or naming the
    first tensor that is not floating-point, holds NaN or inf, or a negative BatchNorm running
    variance (`num_batches_tracked`, an integer, is dropped before). A ViT state
    dict goes to :func:`vit_torch_to_encoder` (``interpolate_pos_embed``, ``encoder``: ViT only)."""
    if is_vit_state_dict(state_dict):
        return vit_torch_to_encoder(state_dict, meta, seed=seed, interpolate_pos_embed=interpolate_pos_embed,
                                    encoder=encoder)
    sd, meta, with_head = read_keys(normalize_keys(state_dict), meta, infer_meta, seed)
    model = models.build_encoder(meta, abstract=True)
    expected = _expected_keys(model, with_head)
    key_mismatch(meta, expected, sd)
    check_values(sd, expected)

    graphdef, p, s = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(p), nnx.to_pure_dict(s)
    bad = []
    for name, kind, path in _layout(model, with_head):
        if kind == "bn":
            targets = [(params, "scale"), (params, "bias"), (stats, "mean"), (stats, "var")]
            tkeys = _BN_KEYS
        else:
            targets = [(params, "kernel")] + ([(params, "bias")] if kind == "linear" else [])
            tkeys = ("weight", "bias")[: len(targets)]
        for (tree, leaf), tk in zip(targets, tkeys):
            key = f"{name}.{tk}"
            value = np.asarray(_to_flax(kind, key, np.asarray(sd[key])), np.float32)
            node = get_path(tree, path)
            want = tuple(node[leaf].shape)
            if value.shape != want:
                bad.append(f"{key}: torch {tuple(np.shape(sd[key]))} -> {value.shape}, model needs {want}")
                continue
            node[leaf] = jnp.asarray(value)
    if bad:
        raise ValueError(f"shape mismatches ({fmt_keys(bad)})")
    if not with_head:  # only the head is initialized for real (cheap, unlike the whole encoder)
        params["head"] = fresh_head(model.backbone.num_features, meta, seed)
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(s, stats)
    return nnx.merge(graphdef, p, s)


def encoder_to_torch(model: Encoder, *, backbone_only: bool = False) -> dict[str, np.ndarray]:
    """torchvision-named float32 NumPy arrays (in torchvision's order) for an :class:`Encoder`:
    backbone keys as in ``torchvision.models.resnet*``, the head as ``fc.0.*``/``fc.2.*`` (left
    out with ``backbone_only``), ``num_batches_tracked`` = 0 (int64) for every BatchNorm. A ViT
    encoder gives timm's keys (:func:`vit_encoder_to_torch`)."""
    if isinstance(model.backbone, VisionTransformer):
        return vit_encoder_to_torch(model, backbone_only=backbone_only)
    _, p, s = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(p), nnx.to_pure_dict(s)
    out: dict[str, np.ndarray] = {}
    for name, kind, path in _layout(model, not backbone_only):
        pn = get_path(params, path)
        if kind == "conv":
            out[f"{name}.weight"] = np.asarray(pn["kernel"]).transpose(3, 2, 0, 1)
        elif kind == "linear":
            out[f"{name}.weight"] = np.asarray(pn["kernel"]).T
            out[f"{name}.bias"] = np.asarray(pn["bias"])
        else:
            sn = get_path(stats, path)
            out[f"{name}.weight"] = np.asarray(pn["scale"])
            out[f"{name}.bias"] = np.asarray(pn["bias"])
            out[f"{name}.running_mean"] = np.asarray(sn["mean"])
            out[f"{name}.running_var"] = np.asarray(sn["var"])
            out[f"{name}.num_batches_tracked"] = np.array(0, np.int64)
    return {
        k: np.array(v, np.int64 if v.dtype == np.int64 else np.float32, order="C") for k, v in out.items()
    }


