"""A run's metric records, behind one `MetricsWriter.write`: `metrics.jsonl`, TensorBoard event
files and, when `config.wandb.project` is set, Weights & Biases.

Records are dicts with a `step`; `type` is absent for training steps, `"epoch"` for an epoch's
means and `"eval"` for evaluator results. Every number of a record (lists: one per index) becomes
a TensorBoard scalar tagged `<type>/<key>` (`train/` for steps) at the record's step, written by
tensorboardX into `<workdir>/tensorboard/`; view with `tensorboard --logdir <workdir>`. Every
file goes through `etils.epath`, so the workdir may be local or a bucket (`gs://...`).

The training loop's records are means of running sums (`new_sums` / `add_steps` / `means`): the
log window's (`write_window`) and the epoch's; checkpoints carry both.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
from typing import Any

from etils import epath

from hcsc_jax import trees
from hcsc_jax.run import workdir as workdir_lib

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_REMOTE_FLUSH_SECS = 30  # object stores cannot append: metrics.jsonl is rewritten at most this often


def _record(line: bytes) -> dict[str, Any] | None:
    """The record one line of metrics.jsonl holds (UTF-8 JSON of an object with an integer
    "step"), or None."""
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError:  # (UnicodeDecodeError, json.JSONDecodeError)
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return record if isinstance(step, int) and not isinstance(step, bool) else None


def scan_records(path: epath.Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(the records of the metrics.jsonl file `path`, the 1-based numbers of its lines that are
    not records: bytes that are not UTF-8, not JSON, not an object with a step). A last line that a
    kill cut short (it lacks its newline) is neither: it is dropped with a warning."""
    *lines, last = path.read_bytes().split(b"\n")
    records, unreadable = [], []
    for number, line in enumerate(lines, 1):
        record = _record(line)
        records += [record] if record is not None else []
        unreadable += [number] if record is None else []
    if last and _record(last) is None:
        log.warning("dropping the unfinished last line of %s", path)
    elif last:
        records.append(_record(last))
    return records, unreadable


def _numbers(lines: list[int]) -> str:
    """[3] -> "line 3"; [3, 4, ...] -> "lines 3, 4, ..." (5 at most, then how many more)."""
    more = f" and {len(lines) - 5} more" if len(lines) > 5 else ""
    return f"line{'s' * (len(lines) > 1)} {', '.join(map(str, lines[:5]))}{more}"


def read_records(path: epath.Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (`scan_records`); the lines that are not records are
    skipped with one warning naming them."""
    records, unreadable = scan_records(path)
    if unreadable:
        log.warning("%s: skipped the unreadable %s (not UTF-8 JSON of an object with a step)", path,
                    _numbers(unreadable))
    return records


def set_aside(path: epath.Path) -> epath.Path:
    """Renames `path` to `<name>.corrupt-N` (the first N free) -> the new path."""
    n = 1
    while (aside := path.with_name(f"{path.name}.corrupt-{n}")).exists():
        n += 1
    path.rename(aside)
    return aside


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a record: `<type>/<key>` -> value for every number (a list
    gives `<type>/<key>/<index>`); `step`, `epoch` and `type` are not scalars."""
    values = {k: v for k, v in record.items() if k not in ("step", "epoch", "type")}
    return trees.numbers(values, record.get("type", "train"), lists=True)


class _EpathEventFile:
    """tensorboardX's record-file interface over epath, for object stores: keeps the bytes and
    rewrites the object at each flush (they cannot append)."""

    def __init__(self, path: str):
        self.path, self.data = epath.Path(path), bytearray()

    def write(self, data: bytes):
        self.data += data

    def flush(self):
        self.path.write_bytes(bytes(self.data))

    def close(self):
        self.flush()


class _EpathEventFiles:
    """tensorboardX writer factory for `gs://` through epath (fsspec's gcsfs), instead of its
    own, which needs google-cloud-storage."""

    def open(self, path: str) -> _EpathEventFile:
        return _EpathEventFile(path)

    def directory_check(self, path: str):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _summary_writer():
    """tensorboardX's SummaryWriter, imported on first use (a usage error never loads it) with the
    `gs://` factory above registered. tensorboardX imports torch when torch is installed, only to
    accept torch tensors, which no record holds; that import is 2-3 s of every run's start where the
    converter's optional torch is installed, so torch is hidden from it unless already imported."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter, record_writer
    finally:
        if hide:
            del sys.modules["torch"]
    record_writer.register_writer_factory("gs", _EpathEventFiles())
    return SummaryWriter


def check_wandb(config) -> None:
    """ImportError, one line, when `config.wandb.project` is set and wandb is not installed: said
    before the run writes anything, not when its writer opens."""
    if config.get("wandb", {}).get("project") and importlib.util.find_spec("wandb") is None:
        raise ImportError(f"config.wandb.project is {config.wandb.project!r} but wandb is not installed; "
                          "pip install wandb, or leave config.wandb.project unset")


def _wandb_run(config, workdir: epath.Path):
    """A W&B run for `config.wandb` (project, entity, name, mode "online" / "offline"), resumed
    across restarts of the same workdir."""
    try:
        import wandb  # optional: pip install "hcsc-jax[wandb]"
    except ImportError:
        raise ImportError(
            f"config.wandb.project is {config.wandb.project!r} but wandb is not installed; "
            "pip install wandb, or leave config.wandb.project unset") from None
    w = config.wandb
    run_id = hashlib.sha1(os.fspath(workdir).encode()).hexdigest()[:16]
    return wandb.init(project=w.project, entity=w.entity, name=w.name or workdir.name, mode=w.mode,
                      id=run_id, resume="allow", config=config.to_dict(),
                      dir=os.fspath(workdir) if workdir_lib.is_local(workdir) else None)


class MetricsWriter:
    """Writes records to `<workdir>/metrics.jsonl`, TensorBoard and (if `config.wandb.project`)
    W&B. On resume at `resume_step` drops the records past it (TensorBoard: `purge_step`).
    A metrics.jsonl holding lines that are not records (random bytes) is moved aside to
    `metrics.jsonl.corrupt-N` and its records kept. Writes nothing unless `enabled` (process 0)."""

    def __init__(self, workdir: epath.Path, resume_step: int, config=None, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        wandb_on = config is not None and config.get("wandb", {}).get("project")
        self.wandb = _wandb_run(config, workdir) if wandb_on else None
        self.path = workdir / METRICS_FILE
        self.local = workdir_lib.is_local(self.path)
        self.lines = []
        if self.path.exists():
            records, unreadable = scan_records(self.path)
            if unreadable:  # (the file as it was stays beside: nothing is lost)
                log.warning("%s: unreadable %s (not UTF-8 JSON of an object with a step); moved the file "
                            "to %s and kept its %d records", self.path, _numbers(unreadable),
                            set_aside(self.path), len(records))
            keep = [r for r in records if r["step"] <= resume_step]
            self.lines = [json.dumps(r, sort_keys=True) + "\n" for r in keep]
        self._rewrite()
        # One event file per session (the suffix keeps names apart within a second); purge_step
        # makes TensorBoard drop the old events of the replayed steps.
        self.tb = _summary_writer()(os.fspath(workdir / TENSORBOARD_DIR),
                                purge_step=resume_step + 1 if resume_step else None, flush_secs=30,
                                filename_suffix=f".{os.getpid()}.step{resume_step}")
        self.closed = False
        atexit.register(self.close)  # also on a NaN stop or preemption: flush what was written

    def _rewrite(self):
        self.path.write_text("".join(self.lines))
        self.flushed = time.monotonic()

    def write(self, record: dict[str, Any]):
        """Appends `record` (with a `step`) to every destination."""
        if not self.enabled:
            return
        line = json.dumps(record, sort_keys=True) + "\n"
        if self.local:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self.lines.append(line)
            if time.monotonic() - self.flushed > _REMOTE_FLUSH_SECS:
                self._rewrite()
        values = scalars(record)
        for tag, value in values.items():
            self.tb.add_scalar(tag, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(values, step=record["step"])

    def close(self):
        """Flushes and closes every destination (idempotent)."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        if not self.local:
            self._rewrite()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ---- Running means of per-step metrics: the log window's and the epoch's ----

def new_sums() -> dict[str, Any]:
    """Running sums of per-step metrics: {"count": steps, "sums": {key: sum}}. Checkpoints carry
    them (JSON keeps a float exactly), so a resumed run adds the same floats in the same order."""
    return {"count": 0, "sums": {}}


def add_steps(acc: dict[str, Any], per_step: list[dict]) -> None:
    """Adds the host metrics of some steps, in step order, to the running sums `acc`."""
    for m in per_step:
        acc["count"] += 1
        for k, v in m.items():
            acc["sums"][k] = acc["sums"].get(k, 0.0) + float(v)


def means(acc: dict[str, Any]) -> dict[str, float]:
    return {k: v / acc["count"] for k, v in acc["sums"].items()}


def write_window(writer: MetricsWriter, window: dict, step: int, epoch: int, lr: float, batch: int,
                 since: float, bar) -> None:
    """Writes the mean of the steps summed in `window` (the last is `step`, the first began after
    `since`) with `lr` and images/s, and shows the loss and images/s on the progress `bar`."""
    ips = window["count"] * batch / (time.perf_counter() - since)
    record = dict(means(window), step=step, epoch=epoch, lr=lr, images_per_sec=ips)
    writer.write(record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{ips:.0f}")
