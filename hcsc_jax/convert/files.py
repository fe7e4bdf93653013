""".pth files: checked before they are unpickled, read and written with torch; `import_torch` /
`export_torch`, with the JSON sidecar that carries an encoder's meta and input."""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from hcsc_jax import models
from hcsc_jax.convert.resnet import encoder_to_torch, infer_meta, torch_to_encoder
from hcsc_jax.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from hcsc_jax.run import checkpoints
from hcsc_jax.run import workdir as workdir_lib

log = logging.getLogger("hcsc_jax.convert")

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


