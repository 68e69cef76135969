"""Reader for the IDX format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/), numpy only."""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from vaelab.errors import DataError

# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def _gunzip(data: bytes) -> bytes:
    """Decompress a gzip IDX file, at most one byte past what the IDX header inside it promises.

    A few kilobytes of gzip can expand to gigabytes (a "gzip bomb"); reading the header first bounds the
    output by the array it declares, and one byte more is enough for read_idx to report the excess.
    """
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper; checks the CRC at the end of the stream
    out = d.decompress(data, 4)
    if len(out) < 4 and not d.eof:
        raise EOFError("the compressed stream ends early")
    if len(out) < 4 or out[0] or out[1] or out[2] not in _DTYPES:
        return out  # not IDX inside: read_idx's checks say so
    header = 4 + 4 * out[3]
    out += d.decompress(d.unconsumed_tail, header - 4)
    if len(out) < header:
        if not d.eof:
            raise EOFError("the compressed stream ends early")
        return out  # a complete stream holding a truncated IDX file: said by read_idx
    expected = header + math.prod(struct.unpack(f">{out[3]}I", out[4:header])) * np.dtype(_DTYPES[out[2]]).itemsize
    out += d.decompress(d.unconsumed_tail, expected - header + 1)
    if len(out) == expected and not d.eof:
        out += d.decompress(d.unconsumed_tail, 1)  # the end of the stream: its CRC is checked here
    if len(out) <= expected and not d.eof:
        raise EOFError("the compressed stream ends early")
    if d.unused_data:
        return out + b"\0"  # another gzip member follows: more data than the header promises
    return out


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file, raw or gzip (detected by content, not by name), into a native-endian array.

    Args:
        path: the file.
        ndim: if given, the number of dimensions the file must have (3 for images, 1 for labels).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}); check the path and its permissions") from None
    compressed = raw[:2] == _GZIP_MAGIC
    if compressed:
        try:
            raw = _gunzip(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path} is a corrupt gzip file ({e}); delete it and download it again") from None

    if len(raw) < 4:
        raise DataError(
            f"{path} is not an IDX file (only {len(raw)} bytes); pass an uncompressed or gzip IDX file"
        )
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = "0x0000TTDD (TT a type code 08-0e, DD the number of dimensions)"
    if ndim is not None:
        expected_magic = f"0x{0x800 | ndim:08x}"
    if raw[0] or raw[1] or raw[2] not in _DTYPES:
        raise DataError(
            f"{path} is not an IDX file (magic number 0x{magic:08x}, expected {expected_magic}); "
            "pass an uncompressed or gzip IDX file"
        )
    if ndim is not None and raw[3] != ndim:
        raise DataError(
            f"{path} holds a {raw[3]}-dimensional IDX array (magic number 0x{magic:08x}, "
            f"expected {expected_magic}); pass the matching file (images have 3 dimensions, labels 1)"
        )

    dtype = np.dtype(_DTYPES[raw[2]])
    header = 4 + 4 * raw[3]
    dims = struct.unpack(f">{raw[3]}I", raw[4:header]) if len(raw) >= header else None
    expected = header + (math.prod(dims) * dtype.itemsize if dims is not None else 0)
    what = "decompressed bytes" if compressed else "bytes"
    if dims is None or len(raw) < expected:
        promise = f"{expected} {what}" if dims is not None else f"a {header}-byte header"
        raise DataError(
            f"{path} is truncated: it should have {promise}, it has {len(raw)}; delete it and download it again"
        )
    if len(raw) > expected:
        raise DataError(
            f"{path} has {len(raw)} {what}, {len(raw) - expected} more than its IDX header promises "
            f"({expected}); the file is corrupt: delete it and download it again"
        )
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header)
    # astype copies into a writable, native-endian array (frombuffer over bytes is read-only).
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(dims)
