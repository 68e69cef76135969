"""Shared test setup: keep data offline and every cache in temporary folders."""

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (and in CI), so a failure is never a fluke of one
# run; HYPOTHESIS_PROFILE=explore searches afresh. No deadlines: the CI machine is shared and slow.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Every folder the suite's code and its libraries write to, outside the tests' own tmp_path: vaelab's data cache,
# matplotlib's font list, inductor's kernels, Chromium's profile pieces, torchrun's torchelastic_* folders and
# error files (TMPDIR, for subprocesses). All go to one temporary folder, removed when the session ends.
PRIVATE_FOLDERS = {"VAELAB_DATA": "vaelab-data", "MPLCONFIGDIR": "matplotlib",
                   "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton",
                   "XDG_CACHE_HOME": "cache", "XDG_CONFIG_HOME": "config", "TMPDIR": "tmp"}
LOOPBACK = "127.0.0.1,localhost"
_SAVED = pytest.StashKey[tuple]()  # the folder, and the variables as they were before


def pytest_configure(config):
    """Before any test module is imported (matplotlib reads MPLCONFIGDIR once): private folders, and loopback
    addresses exempt from a user's http_proxy, so the download tests reach their local server, not the proxy."""
    tempfile.gettempdir()  # fixed first: this process's tmp_path stays under pytest's own basetemp
    root = Path(tempfile.mkdtemp(prefix="vaelab-tests-"))
    names = [*PRIVATE_FOLDERS, "no_proxy", "NO_PROXY"]
    config.stash[_SAVED] = root, {name: os.environ.get(name) for name in names}
    for name, folder in PRIVATE_FOLDERS.items():
        (root / folder).mkdir()
        os.environ[name] = str(root / folder)
    exempt = os.environ.get("no_proxy") or os.environ.get("NO_PROXY")
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = f"{exempt},{LOOPBACK}" if exempt else LOOPBACK


def pytest_unconfigure(config):
    root, saved = config.stash[_SAVED]
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(root, ignore_errors=True)


NEEDS_INSTALL = re.compile(r"\binstall")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under VAELAB_REQUIRE_PACKAGES (set by .ci/run, which installs every package a test can skip for), a test
    that skips for want of an install (its reason says "install") fails instead: CI must not pass by skipping
    the browser, fortunes or Fashion-MNIST tests. Other skips (no CUDA device, no oneDNN) stay skips."""
    report = (yield).get_result()
    if report.skipped and os.environ.get("VAELAB_REQUIRE_PACKAGES"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if NEEDS_INSTALL.search(reason):
            report.outcome = "failed"
            report.longrepr = f"skipped where .ci/run installs what it needs (VAELAB_REQUIRE_PACKAGES): {reason}"


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it: tiny models are latency-bound, and on a busy 2-core
    machine a second intra-op thread only adds synchronisation (10-80x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

