"""Times the between-epoch prototype pass: embedding N images, then hierarchical k-means.

(a) Feature pass: `features.embed_dataset` of N synthetic uint8 images (32x32) through a ResNet-18
width 0.25 small-stem encoder (includes its jit compilation; --skip_features to leave it out).
(b) `hierarchical_kmeans` at the published settings (levels 3000/2000/1000, niter 20, nredo 5,
max_points_per_centroid 1000) of N synthetic unit-norm 128-d features with cluster structure, for
N and N * --small_fraction, and a linear extrapolation of the k-means time to --target_n. The "jax"
times include compiling for each shape.

  python benchmarks/clustering.py --backend=faiss
  python benchmarks/clustering.py --backend=jax --n=25000 --skip_features
"""

from __future__ import annotations

import datetime
import platform
import time
from unittest import mock

import faiss
import jax
import numpy as np
from absl import app, flags
from flax import nnx

from hcsc_jax import clustering, features, models, sharding
from hcsc_jax.models import make_encoder

flags.DEFINE_integer("n", 100_000, "N, samples to embed and cluster")
flags.DEFINE_float("small_fraction", 0.25, "the second, smaller N for the extrapolation, as a fraction of N")
flags.DEFINE_integer("target_n", 1_281_167, "N to extrapolate the k-means time to (ImageNet-1k)")
flags.DEFINE_enum("backend", "faiss", list(clustering.BACKENDS), "k-means backend")
flags.DEFINE_list("levels", ["3000", "2000", "1000"], "M_l per level")
flags.DEFINE_integer("dim", 128, "d")
flags.DEFINE_integer("niter", 20, "Lloyd iterations")
flags.DEFINE_integer("nredo", 5, "k-means restarts")
flags.DEFINE_integer("max_points_per_centroid", 1000, "faiss subsampling threshold")
flags.DEFINE_bool("skip_features", False, "do not time the feature pass")
FLAGS = flags.FLAGS

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_features(rng, n, dim, num_modes=5000):
    """(n, dim) float32 unit rows: noisy copies of num_modes random unit directions."""
    modes = rng.standard_normal((num_modes, dim)).astype(np.float32)
    x = modes[rng.integers(0, num_modes, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def time_features(n, image_size):
    """Seconds of `embed_dataset` over n random uint8 images (image_size^2 x 3), and (n, 128)."""
    model = make_encoder("resnet18", width=0.25, small_stem=True, rngs=nnx.Rngs(0))
    graphdef, params, stats = models.split_model(model)
    images = np.random.default_rng(0).integers(0, 256, (n, image_size, image_size, 3), np.uint8)
    start = time.perf_counter()
    _, proj = features.embed_dataset(graphdef, params, stats, images, image_size, IMAGENET_MEAN,
                                    IMAGENET_STD, sharding.make_mesh())
    return time.perf_counter() - start, proj


def time_kmeans(x, sizes, backend):
    """-> seconds of each level's k-means (including its members' assignment), and in total."""
    backend = clustering.resolve_backend(backend)
    per_level, kmeans = [], clustering.KMEANS[backend]

    def timed(*args, **kw):
        start = time.perf_counter()
        out = kmeans(*args, **kw)
        per_level.append(time.perf_counter() - start)
        return out

    start = time.perf_counter()
    with mock.patch.dict(clustering.KMEANS, {backend: timed}):
        clustering.hierarchical_kmeans(
            x, sizes, niter=FLAGS.niter, nredo=FLAGS.nredo, seed=0,
            max_points_per_centroid=FLAGS.max_points_per_centroid, backend=backend)
    return per_level, time.perf_counter() - start


def main(_):
    sizes = [int(m) for m in FLAGS.levels]
    print(f"{datetime.date.today()} jax {jax.__version__} faiss {faiss.__version__} numpy {np.__version__} "
          f"on {jax.devices()[0].device_kind} x{jax.device_count()} "
          f"({platform.processor() or platform.machine()}), faiss threads {faiss.omp_get_max_threads()}")
    print(f"levels={sizes} niter={FLAGS.niter} nredo={FLAGS.nredo} "
          f"max_points_per_centroid={FLAGS.max_points_per_centroid} d={FLAGS.dim} backend={FLAGS.backend}")
    feat_s = None
    if not FLAGS.skip_features:
        feat_s, proj = time_features(FLAGS.n, 32)
        print(f"features: N={FLAGS.n} ResNet-18 w0.25 32x32 -> {proj.shape}: {feat_s:.1f} s (with compile)")
    rng = np.random.default_rng(0)
    points = []
    for n in (int(FLAGS.n * FLAGS.small_fraction), FLAGS.n):
        per_level, total = time_kmeans(synthetic_features(rng, n, FLAGS.dim), sizes, FLAGS.backend)
        points.append((n, total))
        print(f"k-means N={n:>9,} backend={FLAGS.backend}: level 1 {per_level[0]:7.1f} s, "
              f"upper levels {sum(per_level[1:]):6.1f} s, total {total:7.1f} s")
    (n0, t0), (n1, t1) = points
    slope = (t1 - t0) / (n1 - n0)
    target = t1 + slope * (FLAGS.target_n - n1)
    print(f"summary: N={FLAGS.n} backend={FLAGS.backend} features "
          f"{'skipped' if feat_s is None else f'{feat_s:.1f} s'}, k-means total {t1:.1f} s; "
          f"linear extrapolation to N={FLAGS.target_n:,}: {target:.0f} s k-means per epoch "
          f"(assumes time = a + b*N: level 1 is O(N * M_1 * d) per iteration, upper levels are "
          f"independent of N, no subsampling below N = M_1 * max_points_per_centroid)")


if __name__ == "__main__":
    app.run(main)
