"""The loader's worker processes and the signals a run's process receives: they end with a parent
killed by `kill -9` (the resource tracker with them), and SIGTERM or Ctrl-C sent to the process
group (a preemption) leaves them to the parent, which goes on and stops them itself.

Each test runs a small script that opens `loader.train_batches` with real worker processes; no
timing thresholds: every wait polls with a generous deadline."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_prepare import _cmdline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 120

# Two workers over 16 tiny in-memory images, 4 steps an epoch, run without end; prints its workers'
# ids once the first batch is in. `extra` (a tail, per test) goes on from there.
SCRIPT = """
import multiprocessing, os, signal, sys, time
import numpy as np
from hcsc_jax.data import loader
from hcsc_jax.data.crops import CropSpec
from hcsc_jax.data.sources import ArrayDataset, ArraySource

if __name__ == "__main__":
    images = np.random.default_rng(0).integers(0, 256, (16, 20, 20, 3), dtype=np.uint8)
    source = ArraySource(ArrayDataset(images, None, None, "tiny"))
    it = loader.train_batches(source, (CropSpec(8, (0.2, 1.0)),), 4, 0, 4, 0, 0, num_workers=2, prefetch=1)
    next(it)
    workers = sorted(p.pid for p in multiprocessing.active_children())
    print("workers", *workers, flush=True)
{extra}
"""

FOREVER = """
    while True:
        next(it)
"""

# Notes SIGTERM / SIGINT as the trainer does (`resume.PreemptionWatch`), then, once both came,
# takes 40 more batches (more than every buffer holds: the workers must still be making them),
# stops the workers itself and reports how they ended.
AFTER_SIGNALS = """
    received = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    print("handlers", flush=True)
    while len(received) < 2:
        next(it)
    for _ in range(40):
        next(it)
    processes = multiprocessing.active_children()
    it.close()
    print("exit codes", *sorted(p.exitcode for p in processes), flush=True)
"""

# The same, but the signals reach the workers during their start-up, before any worker code ran:
# the group is signalled as each worker process is started (and is still waiting for its code).
SIGNALS_AT_START = """
    received = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    from multiprocessing import util
    spawn = util.spawnv_passfds

    def spawn_then_signal(*args):
        pid = spawn(*args)
        os.killpg(0, signal.SIGTERM)
        os.killpg(0, signal.SIGINT)
        return pid

    util.spawnv_passfds = spawn_then_signal
    it.close()
    it = loader.train_batches(source, (CropSpec(8, (0.2, 1.0)),), 4, 0, 4, 0, 0, num_workers=2, prefetch=1)
    for _ in range(40):
        next(it)
    processes = multiprocessing.active_children()
    it.close()
    print("signals", len(received), "exit codes", *sorted(p.exitcode for p in processes), flush=True)
"""


class _Run:
    """The script in its own process group (its id the group's); its output's lines as they come,
    its errors in a file."""

    def __init__(self, tmp_path, extra: str):
        script = tmp_path / "loader_run.py"
        script.write_text(SCRIPT.format(extra=extra))
        self.errors = tmp_path / "stderr.txt"
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
        with open(self.errors, "w") as errors:
            self.proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env, text=True,
                                         stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        first = self.line()
        if first[:1] != ["workers"] or len(first) != 3:
            self.proc.kill()
            raise AssertionError(f"{first} (exit {self.wait()}): {self.stderr()}")
        self.workers = [int(w) for w in first[1:]]

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def line(self) -> list[str]:
        """The next line's words (none at the end of the output)."""
        try:
            line = self.lines.get(timeout=DEADLINE_S)
        except queue.Empty:
            line = None
        if not line:
            what = f"no line in {DEADLINE_S} s" if line is None else "the script ended"
            self.proc.kill()
            raise AssertionError(f"{what} (exit {self.wait()}): {self.stderr()}")
        return line.split()

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=DEADLINE_S)
        finally:
            self.proc.kill()  # (a no-op once it ended)
            self.proc.wait()

    def stderr(self) -> str:
        return self.errors.read_text()[-3000:]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()  # (a no-op once it ended)
        self.proc.wait()


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent id) of a live process (a zombie's state is "Z"); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        stat = _stat(int(p))
        if stat is not None and stat[1] == pid:
            found.append(int(p))
    return found


def _running(pids) -> list[int]:
    return [p for p in pids if (_stat(p) or ("Z",))[0] != "Z"]


def test_workers_and_the_resource_tracker_end_with_a_parent_killed_by_sigkill(tmp_path):
    """`kill -9` leaves the parent no time to stop its workers: they end by themselves
    (`loader._exit_with_parent`), and the resource tracker (multiprocessing's, which the workers
    share) with them (it ends when the last process holding its pipe does)."""
    with _Run(tmp_path, FOREVER) as run:
        children = _children(run.proc.pid)  # the workers and the resource tracker
        assert set(run.workers) <= set(children), (run.workers, children)
    deadline = time.monotonic() + DEADLINE_S
    while _running(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _running(children)
    if left:  # not to leave them to the next tests: the workers, then the resource tracker ends and cleans up
        for pid in left:
            if b"resource_tracker" not in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + DEADLINE_S
        while _running(left) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _running(left):
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"running after their parent's kill -9: {left} of {children} (workers {run.workers})"


def test_sigterm_and_ctrl_c_to_the_process_group_leave_the_workers_to_the_parent(tmp_path):
    """A preemption's SIGTERM and a Ctrl-C reach every process of the group: the workers ignore
    them (`loader._ignore_stop_signals`), the parent goes on reading batches and stops them itself
    (they exit 0); before, a worker died of the signal and the next batches raised `LoaderError`."""
    with _Run(tmp_path, AFTER_SIGNALS) as run:
        assert run.line() == ["handlers"]
        os.killpg(run.proc.pid, signal.SIGTERM)
        os.killpg(run.proc.pid, signal.SIGINT)
        assert run.line() == ["exit", "codes", "0", "0"], run.stderr()
        assert run.wait() == 0, run.stderr()


def test_signals_to_the_process_group_during_the_workers_start_leave_them_to_the_parent(tmp_path):
    """The same signals sent while each worker process is starting, before any of its code ran (so
    before it could ignore them): they wait, blocked (`loader._StopSignalsBlocked`), and are
    dropped once the worker ignores them."""
    with _Run(tmp_path, SIGNALS_AT_START) as run:
        signals, codes = " ".join(run.line()).split(" exit codes ")
        assert int(signals.split()[1]) >= 2 and codes.split() == ["0", "0"], run.stderr()
        assert run.wait() == 0, run.stderr()


# A whole feature pass with its last batch still held at exit, as a run's last step or features
# may hold it: the workers' shared memory must all be released (no resource-tracker warning).
HOLDS_LAST = """
    it.close()
    for batch in loader.center_crop_batches(source, 8, 4, num_workers=2, prefetch=1):
        pass
    print("held", batch["view0"].shape, flush=True)
"""


def test_no_shared_memory_outlives_a_run_that_holds_its_last_batch(tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(SCRIPT.format(extra=HOLDS_LAST))
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                          timeout=DEADLINE_S, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held (4, 8, 8, 3)" in done.stdout
    assert "leaked shared_memory" not in done.stderr, done.stderr[-2000:]


# A consumer that takes one batch of 16 and stops reading: the loader's workers go on only until
# their buffers are full. Every example a worker decodes appends a byte to a file; the script
# prints how many there were once the count stopped growing (or after a deadline).
AHEAD = """
import os, sys, time
import numpy as np
from hcsc_jax.data import loader
from hcsc_jax.data.crops import CropSpec
from hcsc_jax.data.sources import ArrayDataset, ArraySource

COUNT = sys.argv[1]


class Counting(ArraySource):
    def load(self, i):
        fd = os.open(COUNT, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"x")
        os.close(fd)
        return super().load(i)


if __name__ == "__main__":
    workers, prefetch = int(sys.argv[2]), int(sys.argv[3])
    images = np.random.default_rng(0).integers(0, 256, (64, 12, 12, 3), dtype=np.uint8)
    source = Counting(ArrayDataset(images, None, None, "tiny"))
    it = loader.train_batches(source, (CropSpec(8, (0.2, 1.0)),), 16, 0, 4, 0, 0,
                              num_workers=workers, prefetch=prefetch)
    next(it)
    seen, still, deadline = -1, 0, time.monotonic() + 60
    while still < 6 and time.monotonic() < deadline:  # unchanged for 3 s
        time.sleep(0.5)
        now = os.path.getsize(COUNT)
        still, seen = (still + 1 if now == seen else 0), now
    print("decoded", seen, flush=True)
    it.close()
"""


@pytest.mark.parametrize("workers,prefetch", [(2, 1), (0, 2)])
def test_the_loader_runs_only_its_buffers_ahead_of_a_consumer_that_stops(tmp_path, workers, prefetch):
    """What a loader holds is a few batches per worker, whatever the batch size: a worker reads
    ahead one batch per decoding thread (grain counts read-ahead in elements, here whole batches:
    at 2 x batch of them, 1,168 rows here; at batch 256, 512 batches of two 224 ImageNet views,
    39 GB per worker). The bound is exact, in batches: per worker the one it decodes, the one
    it hands over, `prefetch` in its queue and `prefetch` + 1 in the parent's thread that reads
    that queue; without workers, one per thread (two); then the consumer's. A slow machine only
    decodes fewer (no timing can fail this)."""
    script = tmp_path / "ahead.py"
    script.write_text(AHEAD)
    count = tmp_path / "count"
    done = subprocess.run([sys.executable, str(script), str(count), str(workers), str(prefetch)], cwd=ROOT,
                          capture_output=True, text=True, timeout=DEADLINE_S,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    decoded = int(done.stdout.split()[-1])
    bound = (workers * (2 * prefetch + 3) if workers else 2) + 1
    assert 16 <= decoded <= bound * 16, (decoded, bound)
