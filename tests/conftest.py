"""Test set-up, before jax is imported anywhere: 8 virtual CPU devices, and XLA's persistent
compilation cache, so that the many tests (and train.py / eval.py subprocesses) that compile the
same small steps compile each once per machine. The cache lives in $HCSC_TEST_XLA_CACHE (default
<tmp>/hcsc-jax-test-xla-cache) and is kept between runs; delete it to time a cold run. Results
do not depend on it: a cached executable is the one XLA compiled."""
import contextlib
import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get(
    "HCSC_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "hcsc-jax-test-xla-cache")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit turns on the cache's file lock (filelock), so that the pytest-xdist workers and
# their subprocesses never read an entry another process is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

import jax  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 CPU devices; is jax imported before conftest?"


import pytest  # noqa: E402


@contextlib.contextmanager
def shared_by_workers(tmp_path_factory, worker_id: str, name: str):
    """The folder <session>/<name>, one for the whole test session: under pytest-xdist the workers
    share it (it sits above each worker's own folder), and this holds its lock, so the first
    worker to come makes it while the others wait, then find it made."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # (pytest-N/, shared by its popen-gwK/)
    with FileLock(str(root / f"{name}.lock")):
        yield root / name


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, worker_id):
    """A trained `configs/digits.py:runlocal` workdir (3 epochs at 8 px, a tiny model), trained once
    per test session and shared by the tests that only read one (`shared_by_workers`): do not
    write into it."""
    from configs import digits
    from hcsc_jax.run import trainer

    with shared_by_workers(tmp_path_factory, worker_id, "digits_run_shared") as workdir:
        if not (workdir / "summary.json").exists():
            trainer.train_and_evaluate(digits.get_config("runlocal"), str(workdir))
    return str(workdir)


# The longest test (the documented default's band, 4-7 min of the full suite's 16-22) starts
# first: pytest-xdist hands the collection out in order, and started late it ran alone at the end.
START_FIRST = ("tests/test_default_run.py::test_python_train_py_lands_in_the_readme_band",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid not in START_FIRST)  # (stable: the rest keep their order)
