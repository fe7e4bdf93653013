"""Tests for hcsc_jax.models: grouped BN, torchvision padding/layout, sharding, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hcsc_jax.models import GroupedBatchNorm, ProjectionHead, make_encoder, resnet18, resnet34, resnet50
from hcsc_jax.models.resnet import max_pool_3x3_s2


# ----------------------------------------------------------------------------- helpers
def np_grouped_bn(x, g, scale, bias, run_mean, run_var, eps=1e-5, momentum=0.1):
    """Independent NumPy reference (float64): per-group normalization + PyTorch running update."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    y = np.empty_like(x)
    means, uvars = [], []
    for s in range(0, b, g):
        xs = x[s : s + g].reshape(-1, c)
        mu = xs.mean(0)
        var = ((xs - mu) ** 2).mean(0)
        y[s : s + g] = (x[s : s + g] - mu) / np.sqrt(var + eps) * scale + bias
        means.append(mu)
        uvars.append(xs.var(0, ddof=1))
    new_mean = (1 - momentum) * run_mean + momentum * np.mean(means, 0)
    new_var = (1 - momentum) * run_var + momentum * np.mean(uvars, 0)
    return y, new_mean, new_var


def np_conv(x, w, stride, pad):
    """Direct NumPy NHWC/HWIO convolution with explicit symmetric zero padding."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    w = np.asarray(w, np.float64)
    k = w.shape[0]
    ho = (x.shape[1] - k) // stride + 1
    wo = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i in range(k):
        for j in range(k):
            patch = x[:, i : i + stride * ho : stride, j : j + stride * wo : stride, :]
            out += patch @ w[i, j]
    return out


def _forward_impl(graphdef, state, x, train):
    """How the train step uses the model: merge inside jit, return outputs and new BN stats."""
    model = nnx.merge(graphdef, state)
    feats, proj = model(x, train=train)
    return feats, proj, nnx.state(model, nnx.BatchStat)


_forward = jax.jit(_forward_impl, static_argnums=(0, 3))


def forward(model, x, train=True):
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, x, train)


def rngs(seed=0):
    # 'rbg' keys: eager per-shape initializer compilations are ~2x cheaper than threefry on CPU.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def tiny_encoder(bn_group_size=4, dtype=jnp.float32, seed=0):
    return make_encoder(
        "resnet18",
        width=0.125,
        small_stem=True,
        bn_group_size=bn_group_size,
        out_dim=16,
        dtype=dtype,
        rngs=rngs(seed),
    )


@pytest.fixture(scope="module")
def tiny():
    return tiny_encoder(bn_group_size=4)


@pytest.fixture(scope="module")
def r18_big_stem():  # shares all parameter shapes but conv1 with `tiny`: cheap to build
    return resnet18(width=0.125, bn_group_size=2, rngs=rngs())


def n_params(module):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


# ----------------------------------------------------------------------------- GroupedBatchNorm
@pytest.mark.parametrize("g", [4, None])
def test_grouped_bn_matches_numpy_reference(g):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3, 5, 6)) * rng.uniform(0.5, 3, size=6) + rng.normal(size=6)
    bn = GroupedBatchNorm(6, group_size=g)
    scale, bias = rng.normal(size=6), rng.normal(size=6)
    run_mean, run_var = rng.normal(size=6), rng.uniform(0.5, 2, size=6)
    bn.scale[...] = jnp.asarray(scale, jnp.float32)
    bn.bias[...] = jnp.asarray(bias, jnp.float32)
    bn.mean[...] = jnp.asarray(run_mean, jnp.float32)
    bn.var[...] = jnp.asarray(run_var, jnp.float32)

    y = bn(jnp.asarray(x, jnp.float32), train=True)
    y_ref, mean_ref, var_ref = np_grouped_bn(x, g or 12, scale, bias, run_mean, run_var)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.mean[...], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], var_ref, rtol=1e-5, atol=1e-6)

    # Inference uses the (just updated) running statistics and leaves them untouched.
    x2 = rng.normal(size=(5, 2, 2, 6))
    y2 = bn(jnp.asarray(x2, jnp.float32), train=False)
    y2_ref = (x2 - mean_ref) / np.sqrt(var_ref + 1e-5) * scale + bias
    np.testing.assert_allclose(y2, y2_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.mean[...], mean_ref, rtol=1e-5, atol=1e-6)


def test_first_group_running_stats_follow_the_first_group_only():
    """bn_running_stats="first_group" (the authors' DDP: rank 0's buffers broadcast to every rank):
    the running statistics move as the first group's alone would move them; the output is unchanged."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 3, 5, 6)) * rng.uniform(0.5, 3, size=6) + rng.normal(size=6)
    both = [GroupedBatchNorm(6, group_size=4), GroupedBatchNorm(6, group_size=4, running_stats="first_group")]
    y_mean, y_first = (bn(jnp.asarray(x, jnp.float32), train=True) for bn in both)
    np.testing.assert_array_equal(y_mean, y_first)
    _, mean_ref, var_ref = np_grouped_bn(x[:4], 4, np.ones(6), np.zeros(6), np.zeros(6), np.ones(6))
    np.testing.assert_allclose(both[1].mean[...], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[1].var[...], var_ref, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(both[0].mean[...]) - mean_ref).max() > 1e-3  # the groups' mean differs
    with pytest.raises(ValueError, match="bn_running_stats must be one of mean_of_groups, first_group"):
        GroupedBatchNorm(6, running_stats="rank0")


def _two_pass_bn(xg, scale, bias, eps=1e-5, dtype=jnp.float32):
    """The previous implementation (two-pass float32 statistics), differentiated by autodiff."""
    xf = xg.astype(jnp.float32)
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    inv = scale * jax.lax.rsqrt(var + eps)
    return (xf * inv + (bias - mean * inv)).astype(dtype), mean, var


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_bn_custom_vjp_matches_autodiff_of_two_pass_reference(dtype):
    # GroupedBatchNorm uses one-pass (shifted) statistics and a hand-written VJP; it must agree with
    # autodiff of the plain two-pass formula, also for channels whose mean is many stds from 0 and
    # with cotangents on the per-group mean/var outputs (which the module itself stop-gradients).
    from hcsc_jax.models.norm import _grouped_bn_train

    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 3, 5, 6)) * rng.uniform(0.2, 3, size=6) + rng.normal(size=6) * 4
    x = jnp.asarray(x, dtype)
    scale = jnp.asarray(rng.normal(size=6), jnp.float32)
    bias = jnp.asarray(rng.normal(size=6), jnp.float32)
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    wm, wv = (jnp.asarray(rng.normal(size=(3, 1, 1, 1, 6)), jnp.float32) for _ in range(2))

    def loss(fn, x, scale, bias, stats):
        y, m, v = fn(x.reshape((3, 4) + x.shape[1:]), scale, bias, 1e-5, jnp.dtype(dtype))
        assert y.dtype == dtype and m.dtype == v.dtype == jnp.float32
        out = jnp.sum(y.reshape(x.shape).astype(jnp.float32) * w)
        return out + (jnp.sum(m * wm) + jnp.sum(v * wv) if stats else 0.0)

    tol = 1e-4 if dtype == jnp.float32 else 2e-2  # relative to the largest |value|: one bf16 ulp
    for stats in (False, True):
        got = jax.jit(jax.value_and_grad(lambda *a, stats=stats: loss(_grouped_bn_train, *a, stats),
                                         (0, 1, 2)))(x, scale, bias)
        ref = jax.jit(jax.value_and_grad(lambda *a, stats=stats: loss(_two_pass_bn, *a, stats),
                                         (0, 1, 2)))(x, scale, bias)
        assert got[1][0].dtype == dtype
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())

    # Through the module: gradients w.r.t. scale/bias and the input.
    bn = GroupedBatchNorm(6, group_size=4, dtype=dtype)
    bn.scale[...], bn.bias[...] = scale, bias
    graphdef, params, bstats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def module_loss(params, x):
        y = nnx.merge(graphdef, params, bstats, copy=True)(x, train=True)
        return jnp.sum(y.astype(jnp.float32) * w)

    g_params, g_x = jax.jit(jax.grad(module_loss, (0, 1)))(params, x)
    g_ref = jax.grad(lambda *a: loss(_two_pass_bn, *a, False), (0, 1, 2))(x, scale, bias)
    for a, b in [(g_x, g_ref[0]), (g_params["scale"][...], g_ref[1]), (g_params["bias"][...], g_ref[2])]:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())


def test_batch_not_multiple_of_group_raises(tiny):
    bn = GroupedBatchNorm(3, group_size=4)
    with pytest.raises(ValueError, match=r"B=6.*g=4.*batch size or bn_group_size"):
        bn(jnp.ones((6, 2, 2, 3)), train=True)
    model = tiny
    with pytest.raises(ValueError, match=r"B=10.*g=4"):
        jax.eval_shape(
            lambda s, x: _forward_impl(nnx.graphdef(model), s, x, True),
            nnx.state(model),
            jnp.ones((10, 8, 8, 3)),
        )
    bn(jnp.ones((6, 2, 2, 3)), train=False)  # inference has no group constraint


def test_groups_are_independent_through_whole_encoder(tiny):
    model = tiny
    x = jax.random.normal(jax.random.key(1), (12, 8, 8, 3))
    x2 = x.at[4:8].set(jax.random.normal(jax.random.key(2), (4, 8, 8, 3)) * 3 + 1)
    f1, p1, _ = forward(model, x)
    f2, p2, _ = forward(model, x2)
    for a, b in ((f1, f2), (p1, p2)):
        np.testing.assert_array_equal(a[:4], b[:4])  # group 1 unaffected
        np.testing.assert_array_equal(a[8:], b[8:])  # group 3 unaffected
        assert np.abs(np.asarray(a[4:8] - b[4:8])).max() > 1e-3
    # Sanity: with one whole-batch group the same change does leak into group 1.
    whole = tiny_encoder(bn_group_size=None)
    f1, _, _ = forward(whole, x)
    f2, _, _ = forward(whole, x2)
    assert np.abs(np.asarray(f1[:4] - f2[:4])).max() > 1e-3


# ----------------------------------------------------------------------------- torchvision layout
def test_stem_spatial_sizes_and_max_pool_pads_with_neg_inf(r18_big_stem):
    model = r18_big_stem
    y = jax.eval_shape(model.conv1, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert y.shape[1:3] == (112, 112)
    assert max_pool_3x3_s2(jnp.zeros((1, 112, 112, 1))).shape[1:3] == (56, 56)
    # Numerical max-pool check on all-negative input: zero padding would give 0 at the border.
    x = -np.random.default_rng(0).uniform(1, 2, size=(2, 9, 10, 3))
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ref = np.stack(
        [
            np.stack([xp[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max((1, 2)) for j in range(5)], 1)
            for i in range(5)
        ],
        1,
    )
    np.testing.assert_array_equal(max_pool_3x3_s2(jnp.asarray(x, jnp.float32)), ref.astype(np.float32))


@pytest.mark.parametrize("which", ["stem7x7", "layer2_3x3_s2"])
def test_conv_padding_is_torch_symmetric_not_same(which, r18_big_stem):
    # Even input size: 'SAME' pads (2, 3) for the 7x7/s2 conv and (0, 1) for 3x3/s2; torch pads
    # symmetrically (3, 3) and (1, 1). (For odd sizes such as 33 'SAME' happens to be symmetric.)
    model = r18_big_stem
    conv, k, pad, cin = {
        "stem7x7": (model.conv1, 7, 3, 3),
        "layer2_3x3_s2": (model.layer2[0].conv1, 3, 1, 8),
    }[which]
    assert conv.strides == (2, 2)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, cin)).astype(np.float32)
    w = np.asarray(conv.kernel[...])
    assert w.shape[:2] == (k, k)
    out = np.asarray(conv(jnp.asarray(x)))
    np.testing.assert_allclose(out, np_conv(x, w, 2, pad), rtol=1e-4, atol=1e-4)
    dn = ("NHWC", "HWIO", "NHWC")
    same = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn)
    assert same.shape == out.shape and np.abs(np.asarray(same) - out).max() > 1e-2


def test_parameter_counts_match_torchvision(tiny):
    def count(fn, **kw):
        return n_params(nnx.eval_shape(lambda: fn(rngs=nnx.Rngs(0), **kw)))

    # torchvision totals minus the 1000-class fc.
    assert count(resnet50) == 25_557_032 - 2_049_000
    assert count(resnet34) == 21_797_672 - 513_000
    assert count(resnet18) == 11_689_512 - 513_000
    head = nnx.eval_shape(lambda: ProjectionHead(2048, rngs=nnx.Rngs(0)))
    assert head.fc0.kernel.shape == (2048, 2048) and head.fc2.kernel.shape == (2048, 128)
    assert n_params(head) == 2048 * 2048 + 2048 + 2048 * 128 + 128
    # v1.5: stride on the 3x3 conv of the bottleneck; downsample is a strided 1x1 conv + BN.
    r50 = nnx.eval_shape(lambda: resnet50(rngs=nnx.Rngs(0)))
    blk = r50.layer3[0]
    assert (blk.conv1.strides, blk.conv2.strides, blk.conv3.strides) == ((1, 1), (2, 2), (1, 1))
    assert blk.downsample[0].strides == (2, 2) and blk.downsample[0].kernel.shape == (1, 1, 512, 1024)
    assert r50.layer3[1].downsample is None and r50.num_features == 2048
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(r50))}
    assert {
        "conv1.kernel",
        "bn1.mean",
        "layer4.2.bn3.var",
        "layer1.0.downsample.1.scale",
        "layer1.0.downsample.0.kernel",
    } <= paths
    # torchvision init: BN weight 1, bias 0, running stats (0, 1); conv kaiming normal fan_out.
    r18 = tiny.backbone
    bn = r18.layer3[1].bn2
    assert np.all(bn.scale[...] == 1) and np.all(bn.bias[...] == 0)
    assert np.all(bn.mean[...] == 0) and np.all(bn.var[...] == 1)
    w = np.asarray(r18.layer4[1].conv1.kernel[...])  # 3x3x64x64, fan_out = 9 * 64
    np.testing.assert_allclose(w.std(), np.sqrt(2 / (9 * 64)), rtol=0.03)
    assert np.abs(w).max() > 3 * np.sqrt(2 / (9 * 64))  # untruncated normal


# ----------------------------------------------------------------------------- sharding & dtypes
@pytest.mark.parametrize("axis_type,g", [("Explicit", 4), ("Auto", 8)])
def test_sharded_forward_equals_single_device(axis_type, g, tiny):
    # 16x16 input: at 8x8, layer4 is 1x1 and normalizing 4 values per group amplifies float32
    # rounding differences (XLA orders reductions differently per shape) to ~5e-5.
    model = tiny if g == 4 else tiny_encoder(bn_group_size=g)
    x = np.asarray(jax.random.normal(jax.random.key(3), (32, 16, 16, 3)))
    graphdef, state = nnx.split(model)
    single = _forward(graphdef, state, x, True)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    rep = jax.device_put(state, NamedSharding(mesh, P()))
    sharded = _forward(graphdef, rep, xs, True)
    assert len(sharded[0].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    # BN stats really moved (so the comparison above is not vacuous).
    assert not np.allclose(single[2]["backbone"]["layer4"][1]["bn2"]["mean"][...], 0)
    if axis_type == "Explicit":  # groups spanning devices: clear error at trace time
        g8 = tiny_encoder(bn_group_size=8)
        with pytest.raises(ValueError, match=r"B=32.*8 devices.*g=8"):
            jax.eval_shape(lambda s, x: _forward_impl(nnx.graphdef(g8), s, x, True), nnx.state(g8), xs)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny):
    model = tiny_encoder(dtype=jnp.bfloat16)
    ref = tiny  # same seed: same parameters
    x = jax.random.normal(jax.random.key(1), (12, 8, 8, 3))  # as above: reuses a compilation
    f, p, stats = forward(model, x)
    f32, p32, _ = forward(ref, x)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(stats))
    assert f.dtype == jnp.float32 and p.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(p), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(p32), axis=-1), 1.0, atol=1e-5)
    assert np.abs(np.asarray(p - p32)).max() < 0.1  # same model, lower precision
    # The convolutions really run in bfloat16.
    jaxpr = jax.make_jaxpr(lambda s, x: _forward_impl(nnx.graphdef(model), s, x, True))(nnx.state(model), x)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 20  # 1 stem + 16 block convs + 3 downsample convs
    assert all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)


def test_train_mode_gradients_flow_through_max_pool_and_bn(r18_big_stem):
    # The train-step pattern: split into params / BN stats, differentiate w.r.t. params only and
    # return the updated stats as aux (merge with copy=True: stats come from the outer trace).
    graphdef, params, stats = nnx.split(r18_big_stem, nnx.Param, nnx.BatchStat)

    def loss(params, stats, x):
        model = nnx.merge(graphdef, params, stats, copy=True)
        feats = model(x, train=True)
        return jnp.sum(feats[:, :3] ** 2), nnx.state(model, nnx.BatchStat)

    x = jax.random.normal(jax.random.key(5), (4, 32, 32, 3))
    (val, new_stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, stats, x)
    g_stem = np.asarray(grads["conv1"]["kernel"][...])
    assert np.isfinite(val) and np.all(np.isfinite(g_stem)) and np.abs(g_stem).max() > 0
    assert not np.allclose(new_stats["bn1"]["mean"][...], stats["bn1"]["mean"][...])
    # BN scale/bias get gradients; the running stats are not parameters.
    assert np.abs(np.asarray(grads["layer1"][0]["bn1"]["scale"][...])).max() > 0
    assert not any(
        isinstance(v, nnx.BatchStat)
        for v in jax.tree.leaves(grads, is_leaf=lambda v: isinstance(v, nnx.Variable))
    )
