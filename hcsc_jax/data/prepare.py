"""Writes a resized ArrayRecord copy of a dataset split, for hosts that cannot decode the
originals as fast as the accelerators train (FFCV's idea: small JPEGs decode several times faster).

  python -m hcsc_jax.data.prepare --source=folder:/data/imagenet --split=train \\
      --out=/data/imagenet_256 --max_side=256 --quality=90

Each image is decoded, its longest side capped at `max_side` (Pillow's antialiased bilinear,
aspect ratio kept; smaller images are kept as they are), and re-encoded: JPEG at `quality` for
color data, PNG (lossless) for gray-level data. The images go to `<out>/<split>.<token>.array_record`
in the original order, then labels, class names, file names, the settings and the name and size
of that file to `<out>/<split>.json` in one rename: a split is there whole or not at all, and its
description always names the images written with it (`sources/prepared.py` checks both on open).
Train on it with `--config.dataset=prepared:/data/imagenet_256`.

One writer per split: `<out>/<split>.prepare.lock` (process id and host, as a run's `run.lock`)
refuses a second one in one line. Run again on a split already there, the command keeps it when
it was made from the same source, settings and examples, unchanged since (the files' sizes and
modification times for an image folder, a digest of 16 decoded images for every source), and says
so (exit status 0); it refuses in one line naming what differs or changed, and writes it again with
`--overwrite`. Files of a run killed before its
end (records no description names, temporary files) are removed by the next run on that split.
The work is spread over `--workers` processes, which die with the command (Linux: they ask the
kernel for SIGKILL when it does; elsewhere they exit once they see it gone); an image that
cannot be decoded stops the run naming it (nothing is left behind). Errors: one line, status 2.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import secrets
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from absl import app, flags
from etils import epath
from PIL import Image

from hcsc_jax.data.sources import open_source
from hcsc_jax.data.sources.prepared import FORMAT, PreparedSource, meta_path, records_name
from hcsc_jax.run import console
from hcsc_jax.run import workdir as workdir_lib

__all__ = ["encode", "prepare"]

# What a kept copy must share with the one asked for: the settings and the examples.
SAME = ("source", "split", "max_side", "quality", "num_examples", "channels", "labels", "num_classes",
        "class_names", "file_names")
# ... and the source's content as it was: its files' sizes and modification times (image folders)
# and a digest of SAMPLE decoded examples (every source): `_changed_since`.
SAMPLE = 16


def encode(image, max_side: int, quality: int) -> bytes:
    """(H, W, C) uint8 -> JPEG (C = 3) or PNG (C = 1) bytes, the longest side capped at max_side."""
    im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    out = io.BytesIO()
    if image.shape[-1] == 1:
        im.save(out, format="PNG")
    else:
        im.save(out, format="JPEG", quality=quality)
    return out.getvalue()


_SOURCE = {}


def die_with(parent: int) -> None:
    """Makes this (worker) process die when process `parent` does: Linux's PR_SET_PDEATHSIG
    (SIGKILL when the parent exits), then an exit now if the parent is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _open(name: str, split: str, data_dir, parent: int):
    die_with(parent)
    _SOURCE["source"] = open_source(name, split, data_dir)


def _encode_range(start: int, stop: int, max_side: int, quality: int) -> list[bytes]:
    source = _SOURCE["source"]
    return [encode(source.load(i), max_side, quality) for i in range(start, stop)]


def _sample_digest(source, count: int = SAMPLE) -> str:
    """SHA-256 of `count` decoded examples spread evenly over the source (the first and the last
    included), with their shapes: what changes with the pixels, whatever the source."""
    n, digest = source.num_examples, hashlib.sha256()
    for i in np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int)):
        image = np.ascontiguousarray(source.load(int(i)))
        digest.update(repr(image.shape).encode() + image.tobytes())
    return digest.hexdigest()


def _description(name: str, split: str, source, max_side: int, quality: int) -> dict:
    labels = source.labels
    stamps = getattr(source, "stamps", None)
    return dict(format=FORMAT, source=name, split=split, num_examples=source.num_examples,
                sample_digest=_sample_digest(source), file_stamps=stamps() if stamps else None,
                channels=source.channels, labels=None if labels is None else [int(x) for x in labels],
                num_classes=source.num_classes,
                class_names=None if source.class_names is None else list(source.class_names),
                file_names=None if source.file_names is None else list(source.file_names),
                max_side=max_side, quality=quality, encoding="png" if source.channels == 1 else "jpeg")


def _remove_leftovers(out: epath.Path, split: str, keep: str | None) -> None:
    """Removes `split`'s records files other than `keep` (none of them is named by its description)
    and its temporary files: what a killed run, or the copy just replaced, left."""
    records = re.compile(re.escape(split) + r"(\.[0-9a-f]{12})?\.array_record")
    for p in out.iterdir():
        if p.name != keep and (records.fullmatch(p.name) or p.name in (f"{split}.json.tmp",
                                                                        f"{split}.array_record.tmp")):
            p.unlink(missing_ok=True)


def _kept(out: epath.Path, split: str, want: dict) -> dict | None:
    """The description of the copy of `split` already in `out` when it is kept (see the module
    doc), None when there is none; ValueError when it differs from `want` or fails its checks."""
    if not meta_path(out, split).exists():
        return None
    have = PreparedSource(os.fspath(out), split).meta  # checked against it (DataError, one line)
    differ = [k for k in SAME if have.get(k) != want[k]]
    if differ:
        show = lambda v: f"{len(v)} entries" if isinstance(v, list) else repr(v)
        diffs = ", ".join(f"{k}: {show(have.get(k))} -> {show(want[k])}" for k in differ)
        raise ValueError(f"{os.fspath(meta_path(out, split))} holds a copy made otherwise ({diffs}); pass "
                         "--overwrite to write it again, or another --out")
    stale = _changed_since(have, want)
    if stale:
        raise ValueError(f"{os.fspath(meta_path(out, split))} holds a copy of {want['source']}:{split} as it "
                         f"was, but {stale}; pass --overwrite to write it again, or another --out")
    return have


def _changed_since(have: dict, want: dict) -> str | None:
    """What changed in the source since the copy `have` was made (None: nothing that its file stamps
    and sample digest see; a copy made before they were recorded is not compared)."""
    if have.get("file_stamps") is not None and want["file_stamps"] is not None:
        changed = [name for name, a, b in zip(want["file_names"], have["file_stamps"], want["file_stamps"])
                   if a != b]
        if changed:
            more = f" (+{len(changed) - 5} more)" if len(changed) > 5 else ""
            return (f"{len(changed)} of its files changed since (size or modification time): "
                    f"{', '.join(changed[:5])}{more}")
    if have.get("sample_digest") not in (None, want["sample_digest"]):
        return f"its images differ from those the copy was made from (a sample of {SAMPLE} decoded)"
    return None


def prepare(name: str, split: str, out, *, data_dir=None, max_side: int = 256, quality: int = 90,
            workers: int = 1, chunk: int = 256, overwrite: bool = False) -> dict:
    """Writes the copy (see the module doc) -> its description, with `reused` True when the copy
    already in `out` was kept (nothing written)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if max_side < 1 or not 1 <= quality <= 100 or workers < 1:
        raise ValueError(f"need max_side >= 1, quality in [1, 100], workers >= 1; got {max_side}, {quality}, "
                         f"{workers}")
    source = open_source(name, split, data_dir)
    want = _description(name, split, source, max_side, quality)
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with workdir_lib.locked(out, name=f"{split}.prepare.lock", flag="--out"):
        committed = meta_path(out, split)
        if not overwrite:
            have = _kept(out, split, want)
            if have is not None:
                _remove_leftovers(out, split, records_name(have, split))
                return dict(have, reused=True)
        records = out / f"{split}.{secrets.token_hex(6)}.array_record"
        n = source.num_examples
        writer = ArrayRecordWriter(os.fspath(records), "group_size:1")
        try:
            ranges = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
            with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=_open,
                                     initargs=(name, split, data_dir, os.getpid())) as pool:
                done = 0
                for encoded in pool.map(_encode_range, *zip(*ranges), [max_side] * len(ranges),
                                        [quality] * len(ranges)):
                    for data in encoded:
                        writer.write(data)
                    done += len(encoded)
                    print(f"\r{done}/{n} images", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
        except BaseException:
            writer.close()
            records.unlink(missing_ok=True)
            raise
        writer.close()
        meta = dict(want, records=records.name, records_bytes=records.stat().length)
        workdir_lib.write_atomic(committed, json.dumps(meta))  # the commit: one rename
        _remove_leftovers(out, split, records.name)  # the records of the copy replaced, if any
    return dict(meta, reused=False)


flags.DEFINE_string("source", None, "dataset to copy, e.g. folder:/data/imagenet or tfds:imagenet2012")
flags.DEFINE_string("split", "train", "split to copy")
flags.DEFINE_string("out", None, "output directory (local or a bucket)")
flags.DEFINE_string("data_dir", None, "data_dir of the source (TFDS, relative folders)")
flags.DEFINE_integer("max_side", 256, "cap on the longest side, in pixels")
flags.DEFINE_integer("quality", 90, "JPEG quality of color images")
flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 2) - 1), "encoding processes")
flags.DEFINE_boolean("overwrite", False, "write the split again when --out already holds it")
FLAGS = flags.FLAGS


def main(argv):
    if not FLAGS.source or not FLAGS.out:
        console.usage_error("--source and --out are required (--help lists the flags)")
    try:
        meta = prepare(FLAGS.source, FLAGS.split, FLAGS.out, data_dir=FLAGS.data_dir, max_side=FLAGS.max_side,
                       quality=FLAGS.quality, workers=FLAGS.workers, overwrite=FLAGS.overwrite)
    except (ValueError, OSError) as e:  # (DecodeError, a lock held: WorkdirError)
        console.usage_error(e)
    if meta["reused"]:
        print(f"{FLAGS.out} already holds {FLAGS.source}:{FLAGS.split} prepared with these settings "
              f"({meta['num_examples']} images); nothing to do (--overwrite writes it again)")
        return
    print(f"wrote {meta['num_examples']} images of {FLAGS.source}:{FLAGS.split} to {FLAGS.out} "
          f"(longest side <= {FLAGS.max_side}, {meta['encoding']}); train with "
          f"--config.dataset=prepared:{FLAGS.out}")


if __name__ == "__main__":
    app.run(main, flags_parser=console.parse_flags)
