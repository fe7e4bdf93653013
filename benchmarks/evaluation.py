"""Times the evaluation at ImageNet scale: the feature pass and kNN over 1.28M x 2048 features.

(a) Feature pass: `features.embed_input` of a streamed image folder (generated ImageNet-like
    500x375 JPEGs, `benchmarks/input.write_folder`) through a ResNet-50 at 224 px (resize 256 ->
    center crop 224 on the host, the model in inference mode): images/s of the whole pass.
(b) kNN: `evaluators.knn.knn_scores` of --queries synthetic test features against --train
    synthetic training features (F = 2048, k = 10/20/100/200); the time is linear in the number of
    queries, so it is also given scaled to ImageNet's 50,000 validation images.

  python benchmarks/evaluation.py                      # both, full size
  python benchmarks/evaluation.py --train=100000 --skip_embed
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from hcsc_jax import features, sharding
from hcsc_jax.data import pipeline
from hcsc_jax.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from hcsc_jax.evaluators import knn
from hcsc_jax.models import make_encoder

if not __package__:  # run as a script (python benchmarks/x.py): the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.input import write_folder  # noqa: E402

flags.DEFINE_integer("images", 128, "JPEGs embedded in (a)")
flags.DEFINE_integer("embed_batch", 64, "feature-pass batch")
flags.DEFINE_integer("train", 1_281_167, "training features in (b)")
flags.DEFINE_integer("queries", 512, "test features timed in (b)")
flags.DEFINE_integer("dim", 2048, "feature dimension")
flags.DEFINE_integer("train_chunk", 16384, "kNN training rows per chunk")
flags.DEFINE_bool("skip_embed", False, "only (b)")
FLAGS = flags.FLAGS


def embed_rate() -> float:
    """Images/s of a ResNet-50 feature pass over a streamed generated folder (after a warm-up pass)."""
    from flax import nnx

    with tempfile.TemporaryDirectory() as root:
        write_folder(root, FLAGS.images, 375, 500, 90)
        mesh = sharding.make_mesh()
        data = pipeline.open_input("stream", f"folder:{root}", "train", None, mesh, FLAGS.embed_batch, 0)
        graphdef, params, stats = nnx.split(make_encoder("resnet50", rngs=nnx.Rngs(0)), nnx.Param,
                                            nnx.BatchStat)
        run = lambda: features.embed_input(graphdef, params, stats, data, 224, IMAGENET_MEAN, IMAGENET_STD,
                                           FLAGS.embed_batch)
        run()
        t0 = time.perf_counter()
        run()
        return FLAGS.images / (time.perf_counter() - t0)


def knn_seconds() -> float:
    """Seconds of one kNN pass of --queries test rows over --train synthetic training rows."""
    rng = np.random.default_rng(0)
    train = np.empty((FLAGS.train, FLAGS.dim), np.float32)
    for s in range(0, FLAGS.train, 65536):
        train[s:s + 65536] = rng.standard_normal((min(65536, FLAGS.train - s), FLAGS.dim), np.float32)
    labels = rng.integers(0, 1000, FLAGS.train).astype(np.int32)
    test = rng.standard_normal((FLAGS.queries, FLAGS.dim), np.float32)
    run = lambda q: knn.knn_scores(train, labels, q, ks=knn.KS, num_classes=1000,
                                   train_chunk=FLAGS.train_chunk)
    run(test[:8])  # compile (the chunk shapes are those of the timed run)
    t0 = time.perf_counter()
    run(test)
    return time.perf_counter() - t0


def main(argv):
    del argv
    print(f"{datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} devices)")
    if not FLAGS.skip_embed:
        print(f"(a) ResNet-50 feature pass, 224 px, streamed JPEGs: {embed_rate():.1f} images/s")
    sec = knn_seconds()
    print(f"(b) kNN of {FLAGS.queries} queries over {FLAGS.train} x {FLAGS.dim} features: {sec:.1f} s "
          f"({sec / FLAGS.queries * 50_000 / 60:.1f} min scaled to 50,000 queries)")


if __name__ == "__main__":
    app.run(main)
