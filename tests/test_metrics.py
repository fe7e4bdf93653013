"""hcsc_jax.run.metrics: metrics.jsonl, TensorBoard events read back by tensorboard's own reader,
resume (cut lines, purged steps), optional W&B, and a gs:// workdir (in-memory fake)."""

import os
import subprocess
import sys
import types

import ml_collections
import pytest
from etils import epath
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hcsc_jax.run import metrics
from tests.fake_gcs import fake_gcs  # noqa: F401 - fixture


def tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
    """tag -> step -> value, as TensorBoard loads them."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def records(n=5, offset=0.0):
    return [{"step": s, "epoch": 0, "loss": 1.0 / s + offset, "proto_acc/0": 0.1 * s, "lr": 0.03}
            for s in range(1, n + 1)]


def test_scalars_tags_and_skips():
    r = {"step": 3, "epoch": 1, "type": "eval", "knn/top1_k20": 0.9, "nmi_per_level": [0.5, 0.25],
         "name": "x", "flag": True}
    assert metrics.scalars(r) == {"eval/knn/top1_k20": 0.9, "eval/nmi_per_level/0": 0.5,
                                  "eval/nmi_per_level/1": 0.25}
    assert metrics.scalars({"step": 1, "loss": 2}) == {"train/loss": 2.0}


# A metrics.jsonl that random bytes reached: not UTF-8, not JSON, JSON but no record (lines 2-5).
DAMAGED = (b'{"step": 1, "loss": 2.0}\n\xff\xfe\x80garbage\n{"step": \n[1, 2]\n{"loss": 1.0}\n'
           b'{"step": 3, "loss": 1.5}\n')


def test_cut_last_line_is_dropped_and_unreadable_lines_are_named_and_skipped(tmp_path, caplog):
    path = epath.Path(tmp_path) / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert metrics.read_records(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert "dropping the unfinished last line" in caplog.text
    path.write_bytes(DAMAGED)
    assert metrics.read_records(path) == [{"step": 1, "loss": 2.0}, {"step": 3, "loss": 1.5}]
    assert "skipped the unreadable lines 2, 3, 4, 5 (not UTF-8 JSON of an object with a step)" in caplog.text


def test_resume_on_a_damaged_file_moves_it_aside_and_keeps_its_records(tmp_path, caplog):
    """Nothing is lost: the file as it was is metrics.jsonl.corrupt-1 (then -2, ...); the new one
    holds its records up to the resume step, then what the run writes."""
    workdir = epath.Path(tmp_path)
    for n in (1, 2):
        (workdir / "metrics.jsonl").write_bytes(DAMAGED)
        writer = metrics.MetricsWriter(workdir, 2)
        writer.write({"step": 3, "loss": 0.5})
        writer.close()
        assert (workdir / f"metrics.jsonl.corrupt-{n}").read_bytes() == DAMAGED
        kept = metrics.read_records(workdir / "metrics.jsonl")
        assert kept == [{"step": 1, "loss": 2.0}, {"step": 3, "loss": 0.5}]
    assert (f"metrics.jsonl: unreadable lines 2, 3, 4, 5 (not UTF-8 JSON of an object with a step); moved "
            f"the file to {workdir / 'metrics.jsonl.corrupt-2'} and kept its 2 records") in caplog.text


def test_tensorboard_holds_the_jsonl_values_and_resume_purges(tmp_path):
    workdir = epath.Path(tmp_path)
    writer = metrics.MetricsWriter(workdir, 0)
    for r in records(5):
        writer.write(r)
    writer.write({"step": 5, "epoch": 0, "type": "epoch", "loss": 0.7})
    writer.close()
    assert metrics.read_records(workdir / "metrics.jsonl")[-1]["type"] == "epoch"
    tb = tensorboard_scalars(workdir / "tensorboard")
    assert set(tb) == {"train/loss", "train/proto_acc/0", "train/lr", "epoch/loss"}
    for r in records(5):
        assert tb["train/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        assert tb["train/proto_acc/0"][r["step"]] == pytest.approx(r["proto_acc/0"], rel=1e-6)
    # A kill cut the last line; the run resumes from step 3 and logs steps 4-5 anew (other values).
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    writer = metrics.MetricsWriter(workdir, 3)
    for r in records(5, offset=10.0)[3:]:
        writer.write(r)
    writer.close()
    steps = [r["step"] for r in metrics.read_records(workdir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]
    tb = tensorboard_scalars(workdir / "tensorboard")
    assert tb["train/loss"][3] == pytest.approx(1 / 3) and tb["train/loss"][5] == pytest.approx(10.2)
    assert sorted(tb["train/loss"]) == [1, 2, 3, 4, 5]
    assert tb["epoch/loss"] == {}  # its step 5 was past the resume point


def test_gs_workdir(fake_gcs, tmp_path):  # noqa: F811
    workdir = epath.Path("gs://bucket/run")
    writer = metrics.MetricsWriter(workdir, 0)
    for r in records(3):
        writer.write(r)
    writer.close()
    assert metrics.read_records(workdir / "metrics.jsonl") == records(3)
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and "bucket/run/metrics.jsonl" in fake_gcs
    local = epath.Path(tmp_path) / "copy"
    local.mkdir()
    (local / events[0].name).write_bytes(events[0].read_bytes())
    assert tensorboard_scalars(local)["train/loss"] == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
    # Resuming on the bucket (no append there) keeps the records up to the checkpoint.
    writer = metrics.MetricsWriter(workdir, 2)
    writer.write(records(3, offset=1.0)[2])
    writer.close()
    assert [r["loss"] for r in metrics.read_records(workdir / "metrics.jsonl")] == [1.0, 0.5, 1 / 3 + 1.0]


def wandb_config(**wandb):
    defaults = dict(project=None, entity=None, name=None, mode="online")
    c = ml_collections.ConfigDict({"lr": 0.03, "wandb": dict(defaults, **wandb)})
    return c


def test_wandb_gets_the_same_scalars(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda values, step: calls.append(("log", values, step)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    workdir = epath.Path(tmp_path)
    writer = metrics.MetricsWriter(workdir, 0, wandb_config(project="hcsc", mode="offline"))
    writer.write(records(1)[0])
    writer.close()
    (_, init), (_, values, step), finish = calls
    assert init["project"] == "hcsc" and init["mode"] == "offline" and init["resume"] == "allow"
    assert init["config"]["lr"] == 0.03 and init["dir"] == str(workdir)
    assert step == 1 and values == {"train/loss": 1.0, "train/proto_acc/0": 0.1, "train/lr": 0.03}
    assert finish == ("finish",)
    # Off by default: no project, no import.
    monkeypatch.setitem(sys.modules, "wandb", None)
    metrics.MetricsWriter(workdir, 0, wandb_config()).close()


def test_wandb_project_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import raises ImportError
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ImportError, match="wandb is not installed; pip install wandb, "
                                          "or leave config.wandb.project unset"):
        metrics.MetricsWriter(epath.Path(tmp_path), 0, wandb_config(project="hcsc"))
    # Nothing of the run is lost: the records past the resume step are still there, no events written.
    assert ((tmp_path / "metrics.jsonl").read_text().count("step") == 2
            and not (tmp_path / "tensorboard").exists())


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.MetricsWriter(epath.Path(tmp_path), 0, enabled=False)
    writer.write(records(1)[0])
    writer.close()
    assert not list(epath.Path(tmp_path).iterdir())


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
    """tensorboardX imports torch where it is installed (2-3 s of every run's start); the writer
    hides it while tensorboardX loads, and torch imports as usual afterwards."""
    pytest.importorskip("torch")
    code = "\n".join([
        "import sys", "from etils import epath", "from hcsc_jax.run import metrics",
        "w = metrics.MetricsWriter(epath.Path(sys.argv[1]), 0)", "w.write({'step': 1, 'loss': 2.0})",
        "w.close()", "print('tensorboardX' in sys.modules, 'torch' in sys.modules)",
        "import torch", "print(torch.ones(1).item())"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "False", "1.0"]
    tags = EventAccumulator(str(tmp_path / metrics.TENSORBOARD_DIR)).Reload().Tags()["scalars"]
    assert tags == ["train/loss"]
