"""PyTorch <-> hcsc-jax encoder weights: the released HCSC / MoCo v2 / PCL files and torchvision
ResNets, and timm / MoCo v3 / DINO Vision Transformers.

The mapping itself is pure NumPy (no torch import); only the command line needs torch, to read and
write ``.pth`` files.

================================  ==========================================================
NNX path                          torch ``state_dict`` key
================================  ==========================================================
``backbone/<m>/kernel`` (conv)    ``<m>.weight``   HWIO <-> OIHW (``w.transpose(2, 3, 1, 0)``)
``backbone/<m>/scale``, ``bias``  ``<m>.weight``, ``<m>.bias``                    (BatchNorm)
``backbone/<m>/mean``, ``var``    ``<m>.running_mean``, ``<m>.running_var``       (BatchNorm)
(none)                            ``<m>.num_batches_tracked`` dropped on import, 0 on export
``head/fc0``, ``head/fc2``        ``fc.0``, ``fc.2``   kernel [in, out] <-> weight [out, in]
================================  ==========================================================

Accepted key layouts on import (:func:`normalize_keys`):

* the authors' HCSC files and MoCo v2 / PCL files: ``module.encoder_q.<torchvision key>`` with
  the MLP head as ``fc.0``/``fc.2``; ``encoder_k``, ``queue`` and ``queue_ptr`` are ignored (as is
  anything else outside ``encoder_q``, with a note);
* plain torchvision ResNet state dicts (optionally ``module.``-prefixed): the backbone is loaded,
  the projection head keeps its fresh initialization, and a single-layer ``fc.weight``/``fc.bias``
  (the 1000-class classifier) is ignored with a note.

ViTs (a state dict with a ``cls_token``) map key for key onto `models.vit` (its docstring has
the table): linear weights are transposed, the patch-embedding conv goes OIHW -> HWIO, LayerNorm
``weight`` is ``scale``. Accepted layouts (:func:`normalize_vit_keys`): plain timm / DINO
backbones, ``module.``-prefixed ones, and MoCo v3 files (``module.base_encoder.*``, the default,
or ``module.momentum_encoder.*`` with ``encoder="momentum"``; the other encoder and the predictor
are ignored with a note). ``head.*`` (timm's classifier, MoCo v3's projection MLP) is ignored
with a note: the HCSC head is ``fc.0``/``fc.2`` as for ResNets, freshly initialized when absent.
The architecture comes from the shapes (``vit_t/s/b`` by the embedding dim, the patch size from
the patch conv; ``arch`` names it for narrower widths), the position embedding is recognized as
MoCo v3's fixed sin-cos table or taken as a learned one. A learned table for another grid than
the requested ``image_size`` is an error unless ``interpolate_pos_embed`` says how to resize
the grid, as torch's ``F.interpolate(mode="bicubic", align_corners=False)`` does: "bicubic"
(a = -0.75, no antialiasing: what DINO's and MoCo v3's loaders do) or "bicubic_antialias"
(``antialias=True``: Keys' a = -0.5 kernel, widened when shrinking, what timm's
``resample_abs_pos_embed`` does, e.g. for ``timm.create_model(..., img_size=...)``); the two
differ (for a ViT-S/16 resized to 256 px, by 8e-2 in the table and 3e-3 in the output, as
reported in issue #29). No mode is guessed from the file: timm, DINO and MoCo v3 ViTs share one
key layout. The sin-cos table is simply recomputed for any grid. Export writes timm's keys (the
sin-cos table included, for the model's image size), so ``timm.create_model('vit_small_patch16_224')
.load_state_dict(sd, strict=False)`` reports only the classifier as missing and ``fc.*`` as
unexpected.

Command line::

  python -m hcsc_jax.convert import-torch model.pth OUT_DIR [--image-size 224] [--mean 0.485,0.456,0.406] \
      [--std 0.229,0.224,0.225]                                # -> checkpoints.restore_encoder(OUT_DIR)
  python -m hcsc_jax.convert import-torch vit.pth OUT_DIR [--arch vit_s16] [--image-size 224] \
      [--interpolate-pos-embed bicubic|bicubic_antialias] [--encoder base|momentum]   # a ViT
  python -m hcsc_jax.convert export-torch CHECKPOINT OUT.pth [--backbone-only | --moco-layout]

``export-torch`` writes plain torchvision names for the backbone and ``fc.0.*``/``fc.2.*`` for the
head: ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` then reports only the
head keys as unexpected and ``fc.weight``/``fc.bias`` as missing. ``--backbone-only`` leaves the
head out (what detectron2's ``convert-torchvision-to-d2.py`` expects); ``--moco-layout`` writes
``{'arch', 'epoch', 'state_dict': {'module.encoder_q.<key>': ...}}`` as the authors' files are,
for their ``main_lincls.py`` and MoCo's ``convert-pretrain-to-detectron2.py``. Beside the
``.pth`` it writes ``<OUT.pth>.json``: the encoder's meta (architecture, width, depth, ...) and
the input it was trained on (image size, mean, std: `models.input_meta`, from a workdir's
config.json or an encoder's meta); ``import-torch`` reads that sidecar when it finds one, so an
exported ViT of any width imports back without ``--arch``. An import records the input in the
encoder's meta for eval.py: ``--image-size`` / ``--mean`` / ``--std``, else the sidecar's, else
ImageNet's (224 px, or the ViT's size) for 3-channel weights, with a warning saying so.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hcsc_jax import checkpoints, models
from hcsc_jax import workdir as workdir_lib
from hcsc_jax.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from hcsc_jax.models import VIT_ARCHS, Encoder, ProjectionHead, VisionTransformer
from hcsc_jax.models.resnet import Bottleneck
from hcsc_jax.models.vit import sincos_pos_embed

log = logging.getLogger(__name__)

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


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _fmt_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)}: {shown}" + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


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
            notes.append(f"ignored entries outside encoder_q: {_fmt_keys(extra)}")
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


def _has_head(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("fc.0.", "fc.2.")) for k in sd)


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
            f"keys: {_fmt_keys(sorted(sd))}"
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
    if _has_head(sd):
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


def _fresh_head(num_features: int, meta: dict[str, Any], seed: int) -> dict:
    """Pure-dict parameters of a freshly initialized head (for a state dict without fc.0/fc.2)."""
    m = meta["model"]
    head = ProjectionHead(num_features, m.get("hidden_dim"), m["embed_dim"],
                          dtype=jnp.dtype(m.get("dtype", "float32")), rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(head, nnx.Param))


def _check_values(sd: Mapping[str, Any], keys) -> None:
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


def _key_mismatch(meta, expected: list[str], sd: Mapping[str, Any], optional=()) -> None:
    """ValueError naming the missing and unexpected keys (first 20 of each, with counts)."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in set(expected) | set(optional)]
    if missing or unexpected:
        msg = [f"state dict does not match {meta['model']['arch']} (meta {meta['model']})"]
        if missing:
            msg.append(f"missing keys ({_fmt_keys(missing)})")
        if unexpected:
            msg.append(f"unexpected keys ({_fmt_keys(unexpected)})")
        raise ValueError("; ".join(msg))


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
    sd, meta, with_head = _read_keys(normalize_keys(state_dict), meta, infer_meta, seed)
    model = models.build_encoder(meta, abstract=True)
    expected = _expected_keys(model, with_head)
    _key_mismatch(meta, expected, sd)
    _check_values(sd, expected)

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
            node = _get(tree, path)
            want = tuple(node[leaf].shape)
            if value.shape != want:
                bad.append(f"{key}: torch {tuple(np.shape(sd[key]))} -> {value.shape}, model needs {want}")
                continue
            node[leaf] = jnp.asarray(value)
    if bad:
        raise ValueError(f"shape mismatches ({_fmt_keys(bad)})")
    if not with_head:  # only the head is initialized for real (cheap, unlike the whole encoder)
        params["head"] = _fresh_head(model.backbone.num_features, meta, seed)
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
        pn = _get(params, path)
        if kind == "conv":
            out[f"{name}.weight"] = np.asarray(pn["kernel"]).transpose(3, 2, 0, 1)
        elif kind == "linear":
            out[f"{name}.weight"] = np.asarray(pn["kernel"]).T
            out[f"{name}.bias"] = np.asarray(pn["bias"])
        else:
            sn = _get(stats, path)
            out[f"{name}.weight"] = np.asarray(pn["scale"])
            out[f"{name}.bias"] = np.asarray(pn["bias"])
            out[f"{name}.running_mean"] = np.asarray(sn["mean"])
            out[f"{name}.running_var"] = np.asarray(sn["var"])
            out[f"{name}.num_batches_tracked"] = np.array(0, np.int64)
    return {
        k: np.array(v, np.int64 if v.dtype == np.int64 else np.float32, order="C") for k, v in out.items()
    }


# ----------------------------------------------------------------------------- ViT (timm layout)

_MOCO_V3_ENCODERS = ("base", "momentum")


def is_vit_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether a (raw or normalized) state dict holds a ViT: it has a class token."""
    return any(str(k).endswith("cls_token") for k in state_dict)


def normalize_vit_keys(state_dict: Mapping[str, Any],
                       encoder: str = "base") -> tuple[dict[str, np.ndarray], list[str]]:
    """Strips DataParallel / MoCo v3 prefixes -> ({timm key: array}, notes).

    ``module.`` is removed; of a MoCo v3 file (``base_encoder.*``, ``momentum_encoder.*``,
    ``predictor.*``) the keys of ``<encoder>_encoder`` are kept; ``head.*`` (a classifier or MoCo
    v3's projection MLP, not the HCSC head) is dropped. Every drop is noted."""
    if encoder not in _MOCO_V3_ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(_MOCO_V3_ENCODERS)}, got {encoder!r}")
    notes: list[str] = []
    sd = {str(k): v for k, v in state_dict.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith(tuple(f"{e}_encoder." for e in _MOCO_V3_ENCODERS)) for k in sd):
        keep = f"{encoder}_encoder."
        if not any(k.startswith(keep) for k in sd):
            raise ValueError(f"this MoCo v3 state dict has no {keep}* entries (it holds "
                             f"{', '.join(sorted({k.split('.')[0] for k in sd}))}); pick another encoder")
        other = sorted({k.split(".")[0] for k in sd if not k.startswith(keep)})
        notes.append(f"took {keep[:-1]}, ignored the entries of {', '.join(other)}")
        sd = {k[len(keep):]: v for k, v in sd.items() if k.startswith(keep)}
    head = [k for k in sd if k.startswith("head.")]
    if head:
        notes.append(f"ignored head.* ({_fmt_keys(head)}): a classifier or MoCo v3 projection MLP, "
                     "not the HCSC head (fc.0/fc.2)")
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return {k: np.asarray(v) for k, v in sd.items()}, notes


def _grid(pos_embed: np.ndarray) -> int:
    """Side of the square patch grid of a (1, 1 + N, D) position embedding."""
    n = int(np.shape(pos_embed)[1]) - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed {tuple(np.shape(pos_embed))} holds {n} patch positions: not a square "
                         "grid")
    return side


def _is_sincos(pos_embed: np.ndarray) -> bool:
    """Whether a (1, 1 + N, D) table is MoCo v3's fixed sin-cos embedding of its grid."""
    g, dim = _grid(pos_embed), int(np.shape(pos_embed)[-1])
    return dim % 4 == 0 and np.allclose(pos_embed, sincos_pos_embed(g, g, dim), atol=1e-4)


def infer_vit_meta(state_dict: Mapping[str, Any], *, embed_dim: int = 128, hidden_dim: int | None = None,
                   dtype: str = "float32", arch: str | None = None, image_size: int | None = None,
                   encoder: str = "base", bn_group_size: int | None = None, **extra) -> dict[str, Any]:
    """`models.encoder_meta` of a ViT state dict: arch (``vit_{t,s,b}{patch}`` whose embedding
    dim the class token has; ``arch`` names it when the width is not 1), width, depth, in_channels,
    pos_embed ("sincos" when the table is MoCo v3's, else "learn"), image_size (``image_size``,
    else the table's grid x patch), and the head's dims as :func:`infer_meta`."""
    sd, _ = normalize_vit_keys(state_dict, encoder)
    for k in ("cls_token", "patch_embed.proj.weight"):
        if k not in sd:
            raise ValueError(f"cannot infer the ViT: no {k}; keys: {_fmt_keys(sorted(sd))}")
    dim = int(np.shape(sd["cls_token"])[-1])
    out, in_channels, ph, pw = np.shape(sd["patch_embed.proj.weight"])
    if ph != pw or out != dim:
        raise ValueError(f"patch_embed.proj.weight has shape {(out, in_channels, ph, pw)}; expected "
                         f"[{dim}, in, p, p]")
    if arch is None:
        found = [a for a, (d, _, _, p) in VIT_ARCHS.items() if (d, p) == (dim, ph)]
        if not found:
            raise ValueError(f"cannot tell the ViT's heads from its shapes (embedding dim {dim}, patch "
                             f"{ph}): name its architecture (arch / --arch, one of {', '.join(VIT_ARCHS)})")
        arch = found[0]
    if arch not in VIT_ARCHS or VIT_ARCHS[arch][3] != ph:
        raise ValueError(f"arch {arch!r} does not fit a ViT with {ph}-px patches; one of "
                         f"{', '.join(a for a, v in VIT_ARCHS.items() if v[3] == ph) or 'none known'}")
    width = dim / VIT_ARCHS[arch][0]
    depth = 0
    while f"blocks.{depth}.norm1.weight" in sd:
        depth += 1
    pos = sd.get("pos_embed")
    pos_embed = "sincos" if pos is None or _is_sincos(pos) else "learn"
    size = image_size or (None if pos is None else _grid(pos) * ph)
    if _has_head(sd):
        if "fc.0.weight" not in sd or "fc.2.weight" not in sd:
            raise ValueError("the projection head is incomplete: need fc.0.weight and fc.2.weight")
        hidden_dim, embed_dim = int(np.shape(sd["fc.0.weight"])[0]), int(np.shape(sd["fc.2.weight"])[0])
    model = dict(arch=arch, width=width, small_stem=False, embed_dim=int(embed_dim),
                 hidden_dim=None if hidden_dim is None else int(hidden_dim), dtype=dtype, depth=depth,
                 pos_embed=pos_embed, image_size=size)
    return models.encoder_meta(model, int(in_channels), bn_group_size, **extra)


def _vit_layout(vit: VisionTransformer, with_head: bool) -> Iterator[tuple[str, tuple, str]]:
    """(timm key, NNX path of the leaf, kind) in timm's order; kind "conv" / "linear" weights
    change layout, "param" ones are copied. ``pos_embed`` is listed whichever its kind."""
    bb = ("backbone",)
    yield "cls_token", bb + ("cls_token",), "param"
    yield "pos_embed", bb + ("pos_embed",), "param"
    yield "patch_embed.proj.weight", bb + ("patch_embed", "proj", "kernel"), "conv"
    yield "patch_embed.proj.bias", bb + ("patch_embed", "proj", "bias"), "param"
    norm = lambda name, path: [(f"{name}.weight", path + ("scale",), "param"),
                               (f"{name}.bias", path + ("bias",), "param")]
    linear = lambda name, path: [(f"{name}.weight", path + ("kernel",), "linear"),
                                 (f"{name}.bias", path + ("bias",), "param")]
    for i in range(len(vit.blocks)):
        b = bb + ("blocks", i)
        yield from norm(f"blocks.{i}.norm1", b + ("norm1",))
        yield from linear(f"blocks.{i}.attn.qkv", b + ("attn", "qkv"))
        yield from linear(f"blocks.{i}.attn.proj", b + ("attn", "proj"))
        yield from norm(f"blocks.{i}.norm2", b + ("norm2",))
        yield from linear(f"blocks.{i}.mlp.fc1", b + ("mlp", "fc1"))
        yield from linear(f"blocks.{i}.mlp.fc2", b + ("mlp", "fc2"))
    yield from norm("norm", bb + ("norm",))
    if with_head:
        yield from linear("fc.0", ("head", "fc0"))
        yield from linear("fc.2", ("head", "fc2"))


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) weights of torch's 1-D bicubic resize (align_corners=False, edges clamped)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    t = src - base

    def kernel(x):
        x = np.abs(x)
        return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                        np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))

    m = np.zeros((n_out, n_in))
    for off in (-1, 0, 1, 2):
        idx = np.clip(base + off, 0, n_in - 1).astype(int)
        np.add.at(m, (np.arange(n_out), idx), kernel(t - off))
    return m


def _bicubic_antialias_matrix(n_in: int, n_out: int, a: float = -0.5) -> np.ndarray:
    """(n_out, n_in) weights of torch's 1-D antialiased bicubic resize (``antialias=True``,
    align_corners=False): Keys' kernel with a = -0.5 (PIL's), stretched by the scale when
    downsampling, taken over the input pixels only and normalized to sum to 1 (ATen's
    ``_compute_index_ranges_weights``)."""
    scale = n_in / n_out
    support, inv = (2.0 * scale, 1.0 / scale) if scale >= 1.0 else (2.0, 1.0)

    def kernel(x):
        x = abs(x)
        return (((a + 2) * x - (a + 3)) * x * x + 1 if x < 1 else
                (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0)

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = np.array([kernel((j - center + 0.5) * inv) for j in range(lo, hi)])
        m[i, lo:hi] = w / w.sum() if w.sum() else w
    return m


# --interpolate-pos-embed: how a learned position embedding is resized to another grid.
POS_EMBED_RESIZE = {
    "bicubic": _bicubic_matrix,  # DINO, MoCo v3: F.interpolate(mode="bicubic", align_corners=False)
    "bicubic_antialias": _bicubic_antialias_matrix,  # timm's resample_abs_pos_embed (antialias=True)
}


def interpolate_pos_embed(pos_embed: np.ndarray, grid: int, mode: str = "bicubic") -> np.ndarray:
    """A learned (1, 1 + g*g, D) position embedding resized to a grid x grid patch grid: the class
    token's row kept, the patch rows resized as a g x g image of D channels, as torch's
    ``F.interpolate(size=(grid, grid), mode="bicubic", align_corners=False)`` does (`mode`
    "bicubic": what DINO's and MoCo v3's loaders do) or with ``antialias=True`` ("bicubic_antialias":
    timm's ``resample_abs_pos_embed``, what ``timm.create_model(..., img_size=...)`` does)."""
    if mode not in POS_EMBED_RESIZE:
        raise ValueError(f"unknown pos_embed resize {mode!r}; one of {', '.join(POS_EMBED_RESIZE)}")
    g = _grid(pos_embed)
    pos = np.asarray(pos_embed, np.float64)
    table = pos[0, 1:].reshape(g, g, -1)
    m = POS_EMBED_RESIZE[mode](g, grid)
    resized = np.einsum("ai,ijd,bj->abd", m, table, m).reshape(1, grid * grid, -1)
    return np.concatenate([pos[:, :1], resized], axis=1).astype(np.float32)


def _vit_to_flax(kind: str, x: np.ndarray) -> np.ndarray:
    return x.transpose(2, 3, 1, 0) if kind == "conv" else x.T if kind == "linear" else x


def _read_keys(normalized: tuple[dict, list[str]], meta, infer, seed: int):
    """(state dict, meta, whether it has the projection head) from a `normalize_*_keys` result:
    its notes logged, `meta` inferred by `infer` when None, a missing head said."""
    sd, notes = normalized
    for n in notes:
        log.warning("torch_to_encoder: %s", n)
    with_head = _has_head(sd)
    if not with_head:
        log.warning("torch_to_encoder: no projection head (fc.0/fc.2) in the state dict; the head keeps its "
                    "fresh initialization (ProjectionHead, nnx.Rngs(%d))", seed)
    return sd, infer(sd) if meta is None else meta, with_head


def vit_torch_to_encoder(state_dict: Mapping[str, Any], meta: dict[str, Any] | None = None, *, seed: int = 0,
                         interpolate_pos_embed: str | None = None, encoder: str = "base") -> Encoder:
    """`torch_to_encoder` of a ViT. A learned ``pos_embed`` for another grid than the model's is
    resized (:func:`interpolate_pos_embed`) only when ``interpolate_pos_embed`` names how
    ("bicubic" or "bicubic_antialias"); a sin-cos one is checked and recomputed by the model for
    its grid."""
    sd, meta, with_head = _read_keys(normalize_vit_keys(state_dict, encoder), meta, infer_vit_meta, seed)
    model = models.build_encoder(meta, abstract=True)
    vit = model.backbone
    learned = vit.pos_embed_kind == "learn"
    expected = [k for k, _, _ in _vit_layout(vit, with_head) if learned or k != "pos_embed"]
    _key_mismatch(meta, expected, sd, optional=("pos_embed",))
    _check_values(sd, [k for k, _, _ in _vit_layout(vit, with_head) if k in sd])
    if "pos_embed" in sd:
        sd = dict(sd, pos_embed=_fit_pos_embed(sd["pos_embed"], vit, interpolate_pos_embed))
    graphdef, p, s = nnx.split(model, nnx.Param, nnx.BatchStat)
    params = nnx.to_pure_dict(p)
    bad = []
    for key, path, kind in _vit_layout(vit, with_head):
        if key not in expected:
            continue
        value = np.asarray(_vit_to_flax(kind, np.asarray(sd[key])), np.float32)
        node = _get(params, path[:-1])
        want = tuple(node[path[-1]].shape)
        if value.shape != want:
            bad.append(f"{key}: torch {tuple(np.shape(sd[key]))} -> {value.shape}, model needs {want}")
            continue
        node[path[-1]] = jnp.asarray(value)
    if bad:
        raise ValueError(f"shape mismatches ({_fmt_keys(bad)})")
    if not with_head:
        params["head"] = _fresh_head(vit.num_features, meta, seed)
    nnx.replace_by_pure_dict(p, params)
    return nnx.merge(graphdef, p, s)


def _fit_pos_embed(pos: np.ndarray, vit: VisionTransformer, interpolate: str | None) -> np.ndarray:
    """The checkpoint's position embedding for the model: a sin-cos table is checked (the model
    recomputes it for its grid); a learned one must cover the model's grid, or be resized to it
    the `interpolate` way (a `POS_EMBED_RESIZE` mode; None: refused)."""
    g = _grid(pos)
    size = g * vit.patch_size
    if vit.pos_embed_kind == "sincos":
        if not _is_sincos(pos):
            raise ValueError("the checkpoint's pos_embed is a learned table, not MoCo v3's sin-cos one: "
                             "import it with pos_embed='learn' (infer the meta from the state dict)")
        return pos
    want = vit.pos_embed.shape[1] - 1
    if want == g * g:
        return pos
    new = math.isqrt(want)
    if not interpolate:
        raise ValueError(
            f"the checkpoint's learned pos_embed covers a {g}x{g} grid of patches ({size}-px images), the "
            f"model a {new}x{new} grid ({new * vit.patch_size} px); import at image_size={size}, or resize "
            "the grid with --interpolate-pos-embed=bicubic (as DINO and MoCo v3 do) or =bicubic_antialias "
            "(as timm does)")
    log.warning("torch_to_encoder: pos_embed resized from a %dx%d to a %dx%d grid (%s)", g, g, new, new,
                interpolate)
    return interpolate_pos_embed(pos, new, interpolate)


def vit_encoder_to_torch(model: Encoder, *, backbone_only: bool = False) -> dict[str, np.ndarray]:
    """timm-named float32 arrays (timm's order) of a ViT encoder, the head as ``fc.0.*``/``fc.2.*``
    (left out with ``backbone_only``). A sin-cos ``pos_embed`` is written for the model's
    image_size (left out, with a warning, when the model was built without one)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    vit = model.backbone
    out: dict[str, np.ndarray] = {}
    for key, path, kind in _vit_layout(vit, not backbone_only):
        if key == "pos_embed" and vit.pos_embed_kind == "sincos":
            if vit.image_size is None:
                log.warning("encoder_to_torch: no image size recorded; the sin-cos pos_embed is left out")
                continue
            g = vit.image_size // vit.patch_size
            out[key] = sincos_pos_embed(g, g, vit.num_features)
            continue
        x = np.asarray(_get(params, path))
        out[key] = x.transpose(3, 2, 0, 1) if kind == "conv" else x.T if kind == "linear" else x
    return {k: np.array(v, np.float32, order="C") for k, v in out.items()}


# ----------------------------------------------------------------------------- files


# torch.save stores the members of its zip archive uncompressed, so they add up to less than the
# file; members that would expand to more than this many times the file's size are a zip bomb.
MAX_ZIP_EXPANSION = 4.0


def check_torch_file(path: str) -> None:
    """ValueError (one line, no --trust-pickle advice) unless `path` is what ``torch.save`` writes,
    checked before ``torch.load`` reads anything: a zip archive with a ``<name>/data.pkl`` member
    whose members expand to at most `MAX_ZIP_EXPANSION` times the file's size in all, or a legacy
    (``_use_new_zipfile_serialization=False``) pickle file. A .tar.gz, random bytes, a zip
    without ``data.pkl`` or a zip bomb (a small file whose data.pkl would expand to GBs) is refused."""
    size = os.path.getsize(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                members = z.infolist()
        except (zipfile.BadZipFile, OSError) as err:
            raise ValueError(f"{path} is not a PyTorch checkpoint: a damaged zip archive ({err})") from None
        if not any(re.fullmatch(r"[^/]+/data\.pkl", m.filename) for m in members):
            raise ValueError(f"{path} is not a PyTorch checkpoint: a zip archive without the <name>/data.pkl "
                             "that torch.save writes")
        total = sum(m.file_size for m in members)
        if total > MAX_ZIP_EXPANSION * size:
            raise ValueError(
                f"{path} is not a PyTorch checkpoint: its zip members would expand to {total:,} bytes, "
                f"{total / size:.0f}x the file's {size:,} (torch.save stores them uncompressed); not read")
        return
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:  # pickle's PROTO opcode, protocol 2-5
        raise ValueError(f"{path} is not a PyTorch checkpoint: neither the zip archive that torch.save "
                         "writes nor a legacy pickle; pass the .pth file of a saved state dict")


def load_torch_state_dict(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a ``.pth`` file (torch needed) -> {key: float NumPy array or int array}, unwrapping
    ``{'state_dict': ...}`` / ``{'model': ...}`` wrappers. Only tensors and plain containers are
    unpickled unless `trust_pickle` (which runs whatever code the file names: trusted files only).
    A file that is no checkpoint at all (`check_torch_file`, before torch.load) is a ValueError
    that does not suggest --trust-pickle."""
    torch = import_torch_module()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such PyTorch checkpoint file: {path}")
    check_torch_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # noqa: BLE001 - torch.load raises anything on a file that is not its own
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not trust_pickle and "Weights only load failed" in str(err):  # e.g. an argparse.Namespace
            raise ValueError(
                f"{path} holds objects other than tensors, which torch.load(weights_only=True) refuses "
                f"({first}); if you trust the file, pass --trust-pickle "
                "(it runs code named in the file)") from None
        raise ValueError(f"{path} is not a PyTorch checkpoint that torch.load can read "
                         f"({type(err).__name__}: {first}); pass the .pth file of a saved state "
                         "dict") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict of tensors (got {type(obj).__name__})")

    def to_np(t):
        t = t.detach().cpu()
        return (t.float() if t.is_floating_point() else t).numpy()

    return {k: to_np(v) for k, v in obj.items()}


def import_torch_module():
    """`torch`, or ImportError saying how to install it (an optional dependency)."""
    try:
        import torch
    except ImportError:
        raise ImportError("PyTorch checkpoints need torch, an optional dependency: pip install torch "
                          "(CPU build: pip install torch==2.13.0)") from None
    return torch


def save_torch_state_dict(
    path: str, state: Mapping[str, np.ndarray], wrap: dict[str, Any] | None = None
) -> None:
    torch = import_torch_module()

    sd = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    obj = sd if wrap is None else dict(wrap, state_dict=sd)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path)


def import_torch(pth: str, out_dir: str, *, seed: int = 0, trust_pickle: bool = False,
                 interpolate_pos_embed: str | None = None, encoder: str = "base",
                 image_size: int | None = None, mean=None, std=None, **meta_kw) -> dict[str, Any]:
    """``.pth`` -> Orbax encoder directory (readable by `checkpoints.restore_encoder`); returns meta.
    The file's sidecar ``<pth>.json`` (written by `export_torch`), when there is one, names the
    architecture when ``arch`` does not and the input the weights were trained on (`models.input_meta`,
    kept as ``meta["input"]`` for eval.py) where ``image_size`` / ``mean`` / ``std`` do not; what
    neither says is ImageNet's for 3-channel weights (224 px, or the ViT's image size), logged as
    assumed. Nothing is written unless the whole state dict converts."""
    models.check_input(image_size, None if mean is None else list(mean), None if std is None else list(std),
                       where="import-torch: ")
    sd = load_torch_state_dict(pth, trust_pickle)
    recorded = read_sidecar(pth)
    if meta_kw.get("arch") is None and "model" in recorded:
        meta_kw["arch"] = recorded["model"]["arch"]
    meta = infer_meta(sd, converted_from=os.path.abspath(pth), encoder=encoder, image_size=image_size,
                      **meta_kw)
    model = torch_to_encoder(sd, meta, seed=seed, interpolate_pos_embed=interpolate_pos_embed,
                             encoder=encoder)
    trained_on = _input_meta(meta, recorded.get("input", {}), image_size, mean, std)
    if trained_on is not None:
        meta["input"] = trained_on
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    checkpoints.export_encoder(out_dir, meta, params, stats)
    return meta


def sidecar_path(pth: str) -> str:
    """The JSON beside a ``.pth`` that `export_torch` writes and `import_torch` reads."""
    return pth + ".json"


def read_sidecar(pth: str) -> dict[str, Any]:
    """The encoder meta of `pth`'s sidecar ({} when it has none); ValueError when it is no JSON."""
    if not os.path.isfile(sidecar_path(pth)):
        return {}
    try:
        with open(sidecar_path(pth)) as f:
            recorded = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{sidecar_path(pth)} is not the JSON that export-torch writes ({err}); move it "
                         "away to import the file without it") from None
    what = _not_a_sidecar(recorded)
    if what:
        raise ValueError(f"{sidecar_path(pth)} is JSON, but not what export-torch writes ({what} is not an "
                         "object of its fields); move it away to import the file without it")
    inp = recorded.get("input", {})
    models.check_input(inp.get("image_size"), inp.get("mean"), inp.get("std"),
                       where=f"{sidecar_path(pth)}: input ")
    return recorded


def _not_a_sidecar(recorded) -> str | None:
    """The part of a sidecar's JSON that is not of the type export-torch writes, or None."""
    if not isinstance(recorded, dict):
        return "the file"
    wrong = [k for k in ("model", "input") if not isinstance(recorded.get(k, {}), dict)]
    if wrong:
        return wrong[0]
    return None if isinstance(recorded.get("model", {}).get("arch", ""), str) else "model.arch"


def _input_meta(meta, recorded: dict, image_size, mean, std) -> dict[str, Any] | None:
    """`models.input_meta` of an import: the flags, else the sidecar's, else (3-channel weights)
    ImageNet's, logged as assumed; None (logged) for other channel counts when something is unknown."""
    channels = int(meta["in_channels"])
    first = lambda *vs: next((v for v in vs if v is not None), None)
    values = dict(image_size=first(image_size, recorded.get("image_size"), meta["model"].get("image_size")),
                  mean=first(mean, recorded.get("mean")), std=first(std, recorded.get("std")))
    unknown = [k for k, v in values.items() if v is None]
    flags = " ".join(f"--{k.replace('_', '-')}" for k in unknown)
    if unknown and channels != 3:
        log.warning("import-torch: the file does not say the %s of its %d-channel images: pass %s, or give "
                    "them to eval.py", ", ".join(unknown), channels, flags)
        return None
    if unknown:
        imagenet = dict(image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        values.update({k: imagenet[k] for k in unknown})
        log.warning("import-torch: assumed ImageNet's %s (the file does not say); pass %s if the weights "
                    "were trained otherwise", ", ".join(f"{k}={values[k]}" for k in unknown), flags)
    return models.input_meta(values["image_size"], channels, values["mean"], values["std"])


def export_torch(
    checkpoint: str,
    out_pth: str,
    *,
    backbone_only: bool = False,
    moco_layout: bool = False,
    which: str = "query",
) -> dict[str, np.ndarray]:
    """Train workdir or exported encoder -> torchvision-named (timm-named for a ViT) ``.pth``;
    returns the arrays. Beside it, ``<out_pth>.json`` (`sidecar_path`) holds the encoder's meta
    and the input it was trained on (a workdir's config.json, an exported encoder's meta), which
    `import_torch` reads back: a ViT of any width then imports without ``--arch``."""
    model, meta = checkpoints.restore_encoder(checkpoint, which=which)
    sd = encoder_to_torch(model, backbone_only=backbone_only)
    recorded = {k: v for k, v in meta.items() if k != "digest"}  # (the digest is of the Orbax weights)
    run_config = workdir_lib.path(checkpoint) / workdir_lib.CONFIG_FILE
    if "input" not in recorded and run_config.exists():
        run = workdir_lib.read_json(run_config)
        recorded["input"] = models.input_meta(run["image_size"], meta["in_channels"], run["augment"]["mean"],
                                              run["augment"]["std"])
    if moco_layout:
        wrap = {"arch": meta["model"]["arch"], "epoch": int(meta.get("epoch", 0) or 0)}
        save_torch_state_dict(out_pth, {f"module.encoder_q.{k}": v for k, v in sd.items()}, wrap)
    else:
        save_torch_state_dict(out_pth, sd)
    workdir_lib.write_atomic(workdir_lib.path(sidecar_path(out_pth)), workdir_lib.dumps(recorded))
    return sd


def _floats(text: str) -> tuple[float, ...]:
    """A --mean / --std value: comma-separated floats."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        message = f"{text!r} is not comma-separated numbers, e.g. 0.5,0.5,0.5"
        raise argparse.ArgumentTypeError(message) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hcsc_jax.convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser(
        "import-torch", help="PyTorch .pth (HCSC / MoCo v2 / PCL / torchvision; timm / MoCo v3 / DINO ViT) "
        "-> Orbax encoder"
    )
    imp.add_argument("pth")
    imp.add_argument("out_dir")
    imp.add_argument("--embed-dim", type=int, default=128, help="head output dim when the file has no head")
    imp.add_argument("--hidden-dim", type=int, default=None, help="head hidden dim when the file has no head")
    imp.add_argument("--bn-group-size", type=int, default=32, help="recorded in meta, for fine-tuning")
    imp.add_argument("--seed", type=int, default=0, help="initialization of a head absent from the file")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="unpickle any object in the file (runs code it names): only for files you trust")
    imp.add_argument("--arch", default=None, help="ViT only: the architecture (e.g. vit_s16) when the width "
                     "is not the standard one")
    imp.add_argument("--image-size", type=int, default=None,
                     help="image side the weights were trained on, recorded for eval.py; a ViT's model size "
                     "too (default: the sidecar's, else a ViT's position-embedding grid, else 224)")
    imp.add_argument("--mean", type=_floats, default=None, help="per-channel input mean the weights were "
                     "trained with, e.g. 0.485,0.456,0.406 (default: the sidecar's, else ImageNet's for RGB)")
    imp.add_argument("--std", type=_floats, default=None, help="per-channel input std (as --mean)")
    imp.add_argument("--interpolate-pos-embed", choices=tuple(POS_EMBED_RESIZE), default=None,
                     help="ViT only: resize a learned position embedding to --image-size: bicubic (torch's "
                     "F.interpolate, as DINO and MoCo v3 do) or bicubic_antialias (antialias=True, as timm's "
                     "resample_abs_pos_embed does)")
    imp.add_argument("--encoder", choices=_MOCO_V3_ENCODERS, default="base",
                     help="MoCo v3 files: base_encoder (default) or momentum_encoder")
    exp = sub.add_parser("export-torch",
                         help="train workdir or exported encoder -> torchvision-named (ViT: timm-named) .pth")
    exp.add_argument("checkpoint")
    exp.add_argument("out_pth")
    grp = exp.add_mutually_exclusive_group()
    grp.add_argument(
        "--backbone-only",
        action="store_true",
        help="leave out the fc.0/fc.2 head (for detectron2's convert-torchvision-to-d2.py)",
    )
    grp.add_argument(
        "--moco-layout",
        action="store_true",
        help="write {'arch', 'epoch', 'state_dict': {'module.encoder_q.<key>': ...}} like the authors' files",
    )
    exp.add_argument("--which", choices=("query", "key"), default="query", help="encoder of a train workdir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.cmd == "import-torch":
            meta = import_torch(
                args.pth,
                args.out_dir,
                seed=args.seed,
                trust_pickle=args.trust_pickle,
                interpolate_pos_embed=args.interpolate_pos_embed,
                encoder=args.encoder,
                arch=args.arch,
                image_size=args.image_size,
                mean=args.mean,
                std=args.std,
                embed_dim=args.embed_dim,
                hidden_dim=args.hidden_dim,
                bn_group_size=args.bn_group_size,
            )
            print(f"wrote {args.out_dir}: {meta['model']} in_channels={meta['in_channels']} "
                  f"input={meta.get('input')}")
        else:
            sd = export_torch(
                args.checkpoint,
                args.out_pth,
                backbone_only=args.backbone_only,
                moco_layout=args.moco_layout,
                which=args.which,
            )
            print(f"wrote {args.out_pth}: {len(sd)} tensors; its meta in {sidecar_path(args.out_pth)}")
    except (OSError, ValueError, ImportError, checkpoints.NoReadableStep) as err:
        if isinstance(err, OSError) and err.filename:  # e.g. a read-only output directory
            err = f"{err.filename}: {err.strerror or err}"
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
