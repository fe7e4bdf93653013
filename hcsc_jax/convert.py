"""PyTorch <-> hcsc-jax encoder weights: the released HCSC / MoCo v2 / PCL files and torchvision.

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

Command line::

  python -m hcsc_jax.convert import-torch model.pth OUT_DIR    # -> checkpoints.load_encoder(OUT_DIR)
  python -m hcsc_jax.convert export-torch CHECKPOINT OUT.pth [--backbone-only | --moco-layout]

``export-torch`` writes plain torchvision names for the backbone and ``fc.0.*``/``fc.2.*`` for the
head: ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` then reports only the
head keys as unexpected and ``fc.weight``/``fc.bias`` as missing. ``--backbone-only`` leaves the
head out (what detectron2's ``convert-torchvision-to-d2.py`` expects); ``--moco-layout`` writes
``{'arch', 'epoch', 'state_dict': {'module.encoder_q.<key>': ...}}`` as the authors' files are,
for their ``main_lincls.py`` and MoCo's ``convert-pretrain-to-detectron2.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hcsc_jax import checkpoints, models
from hcsc_jax.models import Encoder, ProjectionHead
from hcsc_jax.models.resnet import Bottleneck

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
    **extra,
) -> dict[str, Any]:
    """`models.encoder_meta` for a (normalized or raw) torch state dict, from tensor shapes:
    arch (resnet18/34/50 from block type and counts), width (stem channels / 64), small_stem (3x3
    stem), in_channels, and the head's hidden/out dims (``embed_dim``/``hidden_dim`` are used only
    when the dict has no head)."""
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


def torch_to_encoder(
    state_dict: Mapping[str, Any], meta: dict[str, Any] | None = None, *, seed: int = 0
) -> Encoder:
    """An :class:`Encoder` holding the weights of a torch state dict (values: NumPy arrays or
    anything ``np.asarray`` takes). ``meta``: a `models.encoder_meta` dict; inferred from the
    shapes (:func:`infer_meta`) when None. Without head keys the head is freshly initialized as
    ``ProjectionHead(F, hidden_dim, embed_dim, rngs=nnx.Rngs(seed))``. Raises ValueError listing
    missing / unexpected keys (first 20 of each, with counts) and shape mismatches."""
    sd, notes = normalize_keys(state_dict)
    for n in notes:
        log.warning("torch_to_encoder: %s", n)
    if meta is None:
        meta = infer_meta(sd)
    with_head = _has_head(sd)
    if not with_head:
        log.warning(
            "torch_to_encoder: no projection head (fc.0/fc.2) in the state dict; the head keeps its "
            "fresh initialization (ProjectionHead, nnx.Rngs(%d))",
            seed,
        )
    model = models.build_encoder(meta, abstract=True)
    expected = _expected_keys(model, with_head)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in set(expected)]
    if missing or unexpected:
        msg = [f"state dict does not match {meta['model']['arch']} (meta {meta['model']})"]
        if missing:
            msg.append(f"missing keys ({_fmt_keys(missing)})")
        if unexpected:
            msg.append(f"unexpected keys ({_fmt_keys(unexpected)})")
        raise ValueError("; ".join(msg))

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
        m = meta["model"]
        head = ProjectionHead(
            model.backbone.num_features,
            m.get("hidden_dim"),
            m["embed_dim"],
            dtype=jnp.dtype(m.get("dtype", "float32")),
            rngs=nnx.Rngs(seed),
        )
        params["head"] = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(s, stats)
    return nnx.merge(graphdef, p, s)


def encoder_to_torch(model: Encoder, *, backbone_only: bool = False) -> dict[str, np.ndarray]:
    """torchvision-named float32 NumPy arrays (in torchvision's order) for an :class:`Encoder`:
    backbone keys as in ``torchvision.models.resnet*``, the head as ``fc.0.*``/``fc.2.*`` (left
    out with ``backbone_only``), ``num_batches_tracked`` = 0 (int64) for every BatchNorm."""
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


# ----------------------------------------------------------------------------- files


def load_torch_state_dict(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a ``.pth`` file (torch needed) -> {key: float NumPy array or int array}, unwrapping
    ``{'state_dict': ...}`` / ``{'model': ...}`` wrappers. Only tensors and plain containers are
    unpickled unless `trust_pickle` (which runs whatever code the file names: trusted files only).
    A file that is no checkpoint at all is a ValueError that does not suggest --trust-pickle."""
    torch = import_torch_module()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such PyTorch checkpoint file: {path}")
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
                 **meta_kw) -> dict[str, Any]:
    """``.pth`` -> Orbax encoder directory (readable by `checkpoints.load_encoder`); returns meta."""
    sd = load_torch_state_dict(pth, trust_pickle)
    meta = infer_meta(sd, converted_from=os.path.abspath(pth), **meta_kw)
    model = torch_to_encoder(sd, meta, seed=seed)
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    checkpoints.export_encoder(out_dir, meta, params, stats)
    return meta


def export_torch(
    checkpoint: str,
    out_pth: str,
    *,
    backbone_only: bool = False,
    moco_layout: bool = False,
    which: str = "query",
) -> dict[str, np.ndarray]:
    """Train workdir or exported encoder -> torchvision-named ``.pth``; returns the arrays."""
    model, meta = checkpoints.load_encoder(checkpoint, which=which)
    sd = encoder_to_torch(model, backbone_only=backbone_only)
    if moco_layout:
        wrap = {"arch": meta["model"]["arch"], "epoch": int(meta.get("epoch", 0) or 0)}
        save_torch_state_dict(out_pth, {f"module.encoder_q.{k}": v for k, v in sd.items()}, wrap)
    else:
        save_torch_state_dict(out_pth, sd)
    return sd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hcsc_jax.convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser(
        "import-torch", help="PyTorch .pth (HCSC / MoCo v2 / PCL / torchvision) -> Orbax encoder"
    )
    imp.add_argument("pth")
    imp.add_argument("out_dir")
    imp.add_argument("--embed-dim", type=int, default=128, help="head output dim when the file has no head")
    imp.add_argument("--hidden-dim", type=int, default=None, help="head hidden dim when the file has no head")
    imp.add_argument("--bn-group-size", type=int, default=32, help="recorded in meta, for fine-tuning")
    imp.add_argument("--seed", type=int, default=0, help="initialization of a head absent from the file")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="unpickle any object in the file (runs code it names): only for files you trust")
    exp = sub.add_parser("export-torch", help="train workdir or exported encoder -> torchvision-named .pth")
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
                embed_dim=args.embed_dim,
                hidden_dim=args.hidden_dim,
                bn_group_size=args.bn_group_size,
            )
            print(f"wrote {args.out_dir}: {meta['model']} in_channels={meta['in_channels']}")
        else:
            sd = export_torch(
                args.checkpoint,
                args.out_pth,
                backbone_only=args.backbone_only,
                moco_layout=args.moco_layout,
                which=args.which,
            )
            print(f"wrote {args.out_pth}: {len(sd)} tensors")
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
