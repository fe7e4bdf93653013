"""The inference-mode feature pass: every image of a split through an encoder, once.

Used by the clustering between epochs (key encoder projections) and by every evaluator (pooled
features). Batches come from a `data.pipeline` input (`center_crops`): resident images are
center-cropped on the devices, streamed ones on the hosts (resize 256 -> crop 224 at 224 px,
`crops.center_crop_geometry`), each process decoding only its share; the batch is sharded over
all devices of all processes and the outputs are gathered to every host. Host memory: N x F
float32 per process (1.28M x 2048 = 10.5 GB for ImageNet's train split with a ResNet-50, plus
N x 128 for the projection).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from hcsc_jax import clustering, distributed, models, sharding
from hcsc_jax.data import augmentations, pipeline
from hcsc_jax.run import workdir as workdir_lib

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def embed_fn(graphdef, crop: int, mean: tuple, std: tuple):
    """jitted (params, stats, `Images`) -> (pooled, projection), inference mode, center crop
    (taken on the host already when the images are `cropped`): the feature pass's one function."""

    @jax.jit
    def embed(params, stats, images):
        (x,) = images.views
        x = (augmentations.normalize(x, mean, std) if images.cropped
             else augmentations.center_crop(x, crop, mean, std))
        feats, proj, _ = models.apply_model(graphdef, params, stats, x, train=False)
        return feats, proj

    return embed


def embed_batches(graphdef, params, stats, batches, n: int, crop, mean, std, progress: str | None = None):
    """Inference-mode features of `batches` of (`Images` sharded, indices (b,), valid (b,)) that
    cover indices 0..n-1 -> (pooled (N, F), projection (N, d)) on the host of every process.
    `progress`: the description of a progress bar (images/s, ETA) on process 0, None for none."""
    embed = embed_fn(graphdef, crop, tuple(mean), tuple(std))
    feats = projs = None
    bar = tqdm(total=n, desc=progress, unit="img", unit_scale=True, dynamic_ncols=True, leave=False,
               disable=progress is None or not distributed.is_main())
    for images, idx, valid in batches:
        f, p = embed(params, stats, images)
        f, p = sharding.to_host(f)[valid], sharding.to_host(p)[valid]
        if feats is None:
            feats, projs = np.zeros((n, f.shape[1]), f.dtype), np.zeros((n, p.shape[1]), p.dtype)
        feats[idx[valid]], projs[idx[valid]] = f, p
        bar.update(int(valid.sum()))
    bar.close()
    return feats, projs


def embed_dataset(graphdef, params, stats, images, crop, mean, std, mesh, batch=256):
    """Inference-mode pass over uint8 images (N, H, W, C) (center crop on the device) -> (pooled
    (N, F), projection (N, d)), batches sharded over the mesh, results on every host."""
    batches = pipeline.array_batches(images, mesh, batch)
    return embed_batches(graphdef, params, stats, batches, len(images), crop, mean, std)


def embed_input(graphdef, params, stats, data, crop, mean, std, batch=256, progress: str | None = None):
    """`embed_dataset` of a `pipeline` input (resident or streamed)."""
    return embed_batches(graphdef, params, stats, data.center_crops(crop, batch), data.num_examples,
                         crop, mean, std, progress)


def key_hierarchy(graphdef, params, stats, data, crop: int, mean_std: tuple, clustering_config, seed: int,
                  num_clusters=None, mesh=None, batch: int = 256) -> clustering.Hierarchy:
    """The hierarchy (`clustering.cluster_from_config`: the levels `num_clusters`, else those of
    `clustering_config`, its settings, `seed`) of an encoder's projections of the center crops of
    the `pipeline` input `data`: the training's hierarchy of each epoch (of the key encoder) and
    the summary's final one."""
    _, proj = embed_input(graphdef, params, stats, data, crop, *mean_std, batch)
    return clustering.cluster_from_config(clustering_config, proj, seed, num_clusters, mesh)


def weights_digest(*trees) -> str:
    """SHA-256 of the bytes (and shapes, dtypes, tree paths) of every array in `trees`: the
    identity of an encoder's weights, e.g. for a feature cache."""
    h = hashlib.sha256()
    for tree in trees:
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            a = np.ascontiguousarray(sharding.to_host(leaf) if isinstance(leaf, jax.Array)
                                     else np.asarray(leaf))
            h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def cached(path, key: dict, compute, rows: int | None = None) -> np.ndarray:
    """`compute()` (an array), saved to / read from the .npz `path` (an epath, local or a bucket)
    under `key` (a JSON-able dict naming everything the array depends on); a file with another key
    is recomputed and replaced. A file that cannot be what was saved (not an .npz, cut, without
    its arrays, not `rows` rows of finite floats) is set aside as `<path>.bad` with one warning and
    recomputed. `path` None: no cache. Process 0 writes; with several processes every process
    computes (they all take part in the sharded pass)."""
    if path is not None and jax.process_count() == 1 and path.exists():
        array, problem = _read_cache(path, key, rows)
        if array is not None:
            log.info("features from %s", path)
            return array
        if problem:
            log.warning("feature cache %s is unreadable (%s): set aside as %s.bad, computing the features "
                        "again", path, problem, path.name)
            try:
                path.replace(path.with_name(path.name + ".bad"))
            except OSError:
                pass  # (replaced below)
    t0 = time.perf_counter()
    array = compute()
    log.info("computed %s in %.1fs", path.name if path is not None else "features", time.perf_counter() - t0)
    if path is not None and distributed.is_main():  # atomic: concurrent evals of one step may share `path`
        workdir_lib.save_npz(path, dict(array=array, key=np.asarray(json.dumps(key))))
    return array


def _read_cache(path, key: dict, rows: int | None) -> tuple[np.ndarray | None, str | None]:
    """-> (the cached array, None) when `path` holds `key`'s; (None, None) for another key's;
    (None, what is wrong) for a file that is not a whole cache."""
    try:
        z = workdir_lib.load_npz(path)
        saved_key, array = json.loads(str(z["key"])), z["array"]
    except KeyError as err:
        return None, f"no array {err}"
    except Exception as err:  # noqa: BLE001 - a cut or foreign file: zipfile, EOF, pickle, JSON, OS errors
        return None, f"{type(err).__name__}: {err}"
    if saved_key != key:
        return None, None
    if array.ndim != 2 or array.dtype.kind != "f" or (rows is not None and len(array) != rows):
        return None, f"{array.dtype} {array.shape}, not {rows if rows is not None else 'N'} rows of features"
    if not np.isfinite(array).all():
        return None, "not finite"
    return array, None
