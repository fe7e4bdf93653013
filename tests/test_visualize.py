"""hcsc_jax.visualize on a synthetic workdir: which series each panel plots, the Fig. 3 tree,
nearest images, PNGs on local and gs:// workdirs, and a workdir without a hierarchy yet."""

import json

import numpy as np
from etils import epath

from hcsc_jax import visualize
from hcsc_jax.clustering import hierarchical_kmeans
from hcsc_jax.run import workdir as workdir_lib
from tests.fake_gcs import fake_gcs  # noqa: F401 - fixture

PNG = b"\x89PNG\r\n\x1a\n"


def _records():
    steps = [{"step": s, "epoch": s // 10, "loss": 5.0 - 0.1 * s, "loss_instance": 4.0,
              "instance_loss/0": 4.0, "proto_acc/1": 0.01 * s, "instance_keep/2": 0.8, "lr": 0.03,
              "images_per_sec": 100.0, "grad_norm": 1.0}
             for s in range(1, 21)]
    return steps + [{"step": 20, "epoch": 1, "type": "epoch", "loss": 4.0},
                    {"step": 10, "epoch": 1, "type": "eval", "knn/top1_k20": 50.0,
                     "nmi_per_level": [0.1, 0.2]},
                    {"step": 20, "epoch": 2, "type": "eval", "knn/top1_k20": 70.0, "summary/knn_top1": 0.7,
                     "nmi_per_level": [0.3, 0.4], "knn/best_k": 20, "knn/temperature": 0.07}]


def _workdir(root, hierarchy_epochs=(1, 2)):
    workdir = epath.Path(root)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    for e in hierarchy_epochs:
        h = hierarchical_kmeans(x, [12, 6, 3], niter=5, nredo=1, seed=e, min_points_per_centroid=1)
        workdir_lib.save_npz(workdir / "hierarchy" / f"epoch_{e:04d}.npz", h.to_arrays())
    return workdir


def test_curve_series_panels():
    series = visualize.curve_series(_records())
    assert list(series) == ["loss", "per-level losses", "accuracy", "keep rate", "learning rate",
                            "images / s", "evaluation (%)", "evaluation (0-1)"]
    # grad_norm and the epoch record are not plotted.
    assert sorted(series["loss"]) == ["loss", "loss_instance"]
    assert series["loss"]["loss"][0][:3] == [1, 2, 3]
    # Settings and choices (knn/best_k, knn/temperature) are not curves.
    # Percentages and fractions on axes of their own (summary/knn_top1 0.75 sat beside knn's 75.3).
    assert series["evaluation (%)"] == {"knn/top1_k20": ([1, 2], [50.0, 70.0])}
    assert series["evaluation (0-1)"] == {"nmi_per_level/0": ([1, 2], [0.1, 0.3]),
                                          "nmi_per_level/1": ([1, 2], [0.2, 0.4]),
                                          "summary/knn_top1": ([2], [0.7])}


def test_embedding_figure_has_a_legend_per_panel():
    rng = np.random.default_rng(0)
    proj = rng.normal(size=(60, 8)).astype(np.float32)
    fig = visualize.embedding_figure(proj, rng.integers(0, 10, 60), rng.integers(0, 4, 60))
    legends = [ax.get_legend() for ax in fig.axes]
    assert all(legends) and [lg.get_title().get_text() for lg in legends] == ["label", "top-level cluster"]
    assert len(legends[1].get_texts()) == 4


def test_tree_rows_and_nearest_members(tmp_path):
    arrays = workdir_lib.load_npz(_workdir(tmp_path) / "hierarchy" / "epoch_0002.npz")
    rows = visualize.tree_rows(arrays, top=2, branch=2)
    counts = [visualize.image_counts(arrays, l) for l in range(3)]
    assert rows[0][:2] == (0, 2) and counts[2][rows[0][2]] == counts[2].max()
    assert sum(d == 0 for d, _, _ in rows) == 2
    for (d, l, p), (d2, l2, p2) in zip(rows, rows[1:]):
        if d2 == d + 1:  # a child: one level down, whose parent is the row above
            assert l2 == l - 1 and arrays[f"level{l2}/parents"][p2] == p
    # Nearest members: assigned to the prototype, most similar first.
    idx = np.arange(0, 300, 2)
    proj = np.random.default_rng(1).normal(size=(len(idx), 8)).astype(np.float32)
    got = visualize.nearest_members(arrays, 0, 3, idx, proj, 4)
    members = np.flatnonzero(arrays["level0/assignments"][idx] == 3)
    sims = proj[members] @ arrays["level0/centroids"][3]
    np.testing.assert_array_equal(got, members[np.argsort(-sims)[:4]])


def test_run_figures_local_and_on_a_bucket(tmp_path, fake_gcs):  # noqa: F811
    for workdir in (_workdir(tmp_path), _workdir("gs://bucket/run")):
        written = visualize.write_run_figures(workdir)
        assert [p.name for p in written] == ["curves.png", "clusters.png"]
        for p in written:
            data = p.read_bytes()
            assert data.startswith(PNG) and 10_000 < len(data) < 200_000
    assert "bucket/run/figures/curves.png" in fake_gcs


def test_no_hierarchy_yet_writes_the_curves_and_says_so(tmp_path, capsys):
    workdir = _workdir(tmp_path, hierarchy_epochs=())
    assert visualize.main([str(workdir)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no hierarchy/epoch_*.npz yet" in err[0] and "run this again" in err[0]
    assert sorted(p.name for p in (workdir / "figures").iterdir()) == ["curves.png"]
    assert visualize.main([str(tmp_path / "nothing")]) == 2
    assert "has no metrics.jsonl; pass the --workdir of a train.py run" in capsys.readouterr().err
