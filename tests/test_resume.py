"""hcsc_jax.run.resume: which config changes a resumed run refuses, and the SIGTERM watch."""

import json
import os
import signal

import pytest
from etils import epath

from configs import digits
from hcsc_jax.run import config_checks, resume, rules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_changed_fields_ignores_what_is_safe():
    old = {"batch_size": 64, "log_every_steps": 5, "eval": {"knn_k": 20}, "model": {"arch": "resnet18"},
           "input": {"num_workers": 0, "pipeline": "memory"}}
    new = {"batch_size": 64, "log_every_steps": 7, "eval": {"knn_k": 200}, "model": {"arch": "resnet50"},
           "input": {"num_workers": 4, "pipeline": "stream"}, "wandb": {"project": "x"}, "extra": 1}
    assert resume.changed_fields(old, new) == ["extra", "input.pipeline", "model.arch"]


def test_runs_from_before_the_host_resampling_field_resume_only_with_their_filter():
    """A config.json written before input.resampling existed cropped with Pillow's antialias
    filter: the new default ("linear") would change the run, the old filter resumes it."""
    new = json.loads(digits.get_config().to_json())
    old = json.loads(json.dumps(new))
    del old["input"]["resampling"], old["input"]["bad_images"]
    assert resume.changed_fields(old, new) == ["input.resampling"]
    new["input"]["resampling"] = "antialias"
    assert resume.changed_fields(old, new) == []


def test_runs_from_before_evals_summary_resume():
    """A config.json written before the final evaluation became `evals.summary` holds `eval` and
    no `evals.summary`: the new config resumes it (the summary is safe to change)."""
    new = json.loads(digits.get_config().to_json())
    old = json.loads(json.dumps(new))
    del old["evals"]["summary"]
    old["eval"] = {"knn_k": 20, "knn_temperature": 0.07, "num_clusters": [60, 30, 10]}
    assert resume.changed_fields(old, new) == []
    assert "eval." in resume.SAFE_TO_CHANGE and "evals." in resume.SAFE_TO_CHANGE


def _nested(field: str, value) -> dict:
    head, _, rest = field.partition(".")
    return {head: _nested(rest, value) if rest else value}


def test_a_fields_resume_policy_is_the_one_its_rule_declares():
    """What a resumed run may change and what an older config.json means by leaving a field out
    are read from the rules (`rules.free`, `rules.added`), not listed apart: every free field may
    change, every other field of a rule may not; an added field left out reads as its value
    before, and any other value of it is a change."""
    free = [k for k, r in config_checks.RULES.items() if r.free]
    fixed = [k for k, r in config_checks.RULES.items() if not r.free]
    assert "log_every_steps" in free and "lr" in fixed and "input.pipeline" in fixed
    for field in free:
        assert resume.changed_fields(_nested(field, 1), _nested(field, 2)) == [], field
    for field in fixed:
        assert resume.changed_fields(_nested(field, 1), _nested(field, 2)) == [field], field
    added = {k: r.before for k, r in config_checks.RULES.items() if r.added}
    assert added["optimizer"] == "sgd" and added["clustering.seed_per_epoch"] is True
    for field, before in added.items():
        rule = config_checks.RULES[field]
        assert rule.ok(before), field
        assert resume.changed_fields({}, _nested(field, before)) == [], field
        if not rule.free:
            other = next(v for v in (rule.example, "other", 12345) if v != before)
            assert resume.changed_fields({}, _nested(field, other)) == [field], field
    with pytest.raises(ValueError, match="is not one of"):
        rules.added(rules.choice("a", "b"), "c")


def _workdir(tmp_path, config, with_checkpoint=True):
    workdir = epath.Path(tmp_path)
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    if with_checkpoint:
        (workdir / "checkpoints" / "22").mkdir(parents=True)
    return workdir


def test_check_config_only_when_there_is_a_checkpoint(tmp_path):
    old, new = digits.get_config(), digits.get_config()
    new.queue_size = 2048
    new.model.width = 0.5
    resume.check_config(_workdir(tmp_path / "a", old, with_checkpoint=False), new.to_json_best_effort())
    with pytest.raises(resume.ConfigMismatch, match=r"model.width: 0.25 -> 0.5, queue_size: 1024 -> 2048\)"):
        resume.check_config(_workdir(tmp_path / "b", old), new.to_json_best_effort())
    safe = digits.get_config()
    safe.update(log_every_steps=1, progress_bar=False)
    safe.wandb.project = "hcsc"
    resume.check_config(_workdir(tmp_path / "c", old), safe.to_json_best_effort())
    assert json.loads((tmp_path / "c" / "config.json").read_text())["log_every_steps"] == 11


def test_sigterm_is_noted_not_fatal_and_the_handler_restored():
    before = signal.getsignal(signal.SIGTERM)
    with resume.PreemptionWatch() as watch:
        assert not watch.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the watch
        assert watch.reached(2)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_handler_is_restored_when_the_run_stops_with_an_error():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="NaN"):
        with resume.PreemptionWatch():
            assert signal.getsignal(signal.SIGTERM) is not before
            raise RuntimeError("NaN loss")  # what the trainer's NonFiniteLossError does
    assert signal.getsignal(signal.SIGTERM) is before


WATCHED = """
import hashlib, sys, time
from hcsc_jax.run import console, resume

console.setup()
with resume.PreemptionWatch(on_abort=lambda: print("on_abort", flush=True)) as watch:
    print("watching", flush=True)
    if sys.argv[1] == "python":
        while time.sleep(0.01) is None:  # Python: its handlers run between bytecodes
            pass
    else:  # ~1 minute inside one C call that releases the GIL and runs no Python handler, as XLA's compile
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 100_000_000)
print("not stopped", watch.received, flush=True)
"""


@pytest.mark.parametrize("inside", ["python", "a long C call"])
def test_ctrl_c_is_noted_like_sigterm_and_a_second_one_stops_at_once(inside):
    """Two Ctrl-C 0.2 s apart stop the process at once, unsaved: exit status 130 after
    `on_abort` (the run's lock), also while the main thread is inside a long C++ call (an XLA
    compile), where Python's own handlers cannot run and the two would reach them as one."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", WATCHED, inside.split()[0]], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == "watching\n"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 130 and out == "on_abort\n", (out, err)
    lines = [line.split(" ", 1)[1] for line in err.strip().splitlines()]  # (after the time)
    assert lines == ["SIGINT received: saving a checkpoint at the next step boundary, then exiting (Ctrl-C "
                     "again: stop at once, unsaved)",
                     "Ctrl-C again: stopped at once, unsaved; the same command resumes from the last "
                     "checkpoint"]
