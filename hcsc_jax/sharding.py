"""Where arrays live: the one device mesh, its data axis, and the moves between host and devices.

Every jitted function of the project runs on a 1-D mesh with the axis `DATA_AXIS`: batches are
split over it (`batch_sharded`), the train state, prototypes and a resident dataset are copied
to every device (`replicated`). With several processes a global array is assembled from each
process's rows (`to_global`) and read back whole on every host (`to_host`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all, of every process) with the axis `DATA_AXIS`,
    GSPMD (Auto) axis type."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of `mesh`."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `DATA_AXIS`."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
    """`tree`'s arrays copied to every device of `mesh`."""
    return jax.device_put(tree, replicated(mesh))


def to_global(mesh: Mesh, tree):
    """Process-local numpy arrays (b, ...) -> global jax arrays (b * process_count, ...), batch-
    sharded (rows of process p at [p*b, (p+1)*b))."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly sharded over several processes) array, on every process's host."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return multihost_utils.process_allgather(x, tiled=True)
