"""Files of a run directory through `etils.epath`: local paths and buckets (`gs://`, `s3://`)
alike, as Orbax and TFDS read them. For `gs://` install gcsfs (`pip install "hcsc-jax[gcs]"`).

Layout: `config.json`, `metrics.jsonl`, `tensorboard/`, `hierarchy/epoch_XXXX.npz`,
`checkpoints/`, `summary.json`, `figures/`.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from etils import epath

CONFIG_FILE = "config.json"
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


def prepare(p: str | os.PathLike) -> epath.Path:
    """Creates the run directory `p` if needed and checks that it can be written. Raises
    WorkdirError with one line saying what to change when it cannot (permissions, missing bucket)."""
    p = path(p)
    try:
        if is_local(p):  # buckets have no directories (and gcsfs would create a missing bucket)
            p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write_test"
        probe.write_text("")
        probe.unlink()
    except Exception as err:  # noqa: BLE001 - every backend has its own errors
        raise WorkdirError(f"cannot write to workdir {p} ({type(err).__name__}: {err}); "
                      "pass a --workdir that exists (or can be created) and that you can write to") from None
    return p


def write_json(p: epath.Path, obj: Any):
    p.write_text(json.dumps(obj, indent=2, sort_keys=True))


def read_json(p: epath.Path) -> Any:
    return json.loads(p.read_text())


def save_npz(p: epath.Path, arrays: dict[str, np.ndarray]):
    """`np.savez` to any epath (built in memory: object stores cannot seek)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(buf.getvalue())


def load_npz(p: epath.Path) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(p.read_bytes())) as z:
        return {k: z[k] for k in z.files}


def hierarchy_files(workdir: epath.Path) -> list[epath.Path]:
    """The run's `hierarchy/epoch_XXXX.npz` files, oldest first."""
    d = workdir / HIERARCHY_DIR
    return sorted(d.glob("epoch_*.npz"), key=lambda f: f.name) if d.exists() else []
