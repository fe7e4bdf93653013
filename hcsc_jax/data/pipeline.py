"""Where the train step's images come from: resident on the devices, or streamed from the host.

Both inputs visit `stream.epoch_permutation(seed, epoch, N)` in order, `global_batch` examples per
step, and can start an epoch at any step (resume). `steps(epoch, start, assignments)` yields
what a step takes, `(images, labels)`, batch-sharded (see `train_step.jit_train_step`): the
global batch's images and its rows of `assignments` (N, L). `center_crops(crop, batch)` yields
the batches of the clustering / evaluation feature pass: (images batch-sharded, indices (b,),
valid (b,)) with every index once, in order.

- `ResidentInput`: the decoded dataset is replicated on every device (digits, Fashion-MNIST,
  CIFAR); a step's images are the whole images (B, H, W, C), gathered on the devices, and every
  view is cropped on the device.
- `StreamInput`: each process decodes its share of every batch and takes the random-resized
  crops on the host (`stream.TrainStream`); a step's images are the tuple of views, and the
  flip and photometric ops run on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import numpy as np

from hcsc_jax import sharding
from hcsc_jax.data import sources
from hcsc_jax.data import stream as stream_lib
from hcsc_jax.data.sources import ArrayDataset, RandomAccessSource


def open_input(pipeline: str, dataset: str, split: str, data_dir, mesh, global_batch: int, seed: int,
               crops: tuple[stream_lib.CropSpec, ...] = (), num_workers: int | None = None, prefetch: int = 2,
               indices=None):
    """One split as a `ResidentInput` ("memory") or a `StreamInput` ("stream"), restricted to the
    examples `indices` when given. `crops` (stream): the host's random-resized crops per example;
    none for an input that only feeds the feature pass."""
    if pipeline == "memory":
        data = sources.load_dataset(dataset, split, data_dir)
        if indices is not None:
            labels = None if data.labels is None else data.labels[indices]
            data = ArrayDataset(data.images[indices], labels, data.num_classes, data.name, data.class_names)
        return ResidentInput(data, mesh, global_batch, seed)
    if pipeline == "stream":
        source = sources.open_source(dataset, split, data_dir)
        if indices is not None:
            source = sources.SubsetSource(source, indices)
        return StreamInput(source, mesh, global_batch, seed, crops, num_workers or None, prefetch)
    raise ValueError(f"input pipeline must be 'memory' or 'stream', got {pipeline!r}")


class ResidentInput:
    """A dataset held on the devices. `precropped = False`: feature batches are whole images."""

    precropped = False

    def __init__(self, dataset: ArrayDataset, mesh, global_batch: int, seed: int):
        self.mesh, self.batch, self.seed = mesh, global_batch, seed
        self.host_images = dataset.images
        self.labels, self.num_classes = dataset.labels, dataset.num_classes
        self.num_examples, self.channels = len(dataset.images), dataset.images.shape[-1]
        self.steps_per_epoch = self.num_examples // global_batch
        self._replicated = sharding.replicated(mesh)

    @functools.cached_property
    def images(self) -> jax.Array:
        """(N, H, W, C) uint8 on every device, transferred at the first training step (a
        held-out split only used for features is never copied whole)."""
        return jax.device_put(self.host_images, self._replicated)

    def steps(self, epoch: int, start_step: int, assignments: np.ndarray) -> Iterator[tuple]:
        """-> (images (B, H, W, C) uint8, labels (B, L) int32) per step, batch-sharded."""
        assign = jax.device_put(assignments, self._replicated)
        perm = stream_lib.epoch_permutation(self.seed, epoch, self.num_examples)
        b = self.batch
        for s in range(start_step, self.steps_per_epoch):
            yield gather_batch(self.mesh)(self.images, assign, perm[s * b:(s + 1) * b].astype(np.int32))

    def center_crops(self, crop: int, batch: int) -> Iterator[tuple]:
        del crop  # cropped on the device
        return array_batches(self.host_images, self.mesh, batch)


@functools.cache
def gather_batch(mesh):
    """jitted (images (N, H, W, C), assignments (N, L), indices (B,)) -> (images, labels): their rows
    at `indices`, batch-sharded over `mesh` (a resident input's step batch)."""
    return jax.jit(lambda images, assign, idx: (images[idx], assign[idx]),
                   out_shardings=sharding.batch_sharded(mesh))


def array_batches(images: np.ndarray, mesh, batch: int) -> Iterator[tuple]:
    """Whole images in index order -> (images (b, H, W, C) sharded, indices (b,), valid (b,)),
    b = `batch` rounded to the device count; the last batch is padded (valid False)."""
    n_dev, n = mesh.size, len(images)
    batch = max(n_dev, (batch // n_dev) * n_dev)
    sharded = sharding.batch_sharded(mesh)
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch)
        valid = idx < n
        yield jax.device_put(images[np.minimum(idx, n - 1)], sharded), idx, valid


class StreamInput:
    """A random-access source streamed through host-side decoding and cropping, per process.
    `precropped = True`: feature batches are already center-cropped on the host."""

    precropped = True

    def __init__(self, source: RandomAccessSource, mesh, global_batch: int, seed: int,
                 crops: tuple[stream_lib.CropSpec, ...] = (), num_workers: int | None = None,
                 prefetch: int = 2):
        """No `crops`: only the feature pass (`center_crops`), e.g. for a held-out split."""
        self.mesh, self.source = mesh, source
        self.labels, self.num_classes = source.labels, source.num_classes
        self.num_examples, self.channels = source.num_examples, source.channels
        self.num_workers, self.prefetch = num_workers, prefetch
        self.stream = crops and stream_lib.TrainStream(
            source, crops, global_batch, seed, process_index=jax.process_index(),
            process_count=jax.process_count(), num_workers=num_workers, prefetch=prefetch)
        self.steps_per_epoch = self.stream.steps_per_epoch if crops else 0

    def steps(self, epoch: int, start_step: int, assignments: np.ndarray) -> Iterator[tuple]:
        """-> (images: tuple of uint8 views (B, S_v, S_v, C), labels (B, L) int32), batch-sharded."""
        local = ((views, assignments[idx]) for idx, views in self.stream.epoch(epoch, start_step))
        yield from stream_lib.prefetch_to_device(local, self.prefetch, self.mesh)

    def center_crops(self, crop: int, batch: int) -> Iterator[tuple]:
        """-> (images (b, crop, crop, C) uint8 sharded, indices (b,), valid (b,)): every
        process's part, indices / valid gathered to every host."""
        per_process = max(batch // jax.process_count(), jax.local_device_count())
        for idx, images, valid in stream_lib.center_crop_batches(
                self.source, crop, per_process * jax.process_count(), process_index=jax.process_index(),
                process_count=jax.process_count(), num_workers=self.num_workers, prefetch=self.prefetch):
            images, idx, valid = sharding.to_global(self.mesh, (images, idx, valid))
            yield images, sharding.to_host(idx), sharding.to_host(valid)
