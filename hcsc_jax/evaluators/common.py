"""What every evaluator works on: a frozen encoder, a dataset description and its features.

An evaluator is a module with `run(ctx: Context, cfg) -> (result dict, one-line summary)`;
`cfg` is its entry of `config.evals` (of the eval config for eval.py, of the training config
during training).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from hcsc_jax import features as features_lib
from hcsc_jax import models, sharding
from hcsc_jax.data import augmentations, pipeline, sources
from hcsc_jax.data.crops import CropSpec
from hcsc_jax.models import pixels
from hcsc_jax.run import checkpoints, config_fields
from hcsc_jax.run import workdir as workdir_lib


class EvalError(Exception):
    """Bad input (data, settings, checkpoint): reported as one line; nothing is written."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where an evaluation's images come from and how they are cropped and normalized."""

    dataset: str
    data_dir: str | None
    train_split: str
    eval_split: str
    image_size: int  # crop size; center crops resize the shorter side to image_size * 256 / 224
    mean: tuple
    std: tuple
    # The input settings, as a training config's `input` (run.config_fields.FIELDS says each).
    pipeline: str  # "memory" (decoded once, on the devices) or "stream" (host decoding)
    num_workers: int  # loader worker processes (data.loader): -1 one per core but one, 0 none
    prefetch: int
    bad_images: str  # an undecodable image: "skip" (warn, next one) or "error"
    max_pixels: int  # the decoder's bound on an image (data.decode)


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A frozen encoder: `models.split_model` parts (replicated), its `models.encoder_meta`, step."""

    graphdef: Any
    params: Any
    stats: Any
    meta: dict
    step: int


class Context:
    """An encoder and a dataset for the evaluators, with the labels and features of each split
    computed once (features also cached on disk under `out_dir` when given)."""

    def __init__(self, encoder: Encoder, data: DataSpec, mesh, out_dir: str | None = None, batch: int = 256,
                 progress: bool = True, seed: int = 0, inputs: dict | None = None,
                 key_encoder: Encoder | None = None, run_config: ml_collections.ConfigDict | None = None):
        """`inputs`: split name -> feature-pass input already open, shared (and filled) across
        contexts, e.g. the trainer's from epoch to epoch. `key_encoder` (the run's momentum
        encoder) and `run_config` (the training config: clustering settings, seed, epochs), known
        for a training run, not for an exported encoder: the "summary" evaluator needs them."""
        self.encoder, self.data, self.mesh = encoder, data, mesh
        self.key_encoder, self.run_config = key_encoder, run_config
        self.out_dir = None if out_dir is None else workdir_lib.path(out_dir)  # an epath
        self.batch, self.progress, self.seed = batch, progress, seed
        self._inputs: dict[str, Any] = {} if inputs is None else inputs
        self._features: dict[str, np.ndarray] = {}
        self._digest = None

    def with_data(self, **changes) -> Context:
        """The same encoder (and weight digest) on other data, e.g. a transfer dataset."""
        ctx = Context(self.encoder, dataclasses.replace(self.data, **changes), self.mesh, self.out_dir,
                      self.batch, self.progress, self.seed, key_encoder=self.key_encoder,
                      run_config=self.run_config)
        ctx._digest = self._digest
        return ctx

    @property
    def digest(self) -> str:
        """SHA-256 of the encoder's weights (`features.weights_digest`)."""
        if self._digest is None:
            self._digest = features_lib.weights_digest(self.encoder.params, self.encoder.stats)
        return self._digest

    @property
    def mean_std(self) -> tuple[tuple, tuple]:
        """The normalization of the encoder's input channels (`augmentations.channel_stats`)."""
        channels = int(self.encoder.meta["in_channels"])
        return augmentations.channel_stats(self.data.mean, self.data.std, channels)

    def input(self, split: str, crops: tuple[CropSpec, ...] = (), batch: int | None = None,
              indices=None):
        """`split` as a `data.pipeline` input (cached when it only feeds the feature pass).
        `crops`: the host's random-resized crops of a streamed training input."""
        key = split if not crops and batch is None and indices is None else None
        if key in self._inputs:
            return self._inputs[key]
        d = self.data
        try:
            inp = pipeline.open_input(d.pipeline, d.dataset, split, d.data_dir, self.mesh,
                                      batch or self.batch, self.seed, crops, d.num_workers, d.prefetch,
                                      indices, bad_images=d.bad_images, max_pixels=d.max_pixels)
        except (FileNotFoundError, ValueError, ImportError) as err:
            raise EvalError(str(err)) from None
        want = int(self.encoder.meta["in_channels"])
        if inp.channels != want:
            raise EvalError(f"{d.dataset}:{split} has {inp.channels}-channel images, the encoder takes "
                            f"{want}; evaluate it on a dataset with its number of channels")
        if key is not None:
            self._inputs[key] = inp
        return inp

    def labels(self, split: str) -> np.ndarray:
        labels = self.input(split).labels
        if labels is None:
            raise EvalError(f"dataset {self.data.dataset} split {split!r} has no labels; this protocol needs "
                            "labelled data")
        return labels

    def num_classes(self) -> int:
        inp = self.input(self.data.train_split)
        return int(inp.num_classes or max(self.labels(self.data.train_split).max(),
                                          self.labels(self.data.eval_split).max()) + 1)

    def feature_dim(self) -> int:
        """F of the pooled features (from shapes only, nothing computed)."""
        e, size = self.encoder, self.data.image_size
        x = jax.ShapeDtypeStruct((1, size, size, int(e.meta["in_channels"])), np.float32)
        out = jax.eval_shape(lambda x: models.apply_model(e.graphdef, e.params, e.stats, x, False)[0], x)
        return int(out.shape[1])

    def feature_path(self, split: str):
        """The epath of the feature cache of `split` (None without an out_dir)."""
        if self.out_dir is None:
            return None
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.data.dataset}_{split}").strip("_")
        return workdir_lib.path(self.out_dir) / f"features_step{self.encoder.step}_{name}.npz"

    def features(self, split: str) -> np.ndarray:
        """(N, F) float32 pooled center-crop features of `split`, in index order."""
        if split not in self._features:
            d, inp = self.data, self.input(split)
            mean, std = self.mean_std
            key = dict(dataset=d.dataset, split=split, n=inp.num_examples, image_size=d.image_size,
                       mean=list(mean), std=list(std), weights=self.digest)
            e = self.encoder
            compute = lambda: features_lib.embed_input(
                e.graphdef, e.params, e.stats, inp, d.image_size, mean, std, self.batch,
                progress=f"features {split}" if self.progress else None)[0]
            self._features[split] = features_lib.cached(self.feature_path(split), key, compute,
                                                        rows=inp.num_examples)
        return self._features[split]

    def crop_config(self, scale, flip: bool) -> augmentations.AugmentConfig:
        """RandomResizedCrop(image_size, scale) + flip, no photometric ops (linear / semi-sup)."""
        mean, std = self.mean_std
        return augmentations.AugmentConfig(crop_size=self.data.image_size, scale=tuple(scale),
                                           jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
                                           flip=bool(flip), mean=mean, std=std)

    def common(self) -> dict:
        d = self.data
        return dict(step=self.encoder.step, dataset=d.dataset, train_split=d.train_split,
                    eval_split=d.eval_split, image_size=d.image_size, model=self.encoder.meta["model"],
                    weights_sha256=self.digest)


def check_ks(ks, n: int, what: str, where: str, flag: str) -> None:
    """EvalError saying what to change when a k of `ks` exceeds the `n` samples of `where`."""
    too_big = [int(k) for k in ks if k > n]
    if too_big:
        raise EvalError(f"{what} k = {too_big} larger than the {n} training samples of {where}; "
                        f"set smaller {flag}")


def labelled_views(key, inputs, cfg: augmentations.AugmentConfig):
    """A training batch `(images, labels)` of a `pipeline` input whose `steps` were given the class
    labels as (N, 1) "assignments" -> (augmented views (B, S, S, C) float32, labels (B,) int32).
    Whole images (resident) are cropped here; a host-cropped `(view,)` (streamed) only gets the
    flip."""
    images, labels = inputs
    (views,) = augmentations.augment_input([key], images, (cfg,))
    return views, labels[:, 0]


def topk_accuracy(scores, labels, k: int) -> float:
    """Fraction of rows whose label is among the `k` highest scores (k clipped to the number of
    classes, so top-5 with fewer than 5 classes is 1)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == labels[:, None]).any(axis=1)))


def accuracies(scores, labels) -> dict[str, float]:
    """Top-1 / top-5 in percent."""
    return dict(top1=100 * topk_accuracy(scores, labels, 1), top5=100 * topk_accuracy(scores, labels, 5))


# The input settings of DataSpec, at their training defaults where neither the eval config nor the
# run's config.json gives them (an exported encoder's, or a config.json written before them).
_INPUT_DEFAULTS = {k: config_fields.default(f"input.{k}")
                   for k in ("pipeline", "num_workers", "prefetch", "bad_images", "max_pixels")}


def data_spec(config, run_config: dict | None = None, trained_on: dict | None = None) -> DataSpec:
    """The eval config's data fields, unset (None) ones taken from a training run's config.json
    (`run_config`), else (image_size, mean, std) from the input an exported or imported encoder
    records (`trained_on`: its `models.input_meta`); EvalError naming the flags to set when none
    has them."""
    run, enc = run_config or {}, trained_on or {}
    aug, inp = run.get("augment", {}), run.get("input", {})
    fallback = dict(dataset=run.get("dataset"), data_dir=run.get("data_dir"),
                    train_split=run.get("train_split"), eval_split=run.get("eval_split"),
                    image_size=run.get("image_size", enc.get("image_size")),
                    mean=aug.get("mean", enc.get("mean")), std=aug.get("std", enc.get("std")),
                    **{k: inp.get(k, default) for k, default in _INPUT_DEFAULTS.items()})
    data = {k: (config.get(k) if config.get(k) is not None else v) for k, v in fallback.items()}
    standard = sources.standard_splits(data["dataset"]) if data["dataset"] else None
    for i, k in enumerate(("train_split", "eval_split")):  # (the dataset's own, when none is given)
        data[k] = standard[i] if data[k] is None and standard else data[k]
    missing = [k for k in ("dataset", "train_split", "eval_split", "image_size", "mean", "std")
               if data[k] is None]
    if missing:
        raise EvalError("neither a training config.json nor the encoder's input metadata give "
                        + ", ".join(missing) + "; set them with "
                        + " ".join(f"--config.{k}=..." for k in missing))
    try:
        models.check_input(data["image_size"], list(data["mean"]), list(data["std"]))
    except (ValueError, TypeError) as err:
        raise EvalError(f"{err} (the eval config's, else the run's or the encoder's recorded input); set "
                        "--config.image_size / --config.mean / --config.std") from None
    if data["pipeline"] not in pipeline.PIPELINES:
        raise EvalError(f"pipeline must be one of {pipeline.PIPELINES}, got {data['pipeline']!r}")
    return DataSpec(dataset=data["dataset"], data_dir=data["data_dir"], train_split=data["train_split"],
                    eval_split=data["eval_split"], image_size=int(data["image_size"]),
                    mean=tuple(float(m) for m in data["mean"]), std=tuple(float(s) for s in data["std"]),
                    pipeline=data["pipeline"], num_workers=int(data["num_workers"]),
                    prefetch=int(data["prefetch"]), bad_images=data["bad_images"],
                    max_pixels=int(data["max_pixels"]))


def pixels_context(config, run: str | None, mesh, out: str | None = None) -> Context:
    """The raw-pixel reference (`models.pixels`) on the data of the train.py workdir `run` (its
    config.json; the eval config's data fields override it), or of the eval config alone when
    `run` is None. Outputs go to `out`, default `<run>/eval/pixels` (else ./eval/pixels)."""
    run_config = None
    if run:
        path = workdir_lib.path(run)
        workdir_lib.check_reachable(path)
        if not (path / "config.json").exists():
            raise EvalError(f"pixels:{run}: {run} has no config.json; pass a train.py workdir, or "
                            "--checkpoint=pixels with --config.dataset/image_size/mean/std")
        run_config = workdir_lib.read_json(path / "config.json")
    data = data_spec(config, run_config)
    try:
        first = sources.open_source(data.dataset, data.train_split, data.data_dir).load(0)
        channels = int(np.shape(first)[-1])
    except sources.DataError as err:
        raise EvalError(str(err)) from None
    meta = dict(pixels.pixels_meta(data.image_size, channels), step=0)
    encoder = frozen(models.build_encoder(meta), meta, 0, mesh)
    out = out or (workdir_lib.path(run) / "eval" / "pixels" if run else workdir_lib.path("eval") / "pixels")
    return Context(encoder, data, mesh, out, int(config.embed_batch), bool(config.progress_bar),
                   int(config.seed),
                   run_config=None if run_config is None else ml_collections.ConfigDict(run_config))


def from_checkpoint(config, path: str, step: int | None, mesh, out: str | None = None,
                    key_encoder: bool = False) -> Context:
    """A Context for the query encoder of a train.py workdir (newest readable step, or `step`) or
    an exported encoder directory (local or a bucket); outputs go to `out`, default `<path>/eval/`.
    Data fields the eval config leaves unset come from `<path>/config.json` or the encoder's
    recorded input (`data_spec`).
    With `key_encoder`, a workdir's momentum encoder of the same step too (`Context.key_encoder`;
    an exported encoder has none). `Context.run_config`: `<path>/config.json` when there is one.
    `path` "pixels" or "pixels:<workdir>": the raw-pixel reference (`pixels_context`)."""
    if str(path) == pixels.PIXELS or str(path).startswith(pixels.PIXELS + ":"):
        return pixels_context(config, str(path).partition(":")[2] or None, mesh, out)
    path = workdir_lib.path(path)
    workdir_lib.check_reachable(path)  # WorkdirError: a bucket without gcsfs, network or an answer
    if not path.exists():
        raise EvalError(f"checkpoint path {path} does not exist")
    try:
        model, meta = checkpoints.restore_encoder(path, step)
    except FileNotFoundError as err:
        if not (path / "checkpoints").is_dir():
            raise EvalError(f"{path} is not a train.py run (it has no checkpoints/) nor an exported encoder; "
                            "pass the --workdir of a run or a directory written by export_encoder or "
                            "`convert import-torch`") from None
        raise EvalError(f"no encoder found: {err}") from None
    except ValueError as err:  # a fine-tuned classifier, not an encoder
        raise EvalError(str(err)) from None
    except RuntimeError as err:  # no step of the workdir (or not `step`, or not the export) restores
        raise EvalError(f"{err} (see the warnings above)" if step is None and (path / "checkpoints").is_dir()
                        else str(err)) from None
    run_config = workdir_lib.read_json(path / "config.json") if (path / "config.json").exists() else None
    data = data_spec(config, run_config, meta.get("input"))
    arch = meta["model"]["arch"]
    if config.get("expect_arch") and arch != config.expect_arch:
        raise EvalError(f"{path} holds a {arch} encoder, this eval config is for {config.expect_arch}; "
                        f"pass the right checkpoint or --config.expect_arch={arch}")
    encoder = frozen(model, meta, int(meta.get("step", 0) if step is None else step), mesh)
    key = None
    if key_encoder and (path / "checkpoints").is_dir():  # (an exported directory holds one encoder)
        key = frozen(*checkpoints.restore_encoder(path, encoder.step, which="key"), encoder.step, mesh)
    return Context(encoder, data, mesh, out or path / "eval", int(config.embed_batch),
                   bool(config.progress_bar), int(config.seed), key_encoder=key,
                   run_config=None if run_config is None else ml_collections.ConfigDict(run_config))


def frozen(model, meta: dict, step: int, mesh) -> Encoder:
    """A restored encoder module as an `Encoder` replicated on `mesh`."""
    graphdef, params, stats = models.split_model(model)
    params, stats = sharding.replicate((params, stats), mesh)
    return Encoder(graphdef, params, stats, meta, step)
