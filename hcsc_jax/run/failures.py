"""How a run fails: one line that names the cause and the checkpoint kept, never a traceback.

- A loss or gradient the run cannot recover from (`check_health` on the metrics fetched from the
  device, `fetched_and_checked`): DivergedError / NonFiniteLossError, naming the step.
- The input stopping the run (an image that cannot be decoded, a dead loader worker): InputError.
- A refused write (full disk, quota, read-only mount, permission; Orbax's tensorstore raises
  these as ValueErrors with the errno in their text): `workdir.WorkdirError` (`write_failure`).
`keeping_saves` wraps the loop: any error first waits for the checkpoint save in flight, so the
newest checkpoint survives, and the message names it (`checkpoints.describe_latest`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import re

import jax

from hcsc_jax.data.decode import DecodeError
from hcsc_jax.data.loader import LoaderError
from hcsc_jax.run import checkpoints
from hcsc_jax.run import workdir as workdir_lib

log = logging.getLogger(__name__)


class InputError(RuntimeError):
    """The input stopped the run (an image that cannot be decoded under input.bad_images="error",
    a loader worker that died); the message names the file and the checkpoint kept."""


class DivergedError(RuntimeError):
    """Training stopped on a loss or gradient it cannot recover from; the last good checkpoint is kept."""


class NonFiniteLossError(DivergedError):
    """The loss became NaN or inf."""


def fetched_and_checked(pending: list, step: int, divergence) -> list[dict]:
    """Waits for the metrics of the steps in `pending` (the last is `step`) -> their host copies;
    stops on a non-finite loss or a divergence (see `check_health`)."""
    per_step = jax.device_get(pending)
    check_health(per_step, step - len(per_step) + 1, divergence)
    return per_step


def check_health(per_step: list[dict], first_step: int, divergence) -> None:
    """Raises NonFiniteLossError naming the first step (1-based, as in metrics.jsonl) whose loss
    is not finite, DivergedError for one whose loss or gradient norm is above
    `divergence.max_loss` / `divergence.max_grad_norm` (0: no limit). per_step[i] holds the
    metrics of step first_step + i."""
    limits = {"loss": divergence.max_loss, "grad_norm": divergence.max_grad_norm}
    for i, m in enumerate(per_step):
        if not math.isfinite(m["loss"]):
            raise NonFiniteLossError(
                f"loss is {m['loss']} at step {first_step + i}; stopping; lower the learning rate, "
                "check the data, or use float32 compute")
        for key, limit in limits.items():
            if limit and m.get(key, 0.0) > limit:
                raise DivergedError(
                    f"{key} is {m[key]:.4g} at step {first_step + i}, above config.divergence.max_{key} = "
                    f"{limit:g}: the run diverges; stopping; lower the learning rate")


# What a refused write says when Orbax's tensorstore raises it (a ValueError, the errno in its
# message: "RESOURCE_EXHAUSTED: Error writing ...: No space left on device [os_error_code='28']"),
# or the OS's own words for a full disk or quota, a read-only mount, a missing permission.
_WRITE_REFUSED = re.compile(r"^[A-Z_]+: Error writing |No space left on device|Disk quota exceeded|"
                            r"Read-only file system|Permission denied")
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def write_failure(err: BaseException) -> BaseException | None:
    """The refused write behind `err`: `err` itself when it is an OSError, else the first of it
    and its causes (`__cause__`, `__context__`) that is an OSError with a full-disk, quota,
    read-only or permission errno, or whose message says a write was refused (`_WRITE_REFUSED`:
    tensorstore's ValueErrors); None when there is none."""
    if isinstance(err, OSError):
        return err
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if (isinstance(err, OSError) and err.errno in _WRITE_ERRNOS) or _WRITE_REFUSED.search(str(err)):
            return err
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def keeping_saves(mngr):
    """Leaving the run for any error (a divergence, a full disk, a bug) first waits for the saves
    in flight, so the newest checkpoint is kept; a divergence's or a write error's message then
    names the checkpoint kept. A write error (`write_failure`: an OSError, or the ValueError
    Orbax's tensorstore raises for a full disk) becomes one line, a WorkdirError."""
    try:
        yield
    except Exception as err:
        try:
            mngr.wait_until_finished()
        except Exception as save_err:  # noqa: BLE001 - the save in flight failed too
            log.warning("the checkpoint save in flight failed: %s: %s", type(save_err).__name__, save_err)
        if isinstance(err, DivergedError):
            raise type(err)(f"{err}. {checkpoints.describe_latest(mngr)}") from None
        if isinstance(err, (DecodeError, LoaderError)):
            what = ("replace or remove that file, or set --config.input.bad_images=skip"
                    if isinstance(err, DecodeError) else "the same command resumes")
            raise InputError(f"{err}; {what}. {checkpoints.describe_latest(mngr)}") from None
        cause = write_failure(err)
        if cause is not None and not isinstance(err, workdir_lib.WorkdirError):
            what = f"{type(cause).__name__}: {' '.join(str(cause).split())}"
            raise workdir_lib.WorkdirError(
                f"writing the run failed ({what}); free space or make the workdir writable, then run the "
                f"same command. {checkpoints.describe_latest(mngr)}") from err
        raise
