"""MoCo v2 augmentation: statistics of each random op, exact values against hand/NumPy/SciPy
references, and per-example determinism (docs/method.md §6).

Compiles are the cost here, so each jitted configuration is built once (module fixtures)
and serves several checks.
"""

import colorsys
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from hcsc_jax.data import augmentations as A
from hcsc_jax.data.resize import bilinear_weights

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
OFF = {"jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0, "flip": False,
       "mean": ZERO, "std": ONE}


@functools.cache
def _jitted(cfg):
    return jax.jit(lambda key, images, indices: A.augment(key, images, cfg, indices))


def run(cfg, images, seed=0, key=None, indices=None):
    key = jax.random.key(seed) if key is None else key
    if indices is None:
        indices = np.arange(len(images))
    return np.asarray(_jitted(cfg)(key, jnp.asarray(images), jnp.asarray(indices, jnp.uint32)))


# ----------------------------------------------------------------------------- crop / flip / gray

H = 64          # ramp image: R = 4 * row, G = 4 * col, B = 255 - 2 * col (never R == G == B)
S = 16          # crop size
N_GEOM = 1500


@pytest.fixture(scope="module")
def geometry():
    """Recover each example's crop box and flip from a linear-ramp image (jitter/blur off)."""
    rows, cols = np.meshgrid(np.arange(H), np.arange(H), indexing="ij")
    image = np.stack([4 * rows, 4 * cols, 255 - 2 * cols], -1).astype(np.uint8)
    cfg = A.AugmentConfig(crop_size=S, **{**OFF, "flip": True, "grayscale_prob": 0.2})
    out = run(cfg, np.broadcast_to(image, (N_GEOM, H, H, 3))) * 255.0
    gray = (np.abs(out[..., 0] - out[..., 1]).max((1, 2))
            + np.abs(out[..., 1] - out[..., 2]).max((1, 2))) < 1e-3
    # Bilinear resampling reproduces a linear function away from the crop border: the output
    # row o samples the input at top + (o + 0.5) * h / S - 0.5. Fit that line on interior rows.
    o = np.arange(4, S - 4)
    x = (o + 0.5) / S
    design = np.stack([x, np.ones_like(x)], 1)
    fit = lambda v: np.linalg.lstsq(design, v.T, rcond=None)[0]  # (slope, intercept) per example
    row_prof = out[:, 4:S - 4, :, 0].mean(2) / 4  # R / 4 = input row
    col_prof = out[:, :, 4:S - 4, 1].mean(1) / 4  # G / 4 = input column (maybe mirrored)
    h, top = fit(row_prof)
    slope_w, icpt_w = fit(col_prof)
    flipped = slope_w < 0
    w = np.abs(slope_w)
    # A mirrored view samples column left + w - (o + 0.5) * w / S - 0.5 at output column o.
    left = np.where(flipped, icpt_w + 0.5 - w, icpt_w + 0.5)
    return {"gray": gray, "h": h, "w": w, "top": top + 0.5, "left": left, "flipped": flipped}


def test_grayscale_rate(geometry):
    rate = geometry["gray"].mean()
    assert abs(rate - 0.2) < 0.04, rate


def test_flip_rate(geometry):
    rate = geometry["flipped"][~geometry["gray"]].mean()
    assert abs(rate - 0.5) < 0.05, rate


def test_recovered_crop_boxes_obey_scale_and_ratio(geometry):
    keep = ~geometry["gray"]
    h, w = geometry["h"][keep], geometry["w"][keep]
    top, left = geometry["top"][keep], geometry["left"][keep]
    # Boxes are whole pixels: the fit recovers them to a fraction of a pixel.
    assert np.abs(h - np.round(h)).max() < 0.2 and np.abs(w - np.round(w)).max() < 0.2
    assert np.abs(top - np.round(top)).max() < 0.2 and np.abs(left - np.round(left)).max() < 0.2
    h, w, top, left = (np.round(v) for v in (h, w, top, left))
    area = h * w / (H * H)
    assert area.min() >= 0.2 - 0.02 and area.max() <= 1.0
    assert area.min() < 0.25 and area.max() > 0.9  # the whole range is used
    log_r = np.log(w / h)
    assert log_r.min() >= math.log(3 / 4) - 0.05 and log_r.max() <= math.log(4 / 3) + 0.05
    assert top.min() >= 0 and left.min() >= 0
    assert (top + h).max() <= H and (left + w).max() <= H
    # Placement is uniform over the free range.
    free_t, free_l = H - h, H - w
    ok = (free_t > 4) & (free_l > 4)
    assert abs((top[ok] / free_t[ok]).mean() - 0.5) < 0.05
    assert abs((left[ok] / free_l[ok]).mean() - 0.5) < 0.05
    # Same distribution as the box sampler itself.
    boxes = _sample_boxes(4000, H, H)
    area_ref = boxes[2] * boxes[3] / (H * H)
    assert abs(area.mean() - area_ref.mean()) < 0.03


@pytest.mark.parametrize("in_size,out_size,start,length", [
    (40, 16, 5, 30), (40, 16, 0, 40), (40, 16, 31, 9), (20, 7, 3, 14)])
def test_box_resampling_is_crop_then_resize(in_size, out_size, start, length):
    # The random crop's weights (traced start/length) equal resizing the cropped interval on
    # its own: nothing outside [start, start + length) leaks in, even with the antialias filter.
    got = np.asarray(jax.jit(lambda s, l: bilinear_weights(in_size, out_size, s, l, xp=jnp))(
        start, length))
    want = np.zeros((out_size, in_size), np.float32)
    want[:, start:start + length] = bilinear_weights(length, out_size)
    np.testing.assert_allclose(got, want, atol=1e-6)


@functools.cache
def _sample_boxes(n, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    keys = jax.random.split(jax.random.key(7), n)
    f = jax.jit(jax.vmap(lambda k: A.sample_crop_box(k, height, width, scale, ratio)))
    return tuple(np.asarray(v) for v in f(keys))


def _torchvision_get_params(rng, height, width, scale, ratio):
    """Reference: torchvision RandomResizedCrop.get_params with NumPy randomness."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ar))
        h = round(math.sqrt(target / ar))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("shape,scale,ratio", [
    ((48, 48), (0.2, 1.0), (3 / 4, 4 / 3)),
    ((30, 60), (0.08, 1.0), (3 / 4, 4 / 3)),   # wide image: many rejections
    ((40, 40), (0.9, 1.0), (2.0, 3.0)),        # almost always the fallback
])
def test_box_sampler_matches_torchvision_distribution(shape, scale, ratio):
    height, width = shape
    top, left, h, w = _sample_boxes(4000, height, width, scale, ratio)
    rng = np.random.default_rng(0)
    ref = np.array([_torchvision_get_params(rng, height, width, scale, ratio) for _ in range(4000)])
    assert (h >= 1).all() and (w >= 1).all() and (h <= height).all() and (w <= width).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    for got, want in [(h * w / (height * width), ref[:, 2] * ref[:, 3] / (height * width)),
                      (np.log(w / h), np.log(ref[:, 3] / ref[:, 2]))]:
        assert abs(got.mean() - want.mean()) < 0.02
        assert abs(got.std() - want.std()) < 0.02
    if ratio == (2.0, 3.0):
        # No candidate fits a square image (w >= sqrt(0.9 * 2) * 40 > 40): torchvision's
        # fallback, width 40, height round(40 / 2), centered.
        assert (h == 20).all() and (w == 40).all() and (top == 10).all() and (left == 0).all()


# ----------------------------------------------------------------------------- color jitter

def _np_gray(x):
    return x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114


def _np_hue(x, shift):
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        h, s, v = colorsys.rgb_to_hsv(*x[idx])
        out[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return out


def _np_jitter(x, order, factors):
    """torchvision ColorJitter on float images, ops in the given order."""
    color = x.shape[-1] == 3
    for op in order:
        f = factors[op]
        if op == 0:
            x = np.clip(f * x, 0, 1)
        elif op == 1:
            m = _np_gray(x).mean() if color else x.mean()
            x = np.clip(f * x + (1 - f) * m, 0, 1)
        elif op == 2 and color:
            x = np.clip(f * x + (1 - f) * _np_gray(x), 0, 1)
        elif op == 3 and color:
            x = _np_hue(x, f)
    return x


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_matches_reference_in_drawn_order(channels):
    cfg = A.AugmentConfig(crop_size=4, brightness=0.6, contrast=0.6, saturation=0.6, hue=0.3)
    n = 300
    keys = jax.random.split(jax.random.key(3), n)
    image = np.random.default_rng(5).uniform(0, 1, (4, 4, channels)).astype(np.float32)
    params = jax.jit(jax.vmap(lambda k: A.jitter_params(k, cfg)))(keys)
    outs = jax.jit(jax.vmap(lambda k: A.color_jitter(k, jnp.asarray(image), cfg)))(keys)
    order, factors = (np.asarray(p) for p in params)
    outs = np.asarray(outs)
    assert len({tuple(o) for o in order}) == 24  # every order occurs
    assert (np.sort(order, 1) == np.arange(4)).all()
    lo = np.array([0.4, 0.4, 0.4, -0.3])
    hi = np.array([1.6, 1.6, 1.6, 0.3])
    assert (factors >= lo).all() and (factors <= hi).all()
    assert (factors.min(0) < lo + 0.05).all() and (factors.max(0) > hi - 0.05).all()
    for b in range(0, n, 5):
        want = _np_jitter(image.astype(np.float64), order[b], factors[b])
        np.testing.assert_allclose(outs[b], want, atol=2e-5, err_msg=f"order {order[b]}")
    # The order matters (clipping, hue): the outputs are not those of one fixed order.
    fixed = [_np_jitter(image.astype(np.float64), [0, 1, 2, 3], factors[b]) for b in range(40)]
    assert max(np.abs(outs[b] - fixed[b]).max() for b in range(40)) > 0.05


def test_hsv_round_trip_matches_colorsys():
    x = np.random.default_rng(6).uniform(0, 1, (50, 3)).astype(np.float32)
    x[:5] = x[:5, :1]  # gray pixels: s = 0, h = 0
    hsv = np.asarray(A.rgb_to_hsv(jnp.asarray(x)))
    want = np.array([colorsys.rgb_to_hsv(*p) for p in x.astype(np.float64)])
    np.testing.assert_allclose(hsv, want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(A.hsv_to_rgb(jnp.asarray(hsv))), x, atol=1e-6)


def test_brightness_factor_and_jitter_probability():
    # Constant image and brightness only: output / input = the factor, or 1 when not applied.
    cfg = A.AugmentConfig(crop_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), contrast=0.0,
                          saturation=0.0, hue=0.0, **{**OFF, "jitter_prob": 0.8})
    value = 100
    out = run(cfg, np.full((2000, 8, 8, 3), value, np.uint8), seed=11)
    assert np.ptp(out, axis=(1, 2, 3)).max() < 1e-5  # still constant
    factor = out[:, 0, 0, 0] * 255 / value
    applied = np.abs(factor - 1) > 1e-6
    assert abs(applied.mean() - 0.8) < 0.03
    f = factor[applied]
    assert f.min() >= 0.6 - 1e-5 and f.max() <= 1.4 + 1e-5
    assert f.min() < 0.62 and f.max() > 1.38 and abs(f.mean() - 1.0) < 0.02  # ~U[0.6, 1.4]


# ----------------------------------------------------------------------------- blur

def test_blur_kernel_size():
    assert A.blur_kernel_size(224) == 23
    assert A.blur_kernel_size(32) == 3
    assert A.blur_kernel_size(96) % 2 == 1


@pytest.mark.parametrize("sigma,ksize", [(0.7, 3), (2.0, 23), (1.3, 9)])
def test_gaussian_blur_matches_scipy_reflect(sigma, ksize):
    x = np.random.default_rng(8).uniform(0, 1, (30, 26, 3)).astype(np.float32)
    got = np.asarray(A.gaussian_blur(jnp.asarray(x), sigma, ksize))
    pos = np.arange(ksize) - (ksize - 1) / 2
    k = np.exp(-0.5 * (pos / sigma) ** 2)
    k /= k.sum()
    # torch 'reflect' padding (edge not repeated) is scipy's 'mirror'.
    want = ndimage.correlate1d(ndimage.correlate1d(x.astype(np.float64), k, 0, mode="mirror"),
                               k, 1, mode="mirror")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_blur_probability_and_sigma_range():
    cfg = A.AugmentConfig(crop_size=12, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          **{**OFF, "blur_prob": 0.5, "blur_sigma": (0.5, 1.5)})
    image = np.random.default_rng(9).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    out = run(cfg, np.broadcast_to(image, (600, 12, 12, 3)), seed=12)
    x = image / 255.0
    plain = np.abs(out - x).max((1, 2, 3)) < 1e-5
    assert abs(plain.mean() - 0.5) < 0.06
    # Every blurred view is the reference blur for some sigma in [0.5, 1.5].
    sigmas = np.linspace(0.5, 1.5, 401)
    blurred = out[~plain]
    err = np.empty((len(blurred), len(sigmas)))
    for j, s in enumerate(sigmas):
        k = np.exp(-0.5 * ((np.arange(3) - 1.0) / s) ** 2)
        k /= k.sum()
        ref = ndimage.correlate1d(ndimage.correlate1d(x, k, 0, mode="mirror"), k, 1, mode="mirror")
        err[:, j] = np.abs(blurred - ref).max((1, 2, 3))
    assert err.min(1).max() < 3e-3
    best = sigmas[err.argmin(1)]
    assert best.min() < 0.6 and best.max() > 1.4


# ----------------------------------------------------------------------------- whole pipeline

def test_identity_config_is_normalization_only():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = A.AugmentConfig(crop_size=10, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          **{**OFF, "mean": mean, "std": std})
    images = np.random.default_rng(10).integers(0, 256, (4, 10, 10, 3), dtype=np.uint8)
    out = run(cfg, images)
    assert out.dtype == np.float32 and out.shape == (4, 10, 10, 3)
    np.testing.assert_allclose(out, (images / 255.0 - np.array(mean)) / np.array(std), atol=1e-5)
    gray_cfg = dataclasses.replace(cfg, mean=(0.5,), std=(0.25,))
    gray = images[..., :1]
    np.testing.assert_allclose(run(gray_cfg, gray), (gray / 255.0 - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(ValueError, match="1-tuples"):
        A.augment(jax.random.key(0), gray, cfg)


FULL = A.AugmentConfig(crop_size=16)


@pytest.fixture(scope="module")
def batch16():
    return np.random.default_rng(11).integers(0, 256, (16, 24, 20, 3), dtype=np.uint8)


def test_per_example_determinism_and_independence(batch16):
    key = jax.random.key(42)
    full = run(FULL, batch16, key=key)
    assert full.dtype == np.float32 and full.shape == (16, 16, 16, 3)
    np.testing.assert_array_equal(run(FULL, batch16, key=key), full)  # same key: same views
    # Example i depends on (key, i) only: not on the batch size ...
    np.testing.assert_allclose(run(FULL, batch16[:8], key=key), full[:8], atol=1e-5)
    # ... nor on the other examples' pixels ...
    other = batch16.copy()
    other[8:] = 255 - other[8:]
    np.testing.assert_allclose(run(FULL, other, key=key)[:8], full[:8], atol=1e-5)
    # ... and a shard given its global indices reproduces its part of the batch.
    shard = run(FULL, batch16[8:], key=key, indices=np.arange(8, 16))
    np.testing.assert_allclose(shard, full[8:], atol=1e-5)
    # Another key, and another example with the same image, give other views.
    assert np.abs(run(FULL, batch16, key=jax.random.key(43)) - full).max() > 0.5
    same = run(FULL, np.broadcast_to(batch16[:1], (8, 24, 20, 3)), key=key)
    assert min(np.abs(same[0] - same[i]).max() for i in range(1, 8)) > 0.1


def test_sharded_batch_gives_identical_bits(batch16):
    # One device or eight (2 examples each) must give the same views to the last bit (docs/method.md §6:
    # results independent of the device count); jnp.mean in contrast did not.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = jax.device_put(batch16, NamedSharding(mesh, PartitionSpec("data")))
    key = jax.random.key(42)
    eight = np.asarray(_jitted(FULL)(key, sharded, jnp.arange(16, dtype=jnp.uint32)))
    np.testing.assert_array_equal(eight, run(FULL, batch16, key=key))


def test_full_pipeline_statistics(batch16):
    imgs = np.broadcast_to(batch16[:1], (16, 24, 20, 3))
    out = np.concatenate([run(FULL, imgs, seed=s) for s in range(40)])
    x = out * np.array(A.IMAGENET_STD) + np.array(A.IMAGENET_MEAN)  # back to [0, 1]
    assert x.min() >= -1e-5 and x.max() <= 1 + 1e-5
    gray = np.abs(x[..., 0] - x[..., 1]).max((1, 2)) < 1e-5
    assert abs(gray.mean() - 0.2) < 0.05


# ----------------------------------------------------------------------------- center crop

def _w_down2(n_in):
    """Hand-derived 2x antialiased downscale weights (n_in -> n_in / 2)."""
    n_out = n_in // 2
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
        taps = {2 * o - 1: 1, 2 * o: 3, 2 * o + 1: 3, 2 * o + 2: 1}
        taps = {k: v for k, v in taps.items() if 0 <= k < n_in}
        total = sum(taps.values())
        for k, v in taps.items():
            w[o, k] = v / total
    return w


def test_center_crop_hand_computed():
    rng = np.random.default_rng(12)
    img = rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    # crop 7 -> resize shorter side to round(7 * 256 / 224) = 8: 16x24 -> 8x12 (2x down),
    # then center crop: top = round(0.5) = 0, left = round(2.5) = 2 (Python/torchvision rounding).
    wy = _w_down2(16)[0:7]
    wx = _w_down2(24)[2:9]
    want = np.einsum("oh,bhwc,pw->bopc", wy, img / 255.0, wx)
    want = (want - np.array(mean)) / np.array(std)
    got = np.asarray(A.center_crop(img, 7, mean, std))
    assert got.dtype == np.float32 and got.shape == (2, 7, 7, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Upscaling (4x4 -> 8x8, crop 7 at offset 0): bilinear, half-pixel centers, clamped edges.
    small = img[:1, :4, :4, :1]
    up = np.zeros((8, 4))
    for o in range(8):
        s = min(max((o + 0.5) / 2 - 0.5, 0), 3)
        k = int(np.floor(s))
        up[o, k] += 1 - (s - k)
        if s > k:
            up[o, k + 1] += s - k
    want = np.einsum("oh,bhwc,pw->bopc", up[:7], small / 255.0, up[:7])
    np.testing.assert_allclose(np.asarray(A.center_crop(small, 7, (0.0,), (1.0,))), want, atol=1e-5)


def test_precropped_views_get_the_same_flip_and_photometric_ops():
    """random_crop=False (views cropped on the host) applies exactly the flip and photometric
    ops of the full pipeline: equal to random_crop=True where the crop is the whole image."""
    images = np.random.default_rng(12).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    whole = A.AugmentConfig(crop_size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    pre = dataclasses.replace(whole, random_crop=False)
    key = jax.random.key(5)
    out = run(pre, images, key=key)
    np.testing.assert_allclose(out, run(whole, images, key=key), atol=1e-5)
    # Flips happened (about half the examples) and photometric ops changed the pixels.
    plain = (images / 255.0 - np.array(A.IMAGENET_MEAN)) / np.array(A.IMAGENET_STD)
    assert not np.allclose(out, plain, atol=1e-3)
    with pytest.raises(ValueError, match="already cropped to 16x16"):
        A.augment(key, images[:, :12], pre)


@pytest.mark.parametrize("cropped", [False, True])
def test_a_view_in_a_given_order_is_the_view_permuted_to_the_last_bit(cropped):
    """ShuffleBN's key view (`augment_input(..., orders)`): the uint8 images gathered in the
    permutation's order, then augmented with each example's own randomness, is the augmented view
    permuted afterwards, bit for bit, also with the batch sharded over 8 devices (where the gather
    of uint8 images is what crosses devices)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from hcsc_jax.data.batch import Images

    rng = np.random.default_rng(3)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    cfg = A.AugmentConfig(crop_size=12)
    if cropped:
        cfg = dataclasses.replace(cfg, random_crop=False)
        views = tuple(shard(rng.integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)) for _ in range(2))
    else:
        views = (shard(rng.integers(0, 256, (16, 20, 18, 3), dtype=np.uint8)),)
    images = Images(views, cropped=cropped)
    keys, perm = [jax.random.key(1), jax.random.key(2)], jax.random.permutation(jax.random.key(3), 16)
    fn = jax.jit(lambda keys, images, perm: A.augment_input(keys, images, (cfg, cfg), orders=(None, perm)))
    plain = jax.jit(lambda keys, images: A.augment_input(keys, images, (cfg, cfg)))
    q, k = fn(keys, images, perm)
    q0, k0 = plain(keys, images)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q0))
    np.testing.assert_array_equal(np.asarray(k), np.asarray(k0)[np.asarray(perm)])
    assert not np.array_equal(np.asarray(k), np.asarray(k0))
