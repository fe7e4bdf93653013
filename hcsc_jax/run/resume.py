"""Stopping and resuming a run safely: the config a checkpoint was written under, and SIGTERM.

A resumed run must mean the same run: `check_config` refuses a config whose fields differ from
the workdir's `config.json` (batch size, epochs, queue, levels, architecture, ...) except those in
`SAFE_TO_CHANGE` (logging, checkpoint cadence, worker counts, the final evaluation and the evaluators
during training, data_dir): each field's rule in `config_checks.RULES` says whether it is one.

`PreemptionWatch` turns SIGTERM (what TPU / GCE preemption and SLURM send before killing) and
Ctrl-C (SIGINT; a second one stops at once, even inside an XLA compile) into a checkpoint at the
next step boundary; with several processes jax's preemption service picks the same step on all of
them (SIGTERM only).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils

from hcsc_jax import trees
from hcsc_jax.run import config_checks
from hcsc_jax.run import workdir as workdir_lib

log = logging.getLogger(__name__)

# What a resumed run may change, and what an older config.json means by leaving out a field added
# since: both from the fields' rules (`rules.free`, `rules.added`), declared with each field in
# `config_fields.FIELDS`. Dotted names; a trailing "." covers a whole group.
SAFE_TO_CHANGE = (*(k for k, r in config_checks.RULES.items() if r.free), *config_checks.FREE_GROUPS)
ADDED_FIELDS = {k: r.before for k, r in config_checks.RULES.items() if r.added}


class ConfigMismatch(ValueError):
    """A resumed run's config changes the meaning of the workdir's checkpoints."""


class Preempted(Exception):
    """SIGTERM or SIGINT was received and a checkpoint saved; running the same command resumes."""


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of the fields that differ between two config dicts and are not safe to change
    (a field of `ADDED_FIELDS` absent from one reads as its value there)."""
    a, b = ({**ADDED_FIELDS, **trees.flatten(c)} for c in (old, new))
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
    safe = lambda k: any(k == s or (s.endswith(".") and k.startswith(s)) for s in SAFE_TO_CHANGE)
    return [k for k in differ if not safe(k)]


def has_checkpoint(workdir: epath.Path) -> bool:
    """Whether `workdir/checkpoints` holds a committed step."""
    d = workdir / "checkpoints"
    return d.exists() and any(p.name.isdigit() for p in d.iterdir())


def check_config(workdir: epath.Path, config_json: str):
    """Raises ConfigMismatch naming the fields when `config_json` (the new run's) would change the
    meaning of the checkpoints in `workdir` (those written under its `config.json`). Every
    process checks, then waits for the others, so none reads the file process 0 writes next."""
    saved = workdir / workdir_lib.CONFIG_FILE
    fields = []
    if saved.exists() and has_checkpoint(workdir):
        try:
            old = json.loads(saved.read_text())
        except json.JSONDecodeError as err:
            raise ConfigMismatch(
                f"{saved} is empty or cut short ({err}), so the config of the checkpoints in {workdir} is "
                "unknown; restore that file from a copy, or delete it to resume with the config given "
                "now") from None
        new = json.loads(config_json)
        fields = changed_fields(old, new)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("config checked")
    if fields:
        was, now = trees.flatten(old), trees.flatten(new)
        diffs = ", ".join(f"{k}: {was.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in fields)
        raise ConfigMismatch(
            f"{workdir} holds checkpoints of a run with another config ({diffs}); resume with the "
            f"same values or use a new --workdir (safe to change: {_safe_list()})")


def _safe_list() -> str:
    """SAFE_TO_CHANGE as a resumed run's error says it: a group whose every field is free as
    "group.*" (wandb.*), the others by name."""
    groups = {}
    for field, rule in config_checks.RULES.items():
        if "." in field:
            groups.setdefault(field.split(".")[0], []).append(rule.free)
    whole = {g for g, free in groups.items() if all(free)}
    names = [s for s in SAFE_TO_CHANGE if s.split(".")[0] not in whole or s.endswith(".")]
    names += [f"{g}." for g in groups if g in whole]
    return ", ".join(s + "*" * s.endswith(".") for s in names)


def preempted(mngr, step: int, signal_name: str) -> Preempted:
    """After the save at `step`: waits for it to commit and returns the `Preempted` to raise."""
    mngr.wait_until_finished()
    return Preempted(f"preempted ({signal_name}): saved the checkpoint of step {step} in {mngr.directory}; "
                     "run the same command to resume")


class PreemptionWatch:
    """Notes SIGTERM and SIGINT (Ctrl-C) while its `with` block runs: `received`, `signal_name`
    (the first one), `reached(step)` (whether to save and stop after `step`). A second Ctrl-C
    stops the process at once: `on_abort()` (e.g. release the run's lock), one line, exit status
    130 (a shell's status for a process ended by Ctrl-C), no save, no other clean-up.

    One process (handlers installed from the main thread, restored when the block is left, however
    it is left): Python runs a signal handler only between bytecodes, so while the main thread is
    inside a long C++ call (an XLA compile: minutes) no handler runs and two Ctrl-C would reach it
    as one. So the signals also go to a socket (`signal.set_wakeup_fd`, written by the C-level
    handler as each arrives) that a thread reads: it logs each signal when it arrives and ends the
    process on the second Ctrl-C, compile or not. SIGTERM still waits for the call to return and
    saves at the next step boundary. Several processes: jax's preemption sync point (SIGTERM
    only), the same step on every process."""

    def __init__(self, on_abort: Callable[[], None] | None = None):
        self.received = False
        self.signal_name = "SIGTERM"
        self.on_abort = on_abort
        self.multiprocess = jax.process_count() > 1
        self.previous: dict[int, Any] = {}
        self._lock = threading.RLock()  # (a handler can interrupt the main thread inside `_note`)
        self._handled = 0  # handler calls: each is at least one signal (coalesced ones are one call)
        self._sockets, self._thread, self._wakeup = (), None, -1

    def _note(self, signum: int, count: int) -> None:
        """The `count`-th stop signal seen by one of the two paths (handler, socket thread)."""
        with self._lock:
            if count > 1 and signum == signal.SIGINT:
                log.error("Ctrl-C again: stopped at once, unsaved; the same command resumes from the last "
                          "checkpoint")
                if self.on_abort is not None:
                    self.on_abort()
                os._exit(130)
            if not self.received:
                self.signal_name = signal.Signals(signum).name
                again = " (Ctrl-C again: stop at once, unsaved)" if signum == signal.SIGINT else ""
                log.warning("%s received: saving a checkpoint at the next step boundary, then exiting%s",
                            self.signal_name, again)
                self.received = True

    def _on_signal(self, signum, frame):
        self._handled += 1
        self._note(signum, self._handled)

    def _read_signals(self, sock: socket.socket) -> None:
        count = 0
        while data := sock.recv(64):  # b"" once __exit__ closed the other end
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    count += 1
                    self._note(signum, count)

    def reached(self, step: int) -> bool:
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def __enter__(self) -> PreemptionWatch:
        if self.multiprocess or threading.current_thread() is not threading.main_thread():
            return self
        read, write = socket.socketpair()
        write.setblocking(False)
        self._sockets = (read, write)
        self._wakeup = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._on_signal)
        self._thread = threading.Thread(target=self._read_signals, args=(read,), name="stop-signals",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        if self._sockets:
            signal.set_wakeup_fd(self._wakeup)
            read, write = self._sockets
            write.close()
            self._thread.join(timeout=5)
            read.close()
            self._sockets = ()
