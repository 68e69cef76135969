"""Shared test setup: keep data offline and every cache in temporary folders."""

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (and in CI), so a failure is never a fluke of one
# run; HYPOTHESIS_PROFILE=explore searches afresh. No deadlines: the CI machine is shared and slow.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory):
    """No test writes to the user's ~/.cache/vaelab: VAELAB_DATA points at a session tmp folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAELAB_DATA", str(tmp_path_factory.mktemp("vaelab-data")))
        yield


@pytest.fixture
def offline_data(tmp_path, monkeypatch):
    """VAELAB_DATA in tmp_path, and download URLs that refuse at once, so no test can reach the internet."""
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("VAELAB_MNIST_URL", "http://127.0.0.1:9/")  # discard port: connection refused
    monkeypatch.setenv("VAELAB_FASHION_MNIST_URL", "http://127.0.0.1:9/")
    return tmp_path / "cache"


def write_idx(path: Path, array, compress: bool = True) -> Path:
    """Write `array` as an IDX file (gzip unless compress=False), the inverse of vaelab.data.read_idx."""
    import gzip

    import numpy as np

    codes = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
    array = np.asarray(array)
    header = bytes([0, 0, codes[array.dtype.str[1:]], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture(name="write_idx", scope="session")
def write_idx_fixture():
    """The write_idx helper, as a fixture so test modules need not import conftest."""
    return write_idx


@pytest.fixture
def tracing_only(monkeypatch):
    """torch.compile with dynamo's tracing alone (backend "eager": no inductor, the random stream as in eager
    mode; seconds instead of minutes), after dynamo's caches and counters are reset."""
    import torch
    from torch._dynamo.utils import counters

    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()

