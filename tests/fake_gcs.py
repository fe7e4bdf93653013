"""A `gs://` filesystem in memory, for tests without network: fsspec's MemoryFileSystem
registered as fsspec's "gs"/"gcs" protocol (the one etils.epath uses for gs:// when TensorFlow
is absent). Like GCS it has no append mode; only the bucket "bucket" exists."""

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=False, **kwargs):  # epath passes gcsfs's option
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).removeprefix("gs://").removeprefix("gcs://").strip("/")

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError("GCS objects cannot be appended to")
        if "w" in mode and self._strip_protocol(path).split("/")[0] != "bucket":
            raise FileNotFoundError(f"bucket of {path} does not exist (only gs://bucket does)")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs():
    """Routes gs:// to an empty in-memory store for the test; -> the store (path -> file)."""
    from etils.epath import backend

    previous = {p: _registry.get(p) for p in FakeGCS.protocol}
    for p in FakeGCS.protocol:
        fsspec.register_implementation(p, FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    FakeGCS.clear_instance_cache()
    yield FakeGCS.store
    for p, cls in previous.items():
        _registry.pop(p, None)
        if cls is not None:
            _registry[p] = cls
    backend.fsspec_backend._get_filesystem.cache_clear()
