"""Streaming input: lazy sources, host crops, per-process batches, resumption, device transfer."""

import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from hcsc_jax import sharding
from hcsc_jax.data import augmentations, stream
from hcsc_jax.data.resize import resize_uint8
from hcsc_jax.data.sources import ArrayDataset, ArraySource, load_dataset, open_source
from hcsc_jax.data.stream import CropSpec, TrainStream, center_crop_batches, epoch_permutation

CROPS = (CropSpec(12, (0.2, 1.0)), CropSpec(12, (0.2, 1.0)), CropSpec(6, (0.1, 0.5)))


class ListSource:
    """Test source over a list of (H, W, C) uint8 images of varied sizes."""

    def __init__(self, images, name="list"):
        self.images, self.name = images, name
        self.num_examples, self.channels = len(images), images[0].shape[-1]
        self.labels, self.num_classes, self.class_names = None, None, None

    def load(self, i):
        return self.images[i]


def _varied(n, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return ListSource([rng.integers(0, 256, (rng.integers(14, 40), rng.integers(14, 40), channels),
                                    dtype=np.uint8) for _ in range(n)])


def _collect(iterator):
    return [(idx.copy(), tuple(v.copy() for v in views)) for idx, views in iterator]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for (ia, va), (ib, vb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        for x, y in zip(va, vb, strict=True):
            np.testing.assert_array_equal(x, y)


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
        _, (view,) = next(TrainStream(src, (CropSpec(10, (0.5, 1.0)),), 4, 0,
                                      process_index=0, process_count=1).epoch(0))
        assert view.shape == (4, 10, 10, 1)
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
    assert calls == [([], "GPU")]


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


def test_crop_box_statistics_and_device_sampler():
    rng = np.random.default_rng(0)
    ratio = (3 / 4, 4 / 3)
    for height, width, scale in [(60, 80, (0.2, 1.0)), (80, 60, (0.2, 1.0)), (30, 200, (0.2, 1.0)),
                                 (50, 50, (0.2, 0.5))]:
        us = rng.random((100, augmentations.CROP_UNIFORMS))
        device = np.stack(jax.vmap(augmentations._crop_box, (0, None, None, None, None))(
            us.astype(np.float32), height, width, scale, ratio), 1)
        same, fractions, log_aspects = 0, [], []
        for u, dev in zip(us, device):
            top, left, h, w = box = stream.crop_box(u, height, width, scale, ratio)
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
    u = rng.random(augmentations.CROP_UNIFORMS)
    assert stream.crop_box(u, 10, 100, (0.9, 1.0), ratio) == (0, 43, 10, 13)
    assert stream.crop_box(u, 100, 10, (0.9, 1.0), ratio) == (43, 0, 13, 10)
    assert stream.crop_box(u, 10, 12, (1.5, 1.5), ratio) == (0, 0, 10, 12)  # in ratio: whole image


@pytest.mark.parametrize("channels", [3, 1])
def test_random_resized_crops_are_pillow_crop_then_resize(channels):
    image = np.random.default_rng(2).integers(0, 256, (37, 53, channels), dtype=np.uint8)
    views = stream.random_resized_crops(image, CROPS, seed=5, epoch=3, index=11)
    pil = Image.fromarray(image if channels == 3 else image[..., 0])
    for v, (view, crop) in enumerate(zip(views, CROPS, strict=True)):
        u = np.random.default_rng([5, 3, 11, v, 1]).random(augmentations.CROP_UNIFORMS)
        top, left, h, w = stream.crop_box(u, 37, 53, crop.scale, crop.ratio)
        want = np.asarray(pil.crop((left, top, left + w, top + h)).resize((crop.size,) * 2,
                                                                             Image.BILINEAR))
        assert view.shape == (crop.size, crop.size, channels) and view.dtype == np.uint8
        np.testing.assert_array_equal(view, want.reshape(view.shape))
        # Pillow's filter = the float antialiased bilinear weights, up to 8-bit rounding.
        exact = resize_uint8(image[top:top + h, left:left + w], (crop.size, crop.size))
        assert np.abs(view.astype(int) - exact).max() <= 1
    assert not np.array_equal(views[0], views[1])  # the two 12 px views are independent draws


# ----------------------------------------------------------------------------- train stream

@pytest.mark.parametrize("count", [1, 2, 4])
def test_process_shards_cover_each_epoch_once(count):
    src = _varied(24)
    whole = _collect(TrainStream(src, CROPS, 8, 7, process_index=0, process_count=1).epoch(2))
    order = epoch_permutation(7, 2, 24)
    np.testing.assert_array_equal(np.concatenate([i for i, _ in whole]), order)
    parts = [_collect(TrainStream(src, CROPS, 8, 7, process_index=p, process_count=count,
                                  num_workers=2).epoch(2)) for p in range(count)]
    assert all(len(part) == 3 for part in parts)
    for step in range(3):
        local = [part[step] for part in parts]
        assert all(len(idx) == 8 // count and idx.dtype == np.int32 for idx, _ in local)
        merged = (np.concatenate([i for i, _ in local]),
                  tuple(np.concatenate(v) for v in zip(*[views for _, views in local])))
        _assert_batches_equal([merged], [whole[step]])
    seen = np.concatenate([idx for part in parts for idx, _ in part])
    np.testing.assert_array_equal(np.sort(seen), np.arange(24))
    # Pixels: each row is its example's views for (seed, epoch, index).
    idx, views = whole[1]
    for r in (0, 5):
        want = stream.random_resized_crops(src.load(idx[r]), CROPS, 7, 2, int(idx[r]))
        for v in range(len(CROPS)):
            np.testing.assert_array_equal(views[v][r], want[v])


def test_resume_and_epochs():
    src = _varied(20, seed=3)
    make = lambda **kw: TrainStream(src, CROPS, 4, 1, process_index=0, process_count=1, **kw)
    full = _collect(make(num_workers=2, prefetch=2).epoch(1))
    assert len(full) == make().steps_per_epoch == 5
    # Resumed at step 3, with other threads / prefetch: the same indices and pixels.
    _assert_batches_equal(_collect(make(num_workers=1, prefetch=0).epoch(1, start_step=3)), full[3:])
    assert _collect(make().epoch(1, start_step=5)) == []
    # Another epoch: another order, and other crops of the same example.
    other = _collect(make().epoch(2))
    assert not np.array_equal(np.concatenate([i for i, _ in other]), np.concatenate([i for i, _ in full]))
    i = int(full[0][0][0])
    row = np.flatnonzero(np.concatenate([idx for idx, _ in other]) == i)[0]
    assert not np.array_equal(other[row // 4][1][0][row % 4], full[0][1][0][0])
    # A stream abandoned mid-epoch shuts its pool down (no hang, no error).
    it = make().epoch(1)
    next(it)
    it.close()


def test_drop_remainder():
    src = _varied(10)
    kept = TrainStream(src, CROPS[:1], 4, 0, process_index=0, process_count=1)
    assert kept.steps_per_epoch == 2
    assert np.unique(np.concatenate([i for i, _ in kept.epoch(0)])).size == 8
    padded = TrainStream(src, CROPS[:1], 4, 0, process_index=1, process_count=2,
                         drop_remainder=False)
    assert padded.steps_per_epoch == 3
    order = padded.epoch_order(0)
    perm = epoch_permutation(0, 0, 10)
    np.testing.assert_array_equal(order, np.concatenate([perm, perm[:2]]))
    last = list(padded.epoch(0))[-1][0]
    np.testing.assert_array_equal(last, perm[:2])  # process 1 of the wrapped last batch
    with pytest.raises(ValueError, match="multiple of process_count"):
        TrainStream(src, CROPS, 6, 0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainStream(src, CROPS, 16, 0, process_index=0, process_count=1)


# ----------------------------------------------------------------------------- center crops

@pytest.mark.parametrize("count", [1, 2])
def test_center_crop_batches(count):
    src = _varied(11, seed=4)
    parts = [list(center_crop_batches(src, 14, 4, process_index=p, process_count=count,
                                      num_workers=2)) for p in range(count)]
    assert all(len(part) == 3 for part in parts)  # ceil(11 / 4) on every process
    b = 4 // count
    for part in parts:
        for idx, images, valid in part:
            assert idx.shape == valid.shape == (b,) and images.shape == (b, 14, 14, 3)
    steps = [[np.concatenate(x) for x in zip(*[part[s] for part in parts])] for s in range(3)]
    idx, images, valid = (np.concatenate(x) for x in zip(*steps))
    np.testing.assert_array_equal(valid, np.arange(12) < 11)
    np.testing.assert_array_equal(idx, np.r_[np.arange(11), 0])
    assert (images[11] == 0).all()
    # Pixels: the device's center_crop (an independent implementation), un-normalized.
    for i in range(3):  # one compile per image size
        img = src.load(i)
        want = augmentations.center_crop(img[None], 14, mean=(0.0,) * 3, std=(1 / 255,) * 3)[0]
        assert np.abs(images[i].astype(np.float32) - np.asarray(want)).max() <= 1.01
    assert len({np.sign(src.load(i).shape[0] - src.load(i).shape[1]) for i in range(3)}) == 2


# ----------------------------------------------------------------------------- device

def test_to_global_and_prefetch_to_device():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    src = _varied(32, seed=5)
    train = TrainStream(src, CROPS[:2], 16, 0, process_index=0, process_count=1)
    host = _collect(train.epoch(0))
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

    it = stream.prefetch_to_device(counting(), 2, mesh)
    first = next(it)
    assert len(pulled) == 3  # the one yielded + 2 in flight
    got = [first, *it]
    assert len(got) == 2 * len(host)
    for (gi, gv), (hi, hv) in zip(got, host * 2):
        np.testing.assert_array_equal(np.asarray(gi), hi)
        np.testing.assert_array_equal(np.asarray(gv[1]), hv[1])


def test_array_dataset_source_in_stream():
    images = np.arange(6 * 8 * 8, dtype=np.uint8).reshape(6, 8, 8, 1)
    src = ArraySource(ArrayDataset(images, np.arange(6, dtype=np.int32), 6, "tiny"))
    (idx, (view,)), = TrainStream(src, (CropSpec(8, (1.0, 1.0), (1.0, 1.0)),), 6, 0,
                                  process_index=0, process_count=1).epoch(0)
    np.testing.assert_array_equal(view, images[idx])  # full-image box at full size: identity


def test_bad_crop_specs_say_what_to_change():
    for bad, msg in (((0, (0.2, 1.0)), "crop size must be positive"), ((8, (0.5, 0.2)), "scale must satisfy"),
                     ((8, (0.2, 1.0), (1.5, 1.0)), "ratio must satisfy")):
        with pytest.raises(ValueError, match=msg):
            CropSpec(*bad)
        with pytest.raises(ValueError, match=msg):
            augmentations.AugmentConfig(*bad)
