"""Dataset sources: digits split, IDX parsing, Fashion-MNIST, TFDS (mocked), image folders."""

import contextlib
import gzip
import io
import logging
import os
import signal
import struct

import numpy as np
import pytest

from hcsc_jax.data import decode, sources
from hcsc_jax.data.resize import bilinear_weights, resize_uint8
from hcsc_jax.data.sources import ArrayDataset, load_dataset, read_idx
from tests.fake_gcs import fake_gcs  # noqa: F401 - fixture


def _rows(images, labels):
    """Multiset of (label, image bytes) pairs, as a sorted list."""
    return sorted((int(l), img.tobytes()) for img, l in zip(images, labels))


# ----------------------------------------------------------------------------- digits

def test_digits_values_and_split():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = load_dataset("digits", "all")
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    assert (len(full), len(train), len(test)) == (1797, 1437, 360)
    assert full.images.shape == (1797, 8, 8, 1) and full.images.dtype == np.uint8
    assert full.labels.dtype == np.int32 and full.num_classes == 10
    # Pixel values: round(v * 255 / 16) of the 0..16 originals, so 0 and 255 both occur.
    np.testing.assert_array_equal(full.images[..., 0], np.round(bunch.images * 255 / 16))
    np.testing.assert_array_equal(full.labels, bunch.target)
    assert full.images.min() == 0 and full.images.max() == 255
    assert set(np.unique(train.labels)) == set(range(10)) == set(np.unique(test.labels))
    # The test split is the last 360 of the rng(0) permutation; train and test are disjoint
    # and together are exactly the whole set.
    perm = np.random.default_rng(0).permutation(1797)
    test_idx = np.sort(perm[-360:])
    train_idx = np.setdiff1d(np.arange(1797), test_idx)
    np.testing.assert_array_equal(test.images, full.images[test_idx])
    np.testing.assert_array_equal(test.labels, full.labels[test_idx])
    np.testing.assert_array_equal(train.images, full.images[train_idx])
    assert _rows(np.concatenate([train.images, test.images]),
                 np.concatenate([train.labels, test.labels])) == _rows(full.images, full.labels)
    # Deterministic.
    again = load_dataset("digits", "test")
    np.testing.assert_array_equal(again.images, test.images)
    np.testing.assert_array_equal(again.labels, test.labels)


def test_digits_bad_split_and_image_size():
    with pytest.raises(ValueError, match="no split 'val'.*train, test, all"):
        load_dataset("digits", "val")
    big = load_dataset("digits", "test", image_size=16)
    assert big.images.shape == (360, 16, 16, 1)
    np.testing.assert_array_equal(big.images, resize_uint8(load_dataset("digits", "test").images,
                                                           (16, 16)))


def test_split_slices_take_those_examples():
    train = load_dataset("digits", "train")
    for split, rows in (("train[:500]", slice(None, 500)), ("train[1000:]", slice(1000, None)),
                        ("train[-7:]", slice(-7, None)), ("train[10:20]", slice(10, 20))):
        part = load_dataset("digits", split)
        np.testing.assert_array_equal(part.images, train.images[rows])
        np.testing.assert_array_equal(part.labels, train.labels[rows])
    with pytest.raises(ValueError, match=r"'train\[5:5\]' selects no examples \(the split has 1437\)"):
        load_dataset("digits", "train[5:5]")
    for bad in ("train[:10%]", "train[:5", "val[:5]", "train[a:b]"):
        with pytest.raises(ValueError, match=r"no split .*e\.g\. train\[:20000\]"):
            load_dataset("digits", bad)


def test_unknown_dataset_lists_registered_names():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet_typo", "train")
    for name in ("digits", "fashion_mnist", "tfds", "folder"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="takes no"):
        load_dataset("digits:extra", "train")


def test_register_custom_loader():
    name = "unit_test_constant"
    if name not in sources.list_datasets():
        @sources.register(name)
        def _loader(spec, split, data_dir, image_size):
            imgs = np.full((3, 4, 5, 1), 7, np.uint8)
            return ArrayDataset(imgs, np.arange(3, dtype=np.int32), 3, f"{name}:{spec}")
    ds = load_dataset(f"{name}:abc", "train", image_size=(2, 3))
    assert ds.name == f"{name}:abc" and ds.images.shape == (3, 2, 3, 1)
    assert (ds.images == 7).all()  # resizing a constant image keeps it constant
    with pytest.raises(ValueError, match="already registered"):
        sources.register(name)(lambda *a: None)


def test_array_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(np.zeros((2, 3, 3, 1), np.float32), None, None, "x")
    with pytest.raises(ValueError, match="int32"):
        ArrayDataset(np.zeros((2, 3, 3, 1), np.uint8), np.zeros(3, np.int32), None, "x")
    with pytest.raises(ValueError, match="outside"):
        ArrayDataset(np.zeros((2, 3, 3, 1), np.uint8), np.array([0, 5], np.int32), 3, "x")


# ----------------------------------------------------------------------------- IDX

def _idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
             np.float32: 0x0D, np.float64: 0x0E}
    code = codes[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path, data: bytes, gz: bool):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    arrays = {
        "u8": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
        "i32": rng.integers(-2**31, 2**31 - 1, (4, 6), dtype=np.int32),
        "f32": rng.normal(size=(9,)).astype(np.float32),
        "i16": rng.integers(-300, 300, (2, 3, 4, 5), dtype=np.int16),
    }
    for name, arr in arrays.items():
        got = read_idx(_write(tmp_path / f"{name}.idx", _idx_bytes(arr), gz))
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_corrupt(tmp_path, gz):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = _idx_bytes(arr)
    bad_magic = b"\x01\x00" + data[2:]
    with pytest.raises(ValueError, match=r"bad.*magic number 0x01000803"):
        read_idx(_write(tmp_path / "magic", bad_magic, gz))
    bad_type = data[:2] + b"\x07" + data[3:]
    with pytest.raises(ValueError, match="magic"):
        read_idx(_write(tmp_path / "type", bad_type, gz))
    with pytest.raises(ValueError, match=r"truncated.*\(2, 3, 4\).*24.*found 20"):
        read_idx(_write(tmp_path / "short", data[:-4], gz))
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(_write(tmp_path / "header", data[:9], gz))
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(_write(tmp_path / "long", data + b"\x00", gz))
    path = _write(tmp_path / "named", data[:-1], gz)
    with pytest.raises(ValueError, match=str(path)):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((50, 3), np.uint8)))[:-10])
    with pytest.raises(ValueError, match="corrupt gzip"):
        read_idx(path)


# ----------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_from_generated_idx(tmp_path):
    rng = np.random.default_rng(1)
    want = {}
    for split, (img_name, lbl_name), n, gz in [
            ("train", sources.FASHION_MNIST_FILES["train"], 12, True),
            ("test", sources.FASHION_MNIST_FILES["test"], 5, False)]:
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        lbls = rng.integers(0, 10, n).astype(np.uint8)
        suffix = ".gz" if gz else ""
        _write(tmp_path / (img_name + suffix), _idx_bytes(imgs), gz)
        _write(tmp_path / (lbl_name + suffix), _idx_bytes(lbls), gz)
        want[split] = (imgs, lbls)
    for split, (imgs, lbls) in want.items():
        ds = load_dataset("fashion_mnist", split, data_dir=str(tmp_path))
        assert ds.images.shape == (len(imgs), 28, 28, 1) and ds.num_classes == 10
        np.testing.assert_array_equal(ds.images[..., 0], imgs)
        np.testing.assert_array_equal(ds.labels, lbls.astype(np.int32))
        assert ds.labels.dtype == np.int32
    head = load_dataset("fashion_mnist", "train[:4]", data_dir=str(tmp_path))
    np.testing.assert_array_equal(head.images[..., 0], want["train"][0][:4])


def test_fashion_mnist_mismatched_files(tmp_path):
    img_name, lbl_name = sources.FASHION_MNIST_FILES["test"]
    _write(tmp_path / img_name, _idx_bytes(np.zeros((3, 28, 28), np.uint8)), False)
    _write(tmp_path / lbl_name, _idx_bytes(np.zeros((4,), np.uint8)), False)
    with pytest.raises(ValueError, match="disagree"):
        load_dataset("fashion_mnist", "test", data_dir=str(tmp_path))


def test_fashion_mnist_missing_names_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion_mnist", "train", data_dir=str(tmp_path))
    msg = str(err.value)
    assert "dataset-fashion-mnist" in msg and "apt" in msg and "data_dir" in msg
    assert "`python tests/imagenet_like.py` writes them" in msg  # the runlocal variants' tiny files
    for stems in sources.FASHION_MNIST_FILES.values():
        for stem in stems:
            assert stem in msg


# ----------------------------------------------------------------------------- TFDS (mocked)

def test_tfds_mock_data_source_without_tensorflow():
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(2)
    # (H, W) gray images, as some sources yield them, must come back as (H, W, 1).
    examples = [{"image": rng.integers(0, 256, (28, 28), dtype=np.uint8), "label": np.int64(i % 10)}
                for i in range(6)]
    calls = []

    def as_data_source(self, split, *args, **kwargs):
        calls.append((self.name, split))
        return list(examples)

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        ds = load_dataset("tfds:mnist", "test")
    assert calls == [("mnist", "test")]
    assert ds.name == "tfds:mnist" and ds.num_classes == 10
    np.testing.assert_array_equal(ds.images, np.stack([e["image"] for e in examples])[..., None])
    np.testing.assert_array_equal(ds.labels, np.arange(6) % 10)
    assert ds.labels.dtype == np.int32

    # Different image sizes: a clear error, or a resize to image_size.
    mixed = [{"image": np.zeros((8, 8, 3), np.uint8), "label": 0},
             {"image": np.full((6, 10, 3), 200, np.uint8), "label": 1}]
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: mixed):
        with pytest.raises(ValueError, match="differ in size.*image_size"):
            load_dataset("tfds:cifar10", "train")
        resized = load_dataset("tfds:cifar10", "train", image_size=(4, 5))
    assert resized.images.shape == (2, 4, 5, 3)
    assert (resized.images[0] == 0).all() and (resized.images[1] == 200).all()


def test_tfds_mock_random_examples_match_data_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5):
        ds = load_dataset("tfds:cifar10", "train")
        src = tfds.data_source("cifar10", split="train")
        want = np.stack([src[i]["image"] for i in range(5)])
        want_labels = [int(src[i]["label"]) for i in range(5)]
    assert ds.images.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(ds.images, want)
    np.testing.assert_array_equal(ds.labels, want_labels)


def test_tfds_missing_and_unknown(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match=r"not prepared.*tfds build mnist.*data_dir"):
        load_dataset("tfds:mnist", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no dataset named 'no_such_dataset_xyz'"):
        load_dataset("tfds:no_such_dataset_xyz", "train", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- image folders

def _save(Image, path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_with_splits(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    imgs = {}
    # Class folders are sorted: "ant" -> 0, "bee" -> 1, "cat" -> 2; "cat" only exists in val.
    layout = {"train": {"bee": 2, "ant": 3}, "val": {"cat": 1, "ant": 1}}
    for split, classes in layout.items():
        for cls, n in classes.items():
            for k in range(n):
                arr = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                _save(Image, tmp_path / split / cls / f"img{k}.png", arr)
                imgs[(split, cls, k)] = arr
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")

    train = load_dataset(f"folder:{tmp_path}", "train")
    assert train.class_names == ("ant", "bee", "cat") and train.num_classes == 3
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 1])
    want = [imgs[("train", "ant", k)] for k in range(3)] + [imgs[("train", "bee", k)] for k in range(2)]
    np.testing.assert_array_equal(train.images, np.stack(want))
    val = load_dataset(f"folder:{tmp_path}", "val")
    np.testing.assert_array_equal(val.labels, [0, 2])
    np.testing.assert_array_equal(val.images, np.stack([imgs[("val", "ant", 0)],
                                                       imgs[("val", "cat", 0)]]))
    test = load_dataset("folder:" + tmp_path.name, "test", data_dir=str(tmp_path.parent))
    np.testing.assert_array_equal(test.images, val.images)  # "test" falls back to val/


def test_image_folder_flat_gray_and_sizes(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    a = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    _save(Image, tmp_path / "zero" / "a.png", a)
    _save(Image, tmp_path / "one" / "b.png", 255 - a)
    for split in ("train", "test"):  # no split folders: the whole folder for any split
        ds = load_dataset(f"folder:{tmp_path}", split)
        assert ds.images.shape == (2, 3, 4, 1)  # gray PNGs -> C = 1
        np.testing.assert_array_equal(ds.labels, [0, 1])  # "one" < "zero"
        np.testing.assert_array_equal(ds.images[..., 0], np.stack([255 - a, a]))
    _save(Image, tmp_path / "one" / "c.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match="differ in size.*image_size"):
        load_dataset(f"folder:{tmp_path}", "train")
    ds = load_dataset(f"folder:{tmp_path}", "train", image_size=3)
    assert ds.images.shape == (3, 3, 3, 1)
    with pytest.raises(FileNotFoundError):
        load_dataset(f"folder:{tmp_path / 'missing'}", "train")


def test_image_folder_skips_a_looping_link_and_refuses_an_empty_class(tmp_path, caplog):
    """A class folder linked to '.' would be an empty class 0 shifting every label by one."""
    Image = pytest.importorskip("PIL.Image")
    for cls in ("ant", "bee"):
        _save(Image, tmp_path / "train" / cls / "a.png", np.zeros((4, 4), np.uint8))
    os.symlink(".", tmp_path / "train" / "aaa")
    train = load_dataset(f"folder:{tmp_path}", "train")
    assert train.class_names == ("ant", "bee") and list(train.labels) == [0, 1]
    assert "skipping" in caplog.text and "aaa" in caplog.text
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(ValueError, match=r"class folder '.*train/cat' holds no .* files; add its images"):
        load_dataset(f"folder:{tmp_path}", "train")


def test_channels_follow_a_sample_of_the_folder_not_its_first_file(tmp_path):
    """A gray JPEG or an unreadable file sorting first must not make an RGB folder 1-channel or stop
    the open; every image is converted to the decided mode."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(6)
    gray = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    _save(Image, tmp_path / "rgb" / "ant" / "a_gray.jpg", gray)
    (tmp_path / "rgb" / "ant" / "aa_cut.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    for k in range(3):
        _save(Image, tmp_path / "rgb" / "bee" / f"{k}.png", rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    src = sources.open_source(f"folder:{tmp_path / 'rgb'}", "train")
    assert src.channels == 3 and src.file_names[:2] == ("a_gray.jpg", "aa_cut.jpg")
    want = np.asarray(Image.open(tmp_path / "rgb" / "ant" / "a_gray.jpg"))
    np.testing.assert_array_equal(src.load(0), np.repeat(want[..., None], 3, axis=-1))
    with pytest.raises(decode.DecodeError, match="aa_cut.jpg"):
        src.load(1)  # (the loader skips it or stops, as input.bad_images says)
    for k in range(3):
        _save(Image, tmp_path / "gray" / "ant" / f"{k}.png", gray)
    (tmp_path / "gray" / "ant" / "3.png").write_bytes(b"unreadable")
    assert sources.open_source(f"folder:{tmp_path / 'gray'}", "train").channels == 1
    (tmp_path / "none" / "ant").mkdir(parents=True)
    (tmp_path / "none" / "ant" / "x.png").write_bytes(b"unreadable")
    with pytest.raises(decode.DecodeError, match="none of the 1 images sampled"):
        sources.open_source(f"folder:{tmp_path / 'none'}", "train")


def _png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_a_16_bit_png_keeps_its_top_8_bits():
    """Pillow's I;16 -> L conversion clips every value above 255 to white."""
    wide = np.random.default_rng(7).integers(0, 65536, (6, 9), dtype=np.uint16)
    data = _png(wide)
    assert decode.mode_of(data) == "L"
    want = (wide >> 8).astype(np.uint8)
    np.testing.assert_array_equal(decode.decode(data, "L")[..., 0], want)
    np.testing.assert_array_equal(decode.decode(data, "RGB"), np.repeat(want[..., None], 3, axis=-1))


def test_an_image_of_more_than_max_pixels_is_refused_from_its_header(tmp_path):
    """A 30000 x 30000 JPEG is 14 MB on disk and 2.7 GB decoded: refused by name before decoding."""
    image = np.random.default_rng(8).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    import simplejpeg

    for data in (simplejpeg.encode_jpeg(image), _png(image)):
        assert decode.decode(data, "RGB", "x.img", max_pixels=1200).shape == (30, 40, 3)
        with pytest.raises(decode.DecodeError, match=r"x.img: 40 x 30 = 1,200 pixels, more than the limit of "
                                                     r"1,199 \(config.input.max_pixels\)"):
            decode.decode(data, "RGB", "x.img", max_pixels=1199)
    (tmp_path / "ant").mkdir()
    (tmp_path / "ant" / "a.png").write_bytes(_png(image))
    src = sources.open_source(f"folder:{tmp_path}", "train", max_pixels=1000)
    with pytest.raises(decode.DecodeError, match="a.png: 40 x 30"):
        src.load(0)


def test_max_pixels_of_the_config_reaches_the_decoder(tmp_path):
    from configs import digits
    from hcsc_jax import sharding
    from hcsc_jax.run import setup

    (tmp_path / "ant").mkdir()
    (tmp_path / "ant" / "a.png").write_bytes(_png(np.zeros((30, 40, 3), np.uint8)))
    config = digits.get_config("runlocal")
    config.dataset, config.batch_size = f"folder:{tmp_path}", 1
    config.input.update(pipeline="stream", max_pixels=1000)
    inp = setup.make_input(config, "train", sharding.make_mesh(), train=False)
    with pytest.raises(decode.DecodeError, match="more than the limit of 1,000"):
        inp.source.load(0)


@contextlib.contextmanager
def _at_most(seconds: int):
    """Fails a block that blocks (e.g. opening a FIFO no one writes) for more than `seconds`."""
    def hung(signum, frame):
        raise AssertionError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fifo_a_device_or_a_too_large_file_is_refused_before_reading(tmp_path):
    """A FIFO named .JPEG blocks whoever opens it; a link to /dev/zero grows a run to a MemoryError."""
    from hcsc_jax.data.sources.folder import read_bytes

    Image = pytest.importorskip("PIL.Image")
    cls = tmp_path / "ant"
    _save(Image, cls / "b.png", np.zeros((4, 4, 3), np.uint8))
    os.mkfifo(cls / "a_fifo.JPEG")  # sorts first: the channel sample reads it
    os.symlink("/dev/zero", cls / "c_zero.JPEG")
    with open(cls / "d_big.png", "wb") as f:
        f.truncate(4 * 1000 + 1)  # sparse: 4 bytes per pixel of max_pixels = 1000, and one more
    with _at_most(20):
        for name in ("a_fifo.JPEG", "c_zero.JPEG"):
            with pytest.raises(decode.DecodeError, match=f"{name}: not a regular file"):
                read_bytes(os.fspath(cls / name))
        with pytest.raises(decode.DecodeError, match=r"d_big.png: 4,001 bytes, more than 4,000 bytes"):
            read_bytes(os.fspath(cls / "d_big.png"), max_pixels=1000)
        src = sources.open_source(f"folder:{tmp_path}", "train", max_pixels=1000)
        assert src.channels == 3 and src.load(1).shape == (4, 4, 3)
        for i in (0, 2, 3):
            with pytest.raises(decode.DecodeError, match=src.file_names[i]):
                src.load(i)


def test_check_available_is_one_line_and_says_digits_ignores_data_dir(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        sources.check_available("digits", ("train", "test"), str(tmp_path))
    assert caplog.text.count(f"digits ships with scikit-learn: data_dir {tmp_path} is not used") == 1
    missing = tmp_path / "nope"
    for name, splits, message in [
            ("mnist", ("train",), "unknown dataset 'mnist'; registered: digits"),
            ("digits", ("train", "validation"), "dataset 'digits' has no split 'validation'"),
            ("fashion_mnist", ("train",), f"Fashion-MNIST not found: {tmp_path} lacks train-images-idx3"),
            (f"folder:{missing}", ("train",), f"image folder '{missing}' does not exist")]:
        with pytest.raises(sources.DataError, match=message) as err:
            sources.check_available(name, splits, str(tmp_path))
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- host resize

def test_resize_uint8_hand_computed():
    # 4 -> 2 is a 2x downscale: antialiased triangle of half-width 2 around 0.5 and 2.5,
    # clipped to the image and renormalized: (3, 3, 1)/7 and (1, 3, 3)/7.
    w = np.array([[3, 3, 1, 0], [0, 1, 3, 3]]) / 7
    np.testing.assert_allclose(bilinear_weights(4, 2), w, rtol=1e-6)
    img = np.random.default_rng(4).integers(0, 256, (4, 4, 2), dtype=np.uint8)
    want = np.rint(np.einsum("oh,hwc,pw->opc", w, img.astype(np.float64), w))
    np.testing.assert_array_equal(resize_uint8(img, (2, 2)), want)
    # Upscaling is plain bilinear with edge clamping: 2 -> 4.
    up = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    np.testing.assert_allclose(bilinear_weights(2, 4), up, rtol=1e-6)


def test_data_dir_on_a_bucket(tmp_path, fake_gcs):  # noqa: F811
    """Fashion-MNIST IDX files and an image folder read from gs:// (in-memory fake) give the
    same data as from a local directory."""
    from etils import epath

    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(5)
    bucket = epath.Path("gs://bucket/data")
    for split, n in (("train", 4), ("test", 3)):
        img_name, lbl_name = sources.FASHION_MNIST_FILES[split]
        _write(tmp_path / (img_name + ".gz"), _idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
               True)
        _write(tmp_path / lbl_name, _idx_bytes(rng.integers(0, 10, n).astype(np.uint8)), False)
    for cls, k in (("ant", 0), ("ant", 1), ("bee", 0)):
        _save(Image, tmp_path / "imgs" / "train" / cls / f"img{k}.png",
              rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    for f in tmp_path.rglob("*"):
        if f.is_file():
            (bucket / f.relative_to(tmp_path).as_posix()).parent.mkdir(parents=True, exist_ok=True)
            (bucket / f.relative_to(tmp_path).as_posix()).write_bytes(f.read_bytes())
    for split in ("train", "test"):
        local, remote = (load_dataset("fashion_mnist", split, data_dir=d)
                         for d in (str(tmp_path), str(bucket)))
        np.testing.assert_array_equal(remote.images, local.images)
        np.testing.assert_array_equal(remote.labels, local.labels)
    local, remote = (load_dataset("folder:imgs", "train", data_dir=d) for d in (str(tmp_path), str(bucket)))
    np.testing.assert_array_equal(remote.images, local.images)
    assert remote.class_names == ("ant", "bee") and list(remote.labels) == [0, 0, 1]
    lazy = sources.open_source("folder:imgs", "train", data_dir=str(bucket))
    np.testing.assert_array_equal(lazy.load(2), local.images[2])
