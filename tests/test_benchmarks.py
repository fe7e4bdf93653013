"""benchmarks/train_step.py times the trainer's own step (`setup.build`): a tiny run of its
ablation path (views cropped before the step, multi-crop, warm-up objective) prints its table;
the scripts run as documented (`python benchmarks/X.py`)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_step_benchmark_runs_the_trainers_step():
    cmd = [sys.executable, "benchmarks/train_step.py", "--arch=resnet18", "--width=0.125", "--small_stem",
           "--image_size=16", "--batch=64", "--bn_group_size=8", "--queue=128", "--num_images=64",
           "--steps=2", "--warmup_steps=1", "--noaugment", "--multicrop", "--objective=moco"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "augment OFF (ablation)" in out.stdout and "objective moco" in out.stdout
    assert "WARNING" not in out.stdout
    assert "images/s:" in out.stdout and "pipelined (2 steps" in out.stdout


def test_every_benchmark_runs_as_a_script_without_pythonpath(tmp_path):
    """`python benchmarks/X.py` as documented, from another directory, no PYTHONPATH: the scripts
    that import the shared JPEG writer find the repository themselves."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in ("input.py", "end_to_end.py", "evaluation.py"):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--helpshort"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert "ModuleNotFoundError" not in out.stderr and out.returncode in (0, 1), (script,
                                                                                     out.stderr[-500:])
        assert "--num_images" in out.stdout + out.stderr or "--images" in out.stdout + out.stderr, script
