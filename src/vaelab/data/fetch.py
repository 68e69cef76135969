"""The data cache folder and checked, atomic downloads into it."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from vaelab.errors import DataError

TIMEOUT_S = 60.0  # per connection attempt and per read; a stalled mirror fails instead of hanging a run
_CHUNK = 1 << 20

log = logging.getLogger(__name__)


def data_dir() -> Path:
    """Folder for downloaded and cached data: $VAELAB_DATA if set, else ~/.cache/vaelab."""
    override = os.environ.get("VAELAB_DATA")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "vaelab"


def download(url: str, dest: Path, sha256: str) -> Path:
    """Download `url` to `dest` atomically and check its SHA-256; returns `dest`.

    Args:
        url: where to fetch the file (http, https or file URL).
        dest: final path; written only once the digest matches, so it never holds a partial file.
        sha256: expected hex digest; a mismatch raises DataError and leaves no file behind.
    """
    return download_first([url], dest, sha256)


def download_first(urls: Sequence[str], dest: Path, sha256: str) -> Path:
    """Like `download`, trying mirrors in order until one yields the right file; returns `dest`."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the data folder {dest.parent} ({e.strerror or e}); "
            "set VAELAB_DATA to a writable folder"
        ) from None
    problems = []
    for url in urls:
        log.info("downloading %s", url)
        problem = _fetch(url, dest, sha256.lower())
        if problem is None:
            return dest
        problems.append(f"{url}: {problem}")
    raise DataError(
        f"cannot download {dest.name} ({'; '.join(problems)}); "
        f"put the file into {dest.parent}/ by hand, "
        f"or set VAELAB_DATA to a folder that has {dest.parent.name}/{dest.name}"
    )


def _fetch(url: str, dest: Path, sha256: str) -> str | None:
    """One attempt: stream `url` into a temporary file beside `dest`, then rename; returns what went wrong, or None."""
    tmp: Path | None = None
    try:
        with (
            urllib.request.urlopen(url, timeout=TIMEOUT_S) as response,
            tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False) as out,
        ):
            tmp = Path(out.name)
            digest = hashlib.sha256()
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            return f"SHA-256 {digest.hexdigest()}, expected {sha256}; the corrupt download was removed"
        os.replace(tmp, dest)  # atomic: readers see the old state or the whole verified file
        tmp = None
        return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        return _describe(e.reason)
    except (OSError, http.client.HTTPException, ValueError) as e:
        return _describe(e)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _describe(reason: object) -> str:
    """A short text for a network failure (socket errors, timeouts, malformed URLs)."""
    if isinstance(reason, TimeoutError):
        return f"no answer within {TIMEOUT_S:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__
