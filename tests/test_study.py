"""experiments/study.py (with settings.py and report.py): a real two-epoch, one-seed smoke run
(train.py + eval.py subprocesses) gives the table rows; a failed run is reported and the finished
ones kept; a rerun skips them; paired differences and verdicts from synthetic rows."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from conftest import shared_by_workers

from experiments import report, settings, study

SMOKE = settings.SETTINGS["smoke"]


@pytest.fixture(scope="session")
def smoke_shared(tmp_path_factory, worker_id):
    """The smoke setting, HCSC only (one train.py and three eval.py runs: ~1 min on 2 idle cores),
    run once per test session and shared by the pytest-xdist workers (conftest's
    `shared_by_workers`): workdirs in <root>, the archive in <root>/archive. Read it only;
    `smoke_root` is a copy to write into."""
    with shared_by_workers(tmp_path_factory, worker_id, "smoke_study_shared") as root:
        if not (root / "archive" / "smoke" / "report" / "results.json").exists():
            # The subprocesses run on one CPU device, not the 8 virtual ones of conftest.py.
            saved = os.environ.get("XLA_FLAGS")
            os.environ["XLA_FLAGS"] = " ".join(f for f in (saved or "").split() if "device_count" not in f)
            try:
                assert study.main(["--setting=smoke", f"--root={root}", f"--archive={root}/archive",
                                   "--only=hcsc"]) == 0
            finally:
                os.environ["XLA_FLAGS"] = saved or ""
    return str(root)


@pytest.fixture
def smoke_root(smoke_shared, tmp_path):
    """A copy of the shared smoke study (about 4 MB), this test's to write into."""
    root = tmp_path / "smoke_root"
    shutil.copytree(smoke_shared, root)
    return str(root)


@pytest.mark.slow
def test_smoke_study_produces_rows(smoke_shared, tmp_path):
    report_dir = os.path.join(smoke_shared, "archive", "smoke", "report")
    res = json.load(open(os.path.join(report_dir, "results.json")))
    (row,) = res["rows"]
    # The row comes from the archive: the run's small outputs, no checkpoints.
    kept = os.path.join(smoke_shared, "archive", "smoke", "hcsc_seed0")
    assert row["workdir"] == kept
    assert sorted(os.listdir(kept)) == ["config.json", "eval", "hierarchy", "metrics.jsonl",
                                        "study_times.json", "summary.json"]
    assert sorted(os.listdir(os.path.join(kept, "eval"))) == [
        "cluster_step22.json", "knn_step22.json", "linear_fast_step22.json"]
    assert os.listdir(os.path.join(kept, "hierarchy")) == ["epoch_0001.npz"]
    assert row["environment"]["versions"]["jax"] and row["environment"]["date"]
    assert row["method"] == "HCSC" and row["seed"] == 0
    for key in ("knn20", "knn200", "linear_fast", "nmi", "ami"):
        assert np.isfinite(row[key]), key
    assert 0 <= row["knn20"] <= 100 and 0 <= row["nmi"] <= 1
    assert row["level_sizes"] == [60, 30, 10] and len(row["level_nmi"]) == 3
    assert row["hierarchy_file"] == "epoch_0001.npz"  # the last epoch's clustering
    assert "--config.epochs=2" in row["command"] and row["train_seconds"] > 0
    records = [json.loads(line) for line in open(os.path.join(kept, "metrics.jsonl"))]
    last = [r for r in records if r.get("type") == "epoch"][-1]
    assert last["epoch"] == 1 and row["last_loss_instance"] == last["loss_instance"]
    assert row["plateau"] == pytest.approx(np.log(1024 + 1)) and 0 <= row["last_instance_acc"] <= 100
    tables = open(os.path.join(report_dir, "tables.md")).read()
    assert "| HCSC | 1 / 1 (seeds 0) |" in tables and "| MoCo v2 | 0 / 1" in tables
    assert os.path.isfile(os.path.join(report_dir, "smoke_bars.png"))
    assert res["environment"]["versions"]["jax"]
    assert "Runs trained on (date of each run's start; machine; versions):" in tables
    # RESULTS.md: the finished setting's tables and figure; Fashion-MNIST marked as not run; a
    # section of the file a setting has no archived run for is kept as it was.
    path = os.path.join(tmp_path, "md", "RESULTS.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("# old\n\n## digits\n\nkept table | 1 |\n\n## smoke\n\nold smoke text\n")
    report.results_md(os.path.join(smoke_shared, "archive"), path,
                      "python experiments/study.py --setting=smoke",
                      names=("smoke", "digits", "fashion_mnist"))
    text = open(path).read()
    assert "| HCSC | 1 / 1 (seeds 0) |" in text and "](results/smoke_bars.png)" in text
    assert "## digits\n\nkept table | 1 |" in text and "old smoke text" not in text
    assert "## fashion_mnist" in text and "**Not run yet.** This setting needs a GPU" in text
    assert os.path.isfile(os.path.join(os.path.dirname(path), "results", "smoke_bars.png"))


@pytest.mark.slow
def test_an_archived_run_is_skipped_without_its_workdir(smoke_root, tmp_path, capsys):
    # A later checkout: the archive is there (committed), the workdirs are not.
    assert study.main(["--setting=smoke", f"--root={tmp_path}", f"--archive={smoke_root}/archive",
                       "--only=hcsc"]) == 0
    out = capsys.readouterr().out
    assert "[skip] HCSC seed 0: archived" in out and "| HCSC | 1 / 1 (seeds 0) |" in out
    assert not os.path.exists(tmp_path / "smoke" / "hcsc_seed0")


@pytest.mark.slow
def test_failed_run_is_reported_and_finished_runs_kept(smoke_root, capsys):
    # A missing dataset: the MoCo v2 run fails; the finished HCSC run is skipped, not redone.
    rc = study.main(["--setting=smoke", f"--root={smoke_root}", f"--archive={smoke_root}/archive",
                     "--only=moco_v2,hcsc", "--extra=--config.dataset=no_such_dataset"])
    assert rc == 1
    out, err = capsys.readouterr()
    assert "[skip] HCSC seed 0: archived" in out
    assert "[FAILED] MoCo v2 seed 0: train.py exited with" in out and "MoCo v2 seed 0 (train)" in err
    (failure,) = json.load(open(os.path.join(smoke_root, "smoke", "failures.json")))
    assert failure["run"] == "MoCo v2 seed 0" and failure["returncode"] != 0
    assert "no_such_dataset" in failure["log_tail"]  # why: the end of its log
    res = json.load(open(os.path.join(smoke_root, "archive", "smoke", "report", "results.json")))
    assert [r["method"] for r in res["rows"]] == ["HCSC"]
    assert "Failed runs:" in open(os.path.join(smoke_root, "archive", "smoke", "report", "tables.md")).read()


@pytest.mark.slow
def test_the_raw_pixels_are_evaluated_on_the_data_of_a_run_and_archived(smoke_root, tmp_path, capsys):
    """The pixels reference trains nothing: eval.py --checkpoint=pixels:<dir> on a copy of the
    HCSC run's config.json; its row has the kNN eval.py gives for those pixels."""
    setting = dataclasses.replace(SMOKE, methods=SMOKE.methods + (
        settings.Method("raw pixels", "digits.py", group="reference", seeds=(0,), pixels_of="HCSC"),))
    archive = os.path.join(smoke_root, "archive")
    assert study.execute(setting, str(tmp_path), only={"raw_pixels"}, archive=archive) == []
    kept = os.path.join(archive, "smoke", "raw_pixels_seed0")
    assert sorted(os.listdir(kept)) == ["config.json", "eval", "reference.json", "study_times.json"]
    assert sorted(os.listdir(os.path.join(kept, "eval"))) == [
        "cluster_step0.json", "knn_step0.json", "linear_fast_step0.json"]
    row = next(r for r in report.collect(setting, archive) if r["method"] == "raw pixels")
    assert row["group"] == "reference" and "level_nmi" not in row
    want = pixel_knn(json.load(open(os.path.join(kept, "config.json"))), k=20)
    assert row["knn20"] == pytest.approx(want, abs=0.3)  # (one test image of 360: a tie broken otherwise)


def pixel_knn(run_config: dict, k: int, t: float = 0.07) -> float:
    """kNN top-1 (%) of the center-cropped, normalized pixels by hand (NumPy): cosine similarity,
    exp(s / t)-weighted vote of the k nearest training images."""
    from hcsc_jax.data import augmentations, sources

    def feats(split):
        d = sources.load_dataset(run_config["dataset"], run_config[split])
        x = np.asarray(augmentations.center_crop(d.images, run_config["image_size"],
                                                 run_config["augment"]["mean"], run_config["augment"]["std"]))
        x = x.reshape(len(x), -1)
        return x / np.linalg.norm(x, axis=1, keepdims=True), d.labels

    (xa, ya), (xb, yb) = feats("train_split"), feats("eval_split")
    sim = xb @ xa.T
    nn = np.argsort(-sim, axis=1)[:, :k]
    votes = np.zeros((len(xb), 10))
    np.add.at(votes, (np.arange(len(xb))[:, None], ya[nn]), np.exp(np.take_along_axis(sim, nn, 1) / t))
    return 100 * float(np.mean(votes.argmax(1) == yb))


def _rows(method, values, metric_shift=0.0):
    return [dict(method=method, group="main", seed=s, knn20=v + metric_shift, knn200=v, linear_fast=v,
                 nmi=v / 100, ami=v / 100, train_seconds=10.0) for s, v in enumerate(values)]


def test_tables_paired_differences_and_verdicts():
    rows = (_rows("MoCo v2", [90.0, 91.0, 92.0]) + _rows("HCSC", [91.0, 93.0, 92.5])
            + _rows("PCL", [89.0, 90.0]))
    text = report.tables(settings.SETTINGS["digits"], rows)
    assert "| HCSC | 3 / 5 (seeds 0,1,2) | 92.17 ± 1.04 |" in text
    # HCSC - MoCo v2 per seed: +1, +2, +0.5 -> mean 1.17, std 0.76.
    assert "| HCSC | 3 | 1.17 ± 0.76 [+1.00, +2.00, +0.50] |" in text
    assert "| PCL | 2 | -1.00 ± 0.00 [-1.00, -1.00] |" in text
    # HCSC - PCL on the seeds both have (0, 1): +2, +3.
    assert "#### Paired difference to PCL" in text and "| HCSC | 2 | 2.50 ± 0.71 [+2.00, +3.00] |" in text
    lines = report.verdicts(settings.SETTINGS["digits"], rows)
    knn_moco = next(l for l in lines if l.startswith("- kNN top-1 k=20 (%): HCSC − MoCo v2"))
    assert "+1.17" in knn_moco and "3/3 seeds" in knn_moco and "HCSC higher" in knn_moco
    # The raw pixels: one row (seed 0), every seed of every method paired with it.
    pixels = [dict(_rows("raw pixels", [92.0])[0], group="reference")]
    text = report.tables(settings.SETTINGS["digits"], rows + pixels)
    assert "#### Paired difference to raw pixels (every seed against its one row)" in text
    assert "| HCSC | 3 | 0.17 ± 1.04 [-1.00, +1.00, +0.50] |" in text
    assert "| PCL | 2 | -2.50 ± 0.71 [-3.00, -2.00] |" in text
    # Against MoCo v2 and PCL only trained methods: a reference's difference is the pixel table's.
    for base in ("MoCo v2", "PCL"):
        table = text.split(f"#### Paired difference to {base} ")[1].split("####")[0]
        assert "| raw pixels |" not in table and "| HCSC |" in table, base
    lines = report.verdicts(settings.SETTINGS["digits"], rows + pixels)
    knn_px = next(l for l in lines if l.startswith("- kNN top-1 k=20 (%): HCSC − raw pixels"))
    assert "+0.17" in knn_px and "HCSC ahead on 2/3 seeds" in knn_px and "seed noise" in knn_px


def test_plan_order_and_commands():
    order = [(m.name, s) for m, s in study.plan(settings.SETTINGS["digits"])]
    assert order[:4] == [("untrained encoder", 0), ("raw pixels", 0), ("untrained encoder", 1),
                         ("untrained encoder", 2)]
    assert order[4:7] == [("MoCo v2", 0), ("PCL", 0), ("HCSC", 0)] and len(order) == 4 + 15 + 12
    assert ("+ ICSC + PCSC (= HCSC)", 0) not in order  # reuses the HCSC runs
    m = next(m for m in settings.SETTINGS["digits"].methods if m.name == "+ PCSC only")
    cmd = study.train_command(settings.SETTINGS["digits"], m, 2, "W")
    assert "--config.objective.instance_selection=False" in cmd and "--config.seed=2" in cmd
    fm = settings.SETTINGS["fashion_mnist"]
    assert [m.config for m in fm.methods] == [
        "fashion_mnist.py:mocov2", "fashion_mnist.py:pcl", "fashion_mnist.py"]
    assert fm.needs_gpu and fm.coarse == "fashion_mnist"
    cpu = settings.SETTINGS["fashion_mnist_cpu"]
    assert [m.config for m in cpu.methods[:5]] == [
        "fashion_mnist.py:cpu", "fashion_mnist.py:cpu", "fashion_mnist.py:cpu,mocov2",
        "fashion_mnist.py:cpu,pcl", "fashion_mnist.py:cpu"]
    assert [(m.name, s) for m, s in study.plan(cpu)][:8] == [
        ("untrained encoder", 0), ("raw pixels", 0), ("untrained encoder", 1), ("untrained encoder", 2),
        ("MoCo v2", 0), ("PCL", 0), ("HCSC", 0), ("MoCo v2", 1)]
    assert "--config.epochs=0" in study.train_command(cpu, cpu.methods[0], 0, "W")
    assert not cpu.needs_gpu and cpu.coarse == "fashion_mnist"


def test_fashion_coarse_groups():
    coarse = settings.fashion_coarse_labels(np.arange(10))
    assert len(set(coarse.tolist())) == 4
    assert coarse[5] == coarse[7] == coarse[9] and coarse[0] == coarse[2] == coarse[4] == coarse[6]
    assert coarse[8] not in (coarse[0], coarse[5], coarse[1])


def test_level_nmi_reads_the_last_hierarchy(tmp_path):
    labels = np.repeat(np.arange(10), 6)
    os.makedirs(tmp_path / "hierarchy")
    for epoch, fine in ((1, np.zeros(60, np.int32)), (2, labels.astype(np.int32))):  # only the last counts
        np.savez(tmp_path / "hierarchy" / f"epoch_{epoch:04d}.npz", **{
            "level0/assignments": fine, "level0/centroids": np.zeros((10, 4), np.float32),
            "level1/assignments": settings.fashion_coarse_labels(labels),
            "level1/centroids": np.zeros((4, 4), np.float32)})
    out = report.level_nmi(str(tmp_path), labels, settings.fashion_coarse_labels(labels))
    assert out["hierarchy_file"] == "epoch_0002.npz" and out["level_sizes"] == [10, 4]
    np.testing.assert_allclose(out["level_nmi"][0], 1.0)
    np.testing.assert_allclose(out["top_level_coarse_nmi"], 1.0)  # the 4-cluster level vs the 4 groups
    assert report.level_nmi(str(tmp_path / "none"), labels) == {}


def test_run_lock(tmp_path):
    lock = tmp_path / "study.lock"
    assert study._lock(str(tmp_path)) and lock.read_text() == str(os.getpid())
    lock.write_text(str(os.getppid()))  # a live other process holds it
    assert not study._lock(str(tmp_path))
    lock.write_text("999999999")  # a dead one: taken over
    assert study._lock(str(tmp_path)) and lock.read_text() == str(os.getpid())


def test_the_authors_section_is_appended_once_however_often_results_md_is_written(tmp_path):
    """RESULTS.md ends with the authors' section (authors_digits/report.md, written by
    experiments/authors_digits.py), once, however often the file is rewritten."""
    (tmp_path / "archive" / "authors_digits").mkdir(parents=True)
    (tmp_path / "archive" / "authors_digits" / "report.md").write_text("## authors_digits\n\ntheirs | ours\n")
    path = tmp_path / "RESULTS.md"
    for _ in range(2):
        text = report.results_md(str(tmp_path / "archive"), str(path), "cmd", names=())
        path.write_text(text)
        assert text.count("## authors_digits") == 1 and text.rstrip().endswith("theirs | ours")


def test_the_authors_switches_are_paired_with_official_semantics():
    """authors_switches: HCSC official, each :authors switch on alone, all four; every row
    paired seed by seed with the official one."""
    s = settings.SETTINGS["authors_switches"]
    assert len(study.plan(s)) == 6 * 4 and s.methods[-1].config == "digits.py:authors"
    assert all("--config.objective.semantics=official" in m.overrides for m in s.methods[:-1])
    rows = [dict(method=m.name, group="main", seed=sd, knn20=90.0 + i + sd, knn200=80.0, linear_fast=90.0,
                 nmi=0.5, ami=0.5) for i, m in enumerate(s.methods) for sd in (0, 1)]
    text = report.tables(s, rows)
    assert "#### Paired difference to HCSC, official (same seed)" in text
    assert "| HCSC, :authors (all four) | 2 | 5.00 ± 0.00 [+5.00, +5.00] |" in text


def test_the_curve_setting_tables_each_runs_knn_during_training(tmp_path):
    """digits_curve reads where MoCo v2 stops gaining from the kNN a run logs while it trains
    (metrics.jsonl's eval records): the table has one column per evaluation, epochs counted from 1."""
    run = tmp_path / "run"
    run.mkdir()
    records = [{"type": "eval", "epoch": e - 1, "step": 44 * e, "knn/best_top1": 90.0 + e / 10,
                "knn/per_k/20/top1": 90.0 + e / 10, "knn/per_k/200/top1": 80.0 + e / 10} for e in (10, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = report._curve(str(run))
    assert curve["knn_by_epoch"] == [(10, 91.0, 81.0), (20, 92.0, 82.0)]
    s = settings.SETTINGS["digits_curve"]
    row = dict(method=s.methods[0].name, group="main", seed=0, knn20=92.0, knn200=82.0, linear_fast=90.0,
               nmi=0.5, ami=0.5, **curve)
    text = report.tables(s, [row])
    assert ("| epochs done | 10 | 20 |\n| --- | --- | --- |\n| k = 20 | 91.00 | 92.00 |\n"
            "| k = 200 | 81.00 | 82.00 |") in text
