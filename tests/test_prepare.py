"""python -m hcsc_jax.data.prepare: a resized ArrayRecord copy, read back as `prepared:<dir>`."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from hcsc_jax.data import prepare
from hcsc_jax.data.sources import DataError, load_dataset, open_source

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
    again = run(f"--source=folder:{tmp_path / 'images'}", f"--out={tmp_path / 'z'}", "--max_side=32")
    assert again.returncode == 0 and "already holds" in again.stdout and "nothing to do" in again.stdout
    other = run(f"--source=folder:{tmp_path / 'images'}", f"--out={tmp_path / 'z'}", "--max_side=16")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "max_side: 32 -> 16" in other.stderr and "--overwrite" in other.stderr
    assert open_source(f"prepared:{tmp_path / 'z'}", "train").num_examples == 6
    with pytest.raises(FileNotFoundError, match="no split 'validation' .splits: train."):
        open_source(f"prepared:{tmp_path / 'z'}", "validation")
    (tmp_path / "z" / "train.json").rename(tmp_path / "z" / "val.json")  # (it names its records file)
    assert open_source(f"prepared:{tmp_path / 'z'}", "validation").num_examples == 6  # as folders name it


def _records(out):
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".array_record"))


def _edit_meta(out, **changes):
    meta = json.loads((out / "train.json").read_text())
    (out / "train.json").write_text(json.dumps(dict(meta, **changes)))
    return meta


def test_a_copy_that_does_not_match_its_description_is_refused_on_open(tmp_path):
    """A count smaller than the records trained on part of the data; larger, a bare traceback."""
    _folder(tmp_path / "images")
    out = tmp_path / "out"
    meta = prepare.prepare(f"folder:{tmp_path / 'images'}", "train", out, max_side=32)
    records = out / meta["records"]
    data = records.read_bytes()
    labels = meta["labels"]
    for changes, message in [
            (dict(num_examples=5), f"{records.name}: holds 6 records, train.json says num_examples = 5"),
            (dict(num_examples=7), "holds 6 records, train.json says num_examples = 7"),
            (dict(labels=labels[:5]), "train.json: labels has 5 entries for 6 examples"),
            (dict(labels=labels[:5] + [2]), r"train.json: labels outside \[0, 2\): from 0 to 2"),
            (dict(labels=labels[:5] + [-1]), r"labels outside \[0, 2\): from -1 to 1"),
            (dict(file_names=meta["file_names"][1:]), "file_names has 5 entries for 6 examples"),
            (dict(records_bytes=len(data) + 1), f"{records.name}: {len(data):,} bytes, train.json says"),
            (dict(records="other.array_record"), "its records file other.array_record is missing")]:
        _edit_meta(out, **changes)
        with pytest.raises(DataError, match=message) as err:
            open_source(f"prepared:{out}", "train")
        assert "\n" not in str(err.value) and "--overwrite" in str(err.value)
        (out / "train.json").write_text(json.dumps(meta))
    records.write_bytes(data[:len(data) // 2])  # a cut file
    with pytest.raises(DataError, match=f"{records.name}: .* bytes, train.json says {len(data):,}"):
        open_source(f"prepared:{out}", "train")
    # A copy of the first format (no records name or size): the reader finds the cut.
    records.rename(out / "train.array_record")
    v1 = {k: v for k, v in meta.items() if k not in ("records", "records_bytes")}
    (out / "train.json").write_text(json.dumps(dict(v1, format="hcsc-jax prepared v1")))
    with pytest.raises(DataError, match="train.array_record: not a readable ArrayRecord file"):
        open_source(f"prepared:{out}", "train")
    (out / "train.array_record").write_bytes(data)
    assert open_source(f"prepared:{out}", "train").num_examples == 6


def test_a_rerun_keeps_refuses_or_overwrites_and_removes_leftovers(tmp_path):
    """A rerun redid all the work, then failed with FileExistsError; a killed run's files stayed."""
    _folder(tmp_path / "images")
    out, source = tmp_path / "out", f"folder:{tmp_path / 'images'}"
    first = prepare.prepare(source, "train", out, max_side=32)
    assert not first["reused"] and _records(out) == [first["records"]]
    leftovers = ["train.0123456789ab.array_record", "train.array_record", "train.json.tmp",
                 "train.array_record.tmp"]
    for name in leftovers:  # a killed run's (and the first format's) files
        (out / name).write_bytes(b"left over")
    (out / "val.0123456789ab.array_record").write_bytes(b"another split's")
    again = prepare.prepare(source, "train", out, max_side=32)
    assert again["reused"] and again["records"] == first["records"]
    assert sorted(p.name for p in out.iterdir()) == sorted([first["records"], "train.json",
                                                            "val.0123456789ab.array_record"])
    with pytest.raises(ValueError, match=r"train.json holds a copy made otherwise \(max_side: 32 -> 16\); "
                                         "pass --overwrite"):
        prepare.prepare(source, "train", out, max_side=16)
    new = prepare.prepare(source, "train", out, max_side=16, overwrite=True)
    assert not new["reused"] and _records(out) == sorted([new["records"], "val.0123456789ab.array_record"])
    assert max(open_source(f"prepared:{out}", "train").load(0).shape[:2]) <= 16


def test_a_source_changed_since_its_copy_is_refused_naming_what_changed(tmp_path):
    """Images replaced under the same names: the rerun said "already holds ... nothing to do" and
    kept the old pixels. The files' sizes and times (a folder) and a sample digest (any source)."""
    _folder(tmp_path / "images")
    out, source = tmp_path / "out", f"folder:{tmp_path / 'images'}"
    prepare.prepare(source, "train", out, max_side=32)
    replaced = tmp_path / "images" / "class1" / "2.png"
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(replaced)  # new pixels, same name
    with pytest.raises(ValueError, match=r"train.json holds a copy of folder:.*:train as it was, but 1 of "
                                         r"its files changed since \(size or modification time\): 2.png; "
                                         r"pass --overwrite"):
        prepare.prepare(source, "train", out, max_side=32)
    # The pixels changed and the stamps were kept (a copy made before stamps, or `cp -p`): the digest.
    meta = json.loads((out / "train.json").read_text())
    prepare.prepare(source, "train", out, max_side=32, overwrite=True)
    fresh = json.loads((out / "train.json").read_text())
    assert fresh["sample_digest"] != meta["sample_digest"]  # 2.png is the last image: in the sample
    _edit_meta(out, sample_digest=meta["sample_digest"], file_stamps=None)
    with pytest.raises(ValueError, match=r"but its images differ from those the copy was made from \(a "
                                         r"sample of 16 decoded\)"):
        prepare.prepare(source, "train", out, max_side=32)
    _edit_meta(out, sample_digest=fresh["sample_digest"], file_stamps=fresh["file_stamps"])
    assert prepare.prepare(source, "train", out, max_side=32)["reused"]


def test_nested_class_folders_are_read_as_torchvision_reads_them(tmp_path):
    """class/sub/*.jpg: 20 of 30 images were dropped without a word. Now every image under a class
    folder is one of its examples (as torchvision's ImageFolder), in the order of its path there;
    hidden folders and a link back up the tree are passed over."""
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    for rel in ("a/0.png", "a/sub/1.png", "a/sub/deeper/2.png", "a/sub2/0.png", "b/x.png", "b/y/z.png",
                "b/.hidden/no.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / rel)
    os.symlink(root / "a", root / "a" / "sub" / "loop")  # a link to a folder above: read once
    src = open_source(f"folder:{root}", "train")
    assert src.file_names == ("0.png", "sub/1.png", "sub/deeper/2.png", "sub2/0.png", "x.png", "y/z.png")
    assert list(src.labels) == [0, 0, 0, 0, 1, 1] and src.class_names == ("a", "b")
    # A prepared copy keeps them, and a class whose images are all in sub-folders is not empty.
    meta = prepare.prepare(f"folder:{root}", "train", tmp_path / "out", max_side=8)
    assert meta["num_examples"] == 6 and tuple(meta["file_names"]) == src.file_names


def test_a_second_writer_of_a_split_is_refused_at_start(tmp_path):
    """Two prepares into one --out ended with the labels of one folder over the records of the other."""
    _folder(tmp_path / "images")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "train.prepare.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # a live writer
    command = [sys.executable, "-m", "hcsc_jax.data.prepare", f"--source=folder:{tmp_path}/images",
               f"--out={out}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert f"{out} is in use by process {os.getpid()}" in done.stderr and "another --out" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train.prepare.lock"]


def test_a_killed_prepare_leaves_no_worker_and_its_files_are_removed_by_the_next(tmp_path):
    """6 SIGKILLed prepares left 6 encoding workers alive 25 minutes later."""
    from test_stream_run import assert_no_process_left, processes_with, tagged_env

    # Enough images that the workers outlive a look at them under any load (6 could all be encoded
    # between two looks); a prepare that still ended first is run again, up to 3 times.
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(tmp_path / "images" / f"class{c}")
        for i in range(1500):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
                tmp_path / "images" / f"class{c}" / f"{i:04d}.png")
    out, source = tmp_path / "out", f"folder:{tmp_path / 'images'}"
    tag, env = tagged_env()
    workers = lambda parent: [p for p in processes_with(tag) if p != parent and b"spawn_main" in _cmdline(p)]
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "hcsc_jax.data.prepare", f"--source={source}",
                                 f"--out={out}", "--workers=2", "--overwrite"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not workers(proc.pid) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if workers(proc.pid) and proc.poll() is None:
            break
        proc.wait()
    assert workers(proc.pid), "no worker seen in 3 prepares"
    proc.kill()
    proc.wait()
    assert_no_process_left(tag)
    meta = prepare.prepare(source, "train", out, max_side=32)
    assert sorted(p.name for p in out.iterdir()) == sorted([meta["records"], "train.json"])


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


WORKER_SCRIPT = """
import multiprocessing, os, time
from hcsc_jax.data.prepare import die_with

def work(parent, ready):
    die_with(parent)
    ready.set()
    time.sleep(600)  # busy, as an encoding worker: never back at its queue

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    context.Process(target=work, args=(os.getpid(), ready)).start()
    ready.wait()
    print("ready", flush=True)
    time.sleep(600)
"""


def test_a_worker_past_its_start_dies_when_its_parent_is_sigkilled(tmp_path):
    """`die_with` after the worker's own check of its parent: the kernel's PR_SET_PDEATHSIG."""
    from test_stream_run import assert_no_process_left, tagged_env

    (tmp_path / "parent.py").write_text(WORKER_SCRIPT)
    tag, env = tagged_env()
    proc = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=dict(env, PYTHONPATH=ROOT))
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    assert_no_process_left(tag)
