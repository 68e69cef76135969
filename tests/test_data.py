"""Data: IDX reader, bundled data sets, registry, binarisation and value checks."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from vaelab.data import (
    CUSTOM,
    DATASETS,
    Dataset,
    Split,
    binarize,
    check_eight_bit,
    check_finite,
    check_unit_interval,
    dequantize,
    load_dataset,
    read_idx,
    sources,
    static_binarize,
)
from vaelab.errors import DataError

pytestmark = pytest.mark.usefixtures("offline_data")


# --- IDX reader ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trip(tmp_path, write_idx, compress, dtype):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a.idx", array, compress))
    assert out.dtype == array.dtype.newbyteorder("=") and out.flags.writeable
    np.testing.assert_array_equal(out, array)


@settings(max_examples=40, deadline=None)
@given(arrays(st.sampled_from([np.uint8, np.int16, np.float32]), array_shapes(min_dims=1, max_dims=4, max_side=4)))
def test_read_idx_round_trip_any_shape(tmp_path_factory, write_idx, array):
    path = write_idx(tmp_path_factory.mktemp("idx") / "x", array)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path, write_idx):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "raw.gz", array, compress=False)), array)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "packed.idx", array, compress=True)), array)


def test_read_idx_wrong_magic_names_file_and_magic(tmp_path, write_idx):
    inner = write_idx(tmp_path / "inner", np.zeros((2, 2, 2), np.uint8))
    twice = tmp_path / "t10k-images-idx3-ubyte.gz"
    twice.write_bytes(gzip.compress(inner.read_bytes()))  # gzip of a gzip: the IDX magic is then 0x1f8b08..
    with pytest.raises(DataError, match="not an IDX file") as info:
        read_idx(twice, ndim=3)
    message = str(info.value)
    assert str(twice) in message and "0x1f8b08" in message and "0x00000803" in message and "\n" not in message


def test_read_idx_wrong_ndim(tmp_path, write_idx):
    path = write_idx(tmp_path / "labels.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match=r"1-dimensional.*0x00000803"):
        read_idx(path, ndim=3)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_truncated(tmp_path, compress):
    header = bytes([0, 0, 8, 3]) + np.array([10, 28, 28], ">u4").tobytes()
    raw = header + bytes(100)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message and str(16 + 10 * 28 * 28) in message and str(len(raw)) in message
    assert "download it again" in message


def test_read_idx_truncated_header_trailing_bytes_short_file(tmp_path):
    short_header = tmp_path / "short_header"
    short_header.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(short_header)
    trailing = tmp_path / "trailing"
    trailing.write_bytes(bytes([0, 0, 8, 1]) + np.array([2], ">u4").tobytes() + bytes(5))
    with pytest.raises(DataError, match="3 more than"):
        read_idx(trailing)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tiny)


def test_read_idx_corrupt_gzip_and_missing_file(tmp_path, write_idx):
    path = write_idx(tmp_path / "x.gz", np.zeros((4, 4, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:-12])  # cut the gzip trailer and some data
    with pytest.raises(DataError, match="corrupt gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "missing.gz")


def test_read_idx_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    """A 4x4x4 header followed by 256 MB of zeros (~250 KB of gzip): only the promised bytes are inflated."""
    import gzip
    import tracemalloc

    path = tmp_path / "bomb.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(bytes([0, 0, 8, 3]) + (4).to_bytes(4, "big") * 3)
        zeros = bytes(1 << 20)
        for _ in range(256):
            f.write(zeros)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="more than its IDX header promises"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # far below the 256 MB inside
    # and a second gzip member after a complete file is more data than promised, too
    good = gzip.compress(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + b"\x01\x02")
    path.write_bytes(good + gzip.compress(b"\x03"))
    with pytest.raises(DataError, match="more than its IDX header promises"):
        read_idx(path)
    path.write_bytes(good)
    assert read_idx(path).tolist() == [1, 2]


# --- bundled data sets -------------------------------------------------------------------------------------


@pytest.fixture
def fresh_mnist5k():
    """Forget the in-process copy so each test sees its own VAELAB_DATA cache."""
    sources._mnist5k_rows.cache_clear()
    yield
    sources._mnist5k_rows.cache_clear()


def test_mnist5k_shapes_range_labels(fresh_mnist5k):
    ds = load_dataset("mnist5k")
    assert ds.name == "mnist5k" and ds.shape == (1, 28, 28) and ds.classes == tuple("0123456789")
    assert [len(s.x) for s in (ds.train, ds.val, ds.test)] == [3500, 500, 1000]
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.min() == 0 and split.x.max() == 1
        assert set(split.y.tolist()) == set(range(10))
    # A zero is mostly background, with some ink: a sanity check that pixels and labels stayed paired.
    assert 0.05 < ds.train.x[ds.train.y == 1].mean() < ds.train.x[ds.train.y == 0].mean() < 0.4


def test_mnist5k_deterministic_and_cached_on_disk(fresh_mnist5k, offline_data, monkeypatch):
    first = load_dataset("mnist5k")
    assert (offline_data / "mnist5k.npz").is_file()
    from vaelab.fileio import usual_mode  # readable as the umask allows, not owner-only
    assert (offline_data / "mnist5k.npz").stat().st_mode & 0o777 == usual_mode()
    sources._mnist5k_rows.cache_clear()  # the next load reads the .npz, not the csv
    monkeypatch.setattr(sources, "_parse_mnist5k_csv", lambda: pytest.fail("the cached .npz was not used"))
    second = load_dataset("mnist5k")
    for a, b in zip((first.train, first.val, first.test), (second.train, second.val, second.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert first.train.x.data_ptr() != second.train.x.data_ptr()  # callers get their own tensors


def test_mnist5k_damaged_or_unwritable_cache(fresh_mnist5k, offline_data, monkeypatch):
    offline_data.mkdir(parents=True)
    (offline_data / "mnist5k.npz").write_bytes(b"garbage")
    assert len(load_dataset("mnist5k").train.x) == 3500
    assert np.load(offline_data / "mnist5k.npz")["rows"].shape == (5000, 785)  # rewritten
    sources._mnist5k_rows.cache_clear()
    np.savez(offline_data / "mnist5k.npz", rows=np.zeros((10, 785), np.uint8))  # a readable cache of other rows
    assert len(load_dataset("mnist5k").train.x) == 3500
    assert np.load(offline_data / "mnist5k.npz")["rows"].shape == (5000, 785)
    sources._mnist5k_rows.cache_clear()
    not_a_dir = offline_data / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("VAELAB_DATA", str(not_a_dir))
    assert len(load_dataset("mnist5k").test.x) == 1000


def test_digits():
    ds = load_dataset("digits")
    assert ds.shape == (1, 8, 8) and ds.classes == tuple("0123456789")
    sizes = [len(s.x) for s in (ds.train, ds.val, ds.test)]
    assert sum(sizes) == 1797 and sizes == [1258, 180, 359]
    assert 0 <= ds.train.x.min() and ds.train.x.max() == 1


# --- registry ----------------------------------------------------------------------------------------------


def test_registry_is_a_plain_dict_of_the_named_sets():
    assert type(DATASETS) is dict and list(DATASETS) == ["mnist5k", "digits", "fashion-mnist", "mnist", "fortunes"]


def test_the_file_prefixes_dataconfig_stores_absolute_are_the_registry_s():
    """config.FILE_DATA (which DataConfig resolves to absolute paths) and data.CUSTOM (which loads them) list the
    same prefixes twice, as config sits below data and cannot import its loaders: a new loader needs both."""
    from vaelab.config import FILE_DATA

    assert set(FILE_DATA) == set(CUSTOM)


def test_unknown_name_lists_known_names_and_forms():
    with pytest.raises(DataError) as info:
        load_dataset("mnsit")
    message = str(info.value)
    for word in ("'mnsit'", "mnist5k", "digits", "fashion-mnist", "folder:PATH", "npz:PATH", "npy:PATH"):
        assert word in message
    with pytest.raises(DataError, match="folder:PATH"):
        load_dataset("folder:")
    for name in (123, None, Path("digits")):  # was AttributeError: ... has no attribute 'partition'
        with pytest.raises(DataError, match="named by a string such as 'digits'"):
            load_dataset(name)


def test_dataset_refuses_splits_that_disagree():
    x = torch.zeros(2, 1, 3, 3)
    with pytest.raises(DataError, match="shape"):
        Dataset("t", Split(x), Split(torch.zeros(2, 1, 4, 4)), Split(x))
    with pytest.raises(DataError, match="labels"):
        Dataset("t", Split(x, torch.zeros(2, dtype=torch.long)), Split(x), Split(x))
    assert Dataset("t", Split(x), Split(x), Split(x)).shape == (1, 3, 3)


def test_dataset_refuses_splits_off_the_cpu():
    """A data set on a GPU trained, then failed deep in torch: binarised with a CPU generator, probed through
    NumPy. (The meta device stands in for a GPU here.)"""
    x, away = torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3, device="meta")
    with pytest.raises(DataError, match=r"^data set t: the test split is on meta; vaelab keeps data sets on the CPU "
                                        r"and moves batches to the run's device itself: give CPU tensors \(x\.cpu"):
        Dataset("t", Split(x), Split(x), Split(away))
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(DataError, match="the val split is on meta"):
        Dataset("t", Split(x, y), Split(x, y.to("meta")), Split(x, y))


# --- binarisation and checks -------------------------------------------------------------------------------


def test_binarize_is_bernoulli_of_x():
    p = torch.linspace(0, 1, 11).repeat(20_000, 1)  # (20000, 11): each column one probability
    sample = binarize(p, torch.Generator().manual_seed(0))
    assert sample.dtype == p.dtype and sample.shape == p.shape
    assert set(sample.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(sample[:, 0] == 0) and torch.all(sample[:, -1] == 1)
    # The column means have standard error <= sqrt(0.25 / 20000) = 0.0035; 0.025 is 7 of them,
    # and with a seeded generator the outcome is fixed anyway.
    assert torch.allclose(sample.mean(0), p[0], atol=0.025)


def test_binarize_reproducible_and_keeps_dtype():
    x = torch.rand(64, 1, 8, 8, dtype=torch.float64)
    a = binarize(x, torch.Generator().manual_seed(3))
    b = binarize(x, torch.Generator().manual_seed(3))
    assert a.dtype == torch.float64 and torch.equal(a, b)
    assert not torch.equal(a, binarize(x, torch.Generator().manual_seed(4)))


def test_static_binarize_deterministic_under_seed():
    x = torch.rand(50, 1, 4, 4)
    y = torch.arange(50) % 3
    ds = Dataset("t", Split(x, y), Split(x[:10], y[:10]), Split(x[:20], y[:20]), ("a", "b", "c"))
    a, b, c = static_binarize(ds, 7), static_binarize(ds, 7), static_binarize(ds, 8)
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert torch.equal(sa.x, sb.x) and set(sa.x.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(sa.y, getattr(ds, name).y)
    assert not torch.equal(a.train.x, c.train.x) and a.classes == ds.classes and a.name == "t"
    with pytest.raises(DataError, match=r"data set u .*outside \[0, 1\]"):
        static_binarize(Dataset("u", Split(x * 2), Split(x), Split(x)), 0)


def test_check_unit_interval():
    check_unit_interval(torch.tensor([0.0, 0.5, 1.0]), "ok")
    check_unit_interval(torch.empty(0), "empty")
    with pytest.raises(DataError) as info:
        check_unit_interval(torch.tensor([0.0, 1.5]), "my.npz")
    assert "my.npz" in str(info.value) and "1.5" in str(info.value) and "rescale" in str(info.value)
    with pytest.raises(DataError, match=r"-0\.5"):
        check_unit_interval(torch.tensor([-0.5, 0.5]), "neg")
    with pytest.raises(DataError, match="my.npz.*NaN"):
        check_unit_interval(torch.tensor([0.5, float("nan")]), "my.npz")


def test_check_finite():
    check_finite(torch.tensor([-3.0, 1e30]), "ok")
    check_finite(torch.arange(3), "ints")
    with pytest.raises(DataError, match="src has 2 NaN or infinite"):
        check_finite(torch.tensor([float("inf"), float("nan"), 0.0]), "src")


# --- dequantisation -----------------------------------------------------------------------------------------


def test_dequantize_spreads_each_8_bit_level_uniformly_over_its_bin():
    k = torch.arange(256, dtype=torch.float32).repeat(400)  # every level, 400 times
    v = dequantize((k / 255).view(-1, 1, 1, 1), torch.Generator().manual_seed(0)).flatten()
    assert torch.equal(torch.floor(v * 256), k)  # (k + u) / 256 with u in [0, 1): inside bin k of [0, 1]
    u = (v * 256 - k).view(400, 256)
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005  # U[0, 1): 1/2, 1/12
    again = dequantize((k / 255).view(-1, 1, 1, 1), torch.Generator().manual_seed(0)).flatten()
    assert torch.equal(v, again)


def test_dequantize_keeps_a_draw_next_to_1_inside_its_bin(monkeypatch):
    """torch.rand's largest draw, 1 - 2^-24, made k + u round to k + 1 in float32 for k >= 128: the next bin."""
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, 1 - 2**-24))
    v = dequantize(torch.tensor([0.0, 100 / 255, 200 / 255, 1.0]))
    assert torch.equal(torch.floor(v * 256), torch.tensor([0.0, 100, 200, 255])) and bool((v < 1).all())


def test_check_eight_bit_takes_k_over_255_and_names_anything_else():
    check_eight_bit(torch.arange(256, dtype=torch.float32) / 255, "src")
    with pytest.raises(DataError, match=r"src has values that are not 8-bit levels k/255 \(off by up to 0.5"):
        check_eight_bit(torch.tensor([0.5 / 255]), "src")
    with pytest.raises(DataError, match=r"outside \[0, 1\]; --dequantize needs 8-bit pixels"):
        check_eight_bit(torch.tensor([1.5]), "src")


def test_check_eight_bit_tolerates_float32_rounding_but_not_16_bit_levels():
    """Only exact k/255 and half a level off were checked: a tolerance 10x looser or tighter passed."""
    k_over_255 = torch.arange(256, dtype=torch.float32) / 255
    # a few float32 operations below k/255 (16 roundings' worth of relative error, ~2.4e-4 of a level at 1)
    check_eight_bit(k_over_255 * (1 - 16 * 2**-24), "src")
    # a 16-bit image one 16-bit step above each 8-bit level: (257k + 1)/65535 is k/255 + 1/257 of a level
    sixteen_bit = (257 * torch.arange(255, dtype=torch.float64) + 1) / 65535
    with pytest.raises(DataError, match=r"src has values that are not 8-bit levels k/255 \(off by up to 0.0039 "):
        check_eight_bit(sixteen_bit.float(), "src")


def test_an_unknown_data_name_is_refused_as_typed():
    """Only folder:, npz: and npy: name the user's files (made absolute, fingerprinted); any other name, with a
    colon or without, stays as typed and is refused with the choices."""
    from vaelab.config import DataConfig

    for name in ("mnsit", "foo:bar.npz", "npz"):
        config = DataConfig(name=name)
        assert config.name == name and not config.from_files
        with pytest.raises(DataError, match=rf"unknown data set '{name}'; choose one of mnist5k, .*, npy:PATH$"):
            load_dataset(name)
