"""The data cache folder and checked, atomic downloads into it."""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from vaelab.errors import DataError
from vaelab.fileio import usual_mode

TIMEOUT_S = 60.0  # per connection attempt and per read; a stalled mirror fails instead of hanging a run
MIN_RATE = 10_000  # bytes per second, on average after TIMEOUT_S: a mirror trickling slower fails too
_CHUNK = 1 << 20
SCHEMES = ("http", "https", "file")
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> SHA-256, hashed once per process


def data_dir() -> Path:
    """Folder for downloaded and cached data: $VAELAB_DATA if set, else ~/.cache/vaelab."""
    override = os.environ.get("VAELAB_DATA")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "vaelab"


def sha256_of(path: Path) -> str:
    """The file's SHA-256 (hex), remembered while it keeps its size and modification time."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _verified[key] = digest.hexdigest()
    return _verified[key]


def download(url: str, dest: Path, sha256: str) -> Path:
    """Download `url` to `dest` atomically and check its SHA-256; returns `dest`.

    Args:
        url: where to fetch the file (http, https or file URL).
        dest: final path; written only once the digest matches, so it never holds a partial file.
        sha256: expected hex digest; a mismatch raises DataError and leaves no file behind.
    """
    download_first([url], dest, sha256)
    return dest


def download_first(urls: Sequence[str], dest: Path, sha256: str) -> int:
    """Like `download`, trying mirrors in order until one yields the right file; returns the index of that URL."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the data folder {dest.parent} ({e.strerror or e}); "
            "set VAELAB_DATA to a writable folder"
        ) from None
    _remove_stale_parts(dest)
    problems = []
    for i, url in enumerate(urls):
        problem = _fetch(url, dest, sha256.lower())
        if problem is None:
            return i
        problems.append(f"{url}: {problem}")
    raise DataError(
        f"cannot download {dest.name} ({'; '.join(problems)}); "
        f"put the file into {dest.parent}/ by hand, "
        f"or set VAELAB_DATA to a folder that has {dest.parent.name}/{dest.name}"
    )


def _remove_stale_parts(dest: Path) -> None:
    """Remove what downloads of dest killed outright left (a live one writes at least every TIMEOUT_S)."""
    for part in dest.parent.glob(f".{dest.name}.*.part"):
        try:
            if time.time() - part.stat().st_mtime > 2 * TIMEOUT_S + 60:
                part.unlink()
        except OSError:
            pass


def _fetch(url: str, dest: Path, sha256: str) -> str | None:
    """One attempt: stream `url` into a temporary file beside `dest`, then rename; returns what went wrong with the
    mirror, or None. A failure of the local disk raises DataError at once."""
    tmp: Path | None = None
    got = 0
    try:
        if urllib.parse.urlsplit(url).scheme not in SCHEMES:  # (urllib said 'unknown url type' of the host or path)
            return f"not a URL: it must start with {', '.join(f'{s}://' for s in SCHEMES[:-1])} or {SCHEMES[-1]}://"
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            out = _on_disk(tempfile.NamedTemporaryFile, dir=dest.parent, prefix=f".{dest.name}.", suffix=".part",
                           delete=False)
            tmp = Path(out.name)
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            digest, start = hashlib.sha256(), time.monotonic()
            with out, tqdm(total=length, unit="B", unit_scale=True, desc=f"downloading {dest.name}", leave=False,
                           disable=None, file=sys.stderr) as bar:  # (None: only on a terminal)
                read = getattr(response, "read1", response.read)  # what has arrived: read() waits for it all
                while chunk := read(_CHUNK):
                    digest.update(chunk)
                    _on_disk(out.write, chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                    seconds = time.monotonic() - start
                    if seconds > TIMEOUT_S and got < MIN_RATE * seconds:
                        return f"too slow ({got / seconds / 1000:.1f} kB/s after {seconds:.0f} s)"
                _on_disk(out.flush)
        if length is not None and got != length:
            return f"the connection closed after {got} of {length} bytes; try again"
        if digest.hexdigest() != sha256:
            return f"SHA-256 {digest.hexdigest()}, expected {sha256}; the corrupt download was removed"
        _on_disk(tmp.chmod, usual_mode())  # a temporary file is owner-only: a shared cache was unreadable to others
        _on_disk(os.replace, tmp, dest)  # atomic: readers see the old state or the whole verified file
        tmp = None
        return None
    except _DiskError as e:  # the next mirror cannot help
        raise DataError(f"cannot write {dest} ({e.error.strerror or e.error}); free space there, or set VAELAB_DATA "
                        "to a writable folder") from None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {str(e.reason).splitlines()[0] if e.reason else ''}".rstrip()  # (a redirect loop's
    except urllib.error.URLError as e:  # reason runs to three lines)
        return _describe(e.reason)
    except http.client.IncompleteRead as e:
        return f"the connection closed early, after {got + len(e.partial)} bytes; try again"
    except OSError as e:  # the network's (an SSL error's errno is the SSL code: 1 read as EPERM, a local failure)
        return _describe(e)
    except (http.client.HTTPException, ValueError) as e:  # (ValueError: a malformed URL, e.g. 'http://[::1/')
        return _describe(e)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


class _DiskError(Exception):
    """An OSError of the local disk (a full one, a read-only folder), not of the mirror."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def _on_disk(operation, *args, **kwargs):
    """operation(*args, **kwargs), its OSError raised as a _DiskError."""
    try:
        return operation(*args, **kwargs)
    except OSError as e:
        raise _DiskError(e) from e


def _describe(reason: object) -> str:
    """A short text for a network failure (socket errors, timeouts, malformed URLs)."""
    if isinstance(reason, TimeoutError):
        return f"no answer within {TIMEOUT_S:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__
