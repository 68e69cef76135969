"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process's umask: from /proc/self/status on Linux; elsewhere os.umask, which can only read it by setting
    it for a moment (so once, cached)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_by_setting()


@functools.cache
def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(*, directory: bool = False) -> int:
    """The permissions open() or mkdir() would give under the umask: mkstemp and mkdtemp make owner-only files
    and folders (0600, 0700), so a report or config written through them was unreadable to a group member or a
    web server running as another user."""
    return (0o777 if directory else 0o666) & ~_umask()


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename) to disk, where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        if hasattr(os, "fchmod"):  # (not on Windows before Python 3.13, where mkstemp's mode is not the issue)
            os.fchmod(fd, usual_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:  # named by the file asked for, not the temporary one
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """atomic_write_bytes for UTF-8 text."""
    atomic_write_bytes(path, text.encode())
