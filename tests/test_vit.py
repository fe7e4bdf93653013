"""Tests for the ViT backbone (hcsc_jax.models.vit) and its timm-layout weights (hcsc_jax.convert).

timm is not installed here, so the PyTorch reference is a short MoCo v3 / timm ViT written in this
file (`_torch_vit`: the same module names, qkv as one Linear with [q | k | v] and heads
contiguous, softmax attention written out, LayerNorm eps 1e-6, exact GELU, MoCo v3's
`build_2d_sincos_position_embedding` transcribed line by line) with the MoCo v2 head
``fc = Sequential(Linear, ReLU, Linear)``. Tiny sizes keep it fast on a 2-core CPU: depth 2,
width 48, 16-32 px images, batch 2.
"""

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hcsc_jax import convert, models
from hcsc_jax.models import vit as vit_lib

torch = pytest.importorskip("torch")
nn = torch.nn

# float32 parity with the PyTorch reference (max abs error / max abs value). Measured on this CPU:
# 3.4e-7 / 3.1e-7 (class token / projection, vit_s4 sin-cos) and 4.2e-7 / 1.9e-7 (vit_t16 learned);
# the stated bound is the 1e-4.
PARITY_RTOL = 1e-4


def _moco_v3_sincos(h, w, dim, temperature=10000.0):
    """MoCo v3's vits.py `build_2d_sincos_position_embedding`, transcribed."""
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature ** omega)
    out_w = torch.einsum("m,d->md", [grid_w.flatten(), omega])
    out_h = torch.einsum("m,d->md", [grid_h.flatten(), omega])
    pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    return torch.cat([torch.zeros([1, 1, dim], dtype=torch.float32), pos_emb], dim=1)


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), _Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, cin, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride=patch)


class _TorchViT(nn.Module):
    """timm / MoCo v3 ViT + MoCo v2 head: forward -> (final-norm class token, normalized projection)."""

    def __init__(self, dim, depth, heads, patch, cin, size, learned, hidden, out):
        super().__init__()
        g = size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = torch.zeros(1, 1 + g * g, dim) if learned else _moco_v3_sincos(g, g, dim)
        self.pos_embed = nn.Parameter(pos)
        self.patch_embed = _PatchEmbed(cin, dim, patch)
        self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        f = self.norm(x)[:, 0]
        return f, nn.functional.normalize(self.fc(f), dim=1)


def _torch_vit(dim=48, depth=2, heads=6, patch=4, cin=3, size=16, learned=False, hidden=32, out=16, seed=0):
    """A reference with every parameter random (LayerNorm affine and biases too)."""
    torch.manual_seed(seed)
    net = _TorchViT(dim, depth, heads, patch, cin, size, learned, hidden, out)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "pos_embed" and not learned:
                continue
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5, generator=g)
            elif p.ndim == 1 or name in ("cls_token", "pos_embed"):
                p.normal_(0, 0.1 if p.ndim == 1 else 0.5, generator=g)
    return net.eval()


def _sd(net, prefix=""):
    return {prefix + k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "kw,arch",
    [
        (dict(dim=48, heads=6, patch=4, cin=1, size=16, learned=False), "vit_s4"),  # width 1/8, sin-cos
        (dict(dim=192, heads=3, patch=16, cin=3, size=32, learned=True), None),  # vit_t16, learned
    ],
    ids=["vit_s4-sincos", "vit_t16-learned"],
)
@pytest.mark.slow
def test_torch_vit_gives_the_same_class_token_and_projection(kw, arch):
    net = _torch_vit(**kw)
    sd = _sd(net)
    meta = convert.infer_meta(sd, arch=arch)
    m = meta["model"]
    assert (m["arch"], m["depth"], m["pos_embed"], m["image_size"], meta["in_channels"]) == (
        arch or "vit_t16", 2, "learn" if kw["learned"] else "sincos", kw["size"], kw["cin"])
    assert (m["embed_dim"], m["hidden_dim"], m["small_stem"]) == (16, 32, False)
    model = convert.torch_to_encoder(sd, meta)
    assert model.backbone.num_features == kw["dim"]
    x = np.random.default_rng(0).normal(size=(2, kw["cin"], kw["size"], kw["size"])).astype(np.float32)
    with torch.no_grad():
        f_ref, z_ref = (t.numpy() for t in net(torch.from_numpy(x)))
    feats, z = model(x.transpose(0, 2, 3, 1), train=False)
    assert feats.dtype == z.dtype == jnp.float32 and feats.shape == f_ref.shape and z.shape == z_ref.shape
    assert _rel_err(feats, f_ref) < PARITY_RTOL, _rel_err(feats, f_ref)
    assert _rel_err(z, z_ref) < PARITY_RTOL, _rel_err(z, z_ref)
    # Export gives back the torch dict: same keys in the same (timm) order, same values.
    back = convert.encoder_to_torch(model)
    assert list(back) == list(sd)
    for k, v in sd.items():
        np.testing.assert_allclose(back[k], v, rtol=0, atol=1e-6 if k == "pos_embed" else 0, err_msg=k)


def test_sincos_table_is_moco_v3s():
    for g, dim in ((4, 48), (14, 384)):
        np.testing.assert_allclose(vit_lib.sincos_pos_embed(g, g, dim), _moco_v3_sincos(g, g, dim).numpy(),
                                   atol=1e-6)


# ----------------------------------------------------------------------------- round trip, layouts


def _meta(arch="vit_s4", width=0.125, pos_embed="sincos", image_size=16, in_channels=3):
    return models.encoder_meta(dict(arch=arch, width=width, small_stem=False, embed_dim=16, hidden_dim=32,
                                    dtype="float32", depth=2, pos_embed=pos_embed, image_size=image_size),
                               in_channels, None)


def _random_encoder(meta, seed=1):
    """Random weights filled from NumPy into an abstract model (no JAX initialization compiles)."""
    graphdef, p, s = nnx.split(models.build_encoder(meta, abstract=True), nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(seed)
    fill = lambda leaf: (rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)
    nnx.replace_by_pure_dict(p, jax.tree.map(fill, nnx.to_pure_dict(p)))
    return nnx.merge(graphdef, p, s)


@pytest.mark.parametrize("pos_embed", ["sincos", "learn"])
def test_export_import_round_trip_is_bit_exact(pos_embed):
    meta = _meta(pos_embed=pos_embed)
    model = _random_encoder(meta)
    sd = convert.encoder_to_torch(model)
    assert list(sd)[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert sd["patch_embed.proj.weight"].shape == (48, 3, 4, 4) and sd["pos_embed"].shape == (1, 17, 48)
    assert sd["blocks.1.attn.qkv.weight"].shape == (144, 48) and list(sd)[-4:] == [
        "fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"]
    assert "fc.0.weight" not in convert.encoder_to_torch(model, backbone_only=True)
    _assert_trees_equal(_pure(model), _pure(convert.torch_to_encoder(sd, meta)))
    inferred = convert.infer_meta(sd, arch="vit_s4")
    assert inferred["model"] == meta["model"] and inferred["in_channels"] == 3
    _assert_trees_equal(_pure(model), _pure(convert.torch_to_encoder(sd, inferred)))


def test_moco_v3_dino_and_timm_layouts(caplog):
    meta = _meta()
    model = _random_encoder(meta)
    sd = convert.encoder_to_torch(model, backbone_only=True)
    other = convert.encoder_to_torch(_random_encoder(meta, seed=2), backbone_only=True)
    moco = {f"module.base_encoder.{k}": v for k, v in sd.items()}
    moco.update({f"module.momentum_encoder.{k}": v for k, v in other.items()})
    moco["module.base_encoder.head.0.weight"] = np.zeros((64, 48), np.float32)  # MoCo v3's MLP head
    moco["module.predictor.0.weight"] = np.zeros((64, 16), np.float32)
    with caplog.at_level(logging.WARNING):
        base = convert.torch_to_encoder(moco, meta)
    assert "took base_encoder, ignored the entries of momentum_encoder, predictor" in caplog.text
    assert "ignored head.* (1: head.0.weight)" in caplog.text and "fresh initialization" in caplog.text
    _assert_trees_equal(_pure(model)["backbone"], _pure(base)["backbone"])
    momentum = convert.torch_to_encoder(moco, meta, encoder="momentum")
    _assert_trees_equal(_pure(_random_encoder(meta, seed=2))["backbone"], _pure(momentum)["backbone"])
    # timm / DINO: plain keys, a classifier head.* ignored.
    timm = dict(sd, **{"head.weight": np.zeros((1000, 48), np.float32),
                       "head.bias": np.zeros(1000, np.float32)})
    _assert_trees_equal(_pure(model)["backbone"], _pure(convert.torch_to_encoder(timm, meta))["backbone"])
    with pytest.raises(ValueError, match="has no momentum_encoder"):
        convert.torch_to_encoder({f"module.base_encoder.{k}": v for k, v in sd.items()}, meta,
                                 encoder="momentum")


def test_missing_unexpected_and_unknown_width_are_named():
    meta = _meta()
    sd = convert.encoder_to_torch(_random_encoder(meta))
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \(1: blocks.1.mlp.fc2.bias\)") as e:
        convert.torch_to_encoder(missing, meta)
    assert "unexpected" not in str(e.value)
    with pytest.raises(ValueError, match=r"unexpected keys \(1: blocks.2.norm1.weight\)"):
        convert.torch_to_encoder(dict(sd, **{"blocks.2.norm1.weight": np.ones(48, np.float32)}), meta)
    with pytest.raises(ValueError, match=r"cannot tell the ViT's heads .*embedding dim 48, patch 4.*--arch"):
        convert.infer_meta(sd)
    with pytest.raises(ValueError, match=r"arch 'vit_s16' does not fit a ViT with 4-px patches"):
        convert.infer_meta(sd, arch="vit_s16")


def _torch_bicubic(pos, grid, antialias=False):
    g = int(math.isqrt(pos.shape[1] - 1))
    t = torch.from_numpy(pos[:, 1:]).reshape(1, g, g, -1).permute(0, 3, 1, 2)
    t = nn.functional.interpolate(t, size=(grid, grid), mode="bicubic", align_corners=False,
                                  antialias=antialias)
    return np.concatenate([pos[:, :1], t.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).numpy()], axis=1)


@pytest.mark.slow
def test_learned_pos_embed_of_another_grid_needs_interpolation(caplog):
    sd = convert.encoder_to_torch(_random_encoder(_meta(pos_embed="learn", image_size=16)))  # 4x4 grid
    meta = convert.infer_meta(sd, arch="vit_s4", image_size=24)  # a 6x6 grid
    assert meta["model"]["image_size"] == 24 and meta["model"]["pos_embed"] == "learn"
    with pytest.raises(ValueError, match=r"covers a 4x4 grid of patches \(16-px images\), the model a 6x6 "
                                         r"grid \(24 px\).*--interpolate-pos-embed=bicubic \(as DINO and "
                                         r"MoCo v3 do\) or =bicubic_antialias \(as timm does\)"):
        convert.torch_to_encoder(sd, meta)
    for mode, antialias in (("bicubic", False), ("bicubic_antialias", True)):
        with caplog.at_level(logging.WARNING):
            model = convert.torch_to_encoder(sd, meta, interpolate_pos_embed=mode)
        assert f"resized from a 4x4 to a 6x6 grid ({mode})" in caplog.text
        got = np.asarray(model.backbone.pos_embed[...])
        assert got.shape == (1, 37, 48)
        np.testing.assert_allclose(got, _torch_bicubic(sd["pos_embed"], 6, antialias), atol=1e-6)
    with pytest.raises(ValueError, match="unknown pos_embed resize 'bilinear'; one of bicubic, "
                                         "bicubic_antialias"):
        convert.interpolate_pos_embed(sd["pos_embed"], 6, "bilinear")
    # 14 -> 16 (224 -> 256 px at patch 16), 14 -> 10 (160 px), downsampling by more than 2, odd sizes:
    # torch's F.interpolate without and with antialias=True (what timm's resample_abs_pos_embed calls).
    rng = np.random.default_rng(0)
    for g, new in ((14, 16), (14, 10), (4, 2), (24, 5), (3, 11)):
        pos = (0.02 * rng.normal(size=(1, 1 + g * g, 8))).astype(np.float32)  # timm's initial scale
        plain, smooth = (convert.interpolate_pos_embed(pos, new, m) for m in ("bicubic", "bicubic_antialias"))
        np.testing.assert_allclose(plain, _torch_bicubic(pos, new), atol=1e-6)
        np.testing.assert_allclose(smooth, _torch_bicubic(pos, new, antialias=True), atol=1e-6)
        assert np.abs(plain - smooth).max() > 1e-3  # two different resizes
    # A sin-cos table is recomputed for any grid: nothing to interpolate.
    sincos = convert.encoder_to_torch(_random_encoder(_meta()))
    model = convert.torch_to_encoder(sincos, convert.infer_meta(sincos, arch="vit_s4", image_size=24))
    assert model(np.zeros((1, 24, 24, 3), np.float32), train=False)[0].shape == (1, 48)


def test_image_size_not_divisible_by_patch_and_shuffle_bn_are_refused():
    model = _random_encoder(_meta())
    msg = r"image size 18 is not divisible by the ViT patch size 4; use e\.g\. 16 or 20"
    with pytest.raises(ValueError, match=msg):
        model(np.zeros((1, 18, 18, 3), np.float32), train=False)
    vit_cfg = _meta()["model"]
    with pytest.raises(ValueError, match=r"image size 30 is not divisible by the ViT patch size 4"):
        models.check_model_config(vit_cfg, 30, shuffle_bn=False)
    with pytest.raises(ValueError, match=r"image size 14 is not divisible.*local view"):
        models.check_model_config(vit_cfg, 16, shuffle_bn=False, view_sizes=(14,))
    with pytest.raises(ValueError, match=r"vit_s4 is a ViT and has no BatchNorm: set "
                                         r"--config.shuffle_bn=False"):
        models.check_model_config(vit_cfg, 16, shuffle_bn=True)
    with pytest.raises(ValueError, match=r"learned position embedding fits one image size"):
        models.check_model_config(dict(vit_cfg, pos_embed="learn"), 16, shuffle_bn=False, view_sizes=(8,))
    with pytest.raises(ValueError, match=r"embedding dim 44 must be a multiple of its 6 heads"):
        models.check_model_config(dict(vit_cfg, width=44 / 384), 16, shuffle_bn=False)
    models.check_model_config(vit_cfg, 16, shuffle_bn=False, view_sizes=(8,))
    models.check_model_config(dict(vit_cfg, arch="resnet18", small_stem=True), 30, shuffle_bn=True)


def test_cli_import_then_export_end_to_end(tmp_path, capsys):
    """A MoCo v3-style .pth with a learned grid for 16 px, imported at 24 px, then exported."""
    net = _torch_vit(learned=True, size=16)
    pth = tmp_path / "mocov3.pth"
    moco = {f"module.base_encoder.{k}": v for k, v in net.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": moco}, pth)
    out = tmp_path / "imported"
    assert convert.main(["import-torch", str(pth), str(out), "--arch=vit_s4", "--image-size=24"]) == 2
    assert "--interpolate-pos-embed" in capsys.readouterr().err and not out.exists()  # nothing written
    assert convert.main(["import-torch", str(pth), str(out), "--arch=vit_s4", "--image-size=24",
                         "--interpolate-pos-embed=bicubic"]) == 0
    assert "'image_size': 24" in capsys.readouterr().out
    back = tmp_path / "back.pth"
    assert convert.main(["export-torch", str(out), str(back)]) == 0
    sd = torch.load(back, weights_only=True)
    assert sd["pos_embed"].shape == (1, 37, 48)
    ref = _sd(net)
    for k in ref:
        if k != "pos_embed":
            np.testing.assert_array_equal(sd[k].numpy(), ref[k], err_msg=k)
    assert os.path.isdir(out)
    # A standard width needs no --arch (vit_t16 by its 192 dims), as a released MoCo v3 file.
    std = _torch_vit(dim=192, heads=3, patch=16, size=32)
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in std.state_dict().items()}},
               tmp_path / "vit-t-300ep.pth.tar")
    assert convert.main(["import-torch", str(tmp_path / "vit-t-300ep.pth.tar"), str(tmp_path / "std")]) == 0
    assert "'arch': 'vit_t16'" in capsys.readouterr().out
