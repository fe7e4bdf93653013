"""python -m hcsc_jax.data.prepare: a resized ArrayRecord copy, read back as `prepared:<dir>`."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hcsc_jax.data import prepare
from hcsc_jax.data.sources import load_dataset, open_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder(root, gray=False):
    """2 classes x 3 smooth images of varied sizes, some larger than 40 pixels."""
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(root / f"class{c}")
        for i in range(3):
            h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
            coarse = rng.integers(0, 256, (4, 4) if gray else (4, 4, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((w, h), Image.BICUBIC).save(root / f"class{c}" / f"{i}.png")


@pytest.mark.parametrize("gray", [False, True])
def test_prepared_copy_keeps_order_labels_and_names_and_caps_the_size(tmp_path, gray):
    _folder(tmp_path / "images", gray)
    meta = prepare.prepare(f"folder:{tmp_path / 'images'}", "train", tmp_path / "out", max_side=40,
                           quality=95)
    assert meta["num_examples"] == 6 and meta["encoding"] == ("png" if gray else "jpeg")
    original = open_source(f"folder:{tmp_path / 'images'}", "train")
    copy = open_source(f"prepared:{tmp_path / 'out'}", "train")
    assert copy.num_examples == 6 and copy.channels == original.channels == (1 if gray else 3)
    np.testing.assert_array_equal(copy.labels, original.labels)
    assert copy.class_names == original.class_names and copy.file_names == original.file_names
    for i in range(6):
        a, b = original.load(i), copy.load(i)
        scale = min(1.0, 40 / max(a.shape[:2]))
        assert b.shape == (max(1, round(a.shape[0] * scale)), max(1, round(a.shape[1] * scale)), a.shape[2])
        want = np.asarray(Image.fromarray(a[..., 0] if gray else a).resize(b.shape[1::-1], Image.BILINEAR))
        diff = np.abs(b.astype(int) - want.reshape(b.shape)).mean()
        assert diff == 0 if gray else diff < 6  # PNG is lossless; JPEG (4:2:0 chroma) is near
    in_memory = load_dataset(f"prepared:{tmp_path / 'out'}", "train", image_size=8)
    assert in_memory.images.shape == (6, 8, 8, copy.channels)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_prepared_errors_and_cli(tmp_path):
    with pytest.raises(FileNotFoundError, match="no split 'val'.*python -m hcsc_jax.data.prepare"):
        open_source(f"prepared:{tmp_path}", "val")
    with pytest.raises(ValueError, match="max_side >= 1"):
        prepare.prepare("digits", "train", tmp_path / "x", max_side=0)
    run = lambda *args: subprocess.run([sys.executable, "-m", "hcsc_jax.data.prepare", *args], cwd=ROOT,
                                       capture_output=True, text=True, timeout=300)
    missing = run("--source=folder:/nonexistent", f"--out={tmp_path / 'y'}")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "y" / "train.json").exists()
    _folder(tmp_path / "images")
    done = run(f"--source=folder:{tmp_path / 'images'}", f"--out={tmp_path / 'z'}", "--max_side=32",
               "--workers=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--config.dataset=prepared:" in done.stdout
    assert open_source(f"prepared:{tmp_path / 'z'}", "train").num_examples == 6
    with pytest.raises(FileNotFoundError, match="no split 'validation' .splits: train."):
        open_source(f"prepared:{tmp_path / 'z'}", "validation")
    (tmp_path / "z" / "train.json").rename(tmp_path / "z" / "val.json")
    (tmp_path / "z" / "train.array_record").rename(tmp_path / "z" / "val.array_record")
    assert open_source(f"prepared:{tmp_path / 'z'}", "validation").num_examples == 6  # as folders name it
