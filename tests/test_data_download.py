"""Data: downloads against a loopback HTTP server, and the IDX data sets (mnist, fashion-mnist)."""

import functools
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab.data import data_dir, download, fetch, load_dataset, sources
from vaelab.errors import DataError

pytestmark = pytest.mark.usefixtures("offline_data")

N_TRAIN, N_TEST, VAL = 14, 6, 4


@pytest.fixture
def idx_files(tmp_path, write_idx):
    """Tiny MNIST-like IDX .gz files: image i is filled with i, its label is i % 10; returns (folder, digests)."""
    folder = tmp_path / "served"
    folder.mkdir()
    train, test = np.arange(N_TRAIN, dtype=np.uint8), np.arange(100, 100 + N_TEST, dtype=np.uint8)
    arrays = {
        "train-images-idx3-ubyte.gz": np.broadcast_to(train[:, None, None], (N_TRAIN, 3, 2)),
        "train-labels-idx1-ubyte.gz": train % 10,
        "t10k-images-idx3-ubyte.gz": np.broadcast_to(test[:, None, None], (N_TEST, 3, 2)),
        "t10k-labels-idx1-ubyte.gz": np.arange(N_TEST, dtype=np.uint8) % 10,
    }
    digests = {}
    for name, array in arrays.items():
        digests[name] = hashlib.sha256(write_idx(folder / name, array).read_bytes()).hexdigest()
    return folder, digests


@pytest.fixture
def server(idx_files):
    """A loopback HTTP server over the fixture folder; yields (base URL, list of requested paths)."""
    folder, _ = idx_files
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def small_idx_sets(monkeypatch, idx_files):
    """Make the mnist/fashion-mnist loaders accept the fixture files: their digests and a tiny validation split."""
    _, digests = idx_files
    monkeypatch.setattr(sources, "MNIST_SHA256", dict(digests))
    monkeypatch.setattr(sources, "FASHION_MNIST_SHA256", dict(digests))
    monkeypatch.setattr(sources, "VAL_SIZE", VAL)
    return digests


def check_small_set(ds, classes):
    assert ds.shape == (1, 3, 2) and ds.classes == classes
    assert [len(s.x) for s in (ds.train, ds.val, ds.test)] == [N_TRAIN - VAL, VAL, N_TEST]
    # Train is the first N_TRAIN - VAL examples in file order, val the rest; pixels were divided by 255.
    assert torch.equal((ds.train.x[:, 0, 0, 0] * 255).round().long(), torch.arange(N_TRAIN - VAL))
    assert torch.equal((ds.val.x[:, 0, 0, 0] * 255).round().long(), torch.arange(N_TRAIN - VAL, N_TRAIN))
    assert torch.equal(ds.val.y, torch.arange(N_TRAIN - VAL, N_TRAIN) % 10)
    assert torch.equal(ds.test.y, torch.arange(N_TEST)) and ds.test.x.max() <= 1


def test_data_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "elsewhere"))
    assert data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("VAELAB_DATA")
    assert data_dir() == Path.home() / ".cache" / "vaelab"


def test_mnist_downloads_once(server, small_idx_sets, monkeypatch, offline_data):
    base, requests = server
    monkeypatch.setenv("VAELAB_MNIST_URL", base)
    check_small_set(load_dataset("mnist"), tuple("0123456789"))
    assert sorted(requests) == sorted(f"/{name}" for name in small_idx_sets)
    assert sorted(os.listdir(offline_data / "mnist")) == sorted(small_idx_sets)  # no temporary files left
    check_small_set(load_dataset("mnist"), tuple("0123456789"))
    assert len(requests) == 4  # the second load came from the cache


def test_mirrors_are_tried_in_order(server, small_idx_sets, monkeypatch):
    base, requests = server
    monkeypatch.setenv("VAELAB_MNIST_URL", f"{base}missing/ {base}")
    check_small_set(load_dataset("mnist"), tuple("0123456789"))
    assert requests[:2] == ["/missing/train-images-idx3-ubyte.gz", "/train-images-idx3-ubyte.gz"]


def test_corrupt_download_is_refused_and_removed(server, small_idx_sets, monkeypatch, offline_data):
    base, _ = server
    monkeypatch.setenv("VAELAB_MNIST_URL", base)
    monkeypatch.setitem(sources.MNIST_SHA256, "t10k-images-idx3-ubyte.gz", "0" * 64)
    with pytest.raises(DataError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert "SHA-256" in message and "t10k-images-idx3-ubyte.gz" in message and "0" * 64 in message
    assert small_idx_sets["t10k-images-idx3-ubyte.gz"] in message and "removed" in message
    assert str(offline_data / "mnist") in message and "\n" not in message
    assert "t10k-images-idx3-ubyte.gz" not in os.listdir(offline_data / "mnist")
    assert not [f for f in os.listdir(offline_data / "mnist") if f.endswith(".part")]


def test_http_404_names_url_and_fix(server, monkeypatch):
    base, _ = server
    monkeypatch.setenv("VAELAB_MNIST_URL", f"{base}nowhere/")
    with pytest.raises(DataError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert f"{base}nowhere/train-images-idx3-ubyte.gz" in message and "HTTP 404" in message
    assert "by hand" in message and "VAELAB_DATA" in message


def test_unreachable_and_silent_servers(monkeypatch, tmp_path):
    with pytest.raises(DataError, match=r"http://127\.0\.0\.1:9/train-images-idx3-ubyte\.gz: Connection refused"):
        load_dataset("mnist")  # the offline fixture points mnist at the discard port
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections into the backlog but never answers
    monkeypatch.setattr(fetch, "TIMEOUT_S", 0.2)
    try:
        with pytest.raises(DataError, match="no answer within 0.2 s"):
            download(f"http://127.0.0.1:{silent.getsockname()[1]}/f", tmp_path / "f", "0" * 64)
    finally:
        silent.close()
    assert not (tmp_path / "f").exists()


def test_download_function(server, idx_files, tmp_path):
    base, _ = server
    folder, digests = idx_files
    name = "train-labels-idx1-ubyte.gz"
    dest = download(base + name, tmp_path / "new" / "labels.gz", digests[name].upper())
    assert dest.read_bytes() == (folder / name).read_bytes()


def test_files_placed_by_hand_are_used_uncompressed_too(
    write_idx, monkeypatch, small_idx_sets, idx_files, offline_data
):
    # Uncompressed files under the unzipped names count as present; read_idx tells the formats apart by content.
    folder, _ = idx_files
    import gzip

    (offline_data / "mnist").mkdir(parents=True)
    for name in small_idx_sets:
        (offline_data / "mnist" / name.removesuffix(".gz")).write_bytes(gzip.decompress((folder / name).read_bytes()))
    check_small_set(load_dataset("mnist"), tuple("0123456789"))


def test_truncated_cached_file_says_delete_and_redownload(server, small_idx_sets, monkeypatch, offline_data):
    base, _ = server
    monkeypatch.setenv("VAELAB_MNIST_URL", base)
    load_dataset("mnist")
    cached = offline_data / "mnist" / "train-labels-idx1-ubyte.gz"
    cached.write_bytes(cached.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz.*delete it and download it again"):
        load_dataset("mnist")


def test_fashion_mnist_from_debian_dir_is_not_checksummed(idx_files, monkeypatch):
    folder, _ = idx_files
    monkeypatch.setattr(sources, "VAL_SIZE", VAL)  # digests stay upstream's: Debian files must not be checked
    monkeypatch.setenv("VAELAB_FASHION_MNIST_DEBIAN_DIR", str(folder))
    check_small_set(load_dataset("fashion-mnist"), sources.FASHION_CLASSES)


def test_fashion_mnist_downloads_without_debian_package(server, small_idx_sets, monkeypatch, tmp_path, offline_data):
    base, requests = server
    monkeypatch.setenv("VAELAB_FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "no-such-dir"))
    monkeypatch.setenv("VAELAB_FASHION_MNIST_URL", base.rstrip("/"))  # a missing slash is forgiven
    ds = load_dataset("fashion-mnist")
    check_small_set(ds, sources.FASHION_CLASSES)
    assert len(requests) == 4 and (offline_data / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


def test_idx_sets_refuse_inconsistent_files(idx_files, write_idx, monkeypatch):
    folder, _ = idx_files
    monkeypatch.setenv("VAELAB_FASHION_MNIST_DEBIAN_DIR", str(folder))
    monkeypatch.setattr(sources, "VAL_SIZE", VAL)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(N_TEST + 1, np.uint8))
    with pytest.raises(DataError, match=f"has {N_TEST} images but .* has {N_TEST + 1} labels"):
        load_dataset("fashion-mnist")
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(N_TEST, np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.full(N_TRAIN, 10, np.uint8))
    with pytest.raises(DataError, match=r"labels outside 0\.\.9"):
        load_dataset("fashion-mnist")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(N_TRAIN, np.uint8))
    monkeypatch.setattr(sources, "VAL_SIZE", N_TRAIN)
    with pytest.raises(DataError, match="too few.*reinstall Debian's package"):  # not "download them again"
        load_dataset("fashion-mnist")


def test_an_incomplete_debian_folder_is_named_and_every_missing_download_listed(idx_files, monkeypatch, tmp_path):
    folder, _ = idx_files
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("VAELAB_FASHION_MNIST_DEBIAN_DIR", str(folder))
    with pytest.raises(DataError) as info:  # the offline fixture's mirror refuses every download
        load_dataset("fashion-mnist")
    message = str(info.value)  # it named train-images... to download, though that file was in the Debian folder
    assert message.startswith(f"{folder} lacks t10k-labels-idx1-ubyte.gz: reinstall Debian's package")
    monkeypatch.setenv("VAELAB_FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "no-such-dir"))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*\(also missing: train-labels-idx1-ubyte\.gz, "
                                        r"t10k-images-idx3-ubyte\.gz, t10k-labels-idx1-ubyte\.gz\)"):
        load_dataset("fashion-mnist")  # one file named at a time, for a user placing them by hand


@pytest.mark.skipif(
    not Path(sources.FASHION_MNIST_DEBIAN_DIR).is_dir(), reason="Debian dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("VAELAB_FASHION_MNIST_DEBIAN_DIR", raising=False)
    ds = load_dataset("fashion-mnist")
    assert ds.shape == (1, 28, 28) and ds.classes[0] == "T-shirt/top" and ds.classes[-1] == "Ankle boot"
    assert [len(s.x) for s in (ds.train, ds.val, ds.test)] == [50_000, 10_000, 10_000]
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.float32 and split.x.min() == 0 and split.x.max() == 1
        assert torch.equal(torch.bincount(split.y, minlength=10) > 0, torch.ones(10, dtype=torch.bool))
    assert torch.equal(torch.bincount(ds.test.y), torch.full((10,), 1000))
