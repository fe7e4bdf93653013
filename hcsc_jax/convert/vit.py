"""Vision Transformers: timm / MoCo v3 / DINO key layouts <-> `models.vit`, and the position
embedding's resize (torch's bicubic, with or without antialiasing)."""

from __future__ import annotations

import logging
import math
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
from hcsc_jax.models import VIT_ARCHS, Encoder, VisionTransformer
from hcsc_jax.models.vit import sincos_pos_embed

log = logging.getLogger("hcsc_jax.convert")

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
        notes.append(f"ignored head.* ({fmt_keys(head)}): a classifier or MoCo v3 projection MLP, "
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
            raise ValueError(f"cannot infer the ViT: no {k}; keys: {fmt_keys(sorted(sd))}")
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
    if has_head(sd):
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




def vit_torch_to_encoder(state_dict: Mapping[str, Any], meta: dict[str, Any] | None = None, *, seed: int = 0,
                         interpolate_pos_embed: str | None = None, encoder: str = "base") -> Encoder:
    """`torch_to_encoder` of a ViT. A learned ``pos_embed`` for another grid than the model's is
    resized (:func:`interpolate_pos_embed`) only when ``interpolate_pos_embed`` names how
    ("bicubic" or "bicubic_antialias"); a sin-cos one is checked and recomputed by the model for
    its grid."""
    sd, meta, with_head = read_keys(normalize_vit_keys(state_dict, encoder), meta, infer_vit_meta, seed)
    model = models.build_encoder(meta, abstract=True)
    vit = model.backbone
    learned = vit.pos_embed_kind == "learn"
    expected = [k for k, _, _ in _vit_layout(vit, with_head) if learned or k != "pos_embed"]
    key_mismatch(meta, expected, sd, optional=("pos_embed",))
    check_values(sd, [k for k, _, _ in _vit_layout(vit, with_head) if k in sd])
    if "pos_embed" in sd:
        sd = dict(sd, pos_embed=_fit_pos_embed(sd["pos_embed"], vit, interpolate_pos_embed))
    graphdef, p, s = nnx.split(model, nnx.Param, nnx.BatchStat)
    params = nnx.to_pure_dict(p)
    bad = []
    for key, path, kind in _vit_layout(vit, with_head):
        if key not in expected:
            continue
        value = np.asarray(_vit_to_flax(kind, np.asarray(sd[key])), np.float32)
        node = get_path(params, path[:-1])
        want = tuple(node[path[-1]].shape)
        if value.shape != want:
            bad.append(f"{key}: torch {tuple(np.shape(sd[key]))} -> {value.shape}, model needs {want}")
            continue
        node[path[-1]] = jnp.asarray(value)
    if bad:
        raise ValueError(f"shape mismatches ({fmt_keys(bad)})")
    if not with_head:
        params["head"] = fresh_head(vit.num_features, meta, seed)
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
        x = np.asarray(get_path(params, path))
        out[key] = x.transpose(3, 2, 0, 1) if kind == "conv" else x.T if kind == "linear" else x
    return {k: np.array(v, np.float32, order="C") for k, v in out.items()}


