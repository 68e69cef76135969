"""Data: downloads against a loopback HTTP server, and the IDX data sets (mnist, fashion-mnist)."""

import functools
import hashlib
import http.server
import os
import re
import shutil
import socket
import threading
import time
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
            if self.path.startswith("/loop/"):  # redirects to itself
                self.send_response(302)
                self.send_header("Location", self.path)
                self.end_headers()
            elif self.path.startswith("/slow/"):  # ten bytes every 50 ms
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(200):
                        self.wfile.write(b"0123456789")
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:  # the client gave up
                    pass
            elif self.path.startswith("/steady/"):  # the whole file in 8 pieces, one every 0.1 s
                body = self.start_file("/steady/")
                try:
                    for i in range(8):
                        self.wfile.write(body[i * len(body) // 8:(i + 1) * len(body) // 8])
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:  # the client gave up
                    pass
            elif self.path.startswith("/cut/"):  # promises the whole file, sends half, closes
                body = self.start_file("/cut/")
                self.wfile.write(body[:len(body) // 2])
                self.close_connection = True
            else:
                super().do_GET()

        def start_file(self, prefix):
            """The fixture file the path names after prefix, its status and Content-Length sent."""
            body = (folder / self.path.removeprefix(prefix)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return body

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
    from vaelab.fileio import usual_mode  # readable as the umask allows (they were owner-only: a shared cache was not)
    assert all((offline_data / "mnist" / f).stat().st_mode & 0o777 == usual_mode() for f in small_idx_sets)
    check_small_set(load_dataset("mnist"), tuple("0123456789"))
    assert len(requests) == 4  # the second load came from the cache


def test_mirrors_are_tried_in_order(server, small_idx_sets, monkeypatch):
    base, requests = server
    monkeypatch.setenv("VAELAB_MNIST_URL", f"{base}missing/ {base}")
    check_small_set(load_dataset("mnist"), tuple("0123456789"))
    assert requests[:2] == ["/missing/train-images-idx3-ubyte.gz", "/train-images-idx3-ubyte.gz"]
    assert len(requests) == 5  # the mirror that answered goes first for the other files (a dead one cost 4 timeouts)


def test_a_file_no_mirror_has_names_each_mirror_once(server, small_idx_sets, monkeypatch):
    """After a file came from the second mirror, the list for the next files was rebuilt around it; a slip there
    (mirrors[used - 1:] for mirrors[used + 1:]) tried the dead one twice, and no test had a later file fail."""
    base, requests = server
    monkeypatch.setenv("VAELAB_MNIST_URL", f"{base}missing/ {base}")
    monkeypatch.setitem(sources.MNIST_SHA256, "t10k-images-idx3-ubyte.gz", "0" * 64)  # the third file, on neither
    with pytest.raises(DataError) as info:
        load_dataset("mnist")
    assert str(info.value).count("t10k-images-idx3-ubyte.gz: ") == 2  # one problem per mirror
    assert [r for r in requests if "t10k-images" in r] == ["/t10k-images-idx3-ubyte.gz",
                                                           "/missing/t10k-images-idx3-ubyte.gz"]


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
    for url in ("127.0.0.1:9/f", "mirror.example/f"):  # mirrors set without a scheme (the first read "unknown url
        with pytest.raises(DataError, match=rf"\({re.escape(url)}: not a URL: it must start with http://, "
                                            r"https:// or file://\)"):  # type: 127.0.0.1", with no hint)
            download(url, tmp_path / "f", "0" * 64)
    with pytest.raises(DataError, match=r"\(http://\[::1/f: Invalid IPv6 URL\)"):
        download("http://[::1/f", tmp_path / "f", "0" * 64)


def test_download_function(server, idx_files, tmp_path):
    base, _ = server
    folder, digests = idx_files
    name = "train-labels-idx1-ubyte.gz"
    dest = download(base + name, tmp_path / "new" / "labels.gz", digests[name].upper())
    assert dest.read_bytes() == (folder / name).read_bytes()


def test_the_loopback_server_is_reached_past_a_users_proxy(server, idx_files, tmp_path, monkeypatch):
    """conftest exempts loopback addresses from http_proxy: with a proxy set (here a dead one), urllib sent the
    fixture server's requests to the proxy, and every download test failed on that machine."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    base, requests = server
    name = "train-labels-idx1-ubyte.gz"
    download(base + name, tmp_path / "labels.gz", idx_files[1][name])
    assert requests == [f"/{name}"]


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


def test_a_cached_file_that_is_not_the_data_sets_is_downloaded_again(server, small_idx_sets, monkeypatch,
                                                                     offline_data):
    """Cached files were never checked against their digests: a damaged one said "delete it and download it
    again", and another data set's files under these names (Fashion-MNIST's as mnist) loaded as this one."""
    import gzip

    base, requests = server
    monkeypatch.setenv("VAELAB_MNIST_URL", base)
    load_dataset("mnist")
    cached = offline_data / "mnist" / "train-labels-idx1-ubyte.gz"
    good = cached.read_bytes()
    cached.write_bytes(gzip.compress(gzip.decompress(good)[::-1]))  # a valid file of the wrong contents
    check_small_set(load_dataset("mnist"), tuple("0123456789"))
    assert cached.read_bytes() == good and requests.count("/train-labels-idx1-ubyte.gz") == 2
    cached.write_bytes(good[:-20])
    monkeypatch.setenv("VAELAB_MNIST_URL", "http://127.0.0.1:9/")  # and offline
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz is not the file mnist has \(SHA-256 differs\); "
                                        r"cannot download train-labels"):
        load_dataset("mnist")
    cached.unlink()  # an uncompressed copy placed by hand has no digest to check: read_idx names its damage
    (offline_data / "mnist" / "train-labels-idx1-ubyte").write_bytes(gzip.decompress(good)[:-3])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte is truncated.*delete it and download it again"):
        load_dataset("mnist")


def test_downloads_say_what_went_wrong_on_which_side(server, idx_files, tmp_path, monkeypatch):
    """A redirect loop's message ran to three lines; a body cut short read as a corrupt file; a full disk was
    blamed on each mirror in turn (each downloaded again until the disk filled) with a fix that could not work."""
    import errno

    base, requests = server
    _, digests = idx_files
    name = "train-labels-idx1-ubyte.gz"
    with pytest.raises(DataError) as info:
        fetch.download_first([f"{base}loop/{name}", f"{base}cut/{name}"], tmp_path / name, digests[name])
    message = str(info.value)
    assert "\n" not in message and "loop/train-labels-idx1-ubyte.gz: HTTP 302 The HTTP server returned a redirect " \
        "error that would lead to an infinite loop.;" in message
    assert "cut/train-labels-idx1-ubyte.gz: the connection closed after" in message and "try again" in message

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fetch.tempfile, "NamedTemporaryFile", full_disk)
    requests.clear()
    with pytest.raises(DataError, match=f"cannot write {tmp_path / name} \\(No space left on device\\); free space"):
        fetch.download_first([base + name, base + name], tmp_path / name, digests[name])
    assert len(requests) == 1  # not each mirror in turn


def test_an_ssl_error_mid_download_is_the_mirror_s_not_the_disk_s(server, idx_files, tmp_path, monkeypatch):
    """ssl.SSLError is an OSError whose errno is the SSL code (1, read as EPERM): it was taken for a local write
    failure, and the other mirrors were not tried."""
    import io
    import ssl

    base, _ = server
    _, digests = idx_files
    name = "train-labels-idx1-ubyte.gz"
    real = fetch.urllib.request.urlopen

    class Broken(io.BytesIO):
        headers = {}

        def read1(self, n=-1):
            raise ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed or bad record mac")
    monkeypatch.setattr(fetch.urllib.request, "urlopen",
                        lambda url, **kw: Broken() if "broken" in url else real(url, **kw))
    fetch.download_first([f"{base}broken/{name}", base + name], tmp_path / name, digests[name])
    assert (tmp_path / name).is_file()


def test_a_trickling_mirror_fails_and_what_killed_downloads_left_is_cleared(server, idx_files, tmp_path,
                                                                             monkeypatch):
    """A mirror sending a few bytes within every read timeout held a run for ever; a download killed outright
    left its .part file beside the cache for good."""
    base, _ = server
    _, digests = idx_files
    name = "train-labels-idx1-ubyte.gz"
    monkeypatch.setattr(fetch, "TIMEOUT_S", 0.3)
    stale, live = tmp_path / f".{name}.old.part", tmp_path / f".{name}.new.part"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    t0 = time.monotonic()
    fetch.download_first([f"{base}slow/{name}", base + name], tmp_path / name, digests[name])
    assert time.monotonic() - t0 < 5 and (tmp_path / name).is_file()
    assert not stale.exists() and live.exists()  # a download still being written is left alone
    with pytest.raises(DataError, match=r"slow/train-labels-idx1-ubyte\.gz: too slow \(\d+\.\d kB/s after \d+ s\)"):
        fetch.download_first([f"{base}slow/{name}"], tmp_path / "again.gz", digests[name])


def test_a_download_longer_than_the_read_timeout_but_fast_enough_completes(server, idx_files, tmp_path, monkeypatch):
    """The rate rule applies after TIMEOUT_S only to mirrors slower than MIN_RATE: no test had a download outlast
    TIMEOUT_S, so failing every one that did (a large file on a slow line) passed."""
    base, _ = server
    _, digests = idx_files
    name = "train-labels-idx1-ubyte.gz"
    monkeypatch.setattr(fetch, "TIMEOUT_S", 0.3)
    monkeypatch.setattr(fetch, "MIN_RATE", 10)  # bytes per second; the fixture's file arrives at about 100
    t0 = time.monotonic()
    assert fetch.download_first([f"{base}steady/{name}"], tmp_path / name, digests[name]) == 0
    assert time.monotonic() - t0 > 0.6 and (tmp_path / name).is_file()


def test_a_mirror_below_the_rate_fails_once_the_read_timeout_has_passed(server, tmp_path, monkeypatch):
    """Average rate against MIN_RATE, at 200 B/s against 300: the trickle test's timeout of 0.3 s left 'got <
    MIN_RATE / seconds' failing the same mirror too (the two part only after a second)."""
    base, _ = server
    monkeypatch.setattr(fetch, "TIMEOUT_S", 1.25)
    monkeypatch.setattr(fetch, "MIN_RATE", 300)
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"slow/f: too slow \(0\.\d kB/s after \d s\)"):
        download(f"{base}slow/f", tmp_path / "f", "0" * 64)
    assert time.monotonic() - t0 < 4  # the slow path sends for 10 s


def test_a_part_file_is_stale_only_after_two_read_timeouts_and_a_minute(tmp_path, monkeypatch):
    """A live download writes within every read timeout; only parts older than twice that and a minute are what a
    killed one left (no test but a new part and an hour-old one set the line)."""
    monkeypatch.setattr(fetch, "TIMEOUT_S", 100.0)  # the line at 260 s
    now = time.time()
    for age in (250, 270):
        part = tmp_path / f".mnist.gz.{age}.part"
        part.write_bytes(b"x")
        os.utime(part, (now - age, now - age))
    fetch._remove_stale_parts(tmp_path / "mnist.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mnist.gz.250.part"]


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


def test_a_damaged_debian_file_gives_way_to_a_checked_download(server, idx_files, small_idx_sets, monkeypatch,
                                                                tmp_path, capsys):
    """A damaged file in Debian's folder stopped every Fashion-MNIST run with "reinstall", though the cache held
    a checked download of all four files."""
    folder, _ = idx_files
    debian = tmp_path / "debian"
    shutil.copytree(folder, debian)
    monkeypatch.setenv("VAELAB_FASHION_MNIST_DEBIAN_DIR", str(debian))
    (debian / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b damaged")
    with pytest.raises(DataError, match=r"t10k-labels.*reinstall Debian's package"):
        load_dataset("fashion-mnist")  # nothing in the cache: the package's fix
    monkeypatch.setenv("VAELAB_FASHION_MNIST_URL", server[0])
    monkeypatch.setenv("VAELAB_FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "none"))
    load_dataset("fashion-mnist")  # (downloaded into the cache)
    monkeypatch.setenv("VAELAB_FASHION_MNIST_DEBIAN_DIR", str(debian))
    capsys.readouterr()
    check_small_set(load_dataset("fashion-mnist"), sources.FASHION_CLASSES)
    err = capsys.readouterr().err
    assert err.startswith("vaelab: note: ") and "t10k-labels-idx1-ubyte.gz" in err
    assert "reading the checked copy in" in err and str(data_dir() / "fashion-mnist") in err


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
    monkeypatch.setattr(sources, "VAL_SIZE", VAL)
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-9])  # a damaged package file: reinstalling it is the fix
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is a corrupt gzip file .*; reinstall Debian's "
                                        r"package \(apt-get install --reinstall dataset-fashion-mnist\)$"):
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
