"""Host input: lazy sources, host crops, the loader's per-process batches (worker processes,
resumption, bad images, dead workers), the streamed input's device transfer."""

import os
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from hcsc_jax import sharding
from hcsc_jax.data import augmentations, crops, loader, pipeline
from hcsc_jax.data.batch import Images
from hcsc_jax.data.crops import CropSpec
from hcsc_jax.data.decode import DecodeError
from hcsc_jax.data.resize import resize_uint8
from hcsc_jax.data.sources import ArrayDataset, ArraySource, load_dataset, open_source

CROPS = (CropSpec(12, (0.2, 1.0)), CropSpec(12, (0.2, 1.0)), CropSpec(6, (0.1, 0.5)))


class ListSource:
    """Test source over a list of (H, W, C) uint8 images of varied sizes; `bad` indices raise
    DecodeError, `fatal` indices kill the process that loads them."""

    def __init__(self, images, name="list", bad=(), fatal=()):
        self.images, self.name, self.bad, self.fatal = images, name, set(bad), set(fatal)
        self.num_examples, self.channels = len(images), images[0].shape[-1]
        self.labels, self.num_classes, self.class_names = None, None, None

    def where(self, i):
        return f"image_{i}.jpg"

    def load(self, i):
        if i in self.fatal:
            os._exit(3)
        if i in self.bad:
            raise DecodeError(f"cannot decode image image_{i}.jpg: truncated")
        return self.images[i]


def _varied(n, channels=3, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return ListSource([rng.integers(0, 256, (rng.integers(14, 40), rng.integers(14, 40), channels),
                                    dtype=np.uint8) for _ in range(n)], **kw)


def _train(src, batch, seed, epoch, step=0, n_steps=None, views=3, **kw):
    """n_steps batches of loader.train_batches as [(indices, views tuple, skipped)]."""
    spe = src.num_examples // batch
    it = loader.train_batches(src, CROPS[:views], batch, seed, spe, epoch, step, **kw)
    out = []
    for _ in range(spe - step if n_steps is None else n_steps):
        b = next(it)
        views_b = tuple(b[f"view{v}"].copy() for v in range(views))
        out.append((b["index"].copy(), views_b, b["skipped"].copy()))
    it.close()
    return out


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for (ia, va, _), (ib, vb, _) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        for x, y in zip(va, vb, strict=True):
            np.testing.assert_array_equal(x, y)


def _children() -> set[int]:
    """Process ids of this process's live children."""
    import multiprocessing

    return {p.pid for p in multiprocessing.active_children()}


# ----------------------------------------------------------------------------- sources

def _write_folder(root):
    """3 classes of RGB JPEG/PNG files of varied sizes, a gray JPEG and a stray text file."""
    rng = np.random.default_rng(1)
    files = {}
    for cls, names in {"b_cls": ["x.png", "a.jpg"], "a_cls": ["k.jpeg", "c.png", "z.jpg"],
                       "c_cls": ["gray.jpg"]}.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            shape = (int(rng.integers(9, 30)), int(rng.integers(9, 30)))
            array = rng.integers(0, 256, shape + (() if name == "gray.jpg" else (3,)), dtype=np.uint8)
            Image.fromarray(array).save(root / cls / name, quality=90)
            files[(cls, name)] = array
    (root / "a_cls" / "notes.txt").write_text("not an image")
    return files


def test_folder_source_matches_in_memory_loader(tmp_path):
    files = _write_folder(tmp_path)
    src = open_source(f"folder:{tmp_path}", "train")
    order = [("a_cls", "c.png"), ("a_cls", "k.jpeg"), ("a_cls", "z.jpg"), ("b_cls", "a.jpg"),
             ("b_cls", "x.png"), ("c_cls", "gray.jpg")]
    assert src.num_examples == 6 and src.channels == 3 and src.num_classes == 3
    assert src.class_names == ("a_cls", "b_cls", "c_cls")
    np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 1, 2])
    images = [src.load(i) for i in range(6)]
    for img, key in zip(images, order):
        assert img.dtype == np.uint8 and img.shape[:2] == files[key].shape[:2] and img.shape[2] == 3
        if key[1].endswith(".png"):  # lossless
            np.testing.assert_array_equal(img, files[key])
    assert (images[5] == images[5][..., :1]).all()  # the gray JPEG, converted to RGB
    # Same examples, labels and order as the in-memory loader (which needs one size).
    ds = load_dataset(f"folder:{tmp_path}", "train", image_size=(8, 7))
    np.testing.assert_array_equal(ds.labels, src.labels)
    np.testing.assert_array_equal(ds.images, np.stack([resize_uint8(i, (8, 7)) for i in images]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(f"folder:{tmp_path / 'missing'}", "train")


def test_array_source_wraps_in_memory_datasets():
    src = open_source("digits", "test")
    ds = load_dataset("digits", "test")
    assert isinstance(src, ArraySource) and src.num_examples == 360 and src.channels == 1
    np.testing.assert_array_equal(src.labels, ds.labels)
    np.testing.assert_array_equal(src.load(7), ds.images[7])
    with pytest.raises(ValueError, match="unknown dataset"):
        open_source("imagenet_typo", "train")


def test_tfds_source_random_access_without_tensorflow(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        src = open_source("tfds:mnist", "train")
        want = tfds.data_source("mnist", split="train")
        assert src.num_examples == 6 and src.channels == 1 and src.num_classes == 10
        for i in (0, 5, 2):
            np.testing.assert_array_equal(src.load(i), want[i]["image"])
            assert src.load(i).shape == (28, 28, 1)
        # (labels are read without decoding images: tests/test_evaluators.py, on a real ArrayRecord build)
        ((_, (view,), _),) = _train(src, 4, 0, 0, n_steps=1, views=1, num_workers=0)
        assert view.shape == (4, 12, 12, 1)
    assert "tensorflow" not in sys.modules
    with pytest.raises(FileNotFoundError, match=r"not prepared.*tfds build mnist.*data_dir"):
        open_source("tfds:mnist", "train", data_dir=str(tmp_path))
    # If TensorFlow was imported (by TFDS or anyone), it is kept off the GPUs.
    calls = []
    fake_tf = types.SimpleNamespace(config=types.SimpleNamespace(
        set_visible_devices=lambda *args: calls.append(args)))
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    with tfds.testing.mock_data(num_examples=2):
        open_source("tfds:mnist", "train")
    assert calls and all(c == ([], "GPU") for c in calls)


# ----------------------------------------------------------------------------- host crops

def _first_fit(u, height, width, scale, ratio):
    """torchvision's candidates from the uniforms, vectorised: (area, aspect) of the first that
    fits, or None."""
    a = (len(u) - 2) // 2
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:a])
    aspect = np.exp(np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * u[a:2 * a])
    w, h = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    k = int(np.argmax(fits))
    return (area[k], aspect[k]) if fits.any() else None


@pytest.mark.slow
def test_crop_box_statistics_and_device_sampler():
    rng = np.random.default_rng(0)
    ratio = (3 / 4, 4 / 3)
    for height, width, scale in [(60, 80, (0.2, 1.0)), (80, 60, (0.2, 1.0)), (30, 200, (0.2, 1.0)),
                                 (50, 50, (0.2, 0.5))]:
        us = rng.random((100, crops.CROP_UNIFORMS))
        device = np.stack(jax.vmap(augmentations._crop_box, (0, None, None, None, None))(
            us.astype(np.float32), height, width, scale, ratio), 1)
        same, fractions, log_aspects = 0, [], []
        for u, dev in zip(us, device):
            top, left, h, w = box = crops.crop_box(u, height, width, scale, ratio)
            assert 0 <= top <= height - h and 0 <= left <= width - w
            same += tuple(dev) == box
            fit = _first_fit(u, height, width, scale, ratio)
            if fit is None:  # fallback: the largest centered box, aspect clamped to 4/3
                assert (height, width) == (30, 200) and box == (0, 80, 30, 40)
                continue
            tol = 2 / min(h, w)  # w and h are rounded
            assert abs(h * w / fit[0] - 1) <= tol and abs(w / h / fit[1] - 1) <= tol
            assert scale[0] * (1 - tol) <= h * w / (height * width) <= scale[1] * (1 + tol)
            assert ratio[0] * (1 - tol) <= w / h <= ratio[1] * (1 + tol)
            fractions.append(h * w / (height * width))
            log_aspects.append(np.log(w / h))
        assert same >= 98  # float32 on the device may round a .5 the other way
        if height == width:  # every first candidate fits: area ~ U(scale), log aspect ~ U(log ratio)
            assert len(fractions) == 100
            assert abs(np.mean(fractions) - 0.35) < 0.03 and abs(np.mean(log_aspects)) < 0.04
            assert min(fractions) < 0.22 and max(fractions) > 0.48
    # Fallback cases: largest centered box with the aspect ratio clamped to `ratio`.
    u = rng.random(crops.CROP_UNIFORMS)
    assert crops.crop_box(u, 10, 100, (0.9, 1.0), ratio) == (0, 43, 10, 13)
    assert crops.crop_box(u, 100, 10, (0.9, 1.0), ratio) == (43, 0, 13, 10)
    assert crops.crop_box(u, 10, 12, (1.5, 1.5), ratio) == (0, 0, 10, 12)  # in ratio: whole image


@pytest.mark.parametrize("channels", [3, 1])
def test_antialias_crops_are_pillow_crop_then_resize(channels):
    image = np.random.default_rng(2).integers(0, 256, (37, 53, channels), dtype=np.uint8)
    views = crops.random_resized_crops(image, CROPS, seed=5, epoch=3, index=11, resampling="antialias")
    pil = Image.fromarray(image if channels == 3 else image[..., 0])
    for v, (view, crop) in enumerate(zip(views, CROPS, strict=True)):
        u = np.random.default_rng([5, 3, 11, v, 1]).random(crops.CROP_UNIFORMS)
        top, left, h, w = crops.crop_box(u, 37, 53, crop.scale, crop.ratio)
        want = np.asarray(pil.crop((left, top, left + w, top + h)).resize((crop.size,) * 2,
                                                                             Image.BILINEAR))
        assert view.shape == (crop.size, crop.size, channels) and view.dtype == np.uint8
        np.testing.assert_array_equal(view, want.reshape(view.shape))
        # Pillow's filter = the float antialiased bilinear weights, up to 8-bit rounding.
        exact = resize_uint8(image[top:top + h, left:left + w], (crop.size, crop.size))
        assert np.abs(view.astype(int) - exact).max() <= 1
    assert not np.array_equal(views[0], views[1])  # the two 12 px views are independent draws



def _bilinear_reference(image, size):
    """Plain bilinear resampling of (h, w, C) to (size, size, C), half-pixel centers, edge clamp,
    no antialias filter: what OpenCV's INTER_LINEAR computes (in 11-bit fixed point)."""
    def axis(n):
        x = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        lo = np.floor(x).astype(int)
        return lo, np.minimum(lo + 1, n - 1), x - lo

    y0, y1, fy = axis(image.shape[0])
    x0, x1, fx = axis(image.shape[1])
    img = image.astype(np.float64)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


@pytest.mark.parametrize("channels", [3, 1])
def test_linear_crops_are_plain_bilinear_of_the_same_box(channels):
    image = np.random.default_rng(3).integers(0, 256, (37, 53, channels), dtype=np.uint8)
    views = crops.random_resized_crops(image, CROPS, seed=5, epoch=3, index=11)  # "linear" is the default
    smooth = resize_uint8(image, (74, 106))  # an image without much energy at the top frequencies
    for v, (view, crop) in enumerate(zip(views, CROPS, strict=True)):
        u = np.random.default_rng([5, 3, 11, v, 1]).random(crops.CROP_UNIFORMS)
        top, left, h, w = crops.crop_box(u, 37, 53, crop.scale, crop.ratio)
        assert view.shape == (crop.size, crop.size, channels) and view.dtype == np.uint8
        want = _bilinear_reference(image[top:top + h, left:left + w], crop.size)
        assert np.abs(view.astype(float) - want).max() <= 1.0
    # Upscaling: no filter widening, so both resamplings agree up to rounding.
    box = (3, 5, 20, 30)
    up = [crops.resized_crop(smooth, box, 48, r) for r in crops.RESAMPLING]
    assert np.abs(up[0].astype(int) - up[1]).max() <= 1
    with pytest.raises(ValueError, match="resampling must be one of linear, antialias"):
        crops.resized_crop(smooth, box, 8, "cubic")


def test_center_crop_image_is_resize_then_crop():
    rng = np.random.default_rng(6)
    for h, w, c in [(37, 53, 3), (60, 20, 1), (224, 300, 3)]:
        image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        crop = 16 if h < 100 else 200
        new_h, new_w, top, left = crops.center_crop_geometry(h, w, crop)
        pil = Image.fromarray(image[..., 0] if c == 1 else image)
        resized = pil.resize((new_w, new_h), Image.BILINEAR)
        want = np.asarray(resized.crop((left, top, left + crop, top + crop)))
        got = crops.center_crop_image(image, crop)
        assert got.shape == (crop, crop, c)
        assert np.abs(got.astype(int) - want.reshape(got.shape)).max() <= 1


# ----------------------------------------------------------------------------- the loader

@pytest.mark.parametrize("count", [1, 2, 4])
def test_process_shards_cover_each_epoch_once(count):
    src = _varied(24)
    whole = _train(src, 8, 7, 2, num_workers=0)
    order = loader.epoch_order(7, 2, 24, 3, 8)
    np.testing.assert_array_equal(order, np.random.default_rng([7, 2]).permutation(24))
    np.testing.assert_array_equal(np.concatenate([i for i, _, _ in whole]), order)
    parts = [_train(src, 8, 7, 2, process_index=p, process_count=count, num_workers=0) for p in range(count)]
    assert all(len(part) == 3 for part in parts)
    for step in range(3):
        local = [part[step] for part in parts]
        assert all(len(idx) == 8 // count and idx.dtype == np.int32 for idx, _, _ in local)
        merged = (np.concatenate([i for i, _, _ in local]),
                  tuple(np.concatenate(v) for v in zip(*[views for _, views, _ in local])), None)
        _assert_batches_equal([merged], [whole[step]])
    seen = np.concatenate([idx for part in parts for idx, _, _ in part])
    np.testing.assert_array_equal(np.sort(seen), np.arange(24))
    # Pixels: each row is its example's views for (seed, epoch, index).
    idx, views, _ = whole[1]
    for r in (0, 5):
        want = crops.random_resized_crops(src.load(idx[r]), CROPS, 7, 2, int(idx[r]))
        for v in range(len(CROPS)):
            np.testing.assert_array_equal(views[v][r], want[v])


@pytest.mark.slow
def test_worker_processes_resume_and_epochs():
    """Worker processes give the bytes of the in-process loader; a loader started at any step
    continues the same sequence; the run goes on into the next epochs; no process outlives it."""
    src = _varied(20, seed=3)
    before = _children()
    full = _train(src, 4, 1, 1, n_steps=10, num_workers=0)  # epochs 1 and 2 (5 steps each)
    _assert_batches_equal(_train(src, 4, 1, 1, n_steps=10, num_workers=2, prefetch=1), full)
    _assert_batches_equal(_train(src, 4, 1, 1, step=3, n_steps=7, num_workers=1), full[3:])
    _assert_batches_equal(_train(src, 4, 1, 2, n_steps=5, num_workers=0), full[5:])
    # Another epoch: another order, and other crops of the same example.
    first, second = full[:5], full[5:]
    order = lambda batches: np.concatenate([i for i, _, _ in batches])
    assert not np.array_equal(order(first), order(second))
    i = int(first[0][0][0])
    row = np.flatnonzero(np.concatenate([idx for idx, _, _ in second]) == i)[0]
    assert not np.array_equal(second[row // 4][1][0][row % 4], first[0][1][0][0])
    assert _children() <= before  # closed loaders leave no worker behind


def test_unreadable_images_are_skipped_by_name_or_stop(caplog):
    src = _varied(8, seed=2, bad={3, 4})
    batches = _train(src, 8, 0, 0, views=1, num_workers=0)
    ((idx, (view,), skipped),) = batches
    order = loader.epoch_order(0, 0, 8, 1, 8)
    for r, i in enumerate(order):
        want = {3: 5, 4: 5}.get(int(i), int(i))  # the next readable example stands in
        assert idx[r] == want and skipped[r] == (i in (3, 4))
        (expected,) = crops.random_resized_crops(src.load(want), CROPS[:1], 0, 0, want)
        np.testing.assert_array_equal(view[r], expected)
    assert "image_3.jpg" in caplog.text and "image_4.jpg" in caplog.text
    with pytest.raises(DecodeError, match=r"^cannot decode image image_[34].jpg: truncated$"):
        _train(src, 8, 0, 0, views=1, num_workers=0, bad_images="error")
    with pytest.raises(DecodeError, match=r"^cannot decode image image_[34].jpg: truncated$"):
        _train(src, 8, 0, 0, views=1, num_workers=1, bad_images="error")  # from a worker process
    with pytest.raises(ValueError, match="bad_images must be one of skip, error"):
        _train(src, 8, 0, 0, views=1, num_workers=0, bad_images="ignore")


def test_a_dead_worker_stops_the_pass_naming_its_file():
    src = _varied(8, seed=2, fatal={int(loader.epoch_order(0, 0, 8, 2, 4)[5])})
    before = _children()
    with pytest.raises(loader.LoaderError, match=r"loader worker died.*image_\d\.jpg"):
        _train(src, 4, 0, 0, views=1, num_workers=2)
    assert _children() <= before


def test_epoch_order_fills_the_last_batch_from_the_start():
    order = loader.epoch_order(0, 0, 10, 3, 4)
    perm = np.random.default_rng([0, 0]).permutation(10)
    np.testing.assert_array_equal(order, np.concatenate([perm, perm[:2]]))
    with pytest.raises(ValueError, match="multiple of process_count"):
        loader.train_batches(_varied(8), CROPS, 6, 0, 1, 0, 0, process_count=4)


@pytest.mark.parametrize("count", [1, 2])
def test_center_crop_batches(count):
    src = _varied(11, seed=4)
    parts = [[(b["index"].copy(), b["view0"].copy()) for b in
              loader.center_crop_batches(src, 14, 4, process_index=p, process_count=count, num_workers=0)]
             for p in range(count)]
    assert all(len(part) == 3 for part in parts)  # ceil(11 / 4) on every process
    b = 4 // count
    for part in parts:
        for idx, images in part:
            assert idx.shape == (b,) and images.shape == (b, 14, 14, 3)
    steps = [[np.concatenate(x) for x in zip(*[part[s] for part in parts])] for s in range(3)]
    idx, images = (np.concatenate(x) for x in zip(*steps))
    np.testing.assert_array_equal(idx, np.r_[np.arange(11), -1])
    assert (images[11] == 0).all()
    # Pixels: the device's center_crop (an independent implementation), un-normalized.
    for i in range(3):  # one compile per image size
        img = src.load(i)
        want = augmentations.center_crop(img[None], 14, mean=(0.0,) * 3, std=(1 / 255,) * 3)[0]
        assert np.abs(images[i].astype(np.float32) - np.asarray(want)).max() <= 1.01
    assert len({np.sign(src.load(i).shape[0] - src.load(i).shape[1]) for i in range(3)}) == 2


# ----------------------------------------------------------------------------- the streamed input

def test_to_global_and_prefetch_to_device():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    src = _varied(32, seed=5)
    host = [(i, v) for i, v, _ in _train(src, 16, 0, 0, views=2, num_workers=0)]
    idx, views = sharding.to_global(mesh, host[0])
    assert idx.shape == (16,) and views[0].shape == (16, 12, 12, 3)
    assert idx.sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(idx), host[0][0])
    for shard in views[1].addressable_shards:  # device d holds rows [2d, 2d + 2)
        rows = shard.index[0]
        assert rows.stop - rows.start == 2
        np.testing.assert_array_equal(np.asarray(shard.data), host[0][1][1][rows])
    # prefetch_to_device: same batches, `size` items taken ahead of the one consumed.
    pulled = []

    def counting():
        for item in host * 2:
            pulled.append(1)
            yield item

    it = pipeline.prefetch_to_device(counting(), 2, mesh)
    first = next(it)
    assert len(pulled) == 3  # the one yielded + 2 in flight
    got = [first, *it]
    assert len(got) == 2 * len(host)
    for (gi, gv), (hi, hv) in zip(got, host * 2):
        np.testing.assert_array_equal(np.asarray(gi), hi)
        np.testing.assert_array_equal(np.asarray(gv[1]), hv[1])


def test_stream_input_steps_are_the_loader_batches_with_their_labels():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    src = _varied(24, seed=7)
    inp = pipeline.StreamInput(src, mesh, 8, 3, CROPS[:2], num_workers=0)
    assign = np.arange(48, dtype=np.int32).reshape(24, 2)
    want = _train(src, 8, 3, 1, views=2, num_workers=0)
    got = list(inp.steps(1, 1, assign))  # resumed at step 1
    assert len(got) == 2
    for (images, labels), (idx, views, _) in zip(got, want[1:]):
        assert isinstance(images, Images) and images.cropped
        for a, b in zip(images.views, views, strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
        np.testing.assert_array_equal(np.asarray(labels), assign[idx])
    assert len(list(inp.steps(2, 0, assign))) == 3  # the next epoch continues the same loader
    inp.close()


def test_array_dataset_source_in_stream():
    images = np.arange(6 * 8 * 8, dtype=np.uint8).reshape(6, 8, 8, 1)
    src = ArraySource(ArrayDataset(images, np.arange(6, dtype=np.int32), 6, "tiny"))
    it = loader.train_batches(src, (CropSpec(8, (1.0, 1.0), (1.0, 1.0)),), 6, 0, 1, 0, 0, num_workers=0)
    b = next(it)
    it.close()
    np.testing.assert_array_equal(b["view0"], images[b["index"]])  # full-image box at full size: identity


def test_bad_crop_specs_say_what_to_change():
    for bad, msg in (((0, (0.2, 1.0)), "crop size must be positive"), ((8, (0.5, 0.2)), "scale must satisfy"),
                     ((8, (0.2, 1.0), (1.5, 1.0)), "ratio must satisfy")):
        with pytest.raises(ValueError, match=msg):
            CropSpec(*bad)
        with pytest.raises(ValueError, match=msg):
            augmentations.AugmentConfig(*bad)
