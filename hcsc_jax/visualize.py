"""Figures of a run, from its workdir (local or a bucket), into `<workdir>/figures/`:

  python -m hcsc_jax.visualize WORKDIR [--out DIR] [--sample 2000]

- `curves.png`: total and per-term losses, per-level losses, instance / prototype accuracies,
  keep (selection) rates per level, lr, images/s against the step; evaluator results (records
  with "type": "eval" in metrics.jsonl, any numeric key) against the epoch.
- `clusters.png`: cluster sizes and phi (concentration) per level over epochs (hierarchy/*.npz).
- `hierarchy.png`: the paper's Fig. 3: for a few top-level prototypes, their child prototypes
  level by level, each shown as a strip of the training images nearest to it (among the sample
  images assigned to it, by cosine similarity of the final key encoder's projection).
- `embedding.png`: t-SNE of the key projections of a sample of training images, colored by
  label and by top-level cluster.

The first two read only metrics.jsonl and hierarchy/ (cheap: written at the end of every run);
the last two embed a sample of the run's training set with its final key encoder.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
from etils import epath

from hcsc_jax.run import metrics
from hcsc_jax.run import workdir as workdir_lib

FIGURES_DIR = "figures"
# Panels of curves.png: title -> pattern of the step-record keys it plots.
_CURVE_PANELS = (
    ("loss", r"loss(_.*)?"), ("per-level losses", r"(instance|proto)_loss/\d+"),
    ("accuracy", r"(instance|proto)_acc(/\d+)?"), ("keep rate", r"(instance|proto)_keep/\d+"),
    ("learning rate", r"lr"), ("images / s", r"images_per_sec"),
)


if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kwargs) -> Figure:
    """A matplotlib Figure (matplotlib is imported here, by the first figure: a second of every
    process's start that a usage error does not need)."""
    from matplotlib.figure import Figure

    return Figure(dpi=80, layout="constrained", **kwargs)


class NoHierarchyError(FileNotFoundError):
    """The run has not written a hierarchy yet (still in warm-up)."""


def save(fig: Figure, path: epath.Path):
    """Writes `fig` as PNG to any epath."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


# Numbers of eval records that are settings or choices, not results: no curve.
_NOT_RESULTS = re.compile(r"(.*/)?(best_k|temperature)")
# Results that are fractions in [0, 1] (the summary's kNN top-1, NMI, AMI), plotted apart from the
# accuracies the evaluators give in percent.
_FRACTIONS = re.compile(r"(.*/)?(knn_top1|nmi|ami)(_per_level)?(/\d+)?")
_EVAL_PANELS = ("evaluation (%)", "evaluation (0-1)")


def curve_series(records: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """panel title -> key -> (xs, ys): step records by `_CURVE_PANELS` against the step, eval
    records (every result; lists per index; not `_NOT_RESULTS`) against the epoch under
    "evaluation (%)", or "evaluation (0-1)" for fractions (`_FRACTIONS`)."""
    panels = defaultdict(dict)
    for r in records:
        kind = r.get("type")
        if kind == "epoch":
            continue
        for tag, value in metrics.scalars(r).items():
            key = tag.split("/", 1)[1]
            if kind == "eval":
                title = (None if _NOT_RESULTS.fullmatch(key)
                         else _EVAL_PANELS[bool(_FRACTIONS.fullmatch(key))])
                x = r.get("epoch", r["step"])
            else:
                title = next((t for t, pat in _CURVE_PANELS if re.fullmatch(pat, key)), None)
                x = r["step"]
            if title is not None:
                xs, ys = panels[title].setdefault(key, ([], []))
                xs.append(x)
                ys.append(value)
    return {t: panels[t] for t in [t for t, _ in _CURVE_PANELS] + list(_EVAL_PANELS) if t in panels}


def curves_figure(records: list[dict]) -> Figure:
    series = curve_series(records)
    cols = 3
    rows = max(1, -(-len(series) // cols))
    fig = _figure(figsize=(4.2 * cols, 2.8 * rows))
    for i, (title, lines) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key, (xs, ys) in sorted(lines.items()):
            ax.plot(xs, ys, label=key, marker="o" if title in _EVAL_PANELS else None, markersize=3, lw=1)
        ax.set_title(title)
        ax.set_xlabel("epoch" if title in _EVAL_PANELS else "step")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if len(lines) > 1:
            ax.legend(fontsize=6, ncol=2)
    return fig


def load_hierarchies(workdir: epath.Path) -> list[tuple[int, dict[str, np.ndarray]]]:
    """[(epoch, `Hierarchy.to_arrays()` dict)] of every hierarchy file, oldest first; raises
    NoHierarchyError with what to do when there is none."""
    files = workdir_lib.hierarchy_files(workdir)
    if not files:
        raise NoHierarchyError(
            f"{workdir} has no hierarchy/epoch_*.npz yet (prototypes start after the warm-up epochs); "
            "run this again once the run has passed its warm-up")
    return [(int(f.stem.split("_")[1]), workdir_lib.load_npz(f)) for f in files]


def num_levels(arrays: dict[str, np.ndarray]) -> int:
    return len({k.split("/")[0] for k in arrays})


def image_counts(arrays: dict[str, np.ndarray], level: int) -> np.ndarray:
    """Training images per cluster of `level` (the `counts` field counts member centroids above
    level 0)."""
    return np.bincount(arrays[f"level{level}/assignments"], minlength=len(arrays[f"level{level}/centroids"]))


def clusters_figure(hierarchies: list[tuple[int, dict[str, np.ndarray]]]) -> Figure:
    """Per level: images per cluster (min / median / max, empty clusters) and phi (min / median /
    max) against the epoch."""
    levels = num_levels(hierarchies[0][1])
    fig = _figure(figsize=(3.6 * levels, 5.4))
    epochs = [e for e, _ in hierarchies]
    for l in range(levels):
        counts = [image_counts(h, l) for _, h in hierarchies]
        phis = [h[f"level{l}/temperatures"][h[f"level{l}/valid"]] for _, h in hierarchies]
        size_ax, phi_ax = fig.add_subplot(2, levels, l + 1), fig.add_subplot(2, levels, levels + l + 1)
        for ax, values, name in ((size_ax, counts, "images per cluster"), (phi_ax, phis, "phi")):
            ax.fill_between(epochs, [v.min() for v in values], [v.max() for v in values], alpha=0.25,
                            label="min-max")
            ax.plot(epochs, [np.median(v) for v in values], lw=1.5, label="median")
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
        empty = [int((c == 0).sum()) for c in counts]
        if any(empty):
            size_ax.plot(epochs, empty, "r--", lw=1, label="empty clusters")
        size_ax.set_title(f"level {l}: {len(counts[0])} clusters")
        size_ax.legend(fontsize=6)
    return fig


def write_run_figures(workdir: str | epath.Path, out: epath.Path | None = None) -> list[epath.Path]:
    """The cheap figures (curves.png, clusters.png once a hierarchy exists) -> written paths."""
    workdir = workdir_lib.path(workdir)
    out = out or workdir / FIGURES_DIR
    records_path = workdir / metrics.METRICS_FILE
    if not records_path.exists():
        raise FileNotFoundError(f"{workdir} has no {metrics.METRICS_FILE}; "
                                "pass the --workdir of a train.py run")
    written = [out / "curves.png"]
    save(curves_figure(metrics.read_records(records_path)), written[0])
    if workdir_lib.hierarchy_files(workdir):
        written.append(out / "clusters.png")
        save(clusters_figure(load_hierarchies(workdir)), written[-1])
    return written


# ----------------------------------------------------------------------------- model figures


def sample_features(workdir: epath.Path, sample: int, seed: int = 0):
    """A sample of the run's training set: (indices (n,), center-cropped uint8 images,
    L2-normalized key projections (n, d), labels or None)."""
    import ml_collections

    from hcsc_jax import features, models, sharding  # jax and the model only for these figures
    from hcsc_jax.data import crops, pipeline, sources
    from hcsc_jax.models import l2_normalize
    from hcsc_jax.run import checkpoints, setup

    config = ml_collections.ConfigDict(workdir_lib.read_json(workdir / workdir_lib.CONFIG_FILE))
    source = sources.open_source(config.dataset, config.train_split, config.get("data_dir"))
    n = source.num_examples
    idx = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    images = np.stack([crops.center_crop_image(source.load(int(i)), config.image_size) for i in idx])
    model, _ = checkpoints.restore_encoder(workdir, which="key")
    mesh = sharding.make_mesh()
    graphdef, params, stats = models.split_model(model)
    params, stats = sharding.replicate((params, stats), mesh)
    _, _, _, (mean, std) = setup.view_configs(config, images.shape[-1])
    batches = pipeline.array_batches(images, mesh, 256, cropped=True)
    _, proj = features.embed_batches(graphdef, params, stats, batches,
                                     len(images), config.image_size, mean, std)
    labels = None if source.labels is None else np.asarray(source.labels)[idx]
    return idx, images, l2_normalize(np.asarray(proj), axis=1), labels


def tree_rows(arrays: dict[str, np.ndarray], top: int, branch: int) -> list[tuple[int, int, int]]:
    """(depth, level, prototype) rows of the hierarchy figure, depth first: the `top` largest
    top-level prototypes (most images), under each its `branch` largest children level by level."""
    levels = num_levels(arrays)

    def largest(level, ids):
        counts = image_counts(arrays, level)[ids]
        return [int(i) for i in np.asarray(ids)[np.argsort(-counts, kind="stable")][:branch]]

    def visit(level, proto, depth):
        rows = [(depth, level, proto)]
        if level > 0:
            children = np.flatnonzero((arrays[f"level{level - 1}/parents"] == proto)
                                      & arrays[f"level{level - 1}/valid"])
            for child in largest(level - 1, children):
                rows += visit(level - 1, child, depth + 1)
        return rows

    top_level = levels - 1
    valid = np.flatnonzero(arrays[f"level{top_level}/valid"])
    tops = valid[np.argsort(-image_counts(arrays, top_level)[valid], kind="stable")][:top]
    return [row for t in tops for row in visit(top_level, int(t), 0)]


def nearest_members(arrays, level: int, proto: int, idx, proj, count: int) -> np.ndarray:
    """Positions (into the sample) of the `count` sample images assigned to `proto` at `level`
    whose projections are closest (cosine) to its centroid."""
    members = np.flatnonzero(arrays[f"level{level}/assignments"][idx] == proto)
    sims = proj[members] @ arrays[f"level{level}/centroids"][proto]
    return members[np.argsort(-sims, kind="stable")[:count]]


def hierarchy_figure(arrays, idx, images, proj, top: int = 3, branch: int = 2, strip: int = 8) -> Figure:
    rows = tree_rows(arrays, top, branch)
    h, w, c = images.shape[1:]
    fig = _figure(figsize=(2.2 + 0.6 * strip, 0.62 * len(rows)))
    for r, (depth, level, proto) in enumerate(rows):
        ax = fig.add_subplot(len(rows), 1, r + 1)
        row = np.full((h, strip * w, c), 255, np.uint8)
        for j, m in enumerate(nearest_members(arrays, level, proto, idx, proj, strip)):
            row[:, j * w:(j + 1) * w] = images[m]
        ax.imshow(row[..., 0] if c == 1 else row, cmap="gray" if c == 1 else None, vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        count = int(image_counts(arrays, level)[proto])
        ax.set_ylabel(f"{'   ' * depth}level {level} #{proto} ({count} images)", rotation=0, ha="right",
                      va="center", fontsize=8, fontweight="bold" if depth == 0 else "normal")
    fig.suptitle("prototypes, top level first; each row: the sample images nearest to it", fontsize=9)
    return fig


def embedding_figure(proj, labels, top_assign, seed: int = 0) -> Figure:
    """t-SNE of the projections, colored by label (when known) and by top-level cluster, with a
    legend of the colors (up to 20 of them)."""
    from sklearn.manifold import TSNE

    xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(proj) - 1) / 3),
              random_state=seed).fit_transform(proj)
    panels = ([("label", labels)] if labels is not None else []) + [("top-level cluster", top_assign)]
    fig = _figure(figsize=(4.6 * len(panels), 4.4))
    for i, (name, color) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        points = ax.scatter(xy[:, 0], xy[:, 1], c=color, cmap="tab10" if color.max() < 10 else "tab20", s=4,
                            lw=0)
        if len(np.unique(color)) <= 20:
            ax.legend(*points.legend_elements(num=None), title=name, fontsize=6, title_fontsize=7,
                      loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        ax.set_title(f"t-SNE of {len(proj)} key projections, by {name}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def write_all(workdir: str | epath.Path, out: epath.Path | None = None, sample: int = 2000, top: int = 3,
              branch: int = 2, strip: int = 8) -> list[epath.Path]:
    """Every figure of the module docstring -> written paths. Raises NoHierarchyError (after
    the curves) when the run has no hierarchy yet."""
    workdir = workdir_lib.path(workdir)
    out = out or workdir / FIGURES_DIR
    written = write_run_figures(workdir, out)
    _, arrays = load_hierarchies(workdir)[-1]
    idx, images, proj, labels = sample_features(workdir, sample)
    save(hierarchy_figure(arrays, idx, images, proj, top, branch, strip), out / "hierarchy.png")
    top_assign = arrays[f"level{num_levels(arrays) - 1}/assignments"][idx]
    save(embedding_figure(proj, labels, top_assign), out / "embedding.png")
    return written + [out / "hierarchy.png", out / "embedding.png"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hcsc_jax.visualize", description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", help="a train.py --workdir (local or gs://...)")
    ap.add_argument("--out", default=None, help="output directory (default: WORKDIR/figures)")
    ap.add_argument("--sample", type=int, default=2000, help="training images embedded for the model figures")
    ap.add_argument("--top", type=int, default=3, help="top-level prototypes in hierarchy.png")
    ap.add_argument("--branch", type=int, default=2, help="children shown per prototype")
    ap.add_argument("--strip", type=int, default=8, help="images per prototype")
    args = ap.parse_args(argv)
    try:
        written = write_all(args.workdir, workdir_lib.path(args.out) if args.out else None, args.sample,
                            args.top, args.branch, args.strip)
    except NoHierarchyError as err:
        print(f"wrote the curves only: {err}", file=sys.stderr)
        return 0
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("wrote " + " ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
