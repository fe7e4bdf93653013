"""The epoch loop end to end on digits: outputs, resume after SIGKILL, NaN stop, corrupt checkpoints."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import digits
from hcsc_jax import clustering, models, sharding
from hcsc_jax.method import train_step
from hcsc_jax.run import checkpoints, failures, metrics, resume, schedule, trainer
from hcsc_jax.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """configs/digits.py:runlocal (3 epochs at 8 px, a tiny model, levels 20/8/4) with overrides."""
    c = digits.get_config("runlocal")
    c.update(overrides)
    return c


@flax.struct.dataclass
class _Stepped:
    """A minimal state with a `.step`, as `checkpoints.save` expects."""

    w: jax.Array
    step: jax.Array


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


TIMING = ("images_per_sec", "clustering_seconds", "input_wait_seconds", "epoch_seconds", "eval_seconds")


def untimed_records(workdir):
    """metrics.jsonl of a run without its timing fields (images/s, clustering time)."""
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def finished_run(digits_run):
    """conftest's `digits_run` (tiny_config(), trained once per session and worker) and its summary:
    read it, copy it (`_copy_run`) to resume or change it."""
    with open(os.path.join(digits_run, "summary.json")) as f:
        return digits_run, json.load(f)


@pytest.mark.slow
def test_run_writes_outputs_and_learns_something(finished_run):
    workdir, summary = finished_run
    steps_per_epoch = 1437 // 64
    assert summary["step"] == 3 * steps_per_epoch
    assert 0.5 < summary["knn_top1"] <= 1.0  # 10 classes: chance is 0.1
    assert len(summary["nmi_per_level"]) == 2 and all(0 < v <= 1 for v in summary["nmi_per_level"])
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == summary
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    epochs = [r for r in records if r.get("type") == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert "loss_proto" not in epochs[0] and "loss_proto" in epochs[1]  # warm-up, then prototypes
    assert all(np.isfinite(r["loss"]) for r in records if r.get("type") != "eval")
    evals = [r for r in records if r.get("type") == "eval"]
    assert records[-1] == evals[-1] and evals[-1]["step"] == summary["step"]  # the last evaluators' record
    assert evals[-1]["summary/knn_top1"] == summary["knn_top1"]  # the summary entry ran after the last epoch
    assert not any("summary/knn_top1" in r for r in evals[:-1])  # (every_epochs 0: only then)
    assert json.load(open(os.path.join(workdir, "config.json")))["queue_size"] == 256
    # One hierarchy per prototype epoch, a valid tree over the training set.
    files = sorted(os.listdir(os.path.join(workdir, "hierarchy")))
    assert files == ["epoch_0001.npz", "epoch_0002.npz"]
    h = clustering.Hierarchy.from_arrays(np.load(os.path.join(workdir, "hierarchy", files[-1])))
    assert h.num_clusters == (20, 8, 4) and h.assignments().shape == (1437, 3)
    np.testing.assert_array_equal(h.levels[1].assignments, h.levels[0].parents[h.levels[0].assignments])


@pytest.mark.slow
def test_evaluators_during_training_match_eval_py(finished_run):
    """config.evals: kNN after epoch 2 (every 2) and after the last one; the last equals what the
    evaluator gives for the final checkpoint outside training."""
    from configs import eval_digits
    from hcsc_jax import evaluators

    workdir, summary = finished_run
    evals = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r.get("type") == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2] and evals[-1]["step"] == summary["step"]
    assert set(evals[-1]) >= {"knn/per_k/5/top1", "knn/per_k/20/top5", "knn/best_top1"}
    cfg = eval_digits.get_config("runlocal")  # kNN with k 5 and 20, no progress bar
    ctx = evaluators.common.from_checkpoint(cfg, workdir, None, sharding.make_mesh())
    ctx.out_dir = None
    res, _ = evaluators.knn.run(ctx, cfg.evals.knn)
    assert res["per_k"]["5"]["top1"] == evals[-1]["knn/per_k/5/top1"]
    assert (res["per_k"]["20"]["top1"] == evals[-1]["knn/per_k/20/top1"]
            == pytest.approx(100 * summary["knn_top1"]))


SUMMARY_UNDER_ANOTHER_NAME = """
from configs import eval_digits

def get_config():
    c = eval_digits.get_config("runlocal")
    c.evals.final = dict(c.evals.summary, type="summary")
    return c
"""


@pytest.mark.slow
def test_eval_py_summary_equals_the_runs_summary_json(finished_run, tmp_path):
    """`eval.py --eval=summary` on the workdir recomputes summary.json's numbers exactly (query
    encoder kNN, key encoder hierarchy with the run's clustering settings and seed); --mode is the
    same flag; an entry under another name with `type: summary` is the same evaluator and names its
    results file."""
    workdir, summary = finished_run
    config = tmp_path / "eval_final.py"
    config.write_text(SUMMARY_UNDER_ANOTHER_NAME)
    results = {}
    for flag in ("--eval=final", "--mode=summary", "--eval=summary"):
        out = tmp_path / flag[2:].replace("=", "_")
        done = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--config={config}", flag,
                               f"--checkpoint={workdir}", f"--out={out}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        name = flag.split("=")[1]
        (results[flag],) = [json.load(open(out / f)) for f in os.listdir(out) if f.endswith(".json")]
        assert os.path.isfile(out / f"{name}_step{summary['step']}.json")
        assert (results[flag]["eval"], results[flag]["type"]) == (name, "summary")
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == summary
    for res in results.values():
        assert res["step"] == summary["step"]
        assert {k: res[k] for k in ("knn_top1", "nmi_per_level", "num_clusters")} == {
            k: summary[k] for k in ("knn_top1", "nmi_per_level", "num_clusters")}


@pytest.mark.slow
def test_a_custom_named_entry_runs_its_type_and_the_summary_needs_the_key_encoder(finished_run):
    from configs import eval_digits
    from hcsc_jax import evaluators

    workdir, summary = finished_run
    evals = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r.get("type") == "eval"]
    cfg = eval_digits.get_config("runlocal")
    ctx = evaluators.common.from_checkpoint(cfg, workdir, None, sharding.make_mesh())
    ctx.out_dir = None
    assert ctx.key_encoder is None and ctx.run_config.epochs == 3  # (the key encoder only when asked)
    c = tiny_config()
    c.evals = {"nn": dict(type="knn", every_epochs=0, ks=(5,), temperature=0.07)}
    trainer.check_values(c, jax.device_count())
    record, results = schedule.run_evals(c, ctx, 2, final=True)
    assert record["nn/per_k/5/top1"] == evals[-1]["knn/per_k/5/top1"] and "nn" in results
    assert schedule.run_evals(c, ctx, 1, final=False) == ({}, {})  # every_epochs 0: at the end only
    with pytest.raises(evaluators.EvalError,
                       match=r"the summary.s NMI needs the key encoder: pass a train.py workdir"):
        evaluators.run("summary", ctx, cfg.evals.summary)


@pytest.mark.slow
def test_an_old_finished_workdir_reruns_to_the_same_summary(finished_run, tmp_path):
    """A finished workdir whose config.json predates `evals.summary` (it has `eval`) resumes under
    the new config at its last step: no training, no eval record, the summary computed again
    after the loop and written the same."""
    workdir, summary = finished_run
    old = str(tmp_path / "old")
    shutil.copytree(workdir, old)
    saved = json.load(open(os.path.join(old, "config.json")))
    saved["eval"] = dict(saved["evals"].pop("summary"), knn_k=20, knn_temperature=0.07)
    for key in ("type", "every_epochs"):
        del saved["eval"][key]
    workdir_lib.write_atomic(workdir_lib.path(old) / "config.json", json.dumps(saved))
    os.remove(os.path.join(old, "summary.json"))
    before = read_jsonl(os.path.join(old, "metrics.jsonl"))
    assert trainer.train_and_evaluate(tiny_config(figures_at_end=False), old) == summary
    assert json.load(open(os.path.join(old, "summary.json"))) == summary
    assert read_jsonl(os.path.join(old, "metrics.jsonl")) == before
    assert "eval" not in json.load(open(os.path.join(old, "config.json")))


def tiny_command(workdir, *extra):
    """train.py with configs/digits.py:runlocal, as a subprocess command."""
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/digits.py:runlocal",
            "--workdir", str(workdir), *extra]


def start_and_signal(cmd, workdir, sig, env=None):
    """Starts `cmd` (in `env`), waits for the end of epoch 1 (step 22) to be committed, then a second
    into epoch 2 (its clustering or first steps) sends `sig`. -> the finished process's stderr."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(os.path.join(ckpt_dir, "22")):  # end of epoch 1 committed
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled"
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(finished_run, tmp_path):
    reference_dir, reference = finished_run
    workdir = str(tmp_path / "killed")
    # The kill can land after a mid-epoch save.
    cmd = tiny_command(workdir, "--config.checkpoint_every_steps=5")
    returncode, _ = start_and_signal(cmd, workdir, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == reference
    # Same final parameters and queue, bit for bit (same devices, same seed, same data order).
    final = [_restore_raw(os.path.join(d, "checkpoints"), 66) for d in (reference_dir, workdir)]
    for a, b in zip(jax.tree.leaves(final[0]), jax.tree.leaves(final[1])):
        np.testing.assert_array_equal(a, b)
    # The same metrics.jsonl, the epoch means after the mid-epoch resume included.
    assert untimed_records(workdir) == untimed_records(reference_dir)


@pytest.mark.slow
def test_a_stop_signal_saves_at_the_next_step_exits_0_and_resumes_exactly(finished_run, tmp_path):
    """SIGTERM (preemption): a checkpoint at the next step, exit 0, then the same command ends with
    the same parameters and the same metrics.jsonl. (Ctrl-C takes the same path, `resume.PreemptionWatch`:
    tests/test_stream_run.py sends it to a streamed run and checks the save and the exit.)"""
    sig = signal.SIGTERM
    reference_dir, reference = finished_run
    workdir = str(tmp_path / "preempted")
    cmd = tiny_command(workdir)  # no mid-epoch saves: the one at the signal is the only one in epoch 2
    returncode, err = start_and_signal(cmd, workdir, sig)
    assert returncode == 0, err[-3000:]
    match = re.search(rf"preempted \({sig.name}\): saved the checkpoint of step (\d+) in .*; "
                      r"run the same command", err)
    assert match, err[-3000:]
    step = int(match.group(1))
    assert 22 < step < 44
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps == [22, step]
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # (epochs counted from 1 as the log counts them: the signal came in epoch 2 of 3)
    assert f"resumed from step {step} (epoch 2/3, after its step {step - 22}/22)" in done.stderr
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == reference
    final = [_restore_raw(os.path.join(d, "checkpoints"), 66) for d in (reference_dir, workdir)]
    for a, b in zip(jax.tree.leaves(final[0]), jax.tree.leaves(final[1])):
        np.testing.assert_array_equal(a, b)
    # The log window and epoch sums cut by the signal went into the checkpoint: same records.
    assert untimed_records(workdir) == untimed_records(reference_dir)


@pytest.mark.slow
def test_two_quick_ctrl_c_inside_an_xla_compile_stop_at_once_with_status_130(tmp_path):
    """Two Ctrl-C 0.2 s apart while the prototype step of epoch 2 compiles (~15 s of C++ during which
    no Python signal handler runs, and after which Python saw the two as one: the run saved and
    exited 0): the run ends at once, unsaved, status 130, its lock released, the checkpoints
    directory holding only committed steps."""
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # a real compile
    proc = subprocess.Popen(tiny_command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(env, JAX_LOG_COMPILES="1"))
    try:
        lowered = 0  # jax logs this line, then compiles: the second is epoch 2's step
        while lowered < 2 and (line := proc.stderr.readline()):
            lowered += "Finished jaxpr to MLIR module conversion jit(step)" in line
        assert lowered == 2, "the run ended before epoch 2's step compiled"
        deadline = time.time() + 5
        while not (workdir / "checkpoints" / "22").is_dir() and time.time() < deadline:
            time.sleep(0.05)  # (the save of epoch 1's end committed, as it is by now)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].endswith("Ctrl-C again: stopped at once, unsaved; the same command "
                                                 "resumes from the last checkpoint")
    assert not (workdir / "run.lock").exists()
    assert [s for s in os.listdir(workdir / "checkpoints") if s.isdigit()] == ["22"]
    assert checkpoints.manager(str(workdir)).all_steps() == [22]


def _signal_after(monkeypatch, module, name, sig=signal.SIGTERM):
    """Replaces `module.name` by itself followed by `sig` to this process."""
    original = getattr(module, name)

    def then_signal(*args, **kwargs):
        out = original(*args, **kwargs)
        os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(module, name, then_signal)


@pytest.mark.slow
def test_a_stop_signal_after_the_last_step_keeps_its_checkpoint_and_leaves_the_summary(
        finished_run, tmp_path, monkeypatch):
    """SIGTERM after the last step (here before the loop of a finished run): the checkpoint is
    committed, no summary, the lock released, exit 0 (Preempted); the same command then writes
    summary.json."""
    reference_dir, reference = finished_run
    workdir = _copy_run(reference_dir, tmp_path / "run")
    os.remove(os.path.join(workdir, "summary.json"))
    _signal_after(monkeypatch, schedule, "evals_cut_off")  # (set-up, with the watch on)
    with pytest.raises(resume.Preempted, match=r"^preempted \(SIGTERM\): saved the checkpoint of step 66 in"):
        trainer.train_and_evaluate(tiny_config(figures_at_end=False), workdir)
    assert not {"summary.json", "run.lock"} & set(os.listdir(workdir))
    monkeypatch.undo()
    assert trainer.train_and_evaluate(tiny_config(figures_at_end=False), workdir) == reference
    assert json.load(open(os.path.join(workdir, "summary.json"))) == reference


@pytest.mark.slow
def test_a_stop_signal_right_after_the_summary_line_still_writes_summary_json(
        finished_run, tmp_path, monkeypatch, caplog):
    """SIGTERM right after the final summary line (the probe: exit 143, summary.json missing, a stale
    lock): summary.json is written, the figures left out, the lock released, the run ends normally."""
    reference_dir, reference = finished_run
    workdir = _copy_run(reference_dir, tmp_path / "run")
    os.remove(os.path.join(workdir, "summary.json"))  # (the copy has no figures/)
    _signal_after(monkeypatch, schedule, "final_summary")
    assert trainer.train_and_evaluate(tiny_config(), workdir) == reference
    assert json.load(open(os.path.join(workdir, "summary.json"))) == reference
    assert not {"figures", "run.lock"} & set(os.listdir(workdir))
    assert "SIGTERM received: summary.json written, figures left out (python -m hcsc_jax.visualize" in \
        caplog.text


@pytest.mark.slow
def test_resume_redoes_an_evaluation_a_kill_cut_off(finished_run, tmp_path):
    """A kill between the checkpoint of step 44 and the kNN record due there: the resumed run
    evaluates step 44 again, and metrics.jsonl ends as the uninterrupted run's."""
    reference_dir, _ = finished_run
    workdir = _copy_run(reference_dir, tmp_path / "run")
    shutil.rmtree(os.path.join(workdir, "checkpoints", "66"))
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    cut = next(i for i, r in enumerate(records) if r.get("type") == "eval" and r["step"] == 44)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[:cut])
    trainer.train_and_evaluate(tiny_config(), workdir)
    assert untimed_records(workdir) == untimed_records(reference_dir)


@pytest.mark.slow
def test_the_host_waits_for_all_but_max_in_flight_steps(tmp_path, monkeypatch):
    """A stop signal is taken at the next step and its save waits for the steps already
    dispatched: never more than MAX_IN_FLIGHT unfinished when the host dispatches the next."""
    jit_train_step, outputs, unfinished = train_step.jit_train_step, [], []

    def counting(*args, **kwargs):
        step = jit_train_step(*args, **kwargs)

        def call(*a):
            unfinished.append(sum(not m["loss"].is_ready() for m in outputs))
            state, metrics = step(*a)
            outputs.append(metrics)
            return state, metrics
        return call

    monkeypatch.setattr(train_step, "jit_train_step", counting)
    c = tiny_config(epochs=1, warmup_epochs=1, figures_at_end=False)
    c.evals = {}
    trainer.train_and_evaluate(c, str(tmp_path))
    assert len(unfinished) == 1437 // 64 and max(unfinished) <= trainer.MAX_IN_FLIGHT


def _restore_raw(directory, step):
    with ocp.CheckpointManager(directory, item_names=("state",)) as mngr:
        return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    # lr 1e30 blows the weights up within the first prototype epoch.
    cfg = tiny_config(epochs=3, warmup_epochs=1, checkpoint_every_epochs=1)
    cfg.lr = 1e30
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(failures.NonFiniteLossError, match=r"loss is (nan|inf|-inf) at step \d+; .* No "
                                                         r"checkpoint was saved in"):
        trainer.train_and_evaluate(cfg, workdir)
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler  # the run's SIGTERM watch is gone
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    # Whatever was saved holds finite parameters.
    for step in steps:
        state = _restore_raw(os.path.join(workdir, "checkpoints"), step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


class _FakeManager:
    """What `failures.keeping_saves` asks of a CheckpointManager: a save in flight, then step 5."""

    directory, waited = "/runs/x/checkpoints", False

    def wait_until_finished(self):
        self.waited = True

    def latest_step(self):
        return 5 if self.waited else None


def _raised_while_handling(cause, error):
    """`error` raised in an `except` block for `cause` (its __context__)."""
    try:
        try:
            raise cause
        except OSError:
            raise error  # noqa: B904 - the implicit chain is the point
    except type(error) as raised:
        return raised


# What Orbax raised on a real full disk (a 2 MiB tmpfs; orbax-checkpoint 0.12.8, tensorstore
# 0.1.86): tensorstore's ValueError, the errno in its message.
ORBAX_FULL_DISK = (
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/runs/x/checkpoints/3.orbax-'
    'checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/runs/x/checkpoints/3.'
    'orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/8de28cfbe7ac8318ab91d929f2f597c7": '
    "Failed to write 1202590 bytes to file 5: No space left on device [os_error_code='28']")


@pytest.mark.parametrize("error,cause", [
    (OSError(28, "No space left on device"), r"OSError: \[Errno 28\] No space left on device"),
    (ValueError(ORBAX_FULL_DISK), r"ValueError: RESOURCE_EXHAUSTED: Error writing .* No space left on device "
                                  r"\[os_error_code='28'\]"),
    (_raised_while_handling(OSError(30, "Read-only file system"), RuntimeError("commit failed")),
     r"OSError: \[Errno 30\] Read-only file system"),
], ids=["OSError", "orbax", "chained"])
def test_a_full_disk_is_one_line_naming_the_cause_and_the_checkpoint_kept(error, cause):
    mngr = _FakeManager()
    message = rf"^writing the run failed \({cause}\); free space .* The last checkpoint kept is step 5 in"
    with pytest.raises(workdir_lib.WorkdirError, match=message):
        with failures.keeping_saves(mngr):
            raise error


def test_an_error_that_is_not_a_refused_write_stays_what_it_is():
    """An XLA out-of-memory error also starts with RESOURCE_EXHAUSTED: it is no full disk."""
    with pytest.raises(ValueError, match="^RESOURCE_EXHAUSTED: Out of memory while trying to allocate"):
        with failures.keeping_saves(_FakeManager()):
            raise ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")


FULL_DISK_SAVE = """
import sys
import flax.struct, jax
from hcsc_jax.run import checkpoints, console, failures
from hcsc_jax.run import workdir as workdir_lib

@flax.struct.dataclass
class State:
    w: jax.Array
    step: jax.Array

log = console.setup()
mngr = checkpoints.manager(sys.argv[1])
state = State(jax.random.normal(jax.random.key(0), (600_000,)), jax.numpy.array(3))  # 2.4 MB > 1 MiB
try:
    with failures.keeping_saves(mngr):
        checkpoints.save(mngr, state, {"epoch": 0, "step_in_epoch": 3}, None)
        mngr.wait_until_finished()
except workdir_lib.WorkdirError as err:
    log.error("%s", err)
    sys.exit(2)
"""


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_real_full_disk_is_one_line_and_orbax_logs_no_traceback(tmp_path):
    """A save to a 1 MiB tmpfs: Orbax's save threads log the failure with tracebacks and raise it;
    what the console shows is the one line of `keeping_saves`."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode:
        pytest.skip("mount -t tmpfs refused (no CAP_SYS_ADMIN)")
    try:
        done = subprocess.run([sys.executable, "-c", FULL_DISK_SAVE, str(small / "run")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert re.search(r"writing the run failed \(ValueError: RESOURCE_EXHAUSTED: Error writing .* No space "
                     r"left on device \[os_error_code='28'\]\); free space .* No checkpoint was saved in",
                     line), line


@pytest.mark.slow
def test_divergence_guard_keeps_the_save_in_flight_and_names_it(tmp_path):
    """The loss jumps from ~5.5 to ~7.4 when the prototype terms start (epoch 2): a max_loss of 6.5
    stops the run there, after the save of step 22 began; that checkpoint is committed and named."""
    cfg = tiny_config(figures_at_end=False)
    cfg.divergence.max_loss = 6.5
    with pytest.raises(failures.DivergedError,
                       match=r"loss is 7\.\d+ at step 23, above config.divergence.max_loss = 6.5: .* "
                             r"The last checkpoint kept is step 22 in"):
        trainer.train_and_evaluate(cfg, str(tmp_path))
    assert sorted(s for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == ["22"]


def test_divergence_guard_stops_before_any_save_and_says_none_exists(tmp_path):
    cfg = tiny_config(figures_at_end=False)
    cfg.divergence.max_grad_norm = 1e-3  # every step's gradient is above it
    with pytest.raises(failures.DivergedError, match=r"grad_norm is .* at step 1, above "
                                                    r"config.divergence.max_grad_norm = 0.001: .* "
                                                    r"No checkpoint was saved in"):
        trainer.train_and_evaluate(cfg, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints" / "22")


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    mngr = checkpoints.manager(str(tmp_path), max_to_keep=3)
    for step in (1, 2):
        checkpoints.save(mngr, _Stepped(jnp.arange(4.0) * step, jnp.array(step, jnp.int32)),
                         {"epoch": step, "step_in_epoch": 0}, None)
    mngr.wait_until_finished()
    # Corrupt step 2: truncate every data file of its state.
    for root, _, files in os.walk(os.path.join(str(tmp_path), "checkpoints", "2", "state")):
        for name in files:
            if "manifest" in name or name.startswith("_METADATA"):
                open(os.path.join(root, name), "w").close()
    abstract = jax.eval_shape(lambda: _Stepped(jnp.zeros(4), jnp.array(0, jnp.int32)))
    mngr = checkpoints.manager(str(tmp_path))
    restored, meta, hierarchy = checkpoints.restore_latest(mngr, abstract)
    assert meta["epoch"] == 1 and int(restored.step) == 1 and hierarchy is None
    np.testing.assert_array_equal(restored.w, np.arange(4.0))
    assert "step 2" in caplog.text and "trying the previous one" in caplog.text
    # Step 2 is kept aside, renamed, and the run can save step 2 again.
    assert os.path.isdir(tmp_path / "checkpoints" / "2.unusable") and mngr.all_steps() == [1]
    checkpoints.save(mngr, _Stepped(jnp.arange(4.0) * 2, jnp.array(2, jnp.int32)), {"epoch": 2}, None)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1, 2]


def test_restore_newest_skips_unreadable_steps_and_names_them_when_none_restores(tmp_path, caplog):
    mngr = checkpoints.manager(str(tmp_path), max_to_keep=3)
    for step in (1, 2, 3):
        checkpoints.save(mngr, _Stepped(jnp.arange(4.0), jnp.array(step, jnp.int32)), {"epoch": step}, None)
    mngr.wait_until_finished()

    def read(step):
        if step > 1:
            raise OSError(f"bad {step}")
        return "one"

    assert checkpoints.restore_newest(mngr, read, what="thing") == (1, "one")
    assert "thing at step 3 in" in caplog.text and "(OSError: bad 2); trying the previous one" in caplog.text
    none = r"no thing in .* could be restored \(steps \[1, 2, 3\]; step 3: ZeroDivisionError: division by "
    with pytest.raises(checkpoints.NoReadableStep, match=none):
        checkpoints.restore_newest(mngr, lambda step: 1 / 0, what="thing")
    assert mngr.all_steps() == [1, 2, 3]  # nothing moved


def test_a_checkpoint_whose_values_differ_from_its_digest_is_not_restored(tmp_path, caplog):
    """Values that read back but differ from those saved (here: the digest saved with them is
    changed, as flipped bytes in the data would) are not restored silently."""
    mngr = checkpoints.manager(str(tmp_path), max_to_keep=3)
    for step in (1, 2):
        state = _Stepped(jnp.arange(4.0) * step, jnp.array(step, jnp.int32))
        checkpoints.save(mngr, state, {"epoch": step}, None)
    mngr.wait_until_finished()
    meta_file = next((tmp_path / "checkpoints" / "2" / "meta").glob("metadata"))
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, digest="0" * 64)))
    abstract = jax.eval_shape(lambda: _Stepped(jnp.zeros(4), jnp.array(0, jnp.int32)))
    restored, _, _ = checkpoints.restore_latest(checkpoints.manager(str(tmp_path)), abstract)
    assert int(restored.step) == 1 and "differs from the one saved (SHA-256 digest)" in caplog.text


def test_a_checkpoint_holding_nan_is_not_restored(tmp_path, caplog):
    mngr = checkpoints.manager(str(tmp_path), max_to_keep=3)
    for step, w in ((1, jnp.arange(4.0)), (2, jnp.array([0.0, np.nan, 1.0, 2.0]))):
        checkpoints.save(mngr, _Stepped(w, jnp.array(step, jnp.int32)), {"epoch": step}, None)
    mngr.wait_until_finished()
    abstract = jax.eval_shape(lambda: _Stepped(jnp.zeros(4), jnp.array(0, jnp.int32)))
    restored, meta, _ = checkpoints.restore_latest(checkpoints.manager(str(tmp_path)), abstract)
    assert int(restored.step) == 1 and "holds NaN or inf" in caplog.text
    assert os.path.isdir(tmp_path / "checkpoints" / "2.unusable")


def test_bad_configs_fail_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match="queue_size 100 is not a multiple of the global batch 64"):
        trainer.train_and_evaluate(tiny_config(queue_size=100), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"multiple of bn_group_size x devices = 16 x 8 = 128"):
        trainer.train_and_evaluate(tiny_config(bn_group_size=16), str(tmp_path / "b"))
    cfg = tiny_config()
    cfg.clustering.num_clusters = (5000, 10)
    with pytest.raises(ValueError, match="exceeds the 1437 training images"):
        trainer.train_and_evaluate(cfg, str(tmp_path / "c"))


@pytest.mark.slow
def test_encoder_restores_from_workdir_and_from_export(finished_run, tmp_path):
    workdir, summary = finished_run
    model, meta = checkpoints.restore_encoder(workdir)
    assert meta["step"] == summary["step"] and meta["in_channels"] == 1
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = _restore_raw(os.path.join(workdir, "checkpoints"), summary["step"])
    want = jax.tree.leaves(state.q_params if hasattr(state, "q_params") else state["q_params"])
    got = jax.tree.leaves(nnx.to_pure_dict(params))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    # Export, then load: the same function of the input.
    export_dir = str(tmp_path / "encoder")
    checkpoints.export_encoder(export_dir, meta, params, stats)
    again, meta2 = checkpoints.restore_encoder(export_dir)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 8, 8, 1)), jnp.float32) / 255
    for a, b in zip(model(x, train=False), again(x, train=False)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="neither a training workdir"):
        checkpoints.restore_encoder(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_init_encoder_starts_from_a_checkpoint(finished_run, tmp_path, caplog):
    workdir, summary = finished_run
    # No training: the evaluation then sees exactly the restored query encoder.
    with caplog.at_level("INFO", logger="hcsc_jax"):
        out = trainer.train_and_evaluate(tiny_config(epochs=0, warmup_epochs=0, init_encoder=workdir),
                                         str(tmp_path / "a"))
    assert out["knn_top1"] == summary["knn_top1"]
    step = checkpoints.restore_encoder(workdir)[1]["step"]
    assert (f"both encoders start from {workdir}: the query encoder of step {step} (resnet18, width"
            in caplog.text)
    wrong = tiny_config(epochs=0, warmup_epochs=0, init_encoder=workdir)
    wrong.model.width = 0.25
    with pytest.raises(ValueError, match="different architecture than config.model"):
        trainer.train_and_evaluate(wrong, str(tmp_path / "b"))


def _final_params(workdir):
    model, _ = checkpoints.restore_encoder(workdir)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.slow
def test_streaming_input_trains_like_resident_input(tmp_path):
    """Host-side crops (input.pipeline="stream") give the same training as device-side crops
    when both crops are the whole image (scale 1): same order, same views, same parameters."""
    runs = {}
    for pipe in ("memory", "stream"):
        c = tiny_config(epochs=1, warmup_epochs=1)  # warm-up only: the steps, no clustering
        c.augment.scale = (1.0, 1.0)
        c.input.update(pipeline=pipe, num_workers=2)
        c.evals.summary.num_clusters = ()
        trainer.train_and_evaluate(c, str(tmp_path / pipe))
        runs[pipe] = _final_params(str(tmp_path / pipe))
    a, b = (jax.tree.leaves(runs[p]) for p in ("memory", "stream"))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    init = _final_params_of_untrained()
    assert max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(a, jax.tree.leaves(init))) > 1e-3


def _final_params_of_untrained():
    config = tiny_config()
    model = models.build_encoder(models.encoder_meta(config.model.to_dict(), 1, config.bn_group_size), seed=0)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.slow
def test_streaming_multicrop_run_adds_local_terms(tmp_path):
    """Multi-crop through the streaming path with prototypes: every logged loss is the sum of the
    global and local terms, the local terms are there in warm-up and after, and the hierarchy is
    built from the host's center crops."""
    c = tiny_config(epochs=2, warmup_epochs=1)
    c.augment.local_views = ((6, (0.3, 0.8)), (6, (0.3, 0.8)), (4, (0.2, 0.5)))
    c.input.update(pipeline="stream", num_workers=2)
    c.evals.summary.num_clusters = (10,)
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "type" not in r]  # step records
    warm = [r for r in records if r["epoch"] == 0]
    proto = [r for r in records if r["epoch"] == 1]
    assert warm and proto
    for r in warm:
        assert "loss_local_proto" not in r and r["loss_local_instance"] > 3 * np.log(2)
        np.testing.assert_allclose(r["loss"], r["loss_instance"] + r["loss_local_instance"], rtol=1e-5)
    for r in proto:
        total = r["loss_instance"] + r["loss_proto"] + r["loss_local_instance"] + r["loss_local_proto"]
        np.testing.assert_allclose(r["loss"], total, rtol=1e-5)
        assert r["loss_local_proto"] > 0
    h = clustering.Hierarchy.from_arrays(np.load(tmp_path / "hierarchy" / "epoch_0001.npz"))
    assert h.assignments().shape == (1437, 3)
    assert 0.0 < summary["nmi_per_level"][0] <= 1.0


@pytest.mark.slow
def test_tensorboard_events_hold_the_metrics_jsonl_values(finished_run):
    """Every number of every metrics.jsonl record, read back by tensorboard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _ = finished_run
    acc = EventAccumulator(os.path.join(workdir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    expected = {(tag, r["step"]): v for r in records for tag, v in metrics.scalars(r).items()}
    assert {"train/loss", "train/proto_acc/0", "train/instance_keep/2", "train/lr", "train/images_per_sec",
            "epoch/clustering_seconds", "eval/knn/per_k/20/top1", "eval/knn/best_top1"} <= set(tb)
    assert len(expected) == sum(len(v) for v in tb.values())
    for (tag, step), value in expected.items():
        assert tb[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)
    assert sorted(os.listdir(os.path.join(workdir, "figures"))) == ["clusters.png", "curves.png"]


def _copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tensorboard", "figures"))
    return str(dst)


@pytest.mark.slow
def test_resume_drops_a_cut_metrics_line(finished_run, tmp_path):
    workdir = _copy_run(finished_run[0], tmp_path / "run")
    path = os.path.join(workdir, "metrics.jsonl")
    before = read_jsonl(path)
    with open(path, "a") as f:
        f.write('{"epoch": 3, "loss": 7.1, "st')  # the kill landed mid-line
    summary = trainer.train_and_evaluate(tiny_config(), workdir)
    assert summary == finished_run[1]
    after = read_jsonl(path)
    assert after[:len(before)] == before and after[-1]["type"] == "eval"


@pytest.mark.slow
def test_resume_moves_aside_a_metrics_file_random_bytes_reached(finished_run, tmp_path):
    """Random bytes in metrics.jsonl (the probe: a UnicodeDecodeError traceback on resume): the file
    as it was is kept as metrics.jsonl.corrupt-1, the run resumes with its readable records."""
    workdir = _copy_run(finished_run[0], tmp_path / "run")
    path = os.path.join(workdir, "metrics.jsonl")
    lines = open(path, "rb").read().splitlines(keepends=True)
    damaged = b"".join(lines[:5]) + bytes(range(128, 256)) + b"\n" + b"".join(lines[5:])
    open(path, "wb").write(damaged)
    assert trainer.train_and_evaluate(tiny_config(figures_at_end=False), workdir) == finished_run[1]
    assert open(path + ".corrupt-1", "rb").read() == damaged
    assert untimed_records(workdir) == untimed_records(finished_run[0])


@pytest.mark.slow
def test_an_empty_or_cut_config_json_is_one_clear_error(finished_run, tmp_path):
    workdir = _copy_run(finished_run[0], tmp_path / "run")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write('{"batch_size": 6')
    with pytest.raises(resume.ConfigMismatch, match=r"config.json is empty or cut short .*; restore that "
                                                    r"file from a copy, or delete it"):
        trainer.train_and_evaluate(tiny_config(), workdir)


def test_a_second_run_on_a_workdir_refuses_with_one_line(tmp_path):
    """A live run's lock (this test's process) makes train.py exit 2 before it writes anything."""
    import socket

    (tmp_path / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    done = subprocess.run(tiny_command(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"is in use by process {os.getpid()} on {socket.gethostname()}" in done.stderr.splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]


@pytest.mark.slow
def test_resume_with_a_config_that_changes_the_checkpoint_is_refused(finished_run, tmp_path):
    workdir = _copy_run(finished_run[0], tmp_path / "run")
    saved = open(os.path.join(workdir, "config.json")).read()
    changed = tiny_config(batch_size=128, epochs=4)
    changed.clustering.num_clusters = (20, 8)
    with pytest.raises(resume.ConfigMismatch,
                       match=r"batch_size: 64 -> 128, clustering.num_clusters: \[20, 8, 4\] -> "
                             r"\[20, 8\], epochs: 3 -> 4\); .* "
                             r"\(safe to change: data_dir, .*log_every_steps, .* evals.\*, eval.\*, "
                             r"wandb.\*, divergence.\*\)"):
        trainer.train_and_evaluate(changed, workdir)
    assert open(os.path.join(workdir, "config.json")).read() == saved
    # Logging, checkpoint cadence and the final evaluation may change.
    ok = tiny_config(log_every_steps=7, keep_checkpoints=5)
    ok.evals.summary.num_clusters = (10,)
    assert trainer.train_and_evaluate(ok, workdir)["num_clusters"] == [10]
    assert json.load(open(os.path.join(workdir, "config.json")))["log_every_steps"] == 7


def test_itstime_is_every_n_or_final_and_never_for_0():
    assert [c for c in range(1, 10) if schedule.itstime(c, 3)] == [3, 6, 9]
    assert not any(schedule.itstime(c, 0) for c in range(10))  # 0: never (e.g. checkpoint_every_steps)
    assert not schedule.itstime(0, 3)  # nothing done yet
    assert schedule.itstime(4, 3, final=True) and schedule.itstime(4, 0, final=True)


@pytest.mark.slow
def test_step_checkpoint_on_an_epochs_last_step_is_saved(tmp_path):
    steps_per_epoch = 1437 // 64
    c = tiny_config(epochs=2, warmup_epochs=2, checkpoint_every_epochs=5,
                    checkpoint_every_steps=steps_per_epoch, figures_at_end=False)
    c.evals.summary.num_clusters = ()
    trainer.train_and_evaluate(c, str(tmp_path))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert steps == [steps_per_epoch, 2 * steps_per_epoch]
    meta = checkpoints.manager(str(tmp_path)).restore(
        steps_per_epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 0)


def test_unwritable_workdir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    done = subprocess.run(tiny_command(tmp_path / "file" / "run"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "cannot write to" in last and "pass a --workdir that exists" in last
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_visualize_cli_writes_every_figure(finished_run, tmp_path):
    workdir, _ = finished_run
    out = tmp_path / "figures"
    done = subprocess.run([sys.executable, "-m", "hcsc_jax.visualize", workdir, "--out", str(out),
                           "--sample", "400"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    names = ["clusters.png", "curves.png", "embedding.png", "hierarchy.png"]
    assert sorted(os.listdir(out)) == names
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and 10_000 < len(data) < 200_000, name
