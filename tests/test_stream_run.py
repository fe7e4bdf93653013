"""A streamed run (loader worker processes) through train.py: a run stopped mid-epoch and resumed
equals an uninterrupted one, and no worker process outlives the run, whichever way it ends."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from test_trainer import start_and_signal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAM = ["--config.input.pipeline=stream", "--config.input.num_workers=2"]


def command(workdir, *extra):
    """train.py on digits (runlocal: 3 epochs of 22 steps), streamed by two loader workers."""
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/digits.py:runlocal",
            "--workdir", str(workdir), *STREAM, *extra]


def tagged_env():
    """An environment with a unique marker, inherited by every process the run starts."""
    tag = uuid.uuid4().hex
    return tag, dict(os.environ, HCSC_TEST_RUN=tag)


def processes_with(tag: str) -> list[int]:
    """Live process ids whose environment holds the marker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"HCSC_TEST_RUN={tag}".encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def assert_no_process_left(tag: str):
    deadline = time.time() + 10  # daemonic workers are terminated as the run exits
    while processes_with(tag) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_with(tag) == []


def final_state(workdir):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",)) as mngr:
        return mngr.restore(66, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    tag, env = tagged_env()
    done = subprocess.run(command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "leaked shared_memory" not in done.stderr  # (the resource tracker's warning at exit)
    assert_no_process_left(tag)
    return workdir


@pytest.mark.slow
def test_sigterm_mid_epoch_resumes_exactly_and_leaves_no_worker(reference, tmp_path):
    import jax

    workdir = tmp_path / "stopped"
    tag, env = tagged_env()
    returncode, err = start_and_signal(command(workdir), str(workdir), signal.SIGTERM, env)
    assert returncode == 0, err[-3000:]
    assert_no_process_left(tag)
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps[0] == 22 and 22 < steps[-1] < 66  # stopped within epoch 2 (or its clustering)
    done = subprocess.run(command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_no_process_left(tag)
    with open(workdir / "summary.json") as a, open(reference / "summary.json") as b:
        assert json.load(a) == json.load(b)
    leaves = [jax.tree.leaves(final_state(d)) for d in (reference, workdir)]
    for x, y in zip(*leaves, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "error"])
def test_no_worker_outlives_ctrl_c_or_an_error(tmp_path, how):
    tag, env = tagged_env()
    if how == "SIGINT":  # Ctrl-C, as SIGTERM: a checkpoint at the next step, exit 0 (test_trainer.py)
        workdir = tmp_path / "run"
        returncode, err = start_and_signal(command(workdir), str(workdir), signal.SIGINT, env)
        assert returncode == 0, err[-3000:]
        match = re.search(r"preempted \(SIGINT\): saved the checkpoint of step (\d+) in .*; "
                          r"run the same command", err)
        assert match, err[-3000:]
        steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
        assert steps[0] == 22 and steps[-1] == int(match.group(1)) and 22 < steps[-1] < 66, steps
    else:  # an unreadable image with bad_images="error": the run stops naming it
        for c in range(2):
            os.makedirs(tmp_path / "images" / f"class{c}")
            for i in range(16):
                image = Image.fromarray(np.full((12, 10), 10 * i + c, np.uint8))
                image.save(tmp_path / "images" / f"class{c}" / f"{i}.jpg")
        (tmp_path / "images" / "class1" / "3.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        cmd = command(tmp_path / "run", f"--config.dataset=folder:{tmp_path / 'images'}",
                      "--config.input.bad_images=error", "--config.batch_size=32", "--config.bn_group_size=4",
                      "--config.queue_size=64", "--config.clustering.num_clusters=(4,2)",
                      "--config.evals.summary.num_clusters=()")
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 1
        message = done.stderr.strip().splitlines()[-1]  # one line, no traceback
        assert "cannot decode image" in message and "3.jpg" in message and "bad_images=skip" in message
        assert "Traceback" not in done.stderr
    assert_no_process_left(tag)
