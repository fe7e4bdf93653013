"""Batch normalization with statistics computed per *BN group* of samples.

MoCo computes BatchNorm statistics per device (32 samples on 8 GPUs). hcsc-jax makes this
independent of the device count: a train-mode batch of B samples is viewed as B // g groups of g
consecutive samples and each group is normalized with its own statistics. The computation is
written in global-batch terms, so under ``jax.jit`` with the batch sharded over a 'data' mesh axis
XLA partitions it; as long as each device holds a multiple of g samples no group spans devices,
and the numbers do not depend on the number of devices (up to float32 rounding: XLA may order
reductions differently for different per-device shapes). With a mesh whose axis types are
``Explicit`` (the default of ``jax.make_mesh``) the per-device batch must be a multiple of the
group size (a clear error otherwise); with ``Auto`` axes groups may also span devices.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

# What the running statistics follow in train mode: the statistics of every group, averaged
# ("mean_of_groups"), or of the first group only ("first_group": what the authors' DDP runs keep,
# as `broadcast_buffers` copies rank 0's buffers to every rank before each forward pass).
RUNNING_STATS = ("mean_of_groups", "first_group")


def _batch_shards(x: jax.Array) -> int:
    """Number of devices the batch axis is split over under *explicit* sharding (else 1)."""
    try:
        sharding = jax.typeof(x).sharding
        axes = sharding.spec[0] if len(sharding.spec) else None
    except (AttributeError, TypeError):
        return 1
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def _group_stats(xg: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Per-(group, channel) mean and biased variance in float32, in one pass over ``xg``.

    One-pass ``var = E[d^2] - E[d]^2`` clamped at 0, as flax's ``use_fast_variance=True``, but on
    ``d = x - k`` with ``k`` the group's first value per channel (the classic shifted-data
    algorithm: the same numbers in exact arithmetic, and the float32 cancellation now scales with
    ``(mean - k)^2 / var`` instead of ``mean^2 / var``). Both sums read the same input with the same
    reduction shape, so XLA fuses them into one multi-output reduction, and the float32 upcast of
    a bfloat16 input happens inside that fusion (no float32 copy of the activation).
    """
    n = math.prod(xg.shape[a] for a in axes)
    k = jax.lax.stop_gradient(xg[(slice(None),) + (slice(0, 1),) * len(axes)].astype(jnp.float32))
    d = xg.astype(jnp.float32) - k
    s1 = jnp.sum(d, axis=axes, keepdims=True)
    s2 = jnp.sum(jnp.square(d), axis=axes, keepdims=True)
    dmean = s1 / n
    var = jnp.maximum(s2 / n - jnp.square(dmean), 0.0)
    return k + dmean, var


def _affine(x: jax.Array, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """``x * a + b`` computed in float32 inside one elementwise fusion, stored as ``dtype``."""
    return (x.astype(jnp.float32) * a + b).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_bn_train(xg, scale, bias, epsilon, dtype):
    """Train-mode grouped BN on ``xg`` (G, g, ..., C): returns (y, mean, var).

    ``mean``/``var`` are the per-(group, channel) float32 statistics, shape (G, 1, ..., 1, C); ``y``
    has dtype ``dtype``. The custom VJP keeps only ``xg`` (in its own dtype) and per-(group,
    channel) vectors as residuals; the backward pass is one fused two-output reduction over
    (dy, x) and one elementwise pass, with float32 arithmetic inside the fusions only.
    """
    return _grouped_bn_train_fwd(xg, scale, bias, epsilon, dtype)[0]


def _grouped_bn_train_fwd(xg, scale, bias, epsilon, dtype):
    axes = tuple(range(1, xg.ndim - 1))
    mean, var = _group_stats(xg, axes)
    rstd = jax.lax.rsqrt(var + epsilon)
    a = scale * rstd
    y = _affine(xg, a, bias - mean * a, dtype)
    return (y, mean, var), (xg, scale, mean, rstd)


def _grouped_bn_train_bwd(epsilon, dtype, res, cts):
    del epsilon, dtype
    xg, scale, mean, rstd = res
    dy, dmean, dvar = cts
    axes = tuple(range(1, xg.ndim - 1))
    n = math.prod(xg.shape[a] for a in axes)
    dyf = dy.astype(jnp.float32)
    xc = xg.astype(jnp.float32) - mean
    sdy = jnp.sum(dyf, axis=axes, keepdims=True)  # (G, 1, ..., 1, C)
    sdyxc = jnp.sum(dyf * xc, axis=axes, keepdims=True)
    a = scale * rstd
    # dx = a * (dy - mean(dy) - xhat * mean(dy * xhat)) + dmean / n + 2 * dvar * (x - mean) / n,
    # with xhat = (x - mean) * rstd: per (group, channel) dx = a * dy + k * (x - mean) + c.
    k = (2.0 * dvar - a * jnp.square(rstd) * sdyxc) / n
    c = (dmean - a * sdy) / n
    dx = (a * dyf + k * xc + c).astype(xg.dtype)
    red = tuple(range(xg.ndim - 1))
    dscale = jnp.sum(sdyxc * rstd, axis=red)
    dbias = jnp.sum(sdy, axis=red)
    return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_grouped_bn_train.defvjp(_grouped_bn_train_fwd, _grouped_bn_train_bwd)


class GroupedBatchNorm(nnx.Module):
    """BatchNorm over the last (channel) axis with per-group train-mode statistics.

    Train mode (``train=True``): input (B, ..., C) with B % g == 0 is viewed as (B//g, g, ..., C);
    mean and biased variance over (g, ...) per group and channel normalize that group. The running
    statistics follow PyTorch (momentum 0.1): ``running = (1 - m) * running + m * stat``, where
    ``stat`` is the group statistic averaged over groups (``running_stats="first_group"``: the first
    group's) and the variance is the *unbiased* one (times n / (n - 1), n = g * prod(spatial)).
    Eval mode (``train=False``) uses the running stats.

    Statistics are always computed in float32, in one pass over the input (see ``_group_stats``);
    the normalization is ``x * a + b`` with per-(group, channel) float32 ``a``, ``b``, evaluated in
    float32 inside the fusion and stored as ``dtype``. The train-mode normalization has a custom
    VJP (``_grouped_bn_train``) that saves only the input and per-(group, channel) vectors.

    Attributes (torch name in brackets): ``scale`` [weight], ``bias`` [bias] (``nnx.Param``),
    ``mean`` [running_mean], ``var`` [running_var] (``nnx.BatchStat``, float32).
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int | None = 32,
        running_stats: str = "mean_of_groups",
        momentum: float = 0.1,
        epsilon: float = 1e-5,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        zero_scale: bool = False,
    ):
        if group_size is not None and group_size < 1:
            raise ValueError(f"bn_group_size must be a positive int or None, got {group_size}")
        if running_stats not in RUNNING_STATS:
            raise ValueError(f"bn_running_stats must be one of {', '.join(RUNNING_STATS)}, "
                             f"got {running_stats!r}")
        self.running_stats = running_stats
        self.num_features = num_features
        self.group_size = group_size
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        init = jnp.zeros if zero_scale else jnp.ones
        self.scale = nnx.Param(init((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        scale = self.scale[...].astype(jnp.float32)
        bias = self.bias[...].astype(jnp.float32)
        if not train:
            a = scale * jax.lax.rsqrt(self.var[...] + self.epsilon)
            return _affine(x, a, bias - self.mean[...] * a, self.dtype)

        b = x.shape[0]
        g = b if self.group_size is None else self.group_size
        if b % g != 0:
            raise ValueError(
                f"GroupedBatchNorm: batch size B={b} is not a multiple of bn_group_size g={g}; "
                "change the batch size or bn_group_size."
            )
        shards = _batch_shards(x)
        if (b // g) % shards != 0:
            raise ValueError(
                f"GroupedBatchNorm: the batch B={b} is split over {shards} devices (explicit sharding), "
                f"so BN groups of g={g} would span devices; the per-device batch must be a multiple of "
                "bn_group_size. Change the batch size or bn_group_size."
            )
        n = g * math.prod(x.shape[1:-1])  # samples per statistic
        if n < 2:
            raise ValueError(
                f"GroupedBatchNorm: need more than 1 value per channel per group in training "
                f"(bn_group_size g={g}, input shape {x.shape})."
            )
        xg = x.reshape((b // g, g) + x.shape[1:])
        y, mean, var = _grouped_bn_train(xg, scale, bias, self.epsilon, jnp.dtype(self.dtype))

        m = self.momentum
        if self.running_stats == "first_group":
            mean, var = mean[:1], var[:1]
        batch_mean = jax.lax.stop_gradient(jnp.mean(mean, axis=tuple(range(mean.ndim - 1))))
        batch_var = jax.lax.stop_gradient(jnp.mean(var, axis=tuple(range(var.ndim - 1))) * (n / (n - 1)))
        self.mean[...] = (1.0 - m) * self.mean[...] + m * batch_mean
        self.var[...] = (1.0 - m) * self.var[...] + m * batch_var
        return y.reshape(x.shape)
