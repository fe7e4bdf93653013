"""MoCo v2 projection head."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# torch nn.Linear default init: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_linear_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear(cin, cout, *, dtype, rngs):
    bound = 1.0 / math.sqrt(cin)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(
        cin,
        cout,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_linear_kernel_init,
        bias_init=bias_init,
        rngs=rngs,
    )


class ProjectionHead(nnx.Module):
    """Linear(in, hidden) - ReLU - Linear(hidden, out), no BN.

    Torch names: ``fc0`` <-> ``fc.0``, ``fc2`` <-> ``fc.2`` (``kernel`` = ``weight.T``, ``bias``).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int = 128,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        hidden_features = in_features if hidden_features is None else hidden_features
        self.fc0 = _torch_linear(in_features, hidden_features, dtype=dtype, rngs=rngs)
        self.fc2 = _torch_linear(hidden_features, out_features, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc0(x)))
