"""Multi-process runs: start-up of the JAX distributed system and host-side exchange.

One process per host (or per GPU node) runs the same program over a global mesh of every
device. `initialize` joins the processes before JAX touches a device; a lone process needs no
set-up and skips it. After that, process 0 writes the files that are not checkpoints, and host
values computed on process 0 alone (the faiss hierarchy) reach the others with `broadcast_arrays`.
"""

from __future__ import annotations

import io
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# Environments in which `jax.distributed.initialize()` finds its arguments by itself (jax 0.10
# `jax._src.clusters`): SLURM (srun), Open MPI (mpirun), Cloud TPU VMs (GCE metadata, GKE env).
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _cluster_with_several_processes() -> bool:
    """True where jax's cluster auto-detection applies and there is more than one process."""
    if all(v in os.environ for v in _SLURM):
        return int(os.environ["SLURM_NTASKS"]) > 1
    if "OMPI_MCA_orte_hnp_uri" in os.environ:
        return _env_int("OMPI_COMM_WORLD_SIZE") != 1
    return _on_cloud_tpu_vm()  # a single-host TPU VM initializes as 1 process


def _on_cloud_tpu_vm() -> bool:
    """Whether `import jax` found TPU chips and libtpu. jax has no public API for it: its private
    flag is read when present; if a jax release moves it, a warning and False (no auto-detection)."""
    try:
        from jax._src import cloud_tpu_init

        return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
    except (ImportError, AttributeError) as err:
        log.warning("cannot tell whether this is a Cloud TPU VM (%s); for a multi-host TPU run pass "
                    "--coordinator_address, --num_processes and --process_id", err)
        return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the JAX distributed system when this is one of several processes; -> whether it did.

    Arguments left None are read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID. With none of them set, it initializes only under SLURM / Open MPI with more
    than one task or on a Cloud TPU VM, letting jax detect the rest; otherwise (a plain process)
    it does nothing. On CPU the cross-process collectives use gloo. Call it before any JAX
    computation.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if not explicit and not _cluster_with_several_processes():
        return False
    if num_processes == 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_main() -> bool:
    """Whether this process writes logs, metrics and summaries (process 0)."""
    return jax.process_index() == 0


def broadcast_arrays(arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Process 0's dict of host arrays on every process, bit for bit (others may pass None).

    Sent as the bytes of an .npz file, so shapes, dtypes and -0.0 survive the sum-based broadcast.
    """
    if jax.process_count() == 1:
        return arrays
    payload = np.zeros(0, np.uint8)
    if is_main():
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        payload = np.frombuffer(buf.getvalue(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(payload.size)))
    if not is_main():
        payload = np.zeros(size, np.uint8)
    payload = multihost_utils.broadcast_one_to_all(payload)
    with np.load(io.BytesIO(payload.tobytes())) as z:
        return {k: z[k] for k in z.files}
