"""Host input rate: the loader's worker processes against a PyTorch-DataLoader-like reference.

Writes --num_images JPEGs (ImageNet-like 500x375, quality 90) as an image folder in a temporary
directory, then, for 1, 2, 4, ... worker processes up to all cores:

- "stream": `data.loader.train_batches` (decode with libjpeg-turbo, two random-resized 224
  crops per image, batches in shared memory), the whole epoch's wall time after the workers
  started (their start-up is printed apart);
- "reference": the same images through a `multiprocessing.Pool` of as many processes, each
  doing what a torchvision DataLoader worker does for MoCo v2's crops: Pillow decode + two
  RandomResizedCrop(224) (Pillow crop + antialiased bilinear resize) + a random flip. It returns
  a checksum, not the pixels (no transfer cost: this favors the reference).

With --prepared it also times the same loader on a `python -m hcsc_jax.data.prepare` copy
(longest side --max_side), and --device_batch > 0 times the on-device augmentation.

  python benchmarks/input.py                    # all worker counts
  python benchmarks/input.py --workers=1 --resampling=antialias --prepared
"""

from __future__ import annotations

import io
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from hcsc_jax.data import crops, loader
from hcsc_jax.data.crops import CropSpec
from hcsc_jax.data.sources import open_source

if not __package__:  # run as a script (python benchmarks/x.py): the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.jpegs import write_folder  # noqa: E402

flags.DEFINE_integer("num_images", 768, "JPEGs to generate")
flags.DEFINE_integer("width", 500, "image width")
flags.DEFINE_integer("height", 375, "image height")
flags.DEFINE_integer("quality", 90, "JPEG quality")
flags.DEFINE_integer("batch", 64, "host batch (images per step)")
flags.DEFINE_list("workers", [], "worker counts (default 1, 2, 4, ... up to all cores)")
flags.DEFINE_enum("resampling", "linear", crops.RESAMPLING, "host crop filter")
flags.DEFINE_bool("multicrop", False, "2 x 224 + 192/160/128/96 local views instead of 2 x 224")
flags.DEFINE_bool("prepared", False, "also time a prepared copy (python -m hcsc_jax.data.prepare)")
flags.DEFINE_integer("max_side", 256, "longest side of the prepared copy")
flags.DEFINE_integer("device_batch", 0, "views per timed on-device augment call (0: skip)")
FLAGS = flags.FLAGS

GLOBAL = (CropSpec(224, (0.2, 1.0)),) * 2
LOCAL = tuple(CropSpec(s, sc) for s, sc in [(192, (0.172, 0.86)), (160, (0.143, 0.715)),
                                            (128, (0.114, 0.571)), (96, (0.086, 0.429))])


def stream_rate(source, views, batch, workers, resampling) -> tuple[float, float]:
    """(images/s wall over one epoch after the workers started, start-up seconds)."""
    spe = source.num_examples // batch
    start = time.perf_counter()
    it = loader.train_batches(source, views, batch, 0, spe, 0, 0, num_workers=workers, prefetch=2,
                              resampling=resampling)
    next(it)
    first = time.perf_counter()
    for _ in range(spe):
        next(it)
    rate = spe * batch / (time.perf_counter() - first)
    it.close()
    return rate, first - start


def decode_rates(paths: list[str]) -> tuple[float, float]:
    """(libjpeg-turbo through `decode.decode`, Pillow as torchvision's loader opens an image):
    images decoded per CPU-second of one thread."""
    from hcsc_jax.data import decode

    data = [open(p, "rb").read() for p in paths]  # noqa: SIM115

    def rate(fn) -> float:
        start = time.process_time()
        for d in data:
            fn(d)
        return len(data) / (time.process_time() - start)

    return rate(decode.decode), rate(lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")))


def _reference_one(path: str) -> int:
    """torchvision's MoCo v2 crops on a PIL image: decode, 2 x RandomResizedCrop(224) + flip."""
    rng = np.random.default_rng(abs(hash(path)) % 2**32)
    with Image.open(path) as im:
        im = im.convert("RGB")
        total = 0
        for _ in range(2):
            top, left, h, w = crops.crop_box(rng.random(crops.CROP_UNIFORMS), im.height, im.width,
                                             (0.2, 1.0), (3 / 4, 4 / 3))
            view = im.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
            if rng.random() < 0.5:
                view = view.transpose(Image.FLIP_LEFT_RIGHT)
            total += int(np.asarray(view)[0, 0, 0])
    return total


def reference_rate(paths: list[str], workers: int) -> float:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_reference_one, paths[:workers * 4])  # warm: processes started, files cached
        start = time.perf_counter()
        pool.map(_reference_one, paths, chunksize=8)
        return len(paths) / (time.perf_counter() - start)


def augment_ms(batch: int) -> float:
    import jax

    from hcsc_jax.data import augmentations

    cfg = augmentations.AugmentConfig(224, random_crop=False)
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), np.uint8))
    fn = jax.jit(augmentations.augment, static_argnums=2)
    for i in range(2):
        jax.block_until_ready(fn(jax.random.key(i), images, cfg))
    times = []
    for i in range(5):
        start = time.perf_counter()
        jax.block_until_ready(fn(jax.random.key(100 + i), images, cfg))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv):
    del argv
    cores = len(os.sched_getaffinity(0))
    counts = [int(w) for w in FLAGS.workers] or sorted({2 ** k for k in range(cores.bit_length())
                                                        if 2 ** k <= cores} | {cores})
    views = GLOBAL + (LOCAL if FLAGS.multicrop else ())
    print(f"host: {platform.processor() or platform.machine()}, {cores} cores; {FLAGS.num_images} JPEGs "
          f"{FLAGS.width}x{FLAGS.height} q{FLAGS.quality}; views {' + '.join(str(c.size) for c in views)}; "
          f"batch {FLAGS.batch}; resampling {FLAGS.resampling}; {time.strftime('%Y-%m-%d')}")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        write_folder(os.path.join(root, "jpeg"), FLAGS.num_images, FLAGS.height, FLAGS.width, FLAGS.quality)
        source = open_source(f"folder:{os.path.join(root, 'jpeg')}", "train")
        turbo, pillow = decode_rates(list(source.paths[:256]))
        print(f"decode only, one thread: libjpeg-turbo (simplejpeg) {turbo:.1f}, Pillow {pillow:.1f} images "
              "per CPU-second", flush=True)
        for workers in counts:
            rate, startup = stream_rate(source, views, FLAGS.batch, workers, FLAGS.resampling)
            ref = reference_rate(list(source.paths), workers)
            rows.append((workers, rate, ref))
            efficiency = rate / (workers * rows[0][1] / rows[0][0])
            print(f"stream, {workers} worker(s): {rate:.1f} images/s wall, scaling efficiency "
                  f"{efficiency:.2f} (start-up {startup:.1f} s); reference: {ref:.1f} images/s wall; "
                  f"stream / reference {rate / ref:.2f}", flush=True)
        if FLAGS.prepared:  # the command a user runs
            out = os.path.join(root, "prepared")
            subprocess.run([sys.executable, "-m", "hcsc_jax.data.prepare", f"--source=folder:{root}/jpeg",
                            f"--out={out}", f"--max_side={FLAGS.max_side}"], check=True, capture_output=True)
            prepared = open_source(f"prepared:{out}", "train")
            for workers in counts:
                rate, _ = stream_rate(prepared, views, FLAGS.batch, workers, FLAGS.resampling)
                print(f"prepared (max side {FLAGS.max_side}), {workers} worker(s): {rate:.1f} images/s wall",
                      flush=True)
    if FLAGS.device_batch:
        ms = augment_ms(FLAGS.device_batch)
        print(f"device augment (flip + photometric), {FLAGS.device_batch} views: {ms:.1f} ms "
              f"({FLAGS.device_batch / ms * 1e3:.0f} views/s)")
    one = rows[0][1] / rows[0][0]
    print("summary: workers | stream images/s | scaling efficiency (rate / (workers x 1-worker rate)) | "
          "reference images/s | stream / reference")
    for workers, rate, ref in rows:
        efficiency = rate / (workers * one)
        print(f"  {workers:3d} | {rate:8.1f} | {efficiency:5.2f} | {ref:8.1f} | {rate / ref:5.2f}")


if __name__ == "__main__":
    app.run(main)
