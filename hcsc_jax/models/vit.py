"""Vision Transformer backbones (MoCo v3 / timm layout) in Flax NNX, NHWC input.

Pre-norm blocks, a class token, fixed 2-D sin-cos position embeddings as MoCo v3 builds them
(or learned ones, ``pos_embed="learn"``), attention through ``jax.nn.dot_product_attention``
(cuDNN's fused attention on a GPU when it applies, XLA's otherwise). The pooled feature is the
final-norm class token. Parameters are float32; ``dtype`` is the compute dtype of the matmuls
(the residual stream and LayerNorm statistics stay float32, as under torch autocast).

Names follow timm / MoCo v3 / DINO, so a converter only maps leaf names and layouts:

=====================================  =====================================================
NNX path (``nnx.to_flat_state``)       timm ``state_dict`` key
=====================================  =====================================================
``patch_embed/proj/kernel``, ``bias``  ``patch_embed.proj.weight`` (HWIO <- OIHW), ``.bias``
``cls_token``                          ``cls_token``            (1, 1, D)
``pos_embed`` (learned only)           ``pos_embed``            (1, 1 + N, D); the sin-cos one
                                                                is computed, not stored
``blocks/{i}/norm1/scale``, ``bias``   ``blocks.{i}.norm1.weight``, ``.bias``
``blocks/{i}/attn/qkv/kernel``         ``blocks.{i}.attn.qkv.weight`` (kernel = weight.T)
``blocks/{i}/attn/proj/...``           ``blocks.{i}.attn.proj.*``
``blocks/{i}/norm2/...``               ``blocks.{i}.norm2.*``
``blocks/{i}/mlp/fc1/...``, ``fc2``    ``blocks.{i}.mlp.fc1.*``, ``blocks.{i}.mlp.fc2.*``
``norm/scale``, ``norm/bias``          ``norm.weight``, ``norm.bias``
=====================================  =====================================================

Architectures (`VIT_ARCHS`): ``vit_{t,s,b}16`` are ViT-Tiny / Small / Base with 16-px patches
(for 224-px images); ``vit_{t,s,b}4`` the same with 4-px patches, for 28-32 px datasets.
``width`` multiplies the embedding dimension (the head count stays), ``depth`` overrides the
block count: a tiny ViT for tests and smoke runs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# name -> (embedding dim, depth, heads, patch size); MLP ratio 4, qkv bias, LayerNorm eps 1e-6.
VIT_ARCHS = {
    "vit_t16": (192, 12, 3, 16), "vit_s16": (384, 12, 6, 16), "vit_b16": (768, 12, 12, 16),
    "vit_t4": (192, 12, 3, 4), "vit_s4": (384, 12, 6, 4), "vit_b4": (768, 12, 12, 4),
}
POS_EMBEDS = ("sincos", "learn")
LN_EPS = 1e-6

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


def _qkv_init(key, shape, dtype=jnp.float32):
    """MoCo v3: xavier-uniform as if q, k and v were three (D, D) layers."""
    bound = math.sqrt(6.0 / (shape[0] + shape[1] // 3))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _linear(cin, cout, *, dtype, rngs, kernel_init=_xavier):
    return nnx.Linear(cin, cout, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                      bias_init=_zeros, rngs=rngs)


def _layer_norm(dim, *, dtype, rngs):
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


def sincos_pos_embed(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """MoCo v3's fixed position embedding (1, 1 + grid_h * grid_w, dim) float32: a zero row for the
    class token, then per patch [sin(r w), cos(r w), sin(c w), cos(c w)] with (r, c) the patch's
    row and column (row-major, as the tokens) and w = temperature^(-k / (dim / 4)), k < dim / 4.
    (MoCo v3 names the row term "w"; on its square grids this is the same table.)"""
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs an embedding dim divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float32) / (dim // 4))
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32),
                             indexing="ij")
    out_r, out_c = np.outer(rows.ravel(), omega), np.outer(cols.ravel(), omega)
    table = np.concatenate([np.sin(out_r), np.cos(out_r), np.sin(out_c), np.cos(out_c)], axis=1)
    return np.concatenate([np.zeros((1, dim), np.float32), table.astype(np.float32)])[None]


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> D channels (timm ``patch_embed``, its conv as ``proj``)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, *, dtype, rngs):
        # MoCo v3: xavier-uniform of the kernel flattened to (D, in_channels * p * p).
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
        self.proj = nnx.Conv(in_channels, dim, (patch_size, patch_size), strides=(patch_size, patch_size),
                             padding="VALID", dtype=dtype, param_dtype=jnp.float32, kernel_init=init,
                             bias_init=_zeros, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


def attention(q, k, v):
    """Softmax attention of (B, T, heads, head_dim) arrays via ``jax.nn.dot_product_attention``:
    cuDNN's fused kernel on a GPU for 16-bit inputs (which it requires), when it takes the shapes
    (it refuses some at trace time: then XLA's); XLA's otherwise. (The cuDNN path has not been run
    on a GPU by this project's tests, which run on CPUs.)"""
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            pass
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


class Attention(nnx.Module):
    """Multi-head self-attention: one qkv projection ([q | k | v], heads contiguous, as timm)."""

    def __init__(self, dim: int, num_heads: int, *, dtype, rngs):
        self.num_heads = num_heads
        self.qkv = _linear(dim, 3 * dim, dtype=dtype, rngs=rngs, kernel_init=_qkv_init)
        self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
    """fc1 - GELU (exact, torch's default) - fc2."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs):
        self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); the residual stream
    stays float32 (the sub-layers compute in ``dtype``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, dtype, rngs):
        self.norm1 = _layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = _layer_norm(dim, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x)).astype(jnp.float32)
        return x + self.mlp(self.norm2(x)).astype(jnp.float32)


class VisionTransformer(nnx.Module):
    """ViT backbone: ``__call__(x NHWC, *, train) -> (B, num_features)`` float32, the final-norm
    class token (``train`` is accepted for the encoder interface: a ViT has no BatchNorm and no
    dropout here, so both modes compute the same).

    Args:
      patch_size: side of the square patches; the image sides must be multiples of it.
      dim: embedding dimension D (= num_features); a multiple of ``num_heads`` and of 4.
      depth: number of blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden size / D.
      in_channels: image channels.
      pos_embed: "sincos" (fixed, computed for any grid, so any image size that the patch size
        divides) or "learn" (a parameter for the grid of ``image_size``, which inputs must match).
      image_size: the training image side; needed for ``pos_embed="learn"``, recorded otherwise
        (the grid of the sin-cos table that `convert` exports).
      dtype: compute dtype; parameters stay float32.
    """

    def __init__(self, *, patch_size: int, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 in_channels: int = 3, pos_embed: str = "sincos", image_size: int | None = None,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        check_dims(dim, num_heads, pos_embed)
        grid = None if image_size is None else check_image_size(image_size, patch_size)
        self.patch_size = patch_size
        self.image_size = image_size
        self.num_features = dim
        self.dtype = dtype
        self.pos_embed_kind = pos_embed
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, dim), jnp.float32))
        if pos_embed == "learn":
            if grid is None:
                raise ValueError("a learned position embedding needs the image size (model.image_size)")
            init = nnx.initializers.truncated_normal(0.02)
            self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + grid * grid, dim), jnp.float32))
        self.blocks = nnx.List([Block(dim, num_heads, mlp_ratio, dtype=dtype, rngs=rngs)
                                for _ in range(depth)])
        self.norm = _layer_norm(dim, dtype=dtype, rngs=rngs)

    def position_embedding(self, grid_h: int, grid_w: int) -> jax.Array:
        """(1, 1 + grid_h * grid_w, D) float32 for a grid of patches."""
        if self.pos_embed_kind == "sincos":
            return jnp.asarray(sincos_pos_embed(grid_h, grid_w, self.num_features))
        n = self.pos_embed.shape[1] - 1
        if grid_h * grid_w != n:
            side = math.isqrt(n)
            px = side * self.patch_size
            raise ValueError(
                f"the learned position embedding covers a {side}x{side} grid of patches ({px} px), the input "
                f"a {grid_h}x{grid_w} grid; feed {px}-px images or "
                "re-import the weights at this size with interpolate_pos_embed")
        return self.pos_embed[...]

    def __call__(self, x, *, train: bool):
        del train
        b, h, w, _ = x.shape
        check_image_size(h, self.patch_size, w)
        x = self.patch_embed(x.astype(self.dtype))
        gh, gw, d = x.shape[1:]
        x = x.reshape(b, gh * gw, d).astype(jnp.float32)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding(gh, gw)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, 0]).astype(jnp.float32)


def check_dims(dim: int, num_heads: int, pos_embed: str) -> None:
    """ValueError unless `pos_embed` is known and D suits the heads (and the sin-cos embedding,
    which needs a multiple of 4)."""
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"model.pos_embed must be one of {', '.join(POS_EMBEDS)}, got {pos_embed!r}")
    if dim % num_heads or (pos_embed == "sincos" and dim % 4):
        raise ValueError(f"ViT embedding dim {dim} must be a multiple of its {num_heads} heads"
                         + (" and of 4 (sin-cos position embedding)" if pos_embed == "sincos" else "")
                         + "; choose a width that keeps it so")


def check_image_size(size: int, patch_size: int, width: int | None = None) -> int:
    """The side of the patch grid; ValueError naming the nearest valid sizes when the image side
    (sides) is not a multiple of the patch size."""
    for s in (size,) if width is None or width == size else (size, width):
        if s % patch_size:
            lo, hi = s // patch_size * patch_size, (s // patch_size + 1) * patch_size
            raise ValueError(f"image size {s} is not divisible by the ViT patch size {patch_size}; use e.g. "
                             f"{lo or hi} or {hi} px (image_size, or the multi-crop local view sizes)")
    return size // patch_size


def build_vit(arch: str, *, width: float = 1.0, depth: int | None = None, in_channels: int = 3,
        pos_embed: str = "sincos", image_size: int | None = None, dtype=jnp.float32,
        rngs: nnx.Rngs) -> VisionTransformer:
    """The `VIT_ARCHS` entry `arch` with D = round(D * width) and `depth` blocks (None: 12)."""
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT {arch!r}; known: {', '.join(VIT_ARCHS)}")
    dim, default_depth, heads, patch = VIT_ARCHS[arch]
    return VisionTransformer(patch_size=patch, dim=max(1, int(round(dim * width))),
                             depth=depth or default_depth, num_heads=heads, in_channels=in_channels,
                             pos_embed=pos_embed, image_size=image_size, dtype=dtype, rngs=rngs)
