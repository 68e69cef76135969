"""Fuzzing the loaders and the config parser: any bytes, any JSON, and every failure is a vaelab error.

Random files as IDX (raw and gzip), .npy, .npz and images in a folder; random JSON as config.json and
random values in otherwise valid configs. A loader may accept what it is given; it may not raise anything
but a VaelabError (one line, naming the file and the fix) or hang.
"""
import gzip
import io
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaelab.config import RunConfig
from vaelab.data import load_folder, load_npy, load_npz, read_idx
from vaelab.errors import VaelabError

FUZZ = settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])


def loads_or_refuses(load, *args) -> None:
    try:
        load(*args)
    except VaelabError as e:
        assert str(e) and "\n" not in str(e).strip(), repr(e)


# IDX: random bytes, and random bytes behind a plausible header (magic 0x08 0x03, sizes that may lie)
idx_like = st.builds(lambda dims, body, dtype: b"\x00\x00" + bytes([dtype, len(dims)])
                     + b"".join(struct.pack(">I", d) for d in dims) + body,
                     st.lists(st.integers(0, 40), min_size=0, max_size=4), st.binary(max_size=400),
                     st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07]))


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), idx_like), compress=st.booleans())
def test_idx_reader_on_random_bytes(tmp_path, data, compress):
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    path.write_bytes(gzip.compress(data) if compress else data)
    loads_or_refuses(read_idx, path)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


arrays = st.one_of(
    st.builds(lambda shape, seed, dtype: np.random.default_rng(seed).normal(size=shape).astype(dtype),
              st.lists(st.integers(0, 6), min_size=0, max_size=5).map(tuple), st.integers(0, 9),
              st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "float16", "complex64"])),
    st.builds(lambda n: np.array(["a"] * n), st.integers(0, 5)),
)


@FUZZ
@given(payload=st.one_of(st.binary(max_size=300), arrays.map(npy_bytes),
                         arrays.map(npy_bytes).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n]))))
def test_npy_loader_on_random_and_truncated_files(tmp_path, payload):
    path = tmp_path / "x.npy"
    path.write_bytes(payload)
    loads_or_refuses(load_npy, f"npy:{path}")


@FUZZ
@given(members=st.dictionaries(st.sampled_from(["x", "y", "train_x", "train_y", "test_x", "val_x", "images", "z"]),
                               arrays, max_size=4), garbage=st.one_of(st.none(), st.binary(max_size=200)))
def test_npz_loader_on_random_archives(tmp_path, members, garbage):
    path = tmp_path / "x.npz"
    if garbage is not None:
        path.write_bytes(garbage)
    else:
        np.savez(path, **members)
    loads_or_refuses(load_npz, f"npz:{path}")


@FUZZ
@given(files=st.lists(st.binary(max_size=200), min_size=0, max_size=3))
def test_folder_loader_on_random_image_files(tmp_path_factory, files):
    folder = tmp_path_factory.mktemp("images")
    png = b"\x89PNG\r\n\x1a\n"
    for i, body in enumerate(files):
        (folder / f"{i}.png").write_bytes(png + body if i % 2 else body)
    loads_or_refuses(load_folder, f"folder:{folder}")


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
VALID = RunConfig().to_dict()


@FUZZ
@given(raw=json_values)
def test_config_parser_on_random_json(raw):
    loads_or_refuses(RunConfig.from_dict, raw)


@FUZZ
@given(section=st.sampled_from(["data", "model", "train"]), data=st.data(), value=json_values)
def test_config_parser_on_one_wrong_value(section, data, value):
    key = data.draw(st.sampled_from(sorted(VALID[section])))
    raw = json.loads(json.dumps(VALID))
    raw[section][key] = value
    loads_or_refuses(RunConfig.from_dict, raw)


@FUZZ
@given(text=st.binary(max_size=200))
def test_config_file_with_random_bytes(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_bytes(text)
    loads_or_refuses(RunConfig.load, path)


@pytest.mark.parametrize("section,key,value", [
    ("train", "lr", 10**400),  # math.isfinite would raise OverflowError
    ("train", "seed", 2**64),  # torch.manual_seed would raise RuntimeError deep in training
], ids=["lr", "seed"])
def test_config_parser_on_huge_integers(section, key, value):
    raw = json.loads(json.dumps(VALID))
    raw[section][key] = value
    with pytest.raises(VaelabError, match=key.replace("_", "[-_]")):
        RunConfig.from_dict(raw)


def test_config_file_nested_deeper_than_the_json_parser_goes(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(VaelabError, match="not valid JSON"):
        RunConfig.load(path)
