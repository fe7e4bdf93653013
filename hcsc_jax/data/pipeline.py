"""Where the step's images come from: resident on the devices, or streamed from the host.

Both inputs visit `loader.epoch_order(seed, epoch, ...)` in order, `global_batch` examples per
step, and can start an epoch at any step (resume). `steps(epoch, start, assignments)` yields
what a step takes, `(images, labels)`: a `batch.Images` and the global batch's rows of
`assignments` (N, L), batch-sharded (see `train_step.jit_train_step`). `center_crops(crop,
batch)` yields the batches of the clustering / evaluation feature pass: (`Images`, indices (b,),
valid (b,)) with every index once, in order.

- `ResidentInput`: the decoded dataset is replicated on every device (digits, Fashion-MNIST,
  CIFAR); a step's images are the whole images (`cropped=False`), gathered on the devices, and
  every view is cropped on the device.
- `StreamInput`: each process's loader workers decode its share of every batch and take the
  random-resized crops on the host (`loader.train_batches`); a step's images are the views
  (`cropped=True`), and the flip and photometric ops run on the device. One loader serves the
  whole run: clustering between epochs overlaps the next epoch's decoding, and its workers start
  once (again only after a jump, e.g. a resume). `close()` stops them.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from hcsc_jax import sharding
from hcsc_jax.data import loader, sources
from hcsc_jax.data.batch import Images
from hcsc_jax.data.crops import CropSpec
from hcsc_jax.data.decode import MAX_PIXELS
from hcsc_jax.data.sources import ArrayDataset, RandomAccessSource

log = logging.getLogger(__name__)

# config.input.pipeline: "memory" (the dataset resident on the devices, crops there) or "stream"
# (decoded and cropped on the host by loader workers).
PIPELINES = ("memory", "stream")


def open_input(pipeline: str, dataset: str, split: str, data_dir, mesh, global_batch: int, seed: int,
               crops: tuple[CropSpec, ...] = (), num_workers: int = -1, prefetch: int = 2,
               indices=None, resampling: str = "linear", bad_images: str = "skip",
               max_pixels: int = MAX_PIXELS):
    """One split as a `ResidentInput` ("memory") or a `StreamInput` ("stream"), restricted to the
    examples `indices` when given. `crops` (stream): the host's random-resized crops per example;
    none for an input that only feeds the feature pass. `max_pixels`: the decoder's bound on an
    image (`decode.decode`)."""
    if pipeline == "memory":
        data = sources.load_dataset(dataset, split, data_dir, max_pixels=max_pixels)
        if indices is not None:
            labels = None if data.labels is None else data.labels[indices]
            data = ArrayDataset(data.images[indices], labels, data.num_classes, data.name, data.class_names)
        return ResidentInput(data, mesh, global_batch, seed)
    if pipeline == "stream":
        source = sources.open_source(dataset, split, data_dir, max_pixels)
        if indices is not None:
            source = sources.SubsetSource(source, indices)
        return StreamInput(source, mesh, global_batch, seed, crops, num_workers, prefetch, resampling,
                           bad_images)
    raise ValueError(f"input pipeline must be one of {PIPELINES}, got {pipeline!r}")


class ResidentInput:
    """A dataset held on the devices; its images reach the step whole (`cropped=False`)."""

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
        """-> (Images: whole (B, H, W, C) uint8, labels (B, L) int32) per step, batch-sharded."""
        assign = jax.device_put(assignments, self._replicated)
        b = self.batch
        order = loader.epoch_order(self.seed, epoch, self.num_examples, self.steps_per_epoch, b)
        for s in range(start_step, self.steps_per_epoch):
            yield gather_batch(self.mesh)(self.images, assign, order[s * b:(s + 1) * b])

    def center_crops(self, crop: int, batch: int) -> Iterator[tuple]:
        del crop  # cropped on the device
        return array_batches(self.host_images, self.mesh, batch)

    def close(self):
        pass


@functools.cache
def gather_batch(mesh):
    """jitted (images (N, H, W, C), assignments (N, L), indices (B,)) -> (whole `Images`, labels):
    their rows at `indices`, batch-sharded over `mesh` (a resident input's step batch)."""
    return jax.jit(lambda images, assign, idx: (Images((images[idx],), cropped=False), assign[idx]),
                   out_shardings=sharding.batch_sharded(mesh))


def feature_batch(pipeline: str, batch: int, num_devices: int, process_count: int) -> int:
    """The global batch of a feature pass asked for `batch` images on `num_devices` devices of
    `process_count` processes: "memory" (`array_batches`) rounds it down to the device count,
    "stream" (`StreamInput.center_crops`) to whole per-process shares of at least one image per
    local device."""
    if pipeline == "memory":
        return max(num_devices, (batch // num_devices) * num_devices)
    return max(batch // process_count, num_devices // process_count) * process_count


def array_batches(images: np.ndarray, mesh, batch: int, cropped: bool = False) -> Iterator[tuple]:
    """Images in index order -> (Images sharded, indices (b,), valid (b,)), b = `batch` rounded to
    the device count; the last batch is padded (valid False). `cropped`: they are the views."""
    n = len(images)
    batch = feature_batch("memory", batch, mesh.size, 1)
    sharded = sharding.batch_sharded(mesh)
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch)
        valid = idx < n
        yield Images((jax.device_put(images[np.minimum(idx, n - 1)], sharded),), cropped), idx, valid


class StreamInput:
    """A random-access source streamed through host-side decoding and cropping, per process
    (see the module doc); its images reach the step as host-cropped views (`cropped=True`)."""

    def __init__(self, source: RandomAccessSource, mesh, global_batch: int, seed: int,
                 crops: tuple[CropSpec, ...] = (), num_workers: int = -1, prefetch: int = 2,
                 resampling: str = "linear", bad_images: str = "skip"):
        """No `crops`: only the feature pass (`center_crops`), e.g. for a held-out split."""
        self.mesh, self.source, self.crops, self.seed = mesh, source, tuple(crops), seed
        self.global_batch = global_batch
        self.labels, self.num_classes = source.labels, source.num_classes
        self.num_examples, self.channels = source.num_examples, source.channels
        self.loader_args = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                                num_workers=num_workers, prefetch=prefetch, bad_images=bad_images)
        self.resampling = resampling
        loader.local_batch(global_batch, jax.process_count())
        self.steps_per_epoch = self.num_examples // global_batch if crops else 0
        if crops and self.steps_per_epoch == 0:
            raise ValueError(f"{source.name}: {self.num_examples} examples, fewer than one global batch "
                             f"of {global_batch}")
        self._run, self._at = None, None  # the run's loader and the (epoch, step) it yields next

    def _batches(self, epoch: int, start_step: int) -> Iterator[dict]:
        if self._at != (epoch, start_step):
            self.close()
            self._run = loader.train_batches(self.source, self.crops, self.global_batch, self.seed,
                                             self.steps_per_epoch, epoch, start_step,
                                             resampling=self.resampling, **self.loader_args)
        for step in range(start_step, self.steps_per_epoch):
            self._at = None  # a step taken but not handed on would be lost: restart at a jump
            batch = next(self._run)
            self._at = (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)
            yield batch

    def steps(self, epoch: int, start_step: int, assignments: np.ndarray) -> Iterator[tuple]:
        """-> (Images: the views (B, S_v, S_v, C) uint8, labels (B, L) int32), batch-sharded."""
        counter = _Skipped(f"epoch {epoch}")
        local = ((tuple(b[f"view{v}"] for v in range(len(self.crops))), assignments[counter(b)])
                 for b in self._batches(epoch, start_step))
        for views, labels in prefetch_to_device(local, self.loader_args["prefetch"], self.mesh):
            yield Images(views, cropped=True), labels
        counter.report()

    def center_crops(self, crop: int, batch: int) -> Iterator[tuple]:
        """-> (Images: (b, crop, crop, C) uint8 sharded, indices (b,), valid (b,)): every
        process's part, indices / valid gathered to every host."""
        counter = _Skipped("feature pass")
        batches = loader.center_crop_batches(
            self.source, crop, feature_batch("stream", batch, self.mesh.size, jax.process_count()),
            **self.loader_args)
        for b in batches:
            idx = counter(b)
            images, idx, valid = sharding.to_global(self.mesh, (b["view0"], idx, idx >= 0))
            idx, valid = np.maximum(sharding.to_host(idx), 0), sharding.to_host(valid)
            yield Images((images,), cropped=True), idx, valid
        counter.report()

    def close(self):
        """Stops the training loader's workers (a later `steps` starts new ones)."""
        if self._run is not None:
            self._run.close()
        self._run, self._at = None, None


class _Skipped:
    """Counts the rows whose example could not be decoded (named in the loader's warnings)."""

    def __init__(self, what: str):
        self.what, self.count = what, 0

    def __call__(self, batch: dict) -> np.ndarray:
        self.count += int(batch["skipped"].sum())
        return batch["index"]

    def report(self):
        if self.count:
            log.warning("%s: %d unreadable image(s) skipped on this host (named above), each "
                        "replaced by the next readable one", self.what, self.count)


def prefetch_to_device(iterator: Iterable, size: int, mesh: jax.sharding.Mesh):
    """`sharding.to_global` of each item of `iterator`, with `size` further items already transferred
    (device_put is asynchronous) while the consumer works on the one yielded."""
    queue = collections.deque()
    iterator = iter(iterator)

    def enqueue(k):
        queue.extend(sharding.to_global(mesh, item) for item in itertools.islice(iterator, k))

    enqueue(size)
    while queue:
        item = queue.popleft()
        enqueue(1)
        yield item
