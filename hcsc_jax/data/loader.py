"""Worker processes that decode and crop a source's examples into batches (grain underneath).

Two kinds of batches, each a function of its position only, so any worker count, any process
count and any resume point give the same bytes:

* `train_batches`: the run's steps, epoch after epoch, from (epoch, step) on. Step s of epoch e
  takes rows [s * G, (s + 1) * G) of `epoch_order(seed, e, ...)` (G = global batch); process p
  of P gets rows [p * b, (p + 1) * b) of each (b = G / P); each row is the example's
  random-resized views (`crops.random_resized_crops`, seeded by (seed, e, index, view)).
* `center_crop_batches`: every example once, in index order (the clustering and evaluation
  feature pass); rows past the end are padding (index -1, zero pixels).

Each yields dicts of NumPy arrays: "index" (b,) int32 (the example each row holds), the views
(b, S, S, C) uint8 as "view0", "view1", ..., and "skipped" (b,) bool.

`num_workers` worker processes (grain's `mp_prefetch`, batches in shared memory) each build
whole batches, round robin, on one thread each (so N workers use N cores: with two threads a
worker decoded on two cores, which BENCHMARKS.md would have counted as one); 0 works in this
process (two threads); -1 (the configs' default) takes one worker per core but one, which the
training loop keeps. Workers import NumPy, Pillow, OpenCV and simplejpeg, never JAX, and hold no
accelerator memory. They are daemonic and stop with the iterator's `close()`, at the parent's
exit (exception, SIGTERM, Ctrl-C) and when the parent dies, however (`kill -9` included:
`_exit_with_parent`). They ignore SIGINT and SIGTERM (a Ctrl-C or a preemption reaches the whole
process group): the parent decides, and stops them (`_ignore_stop_signals`).

An example that cannot be decoded (`decode.DecodeError`: corrupt, truncated, not an image,
unreadable) is, with `bad_images="skip"`, logged by name and replaced by the next decodable
example of the source (its index and label go with it, and its row's "skipped" is True); with
`bad_images="error"` the pass stops with the error naming the file. A worker that dies stops
the pass with a `LoaderError` naming the files the workers were reading.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Iterator
from multiprocessing import shared_memory

import grain
import numpy as np

from hcsc_jax.data import crops as crops_lib
from hcsc_jax.data.crops import CropSpec
from hcsc_jax.data.decode import DecodeError
from hcsc_jax.data.sources.base import RandomAccessSource

__all__ = ["BAD_IMAGES", "LoaderError", "center_crop_batches", "default_workers", "epoch_order",
           "local_batch", "train_batches"]

log = logging.getLogger(__name__)
BAD_IMAGES = ("skip", "error")
_THREADS_PER_WORKER = 1


class LoaderError(RuntimeError):
    """A loader worker died; the message names the files the workers were reading."""


def default_workers() -> int:
    """One worker per core of this process's affinity but one (the training loop's)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def local_batch(batch: int, process_count: int) -> int:
    if batch <= 0 or batch % process_count:
        raise ValueError(f"batch {batch} must be a positive multiple of process_count {process_count}")
    return batch // process_count


def epoch_order(seed: int, epoch: int, num_examples: int, steps: int, batch: int) -> np.ndarray:
    """(steps * batch,) int32: the examples of `epoch`'s global batches, concatenated: a
    permutation seeded by (seed, epoch) only, repeated from its start to fill the last batch
    when `steps * batch` exceeds the examples."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return np.resize(perm, steps * batch).astype(np.int32)


# ----------------------------------------------------------------------------- rows

_WORKER = {"index": 0}  # this worker's index, set by `_init_worker`


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PARENT_CHECK_S = 1.0  # (the parent's pipe wakes the watch at once; the check of its id is a backstop)


class _StopSignalsBlocked:
    """SIGINT and SIGTERM blocked in this thread while it starts the workers: the threads it
    starts then (grain's, which start the worker processes) and so the workers inherit the mask,
    so that a Ctrl-C or a SIGTERM to the process group during a worker's start-up (before
    `_ignore_stop_signals`) waits, and is then dropped, instead of killing it. (The resource
    tracker's own start does the same: bpo-33613.) On leaving, this thread's mask is restored and a
    signal received meanwhile reaches this process's handlers."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and hasattr(signal, "pthread_sigmask")

    def __enter__(self):
        self.old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if self.enabled else None

    def __exit__(self, *exc):
        if self.old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old)


def _ignore_stop_signals():
    """A worker ignores SIGINT and SIGTERM: sent to the process group (Ctrl-C, a preemption), they
    are the parent's to handle (it saves, then stops the workers); a worker killed by one would
    be a dead worker, a `LoaderError`."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # (blocked by `_StopSignalsBlocked`)


def _exit_with_parent():
    """Ends this worker as soon as the process that started it ends, however it ends (`kill -9`
    included, which leaves no time for `close()`): a daemon thread waits on multiprocessing's
    parent sentinel, the read end of a pipe whose write end only the parent holds (the kernel
    closes it as the parent dies; while the parent lives, multiprocessing keeps it open as long as
    the worker's `Process`, which grain drops only once the worker has ended), and checks every
    second that its parent is still the one that started it (a backstop, should a forked child of
    the parent hold that pipe open too). If the parent is already gone, the worker ends at once.

    Not `prepare.die_with`'s prctl(PR_SET_PDEATHSIG): the kernel's "parent" there is the thread
    that started the process, here a grain thread that ends before the worker is stopped in
    `close()`, so every worker would be SIGKILLed mid-`close()`, its batches in flight left in
    shared memory."""
    parent = multiprocessing.parent_process()
    if parent is None:  # (not a worker process)
        return

    def watch():
        while (not multiprocessing.connection.wait([parent.sentinel], timeout=_PARENT_CHECK_S)
               and os.getppid() == parent.pid):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(index: int, count: int):
    del count
    _ignore_stop_signals()
    _exit_with_parent()
    _WORKER["index"] = index
    import cv2  # one thread per worker: the workers are the parallelism

    cv2.setNumThreads(1)


class _Row:
    """What every row function shares: the source, the bad-image policy, and the slot (in a
    shared array named `slots`) where this worker notes the example it is reading."""

    def __init__(self, source: RandomAccessSource, bad_images: str, slots: str | None):
        if bad_images not in BAD_IMAGES:
            raise ValueError(f"bad_images must be one of {', '.join(BAD_IMAGES)}, got {bad_images!r}")
        self.source, self.bad_images, self.slots = source, bad_images, slots

    @functools.cached_property
    def _slots(self) -> np.ndarray | None:
        if self.slots is None:
            return None
        shm = shared_memory.SharedMemory(name=self.slots)
        self._shm = shm  # kept open while the array lives
        return np.ndarray((shm.size // 8,), np.int64, shm.buf)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_slots", None)
        state.pop("_shm", None)
        return state

    def load(self, index: int, make) -> tuple[int, tuple, bool]:
        """(example used, make(its image), whether `index` was skipped): the next decodable
        example from `index` on under bad_images="skip"."""
        n = self.source.num_examples
        for tries in range(n):
            i = (index + tries) % n
            slots = self._slots
            if slots is not None:
                slots[_WORKER["index"]] = i
            try:
                return i, make(self.source.load(i), i), tries > 0
            except DecodeError as e:
                if self.bad_images == "error":
                    raise
                log.warning("skipped unreadable example %d: %s", i, e)
            finally:
                if slots is not None:
                    slots[_WORKER["index"]] = -1
        raise DecodeError(f"{self.source.name}: no example can be decoded")


class _TrainRow(_Row):
    """Row `k` of this process's part of the run -> its example's random-resized views."""

    def __init__(self, source, crops, seed, steps_per_epoch, global_batch, process_index, process_count,
                 resampling, bad_images, slots):
        super().__init__(source, bad_images, slots)
        crops_lib.check_resampling(resampling)
        self.crops, self.seed, self.resampling = tuple(crops), int(seed), resampling
        self.steps_per_epoch, self.global_batch = steps_per_epoch, global_batch
        self.b = local_batch(global_batch, process_count)
        self.first = process_index * self.b

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one order per epoch, two live at an epoch's end)
    def order(self, epoch: int) -> np.ndarray:
        n = self.source.num_examples
        return epoch_order(self.seed, epoch, n, self.steps_per_epoch, self.global_batch)

    def __call__(self, k: int) -> dict:
        step, row = divmod(int(k), self.b)
        epoch, s = divmod(step, self.steps_per_epoch)
        index = int(self.order(epoch)[s * self.global_batch + self.first + row])
        index, views, skipped = self.load(index, lambda image, i: crops_lib.random_resized_crops(
            image, self.crops, self.seed, epoch, i, self.resampling))
        return _element(index, views, skipped)


class _CenterRow(_Row):
    """Row `k` of this process's part of the feature pass -> its example's center crop."""

    def __init__(self, source, crop, batch, process_index, process_count, bad_images, slots):
        super().__init__(source, bad_images, slots)
        self.crop, self.batch = crop, batch
        self.b = local_batch(batch, process_count)
        self.first = process_index * self.b

    def __call__(self, k: int) -> dict:
        step, row = divmod(int(k), self.b)
        index = step * self.batch + self.first + row
        if index >= self.source.num_examples:
            return _element(-1, (np.zeros((self.crop, self.crop, self.source.channels), np.uint8),), False)
        center = lambda image, i: (crops_lib.center_crop_image(image, self.crop),)
        index, views, skipped = self.load(index, center)
        return _element(index, views, skipped)


def _element(index: int, views: tuple, skipped: bool) -> dict:
    out = {f"view{v}": x for v, x in enumerate(views)}
    out.update(index=np.int32(index), skipped=np.bool_(skipped))
    return out


# ----------------------------------------------------------------------------- batches

def _flags_parsed():
    """grain reads absl flags; outside an absl app (tests, notebooks) take their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _batches(row_fn: type, args: tuple, source, positions: range, b: int, num_workers: int, prefetch: int,
             bad_images: str) -> Iterator[dict]:
    """Batches of `b` rows `row_fn(*args, bad_images, slots)(k)` for k in `positions`."""
    workers = default_workers() if num_workers < 0 else num_workers
    slots = shared_memory.SharedMemory(create=True, size=8 * max(workers, 1)) if workers else None
    try:
        if slots is not None:
            np.ndarray((workers,), np.int64, slots.buf)[:] = -1
        row = row_fn(*args, bad_images=bad_images, slots=slots and slots.name)
        ds = grain.MapDataset.range(positions.start, positions.stop).map(row).batch(b)
        threads = _THREADS_PER_WORKER if workers else 2 * _THREADS_PER_WORKER
        # grain's read-ahead counts elements, here whole batches: one per decoding thread keeps
        # each busy (more would only hold memory: 2 x b batches of ImageNet views were GBs)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
        if workers:
            _flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                             per_worker_buffer_size=max(1, prefetch)),
                                worker_init_fn=_init_worker)
        starting = bool(workers)  # (grain starts the workers for the first batch)
        with _StopSignalsBlocked(starting):
            iterator = iter(it)
        try:
            while True:
                try:
                    with _StopSignalsBlocked(starting):
                        batch = next(iterator)
                        if workers:  # out of the workers' shared memory now (see _owned)
                            batch = _owned(batch)
                    starting = False
                except StopIteration:
                    return
                except DecodeError as e:  # one line, without grain's note on its traceback
                    raise DecodeError(str(e).split("\n")[0]) from None
                except Exception as e:
                    if slots is None or "terminated unexpectedly" not in str(e):
                        raise
                    reading = [int(i) for i in np.ndarray((workers,), np.int64, slots.buf) if i >= 0]
                    names = ", ".join(_where(source, i) for i in reading) or "(none in flight)"
                    raise LoaderError(f"a loader worker died ({e}); the workers were reading: {names}") from e
                yield batch
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            if workers:  # the batches still in grain's buffers go with it; their unlinks are queued
                del iterator, it
                _drain_shared_memory_unlinks()
    finally:
        if slots is not None:
            slots.close()
            slots.unlink()


def _drain_shared_memory_unlinks():
    """Waits for the unlinks grain queues on its one deletion thread (`SharedMemoryArray.__del__`
    with async deletion on, which `mp_prefetch` turns on): a no-op task on that thread runs after
    them. A process that exits right after a pass would otherwise drop them with the thread pool
    and the resource tracker would report the shared memory leaked. (grain's module and attribute
    are private: without them, nothing is waited for.)"""
    try:
        from grain._src.python.ipc import shared_memory_array
    except ImportError:
        return
    pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        pool.apply(int)


def _owned(batch: dict) -> dict:
    """A worker's batch copied out of its shared memory, whose names are removed at once (the
    memory itself goes with the last mapping). grain removes a name when its array is collected,
    which may be never: a consumer may hold the last batch until the interpreter exits (on the
    CPU, `jax.device_put` can alias host memory), and on a loaded machine one array of a feature
    pass's batch outlived every collection of a run, so the resource tracker reported it leaked.
    A copy of one batch costs far less than decoding it."""
    owned = {k: np.array(v) for k, v in batch.items()}
    for v in batch.values():
        if getattr(v, "_unlink_on_del", False):  # (grain's private flag: its `__del__` then only closes)
            v._unlink_on_del = False
            v.shm.unlink()
    return owned


def _where(source, i: int) -> str:
    where = getattr(source, "where", None)
    return where(i) if where is not None else f"{source.name} example {i}"


def train_batches(source: RandomAccessSource, crops: tuple[CropSpec, ...], global_batch: int, seed: int,
                  steps_per_epoch: int, epoch: int, step: int, *, process_index: int = 0,
                  process_count: int = 1, num_workers: int = -1, prefetch: int = 2,
                  resampling: str = "linear", bad_images: str = "skip") -> Iterator[dict]:
    """This process's part of every step from (`epoch`, `step`) on, epoch after epoch, without
    end (see the module doc)."""
    b = local_batch(global_batch, process_count)
    start = (epoch * steps_per_epoch + step) * b
    args = (source, crops, seed, steps_per_epoch, global_batch, process_index, process_count, resampling)
    return _batches(_TrainRow, args, source, range(start, 2**62), b, num_workers, prefetch, bad_images)


def center_crop_batches(source: RandomAccessSource, crop: int, batch: int, *, process_index: int = 0,
                        process_count: int = 1, num_workers: int = -1, prefetch: int = 2,
                        bad_images: str = "skip") -> Iterator[dict]:
    """ceil(N / batch) batches of this process's rows of every example's center crop."""
    b = local_batch(batch, process_count)
    steps = -(-source.num_examples // batch)
    args = (source, crop, batch, process_index, process_count)
    return _batches(_CenterRow, args, source, range(steps * b), b, num_workers, prefetch, bad_images)
