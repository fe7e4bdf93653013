"""Times the streaming input path: host decode + random-resized crops, and device augmentation.

Writes --num_images JPEGs (ImageNet-like 500x375, quality 90) as an image folder in a temporary
directory, then measures images/s of `TrainStream` (decode once, crop every view, batch) with
1 worker and with all cores, and the jitted on-device `augment` of a (256, 224, 224, 3) batch.
"Per core" rates divide by the CPU time the process used (all threads), not by wall time x cores,
so they hold on a machine shared with other jobs.

  PYTHONPATH=. python benchmarks/input.py              # 2 x 224 views per image (MoCo v2)
  PYTHONPATH=. python benchmarks/input.py --multicrop  # 2 x 224 + 192/160/128/96 (HCSC multi-crop)
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from hcsc_jax.data import augmentations
from hcsc_jax.data.sources import open_source
from hcsc_jax.data.stream import CropSpec, TrainStream

flags.DEFINE_integer("num_images", 512, "JPEGs to generate")
flags.DEFINE_integer("width", 500, "image width")
flags.DEFINE_integer("height", 375, "image height")
flags.DEFINE_integer("quality", 90, "JPEG quality")
flags.DEFINE_integer("batch", 64, "host batch (images per step)")
flags.DEFINE_bool("multicrop", False, "2 x 224 + 192/160/128/96 local views instead of 2 x 224")
flags.DEFINE_integer("device_batch", 256, "views per on-device augment call")
flags.DEFINE_integer("device_runs", 5, "timed augment calls (after 2 warm-up calls)")
FLAGS = flags.FLAGS

GLOBAL = (CropSpec(224, (0.2, 1.0)),) * 2
LOCAL = tuple(CropSpec(s, sc) for s, sc in [(192, (0.172, 0.86)), (160, (0.143, 0.715)),
                                            (128, (0.114, 0.571)), (96, (0.086, 0.429))])


def write_folder(root: str, n: int, height: int, width: int, quality: int):
    """n smooth random JPEGs (JPEG-typical content, not noise) in 4 class folders."""
    rng = np.random.default_rng(0)
    for c in range(4):
        os.makedirs(os.path.join(root, f"class{c}"))
    for i in range(n):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        im.save(os.path.join(root, f"class{i % 4}", f"{i:06d}.jpg"), quality=quality)


def images_per_s(source, crops, batch, workers) -> tuple[float, float]:
    """(decoded images per wall second, per CPU second of this process) over one epoch, after
    a warm-up epoch (file cache). CPU time counts every thread, so the second is the rate one
    fully used core gives, also on a machine shared with other jobs."""
    stream = TrainStream(source, crops, batch, 0, process_index=0, process_count=1,
                         num_workers=workers)
    for _ in stream.epoch(0):
        pass
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in stream.epoch(1):
        pass
    n = stream.steps_per_epoch * batch
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def decode_per_s(source, n) -> float:
    """Decoded images per CPU second, one thread."""
    start = time.process_time()
    for i in range(n):
        source.load(i)
    return n / (time.process_time() - start)


def augment_ms(cfg, images, runs) -> float:
    fn = jax.jit(augmentations.augment, static_argnums=2)
    for i in range(2):
        jax.block_until_ready(fn(jax.random.key(i), images, cfg))
    times = []
    for i in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(jax.random.key(100 + i), images, cfg))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(_):
    cores = len(os.sched_getaffinity(0))
    crops = GLOBAL + (LOCAL if FLAGS.multicrop else ())
    print(f"host: {platform.processor() or platform.machine()}, {cores} cores; jax {jax.__version__} "
          f"on {jax.devices()[0].device_kind}")
    print(f"{FLAGS.num_images} JPEGs {FLAGS.width}x{FLAGS.height} q{FLAGS.quality}; views per image: "
          f"{' + '.join(str(c.size) for c in crops)}; host batch {FLAGS.batch}")
    with tempfile.TemporaryDirectory() as root:
        write_folder(root, FLAGS.num_images, FLAGS.height, FLAGS.width, FLAGS.quality)
        source = open_source(f"folder:{root}", "train")
        decode = decode_per_s(source, min(FLAGS.num_images, 128))
        print(f"  decode only, 1 thread: {decode:7.1f} images per CPU-s")
        per_core = {}
        for workers in sorted({1, cores}):
            rate, per_core[workers] = images_per_s(source, crops, FLAGS.batch, workers)
            print(f"  stream, {workers:2d} worker(s): {rate:7.1f} images/s wall "
                  f"({rate * len(crops):7.1f} views/s), {per_core[workers]:7.1f} images per CPU-s")

    images = np.random.default_rng(0).integers(0, 256, (FLAGS.device_batch, 224, 224, 3), np.uint8)
    images = jax.device_put(images)
    rows = [("AugmentConfig(224)", augmentations.AugmentConfig(224))]
    if "random_crop" in {f.name for f in dataclasses.fields(augmentations.AugmentConfig)}:
        rows.append(("AugmentConfig(224, random_crop=False)",
                     augmentations.AugmentConfig(224, random_crop=False)))
    else:
        print("  (AugmentConfig has no random_crop field yet: that row is skipped)")
    for name, cfg in rows:
        ms = augment_ms(cfg, images, FLAGS.device_runs)
        print(f"  device augment {name}, {FLAGS.device_batch} views: {ms:8.1f} ms median "
              f"({FLAGS.device_batch / ms * 1e3:8.1f} views/s)")
    print("summary:")
    for workers, rate in per_core.items():
        print(f"  {workers} worker(s): {rate:.1f} images/s per core (per CPU-s) -> cores needed "
              f"for 4,000 images/s: {4000 / rate:.1f}")


if __name__ == "__main__":
    app.run(main)
