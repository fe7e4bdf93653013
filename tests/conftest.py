"""Test set-up: 8 virtual CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 CPU devices; is jax imported before conftest?"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A trained `configs/digits.py:runlocal` workdir (3 epochs at 8 px, a tiny model), trained once
    per test session and shared by the tests that only read one: do not write into it."""
    from configs import digits
    from hcsc_jax import trainer

    workdir = tmp_path_factory.mktemp("digits_run") / "run"
    trainer.train_and_evaluate(digits.get_config("runlocal"), str(workdir))
    return str(workdir)
