"""hcsc_jax.run.workdir: run directories that cannot be written, locally and on a bucket; the run lock."""

import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from hcsc_jax.run import workdir
from tests.fake_gcs import fake_gcs  # noqa: F401 - fixture


def test_prepare_creates_local_and_accepts_an_existing_bucket(tmp_path, fake_gcs):  # noqa: F811
    assert workdir.prepare(tmp_path / "a" / "b").is_dir()
    run = workdir.prepare("gs://bucket/run")
    assert str(run) == "gs://bucket/run" and not fake_gcs  # the write probe is removed
    workdir.save_npz(run / "hierarchy" / "epoch_0001.npz", {"x": np.arange(3)})
    np.testing.assert_array_equal(workdir.load_npz(run / "hierarchy" / "epoch_0001.npz")["x"], np.arange(3))
    assert [f.name for f in workdir.hierarchy_files(run)] == ["epoch_0001.npz"]


def test_unwritable_workdirs_say_what_to_change(tmp_path, fake_gcs):  # noqa: F811
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file" / "run", "gs://no-such-bucket/run"):
        with pytest.raises(workdir.WorkdirError,
                           match=r"cannot write to .*; pass a --workdir that exists"):
            workdir.prepare(bad)


def test_the_lock_refuses_a_live_holder_takes_over_a_dead_one_and_is_released(tmp_path):
    run = workdir.path(tmp_path)
    with workdir.locked(run):
        held = json.loads((tmp_path / "run.lock").read_text())
        assert held == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(workdir.WorkdirError, match=r"is in use by process \d+ on .*; wait for that run"):
            with workdir.locked(run):
                pass
    assert not (tmp_path / "run.lock").exists()  # released
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id of this host that is gone
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with workdir.locked(run):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] != dead.pid
    # Another host's lock is never taken over.
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": "elsewhere"}))
    with pytest.raises(workdir.WorkdirError, match="on elsewhere"):
        with workdir.locked(run):
            pass


def test_writers_of_one_file_at_once_all_succeed_and_a_stale_tmp_blocks_nothing(tmp_path):
    """Two evaluations of one checkpoint share its feature cache: writers of the same file at the
    same time (threads here, as processes) all succeed and leave a whole file; a second cache key
    replaces the first; a temporary file left by a killed writer blocks nothing."""
    from hcsc_jax import features

    target = workdir.path(tmp_path) / "features_step66_digits_train.npz"
    (tmp_path / "features_step66_digits_train.npz.tmp").write_bytes(b"left by a killed writer")
    barrier, errors = threading.Barrier(2), []

    def writer(i):
        try:
            for round_ in range(30):
                barrier.wait()
                key = dict(writer=i, round=round_)
                got = features.cached(target, key, lambda: np.full((4, 3), i, np.float32))
                np.testing.assert_array_equal(got, np.full((4, 3), i, np.float32))
                workdir.write_atomic(target.with_name("result.json"), json.dumps(key))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    saved = workdir.load_npz(target)
    assert json.loads(str(saved["key"]))["writer"] == int(saved["array"][0, 0])  # one writer's whole file
    assert json.loads((tmp_path / "result.json").read_text())["round"] == 29
    assert sorted(os.listdir(tmp_path)) == ["features_step66_digits_train.npz",
                                            "features_step66_digits_train.npz.tmp", "result.json"]


class _Bucket:
    """A bucket path whose `exists()` does what `answer` does (raise, hang)."""

    def __init__(self, answer):
        self.answer = answer

    def __fspath__(self):
        return "gs://bucket/run"

    def __str__(self):
        return "gs://bucket/run"

    def exists(self):
        return self.answer()


def test_a_bucket_that_cannot_be_reached_is_one_line_not_minutes(monkeypatch):
    """eval.py --checkpoint=gs://... without gcsfs was 49 lines, without network 193; load_encoder
    of one waited 86 s, then blamed the path."""
    import importlib.util
    import time

    from hcsc_jax import load_encoder

    workdir.check_reachable(workdir.path("/tmp"))  # local: not asked
    assert workdir.check_reachable(_Bucket(lambda: False)) is None  # answers (no such run: said later)

    def offline():
        raise OSError("Cannot connect to host storage.googleapis.com:443")

    with pytest.raises(workdir.WorkdirError, match=r"^cannot reach gs://bucket/run \(OSError: Cannot connect "
                                                   r"to host .*\); check the network and the credentials"):
        workdir.check_reachable(_Bucket(offline))
    monkeypatch.setattr(workdir, "REACH_TIMEOUT_S", 0.2)
    with pytest.raises(workdir.WorkdirError, match=r"^gs://bucket/run: no answer within 0.2 s; check the "):
        workdir.check_reachable(_Bucket(lambda: time.sleep(30)))
    if importlib.util.find_spec("gcsfs") is None:  # (not installed by the test extra)
        with pytest.raises(workdir.WorkdirError, match=r"gcsfs.*pip install \"hcsc-jax\[gcs\]\""):
            load_encoder("gs://bucket/run")


def _never():
    raise AssertionError("computed again")


def test_a_corrupt_feature_cache_is_set_aside_and_recomputed_with_one_warning(tmp_path, caplog):
    """Random bytes, a cut file, an empty file, an .npz without its key, the wrong number of rows,
    NaN: each was a 20-40 line traceback on every later evaluation until deleted by hand."""
    import io

    from hcsc_jax import features

    target, key = workdir.path(tmp_path) / "features_step3_digits_train.npz", dict(n=5)
    good = np.arange(15, dtype=np.float32).reshape(5, 3)
    features.cached(target, key, lambda: good, rows=5)
    whole = target.read_bytes()

    def npz(**arrays):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    bad_files = {"random bytes": np.random.default_rng(0).bytes(500), "cut": whole[: len(whole) // 2],
                 "empty": b"", "no key": npz(array=good),
                 "4 rows": npz(array=good[:4], key=np.asarray(json.dumps(key))),
                 "NaN": npz(array=np.full((5, 3), np.nan, np.float32), key=np.asarray(json.dumps(key)))}
    for name, data in bad_files.items():
        target.write_bytes(data)
        caplog.clear()
        with caplog.at_level("WARNING"):
            got = features.cached(target, key, lambda: good, rows=5)
        np.testing.assert_array_equal(got, good)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "is unreadable" in warnings[0] and "set aside as" in warnings[0], (
            name, warnings)
        assert (tmp_path / "features_step3_digits_train.npz.bad").read_bytes() == data, name
        assert target.read_bytes() == whole, name  # rewritten whole
        np.testing.assert_array_equal(features.cached(target, key, _never, rows=5), good)  # read back


# One writer under a race: many processes, started together, each try the lock of one workdir; the
# times each holder held it must never overlap. Two starts: a fresh workdir (a lock being created
# is not yet written: it must not be read as stale) and one with a dead process's lock (every
# process sees it stale at once: only one may take it over). In forked children of one driver,
# released by one barrier.
_RACE = r"""
import json, multiprocessing as mp, os, socket, subprocess, sys, time
from hcsc_jax.run import workdir
run, procs, trials, hold = workdir.path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
log = os.path.join(sys.argv[1], "held.jsonl")

def child(barrier):
    barrier.wait()
    try:
        with workdir.locked(run):
            t0 = time.monotonic(); time.sleep(hold); t1 = time.monotonic()
    except workdir.WorkdirError:
        return
    with open(log, "a") as f:
        f.write(json.dumps([t0, t1]) + "\n")

ctx, overlaps, held = mp.get_context("fork"), 0, 0
for trial in range(trials):
    if trial % 2:
        dead = subprocess.Popen(["true"]); dead.wait()
        with open(os.path.join(sys.argv[1], "run.lock"), "w") as f:
            json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)
    barrier = ctx.Barrier(procs)
    ps = [ctx.Process(target=child, args=(barrier,)) for _ in range(procs)]
    [p.start() for p in ps]; [p.join() for p in ps]
    spans = sorted(json.loads(line) for line in open(log)) if os.path.exists(log) else []
    os.path.exists(log) and os.remove(log)
    held += len(spans)
    overlaps += sum(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert not os.path.exists(os.path.join(sys.argv[1], "run.lock")), "the lock outlived its holders"
print(json.dumps({"held": held, "overlaps": overlaps}))
"""


def test_one_writer_per_workdir_under_a_race(tmp_path):
    out = subprocess.run([sys.executable, "-c", _RACE, str(tmp_path), "8", "40", "0.02"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["held"] >= 40 and result["overlaps"] == 0, result
