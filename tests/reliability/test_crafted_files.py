"""Crafted array files that random bytes rarely hit: lying .npy headers, exotic zips, absurd labels.

Each once escaped the loaders as MemoryError, AttributeError, NotImplementedError or RuntimeError, or ran the
machine out of memory; now each is a DataError naming the file (test_fuzz.py feeds the loaders random bytes).
"""
import io
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaelab.data import load_npy, load_npz
from vaelab.data.custom import MAX_CLASSES
from vaelab.errors import DataError


def npy_with_header(shape: tuple[int, ...], descr: str = "<f4", body: bytes = b"") -> bytes:
    """An .npy file whose header claims `shape` of `descr`, followed by `body` (however short)."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"  # pad to a multiple of 64 bytes, as numpy writes
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body


def zipped(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_an_npy_header_promising_400_gb_is_refused_before_anything_is_allocated(tmp_path):
    path = tmp_path / "x.npy"
    path.write_bytes(npy_with_header((10**11,), body=bytes(16)))  # np.load would raise MemoryError
    with pytest.raises(DataError, match=r"x\.npy is truncated or damaged.*promises shape \(100000000000,\)"):
        load_npy(str(path))
    npz = zipped(tmp_path / "x.npz", {"x.npy": path.read_bytes()})
    with pytest.raises(DataError, match=r"x\.npz \[x\] is truncated or damaged"):
        load_npz(str(npz))


def test_an_npy_file_cut_short_names_the_bytes_its_header_promises(tmp_path):
    """Only absurd promises were tested: a check that divided the element count by the item size (a mutant) passed,
    and a float64 array cut in half then failed in numpy's words."""
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((100, 4, 4)))  # 12,800 bytes of float64
    path.write_bytes(path.read_bytes()[:-6_400])
    with pytest.raises(DataError, match=r"x\.npy is truncated or damaged: its header promises shape \(100, 4, 4\) "
                                        r"of float64 \(12,800 bytes\), but there are only 6,528"):
        load_npy(str(path))


def test_an_npz_member_that_is_not_an_npy_array_is_refused(tmp_path):
    npz = zipped(tmp_path / "x.npz", {"x": b"not an array"})  # np.load hands back these bytes as they are
    with pytest.raises(DataError, match=r"x\.npz \[x\] is not an \.npy array"):
        load_npz(str(npz))


def with_header_field(raw: bytes, field: str, value: int) -> bytes:
    """A one-member zip with its general-purpose `flags` or compression `method` set in both of its headers."""
    local = zipfile.ZipFile(io.BytesIO(raw)).infolist()[0].header_offset
    central = raw.rindex(b"PK\x01\x02")
    at = {"flags": (local + 6, central + 8), "method": (local + 8, central + 10)}[field]
    data = bytearray(raw)
    for offset in at:
        data[offset:offset + 2] = value.to_bytes(2, "little")
    return bytes(data)


@pytest.mark.parametrize("field, value", [("method", 99), ("flags", 1)])
def test_unsupported_or_encrypted_zip_members_are_refused(tmp_path, field, value):
    # method 99 (AES): zipfile raises NotImplementedError; flag bit 0 (encrypted): RuntimeError, password needed
    raw = zipped(tmp_path / "plain.npz", {"x.npy": npy_with_header((3, 2, 2), body=bytes(48))}).read_bytes()
    path = tmp_path / "patched.npz"
    path.write_bytes(with_header_field(raw, field, value))
    with pytest.raises(DataError, match=r"cannot read .*patched\.npz \[x\].*damaged"):
        load_npz(str(path))
    assert load_npz(str(tmp_path / "plain.npz")).train.x.shape[1:] == (1, 2, 2)  # unpatched, it loads


@pytest.mark.parametrize("label", [10**6, 1e300, float("inf")])
def test_labels_far_beyond_any_class_count_are_refused(tmp_path, label):
    # 10**12 used to build 10**12 class names (out of memory); 1e300 became a negative int64 label
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((5, 3, 3), "uint8"), y=np.array([0, 1, 2, 3, label]))
    with pytest.raises(DataError, match=rf"x\.npz \[y\] labels must be integers >= 0 and below {MAX_CLASSES}"):
        load_npz(str(path))


def test_labels_just_below_the_bound_still_load(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((5, 3, 3), "uint8"), y=np.array([0, 1, 2, 3, MAX_CLASSES - 1]))
    data = load_npz(str(path))
    assert len(data.classes) == MAX_CLASSES


dtypes = st.sampled_from(["<f4", "<f8", "|u1", "<i8", "|b1", "<c8", "|O", "<U3", "|V7"])
shapes = st.lists(st.integers(0, 2**40), max_size=4).map(tuple)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(shape=shapes, descr=dtypes, body=st.binary(max_size=200))
def test_any_npy_header_over_any_body_loads_or_is_refused(tmp_path, shape, descr, body):
    data = npy_with_header(shape, descr, body)
    npy = tmp_path / "x.npy"
    npy.write_bytes(data)
    npz = zipped(tmp_path / "x.npz", {"x.npy": data}, zipfile.ZIP_DEFLATED)
    for load, path in ((load_npy, npy), (load_npz, npz)):
        try:
            load(str(path))
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e)


@FUZZ
@given(labels=st.lists(st.one_of(st.integers(-5, 10**7), st.floats()), min_size=3, max_size=6))
def test_any_labels_load_as_a_bounded_class_list_or_are_refused(tmp_path, labels):
    # (10**7, not 2**62: were the bound lost, this test should fail, not run the machine out of memory)
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((len(labels), 2, 2), "uint8"), y=np.array(labels))
    try:
        data = load_npz(str(path))
    except DataError as e:
        assert "x.npz [y] labels" in str(e)
    else:
        assert len(data.classes) <= MAX_CLASSES
        assert all(0 <= int(split.y.min()) and int(split.y.max()) < len(data.classes)
                   for split in (data.train, data.val, data.test) if len(split.y))
