"""A trained encoder in your own code: `hcsc_jax.load_encoder(path)` -> `Pretrained`.

  import hcsc_jax
  enc = hcsc_jax.load_encoder("runs/digits")   # a train.py workdir (local or gs://), an exported
                                               # encoder, or a `convert import-torch` directory
  feats = enc.features(images)                 # uint8 (N, H, W, C) of any size -> (N, F) float32
  z = enc.project(images)                      # the L2-normalized projection (N, embed_dim)
  x = enc.preprocess(images)                   # the normalized center crops the encoder sees
  graphdef, params, batch_stats = enc.split()  # for jax.jit / jax.grad (models.apply_model)
  model = enc.classifier(10)                   # a copy of the backbone under a new linear head
  enc.save_classifier(model, "runs/tuned")     # after fine-tuning; Orbax, with a weight digest
  tuned = hcsc_jax.load_classifier("runs/tuned")
  scores = tuned.logits(images)                # (N, 10) float32, inference mode

`Pretrained.module` is the NNX `models.Encoder` itself (`module(x, train=...)` -> (pooled
features, projection)), for `nnx.Optimizer` fine-tuning. `Pretrained.input` says what the encoder
was trained on: the crop size, the channels and the per-channel mean / std, read from the run's
config.json, or from the `meta["input"]` an exported or imported encoder carries.

Preprocessing is the evaluation view of this package (as eval.py and the clustering see an
image): torchvision's Resize(round(S * 256 / 224)) of the shorter side (bilinear, antialiased),
CenterCrop(S), then (x / 255 - mean) / std. An array of same-sized images is cropped on the
devices (as the in-memory input pipeline does), a list of differently sized ones on the host (as
the streamed pipeline does). Color images are turned into gray levels for a 1-channel encoder
(Pillow's ITU-R 601 luma) and gray ones repeated for a 3-channel encoder.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hcsc_jax import features, models, sharding
from hcsc_jax.data import augmentations, crops, pipeline
from hcsc_jax.run import checkpoints
from hcsc_jax.run import workdir as workdir_lib

__all__ = ["Classifier", "FineTuned", "InputSpec", "Pretrained", "load_classifier", "load_encoder"]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The input an encoder was trained on: crop side in pixels, channels (1 gray, 3 color), and
    the per-channel mean / std of images scaled to [0, 1]."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):  # ValueError for an input no encoder can take (a std of 0, a NaN, ...)
        models.check_input(self.image_size, list(self.mean), list(self.std), self.channels,
                           where="InputSpec: ")


class Classifier(nnx.Module):
    """A backbone's pooled features -> one linear layer: `model(x, train)` -> logits (B, classes);
    `x` as `Pretrained.preprocess` gives it, `train` the BatchNorm mode."""

    def __init__(self, backbone: nnx.Module, num_features: int, num_classes: int, rngs: nnx.Rngs):
        self.backbone = backbone
        self.fc = nnx.Linear(num_features, num_classes, rngs=rngs)

    def __call__(self, x, train: bool):
        if not jnp.issubdtype(x.dtype, jnp.floating):  # raw uint8 would train on 0..255, silently
            raise ValueError(f"a Classifier takes the normalized float crops of preprocess(images), "
                             f"got {x.dtype}")
        return self.fc(self.backbone(x, train=train))


class _TakesImages:
    """What `Pretrained` and `FineTuned` share: uint8 images -> the center crops their `input`
    (an InputSpec) asks for."""

    input: InputSpec

    def preprocess(self, images) -> jax.Array:
        """uint8 images, (N, H, W, C) or (N, H, W) or a list of (H, W[, C]) of any sizes -> the
        normalized center crops, float32 (N, S, S, channels) (see the module doc)."""
        batch, cropped = self._uint8_views(images)
        mean, std = self.input.mean, self.input.std
        if cropped:
            return augmentations.normalize(batch, mean, std)
        return augmentations.center_crop(batch, self.input.image_size, mean, std)

    def _uint8_views(self, images) -> tuple[np.ndarray, bool]:
        """-> (uint8 (N, H, W, channels), whether these are already the center crops): one array
        as it is, a list of images of several sizes center-cropped on the host."""
        if isinstance(images, np.ndarray | jax.Array) and np.ndim(images) in (3, 4):
            batch = np.asarray(images)
            if batch.ndim == 3 and batch.shape[-1] in (1, 3):
                raise ValueError(f"images of shape {batch.shape} could be one (H, W, C) image or "
                                 f"{len(batch)} gray (H, W) ones: pass one image as [image] or image[None], "
                                 "gray images as (N, H, W, 1)")
            batch = batch[..., None] if batch.ndim == 3 else batch
            _some_pixels(batch.shape[1:3], "images")
            return self._channels(_uint8(batch, "images")), False
        if not isinstance(images, Sequence) or not len(images):
            raise ValueError("images must be a uint8 array (N, H, W, C) or (N, H, W), or a non-empty list "
                             "of (H, W, C) / (H, W) uint8 arrays")
        views = []
        for i, image in enumerate(images):
            image = _uint8(np.asarray(image), f"images[{i}]")
            if image.ndim not in (2, 3):
                raise ValueError(f"images[{i}] must be (H, W, C) or (H, W), got shape {image.shape}")
            _some_pixels(image.shape[:2], f"images[{i}]")
            image = self._channels(image if image.ndim == 3 else image[..., None])
            views.append(crops.center_crop_image(image, self.input.image_size))
        return np.stack(views), True

    def _channels(self, x: np.ndarray) -> np.ndarray:
        have, want = x.shape[-1], self.input.channels
        if have == want:
            return x
        if have == 3 and want == 1:  # Pillow's "L": (19595 R + 38470 G + 7471 B + 2^15) >> 16
            r, g, b = np.moveaxis(x.astype(np.uint32), -1, 0)
            return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).astype(np.uint8)[..., None]
        if have == 1 and want == 3:
            return np.repeat(x, 3, axis=-1)
        raise ValueError(f"images have {have} channels; this encoder takes {want} (1 gray or 3 color)")


@dataclasses.dataclass
class Pretrained(_TakesImages):
    """An encoder (`module`, NNX) with the input it expects (`input`) and its checkpoint metadata
    (`meta`: `models.encoder_meta` fields, and `step` for a training workdir)."""

    module: models.Encoder
    input: InputSpec
    meta: dict[str, Any]

    @property
    def num_features(self) -> int:
        """F, the width of the pooled features (`features`)."""
        return int(self.module.backbone.num_features)

    def split(self):
        """-> (graphdef, params, batch_stats): the functional form; `models.apply_model(graphdef,
        params, batch_stats, x, train)` -> (pooled features, projection, new batch_stats)."""
        return models.split_model(self.module)

    def classifier(self, num_classes: int, seed: int = 0) -> Classifier:
        """A copy of the backbone (this encoder is left as it is) under a new linear head of
        `num_classes` outputs (initialized with `seed`), for fine-tuning with `nnx.Optimizer`."""
        _positive_int(num_classes, "num_classes")
        return Classifier(nnx.clone(self.module.backbone), self.num_features, num_classes, nnx.Rngs(seed))

    def save_classifier(self, model: Classifier, directory: str | os.PathLike) -> None:
        """Writes `model` (a `classifier` of this encoder, fine-tuned or not) to `directory` as an
        Orbax checkpoint, as `checkpoints.export_encoder` writes an encoder: its weights with their
        digest, this encoder's meta, the number of classes and the input it takes.
        `load_classifier(directory)` reads it back."""
        if not isinstance(model, Classifier) or model.fc.kernel.shape[0] != self.num_features:
            raise ValueError("model must be a classifier of this encoder (Pretrained.classifier)")
        _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        meta = {k: v for k, v in self.meta.items() if k not in ("step", "digest")}
        meta.update({checkpoints.CLASSES: int(model.fc.kernel.shape[1]), "num_features": self.num_features,
                     "input": dataclasses.asdict(self.input)})
        checkpoints.export_encoder(str(directory), meta, params, stats)


    def features(self, images, batch_size: int = 256) -> np.ndarray:
        """Pooled backbone features (N, F) float32 of uint8 `images` (as `preprocess` takes them),
        inference mode (BN running statistics), jitted, in batches sharded over this process's
        devices."""
        return self._embed(images, batch_size)[0]

    def project(self, images, batch_size: int = 256) -> np.ndarray:
        """The L2-normalized projection head output (N, embed_dim) float32 (see `features`)."""
        return self._embed(images, batch_size)[1]

    def _embed(self, images, batch_size: int):
        _positive_int(batch_size, "batch_size")
        batch, cropped = self._uint8_views(images)
        graphdef, params, stats = self.split()
        if not len(batch):  # an empty array: no rows
            out = jax.eval_shape(lambda x: models.apply_model(graphdef, params, stats, x, train=False)[:2],
                                 jax.ShapeDtypeStruct((1, *batch.shape[1:]), np.float32))
            return tuple(np.zeros((0, o.shape[1]), np.float32) for o in out)
        mesh = sharding.make_mesh(jax.local_devices())
        # No more than the images there are, and no more than MAX_BATCH_BYTES of them as float32
        # (a batch of large same-sized images is resized on the device).
        fits = max(1, MAX_BATCH_BYTES // (4 * int(np.prod(batch.shape[1:]))))
        batch_size = max(mesh.size, min(batch_size, -(-len(batch) // mesh.size) * mesh.size, fits))
        batches = pipeline.array_batches(batch, mesh, batch_size, cropped=cropped)
        return features.embed_batches(graphdef, params, stats, batches, len(batch), self.input.image_size,
                                      self.input.mean, self.input.std)

@dataclasses.dataclass
class FineTuned(_TakesImages):
    """A classifier read back by `load_classifier`: `module` (a `Classifier`), the input it takes
    (`input`) and its meta (the encoder's, with `num_classes`)."""

    module: Classifier
    input: InputSpec
    meta: dict[str, Any]

    def logits(self, images, batch_size: int = 256) -> np.ndarray:
        """Class scores (N, num_classes) float32 of uint8 `images` (as `preprocess` takes them),
        inference mode, jitted, `batch_size` images at a time."""
        _positive_int(batch_size, "batch_size")
        x = np.asarray(self.preprocess(images))
        if not len(x):
            return np.zeros((0, self.meta[checkpoints.CLASSES]), np.float32)
        graphdef, state = nnx.split(self.module)
        size = min(batch_size, len(x))  # one compiled shape: the last batch is padded
        padded = np.concatenate([x, np.zeros((-len(x) % size, *x.shape[1:]), x.dtype)])
        return np.concatenate([np.asarray(_logits(graphdef, state, padded[i:i + size]))
                               for i in range(0, len(padded), size)])[:len(x)]


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, x):
    return nnx.merge(graphdef, state)(x, train=False)


def load_classifier(path: str | os.PathLike) -> FineTuned:
    """The classifier `Pretrained.save_classifier` wrote to `path`, its weights checked against
    their digest and for NaN / inf."""
    tree, meta = checkpoints.read_export(path)
    if checkpoints.CLASSES not in meta:
        raise ValueError(f"{path} holds an encoder, not a fine-tuned classifier: read it with "
                         "hcsc_jax.load_encoder")
    features, classes = int(meta["num_features"]), int(meta[checkpoints.CLASSES])
    abstract = nnx.eval_shape(lambda: Classifier(models.build_encoder(meta).backbone, features, classes,
                                                 nnx.Rngs(0)))
    model = checkpoints.fill(abstract, tree["params"], tree["batch_stats"])
    return FineTuned(model, input_spec(path, meta), meta)


# The most bytes of one batch of same-sized images as float32 (`Pretrained.features`): a batch of
# large images is made smaller rather than run out of memory.
MAX_BATCH_BYTES = 1 << 30


def _positive_int(value, what: str) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")


def _some_pixels(hw, what: str) -> None:
    if min(hw) < 1:
        raise ValueError(f"{what} must be at least 1x1 pixels, got {hw[0]}x{hw[1]}")


def _uint8(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (0-255), got {x.dtype}")
    return x


def load_encoder(path: str | os.PathLike, step: int | None = None, which: str = "query") -> Pretrained:
    """The encoder of `path`: a train.py workdir (local or a bucket; its newest readable step, or
    `step`; the query encoder, or the momentum encoder with which="key"), a directory written by
    `checkpoints.export_encoder` or `python -m hcsc_jax.convert import-torch`. Weights are checked
    against their digest and for NaN / inf (`checkpoints.restore_encoder`). ValueError when the
    input it was trained on is recorded nowhere (an export of an earlier version): build
    `Pretrained(module, InputSpec(...), meta)` yourself then."""
    if which not in ("query", "key"):
        raise ValueError(f"which must be 'query' or 'key', got {which!r}")
    module, meta = checkpoints.restore_encoder(path, step, which)
    return Pretrained(module, input_spec(path, meta), meta)


def input_spec(path, meta: dict[str, Any]) -> InputSpec:
    """What the encoder of `path` (with checkpoint metadata `meta`) was trained on: the run's
    config.json (image_size, augment.mean / std), else the `meta["input"]` of an exported or
    imported encoder."""
    channels = int(meta["in_channels"])
    config = workdir_lib.path(path) / workdir_lib.CONFIG_FILE
    if config.exists():
        run = workdir_lib.read_json(config)
        mean, std = augmentations.channel_stats(run["augment"]["mean"], run["augment"]["std"], channels)
        return InputSpec(int(run["image_size"]), channels, tuple(mean), tuple(std))
    recorded = meta.get("input")
    if recorded is None:
        raise ValueError(f"{path} records no input (image size, mean, std): it was exported by an earlier "
                         "version; build hcsc_jax.Pretrained(module, hcsc_jax.InputSpec(...), meta) yourself")
    return InputSpec(int(recorded["image_size"]), channels, tuple(recorded["mean"]), tuple(recorded["std"]))
