"""Writes a resized ArrayRecord copy of a dataset split, for hosts that cannot decode the
originals as fast as the accelerators train (FFCV's idea: small JPEGs decode several times faster).

  python -m hcsc_jax.data.prepare --source=folder:/data/imagenet --split=train \\
      --out=/data/imagenet_256 --max_side=256 --quality=90

Each image is decoded, its longest side capped at `max_side` (Pillow's antialiased bilinear,
aspect ratio kept; smaller images are kept as they are), and re-encoded: JPEG at `quality` for
color data, PNG (lossless) for gray-level data. Labels, class names, file names and the settings
go to `<out>/<split>.json`, the images to `<out>/<split>.array_record` in the original order.
Train on it with `--config.dataset=prepared:/data/imagenet_256` (see `sources/prepared.py`).
The work is spread over `--workers` processes; an image that cannot be decoded stops the run
naming it (nothing is left behind: both files are written under temporary names first).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from absl import app, flags
from etils import epath
from PIL import Image

from hcsc_jax.data import decode
from hcsc_jax.data.sources import open_source
from hcsc_jax.data.sources.prepared import FORMAT, paths

__all__ = ["encode", "prepare"]


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


def _open(name: str, split: str, data_dir):
    _SOURCE["source"] = open_source(name, split, data_dir)


def _encode_range(start: int, stop: int, max_side: int, quality: int) -> list[bytes]:
    source = _SOURCE["source"]
    return [encode(source.load(i), max_side, quality) for i in range(start, stop)]


def prepare(name: str, split: str, out, *, data_dir=None, max_side: int = 256, quality: int = 90,
            workers: int = 1, chunk: int = 256) -> dict:
    """Writes the copy (see the module doc) -> its metadata."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if max_side < 1 or not 1 <= quality <= 100 or workers < 1:
        raise ValueError(f"need max_side >= 1, quality in [1, 100], workers >= 1; got {max_side}, {quality}, "
                         f"{workers}")
    source = open_source(name, split, data_dir)
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, meta_path = paths(out, split)
    tmp_records = records.with_name(records.name + ".tmp")
    n = source.num_examples
    writer = ArrayRecordWriter(os.fspath(tmp_records), "group_size:1")
    try:
        ranges = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=_open,
                                 initargs=(name, split, data_dir)) as pool:
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
        tmp_records.unlink(missing_ok=True)
        raise
    writer.close()
    labels = source.labels
    meta = dict(format=FORMAT, source=name, split=split, num_examples=n, channels=source.channels,
                labels=None if labels is None else [int(x) for x in labels], num_classes=source.num_classes,
                class_names=None if source.class_names is None else list(source.class_names),
                file_names=None if source.file_names is None else list(source.file_names),
                max_side=max_side, quality=quality, encoding="png" if source.channels == 1 else "jpeg")
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta))
    tmp_records.rename(records)
    tmp_meta.rename(meta_path)
    return meta


flags.DEFINE_string("source", None, "dataset to copy, e.g. folder:/data/imagenet or tfds:imagenet2012")
flags.DEFINE_string("split", "train", "split to copy")
flags.DEFINE_string("out", None, "output directory (local or a bucket)")
flags.DEFINE_string("data_dir", None, "data_dir of the source (TFDS, relative folders)")
flags.DEFINE_integer("max_side", 256, "cap on the longest side, in pixels")
flags.DEFINE_integer("quality", 90, "JPEG quality of color images")
flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 2) - 1), "encoding processes")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.source or not FLAGS.out:
        raise app.UsageError("--source and --out are required")
    try:
        meta = prepare(FLAGS.source, FLAGS.split, FLAGS.out, data_dir=FLAGS.data_dir, max_side=FLAGS.max_side,
                       quality=FLAGS.quality, workers=FLAGS.workers)
    except (ValueError, FileNotFoundError, decode.DecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {meta['num_examples']} images of {FLAGS.source}:{FLAGS.split} to {FLAGS.out} "
          f"(longest side <= {FLAGS.max_side}, {meta['encoding']}); train with "
          f"--config.dataset=prepared:{FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
