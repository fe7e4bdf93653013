"""Files of a run directory through `etils.epath`: local paths and buckets (`gs://`, `s3://`)
alike, as Orbax and TFDS read them. For `gs://` install gcsfs (`pip install "hcsc-jax[gcs]"`).

Layout: `config.json`, `metrics.jsonl`, `tensorboard/`, `hierarchy/epoch_XXXX.npz`,
`checkpoints/`, `summary.json`, `figures/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import pathlib
import secrets
import socket
import threading
from typing import Any

import numpy as np
from etils import epath

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"
SUMMARY_FILE = "summary.json"
HIERARCHY_DIR = "hierarchy"


class WorkdirError(OSError):
    """The run directory cannot be created or written."""


def is_local(p: epath.Path) -> bool:
    """Whether `p` is on the local filesystem (not `gs://`, `s3://`, ...)."""
    return "://" not in os.fspath(p)


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an absolute epath (local relative paths are made absolute; URIs stay)."""
    p = epath.Path(p)
    return p if p.is_absolute() else p.absolute()


def prepare(p: str | os.PathLike, flag: str = "--workdir") -> epath.Path:
    """Creates the run directory `p` if needed and checks that it can be written. Raises
    WorkdirError with one line saying what to change (`flag`) when it cannot (permissions, a
    read-only filesystem, a missing bucket)."""
    p = path(p)
    try:
        if is_local(p):  # buckets have no directories (and gcsfs would create a missing bucket)
            p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write_test"
        probe.write_text("")
        probe.unlink()
    except Exception as err:  # noqa: BLE001 - every backend has its own errors
        raise WorkdirError(f"cannot write to {p} ({type(err).__name__}: {err}); pass a {flag} that "
                           "exists (or can be created) and that you can write to") from None
    return p


def check_writable(p: str | os.PathLike, flag: str = "--workdir") -> None:
    """What `prepare` would refuse, found without writing anything: WorkdirError when the local
    path `p` or its nearest existing parent is not a directory this process can write to; a
    bucket is only asked whether it answers (`check_reachable`)."""
    p = path(p)
    if not is_local(p):
        check_reachable(p)
        return
    q = pathlib.Path(os.fspath(p)).absolute()
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir() or not os.access(q, os.W_OK | os.X_OK):
        raise WorkdirError(f"cannot write to {p} ({q} is not a directory you can write to); pass a {flag} "
                           "that exists (or can be created) and that you can write to")


REACH_TIMEOUT_S = 60.0  # the longest `check_reachable` waits for a bucket to answer


def check_reachable(p: epath.Path) -> None:
    """WorkdirError, one line, when the bucket path `p` (`gs://`, ...) cannot be asked about: its
    filesystem is not installed (gcsfs), or it fails or gives no answer within `REACH_TIMEOUT_S`
    (no network, no credentials: gcsfs retries for minutes). A local path is not checked."""
    if is_local(p):
        return
    answer: dict[str, Any] = {}

    def ask():
        try:
            answer["exists"] = p.exists()
        except BaseException as err:  # noqa: BLE001 - reported below
            answer["error"] = err

    asking = threading.Thread(target=ask, daemon=True, name="check_reachable")
    asking.start()
    asking.join(REACH_TIMEOUT_S)
    err = answer.get("error")
    if asking.is_alive():
        raise WorkdirError(f"{p}: no answer within {REACH_TIMEOUT_S:g} s; check the network and the "
                           "credentials for it, or use a local copy")
    if isinstance(err, ImportError):
        raise WorkdirError(f"{p}: {err} (pip install \"hcsc-jax[gcs]\" for gs:// paths)")
    if err is not None:
        first = (str(err).strip().splitlines() or [""])[0]
        raise WorkdirError(f"cannot reach {p} ({type(err).__name__}: {first}); check the network and the "
                           "credentials for it, or use a local copy")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def write_bytes_atomic(p: epath.Path, data: bytes):
    """Writes `data` to `p` through a temporary file beside it, of a name no other writer uses
    (`<name>.<pid>-<random>.tmp`), replaced over `p`: a reader (or a kill) sees the old file or
    the new one, never a cut one; writers of the same `p` at the same time all succeed (the last
    one's file stays), and a temporary file left by a killed writer blocks no later write."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(p: epath.Path, text: str):
    """`text` (UTF-8) written to `p` by `write_bytes_atomic`."""
    write_bytes_atomic(p, text.encode())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale(holder: dict[str, Any]) -> bool:
    """Whether the lock `holder` ({"pid", "host"}) was left by a process of this host that is gone."""
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0)))


@contextlib.contextmanager
def _turns(directory: epath.Path):
    """An exclusive `flock` on the local `directory` while the block runs: the processes taking a
    lock in it check and create it one at a time (the directory, not a file of its own: nothing is
    left behind, and a lock released by a killed process goes with its descriptor)."""
    fd = os.open(os.fspath(directory), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(workdir: epath.Path, enabled: bool = True, name: str = LOCK_FILE, flag: str = "--workdir"):
    """Holds `workdir/run.lock` (or `workdir/<name>`: this process's id and host) while the block
    runs, so a second run on the same workdir refuses with WorkdirError (naming `flag`). A lock left
    by a dead process of this host is taken over; one of another host must be removed by hand once
    that run is known to be gone. Locally, processes starting at the same instant take turns to
    check and create the lock (`_turns`), which is written whole (`write_atomic`): one of them
    holds it (tests/test_workdir.py races 8)."""
    if not enabled:
        yield
        return
    lock, me = workdir / name, json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    with _turns(workdir) if is_local(lock) else contextlib.nullcontext():
        try:
            holder = json.loads(lock.read_text())
            holder = holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            holder = None
        except (json.JSONDecodeError, UnicodeDecodeError):
            holder = {}
        if holder is not None:
            if holder and not stale(holder):
                raise WorkdirError(
                    f"{workdir} is in use by process {holder.get('pid')} on {holder.get('host')} ({lock}); "
                    f"wait for that run to end or pass another {flag} (if that run is gone, delete "
                    "the lock file)")
            log.warning("removing the stale lock %s (%s)", lock, holder or "unreadable")
            lock.unlink(missing_ok=True)
        # Written whole (never seen empty); locally no other process is between the check and this
        # (`_turns`), on an object store the last writer wins.
        write_atomic(lock, me)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def read_json(p: epath.Path) -> Any:
    return json.loads(p.read_text())


def save_npz(p: epath.Path, arrays: dict[str, np.ndarray]):
    """`np.savez` to any epath (built in memory: object stores cannot seek), written by
    `write_bytes_atomic`."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(p, buf.getvalue())


def load_npz(p: epath.Path) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(p.read_bytes())) as z:
        return {k: z[k] for k in z.files}


def hierarchy_files(workdir: epath.Path) -> list[epath.Path]:
    """The run's `hierarchy/epoch_XXXX.npz` files, oldest first."""
    d = workdir / HIERARCHY_DIR
    return sorted(d.glob("epoch_*.npz"), key=lambda f: f.name) if d.exists() else []
