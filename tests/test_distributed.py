"""Start-up of hcsc_jax.distributed when jax's private modules move."""

import sys

import jax._src

from hcsc_jax import distributed


def _plain_environment(monkeypatch):
    for name in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                 "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)


def test_start_up_survives_a_jax_without_cloud_tpu_init(monkeypatch, caplog):
    _plain_environment(monkeypatch)
    monkeypatch.delattr(jax._src, "cloud_tpu_init")  # as if a jax release removed the module
    monkeypatch.setitem(sys.modules, "jax._src.cloud_tpu_init", None)  # import now raises ImportError
    assert distributed.initialize() is False
    assert "cannot tell whether this is a Cloud TPU VM" in caplog.text


def test_plain_process_does_no_set_up(monkeypatch, caplog):
    _plain_environment(monkeypatch)
    assert distributed.initialize() is False and "Cloud TPU" not in caplog.text
