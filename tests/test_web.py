"""The latent explorer: run discovery, every API endpoint and its refusals, latency, the CLI hook, and the
page in a real (headless) Chromium driven by Playwright."""
import argparse
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.data import registry
from vaelab.data.text import tokens_to_text
from vaelab.errors import VaelabError
from vaelab.evaluate import EVALUATION_FORMAT
from vaelab.figures import projection
from vaelab.train import train
from vaelab.web import add_serve_command, bind, is_loopback, url
from vaelab.web.catalog import find_runs

fastapi = pytest.importorskip("fastapi")
with warnings.catch_warnings():  # starlette 1.x nudges TestClient users towards httpx2; httpx still works
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

from test_text import tiny_text  # noqa: E402

from vaelab.web.app import LOOPBACK_HOSTS, create_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
SIDE, N_TEST = 8, 30  # 8x8 images; the npz split keeps 10% (30 of 300) for testing
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bars(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images of one horizontal bar, one vertical bar or a diagonal (labels 0, 1, 2), lightly noised."""
    rng = np.random.default_rng(seed)
    x, y = np.zeros((n, SIDE, SIDE), np.float32), rng.integers(0, 3, n)
    for i in range(n):
        p = int(rng.integers(1, SIDE - 1))
        if y[i] == 0:
            x[i, p, :] = 1
        elif y[i] == 1:
            x[i, :, p] = 1
        else:
            x[i] = np.eye(SIDE, k=p - SIDE // 2)
    return np.clip(x + 0.1 * rng.random(x.shape), 0, 1).astype(np.float32), y


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """runs/vae (a 3-d VAE: PCA map) and runs/pca (2-d, no prior), trained on an npz file of bars."""
    root = tmp_path_factory.mktemp("web")
    x, y = bars()
    np.savez(root / "bars.npz", x=x, y=y)
    data = DataConfig(name=f"npz:{root / 'bars.npz'}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-unit MLP gains nothing from threads, and loses much on a busy machine
    try:
        for name, d in (("vae", 3), ("pca", 2)):
            config = RunConfig(data=data, model=ModelConfig(model=name, hidden=(32,) if name == "vae" else None,
                                                            latent_dim=d),
                               train=TrainConfig(epochs=8, batch_size=32, device="cpu"))
            train(config, root / "runs" / name, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "runs"


@pytest.fixture(scope="module")
def client(runs_root) -> TestClient:
    return TestClient(create_app(runs_root), raise_server_exceptions=False)


def image(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(PNG_MAGIC)
    return Image.open(io.BytesIO(response.content))


# ---- discovery and projection


def test_find_runs_names_one_run_or_every_run_below_a_folder(runs_root, tmp_path):
    assert find_runs(runs_root) == {"pca": runs_root / "pca", "vae": runs_root / "vae"}
    assert list(find_runs(runs_root / "vae")) == ["vae"]
    with pytest.raises(VaelabError, match="no trained runs"):
        find_runs(tmp_path)
    with pytest.raises(VaelabError, match="not a directory"):
        find_runs(tmp_path / "missing")


def test_runs_with_the_longest_folder_names_are_served(runs_root, tmp_path):
    """Names over 200 characters were listed by /api/runs and then refused as unknown on every request."""
    long = "R" * 255  # the most a Linux folder name holds
    shutil.copytree(runs_root / "pca", tmp_path / "one" / long)
    shutil.copytree(runs_root / "pca", tmp_path / "nested" / long / long / long)
    for root, name in ((tmp_path / "one", long), (tmp_path / "nested", f"{long}/{long}/{long}")):
        client = TestClient(create_app(root), raise_server_exceptions=False)
        assert client.get("/api/runs").json()["default"] == name
        assert client.get("/api/summary").status_code == 200
        assert client.get("/api/summary", params={"run": name}).json()["model"] == "pca"
    client = TestClient(create_app(tmp_path / "one" / long), raise_server_exceptions=False)  # one run, by itself
    assert client.get("/api/summary", params={"run": long}).status_code == 200


@pytest.mark.parametrize("d", [1, 2, 5])
def test_projection_maps_points_back_to_codes_in_its_plane(d):
    codes = torch.randn(50, d) @ torch.randn(d, d)
    points, how = projection(codes)
    mean = torch.tensor(how["mean"], dtype=torch.float64)  # (D,)
    comps = torch.tensor(how["components"], dtype=torch.float64)  # (2, D)
    back = mean + points.double() @ comps
    if d <= 2:  # the identity: every code is recovered
        assert how["kind"] == "identity"
        torch.testing.assert_close(back.float(), codes, atol=1e-5, rtol=0)
    else:  # the orthogonal projection onto the plane of the two leading principal components
        assert how["kind"] == "pca"
        torch.testing.assert_close(comps @ comps.T, torch.eye(2, dtype=comps.dtype), atol=1e-6, rtol=0)
        centred = codes.double() - mean
        torch.testing.assert_close(back - mean, centred @ comps.T @ comps, atol=1e-5, rtol=0)
        assert points[:, 0].var() >= points[:, 1].var()


def test_projection_of_a_single_code_still_has_two_axes():
    """A test split of one image (a data set of 3-9 images): the SVD has one component, and the explorer failed
    to load with an IndexError; the second axis is a zero direction."""
    code = torch.randn(1, 5)
    points, how = projection(code)
    comps = torch.tensor(how["components"])
    assert points.shape == (1, 2) and comps.shape == (2, 5) and not comps[1].any()
    torch.testing.assert_close(torch.tensor(how["mean"]) + points @ comps, code)


def test_the_summary_is_of_the_loaded_checkpoint_and_linked_runs_are_found(runs_root, tmp_path):
    """Served while training went on, the page showed the newest metrics line's epoch and losses beside the model
    of an older checkpoint; a run folder linked into a folder of runs was skipped without a word."""
    run = tmp_path / "runs" / "vae"
    shutil.copytree(runs_root / "vae", run)
    records = (run / "metrics.jsonl").read_text()
    later = json.loads(records.splitlines()[-1]) | {"epoch": 9, "val_loss": 1.0}
    (run / "metrics.jsonl").write_text(records + json.dumps(later) + "\n")  # a line the checkpoint is behind
    (tmp_path / "runs" / "linked").symlink_to(runs_root / "pca", target_is_directory=True)
    (tmp_path / "runs" / "loop").symlink_to(".", target_is_directory=True)  # each run once, not per path to it
    (tmp_path / "runs" / "again").symlink_to(run, target_is_directory=True)
    client = TestClient(create_app(tmp_path / "runs"), raise_server_exceptions=False)
    assert [r["name"] for r in client.get("/api/runs").json()["runs"]] == ["linked", "vae"]
    s = client.get("/api/summary", params={"run": "vae"}).json()
    assert s["epoch"] == 8 and s["last_epoch"]["epoch"] == 8 and s["last_epoch"]["val_loss"] != 1.0


def test_a_subsampled_map_keeps_each_point_with_its_own_label_and_index(monkeypatch):
    """Test sets over MAX_MAP_POINTS (fashion-mnist's 10,000) show a subset: colouring it with the first labels
    passed every test, as no test set here was that large."""
    from vaelab.web import explorer

    monkeypatch.setattr(explorer, "MAX_MAP_POINTS", 10)
    codes, labels = torch.randn(30, 3), [i % 7 for i in range(30)]
    m = explorer._map(codes, labels, None)
    full, _ = projection(codes)
    assert len(m["indices"]) == 10 and m["indices"] != list(range(10))
    assert m["labels"] == [labels[i] for i in m["indices"]]
    torch.testing.assert_close(torch.tensor(m["points"]), full[m["indices"]], atol=1e-4, rtol=0)


# ---- happy paths


def test_runs_summary_and_map(client):
    listing = client.get("/api/runs").json()
    assert [r["name"] for r in listing["runs"]] == ["pca", "vae"] and listing["default"] == "pca"
    s = client.get("/api/summary", params={"run": "vae"}).json()
    assert s["model"] == "vae" and s["latent_dim"] == 3 and s["n_test"] == N_TEST and s["has_prior"]
    assert s["input_shape"] == [1, SIDE, SIDE] and s["classes"] == ["0", "1", "2"]
    assert len(s["kl_per_dim"]) == 3 and sorted(s["sliders"]["dims"]) == [0, 1, 2]
    assert s["last_epoch"]["epoch"] == 8 and not s["evaluated"]
    m = client.get("/api/map", params={"run": "vae"}).json()
    assert len(m["points"]) == len(m["labels"]) == len(m["indices"]) == N_TEST
    assert m["projection"]["kind"] == "pca" and len(m["projection"]["mean"]) == 3
    assert client.get("/api/map").json()["projection"]["kind"] == "identity"  # the default run: pca, 2-d


def test_sliders_span_three_standard_deviations_of_the_test_codes_most_used_dimensions_first(client):
    """Only the set of slider dimensions was tested: a span of 3 / std (a mutant) passed test_web.py."""
    s = client.get("/api/summary", params={"run": "vae"}).json()
    codes = torch.tensor([client.get(f"/api/encoding/{i}", params={"run": "vae"}).json()["z"]
                          for i in range(N_TEST)], dtype=torch.float64)
    std = codes.std(0)
    assert std.min() > 0.1 * std.max()  # (no dimension at the floor that keeps an unused one's slider movable)
    kl = s["kl_per_dim"]
    assert s["sliders"]["dims"] == sorted(range(3), key=lambda i: -kl[i])  # by KL, the most used first
    assert s["sliders"]["span"] == pytest.approx([3 * float(std[i]) for i in s["sliders"]["dims"]], rel=1e-5)


def test_an_unused_dimensions_slider_keeps_a_tenth_of_the_widest_span(runs_root, monkeypatch):
    """The floor that keeps an unused dimension's slider movable: no test had a dimension below it."""
    from vaelab.web import explorer

    real, seen = explorer.test_codes, []

    def one_unused(model, x):  # dimension 1 of the codes barely moves (a VAE's inactive unit)
        seen.append(real(model, x) * torch.tensor([1.0, 1e-4, 1.0]))
        return seen[-1]

    monkeypatch.setattr(explorer, "test_codes", one_unused)
    sliders = explorer.Explorer.load("vae", runs_root / "vae").summary["sliders"]
    std = seen[0].double().std(0)
    assert 1 in sliders["dims"] and std[1] < 0.01 * std.max()
    floor = 0.1 * float(std.max()) + 1e-6  # (1e-6: above zero when all codes are one point)
    assert sliders["span"] == pytest.approx([3 * max(float(std[i]), floor) for i in sliders["dims"]], rel=1e-5)


def test_metrics_come_from_evaluation_json(runs_root):
    (runs_root / "pca" / "evaluation.json").write_text(json.dumps({"nll": 12.5, "test_kl": float("nan"),
                                                                                "format": EVALUATION_FORMAT}))
    try:
        s = TestClient(create_app(runs_root / "pca")).get("/api/summary").json()
    finally:
        (runs_root / "pca" / "evaluation.json").unlink()
    assert s["metrics"] == {"nll": 12.5} and s["evaluated"]  # NaN is dropped: strict JSON has no NaN


def test_metrics_written_after_loading_show_on_reload_and_only_for_the_loaded_checkpoint(client, runs_root):
    """The page says "run `vaelab evaluate RUN --nll` and reload"; the summary was computed once per run, so
    reloading showed nothing new until the server restarted. Numbers of another epoch's checkpoint (left by
    training on without a report) are not the shown model's."""
    evaluation = runs_root / "vae" / "evaluation.json"
    assert not client.get("/api/summary", params={"run": "vae"}).json()["evaluated"]  # loads the run
    try:
        evaluation.write_text(json.dumps({"epoch": 8, "nll": 12.5, "format": EVALUATION_FORMAT}))
        s = client.get("/api/summary", params={"run": "vae"}).json()
        assert s["metrics"] == {"nll": 12.5} and s["evaluated"] and not s["nll_density"]
        evaluation.write_text(json.dumps({"epoch": 8, "nll": -12.5, "nll_density": True, "format": EVALUATION_FORMAT}))
        assert client.get("/api/summary", params={"run": "vae"}).json()["nll_density"]  # a Gaussian's density
        for other in ({"epoch": 3, "nll": 99.0, "format": EVALUATION_FORMAT}, {"epoch": 8, "nll": 99.0}):
            evaluation.write_text(json.dumps(other))  # another checkpoint's, or an older vaelab's numbers
            s = client.get("/api/summary", params={"run": "vae"}).json()
            assert s["metrics"] == {} and not s["evaluated"]
    finally:
        evaluation.unlink()


def test_pictures_have_the_expected_sizes(client):
    vae = {"run": "vae"}
    assert image(client.get("/api/decode", params={"z": "0.1,-2,3e-1", **vae})).size == (SIDE, SIDE)
    assert image(client.get("/api/reconstruct/3", params=vae)).size == (2 * (SIDE + 1) + 1, SIDE + 2)
    strip = client.get("/api/interpolate", params={"a": 0, "b": N_TEST - 1, "n": 7, **vae})
    assert image(strip).size == (7 * (SIDE + 1) + 1, SIDE + 2) and strip.headers["x-frames"] == "7"
    grid = client.get("/api/samples", params={"n": 9, "seed": 4, **vae})
    assert image(grid).size == (3 * (SIDE + 1) + 1,) * 2 and grid.headers["x-seed"] == "4"
    again = client.get("/api/samples", params={"n": 9, "seed": 4, **vae})
    assert again.content == grid.content  # a seed fixes the samples
    enc = client.get("/api/encoding/3", params=vae).json()
    assert enc["index"] == 3 and len(enc["z"]) == 3 and enc["label"] in (0, 1, 2)


def test_decoding_an_encoding_gives_the_reconstruction(client):
    z = ",".join(repr(v) for v in client.get("/api/encoding/5", params={"run": "vae"}).json()["z"])
    decoded = np.asarray(image(client.get("/api/decode", params={"z": z, "run": "vae"})))
    pair = np.asarray(image(client.get("/api/reconstruct/5", params={"run": "vae"})))
    np.testing.assert_array_equal(decoded, pair[1:1 + SIDE, SIDE + 2:2 * SIDE + 2])


def test_page_and_static_files_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for element in ('id="map"', 'id="decoded"', 'id="sliders"', 'id="interp-a"', 'id="interp-b"',
                    'id="interp-go"', 'id="interp-strip"', 'id="samples"', 'id="resample"', 'id="metrics"'):
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    # relative addresses: behind a proxy at /some/prefix/ the page lost its script, styles and API
    assert '"/static' not in page.text and '"/api' not in client.get("/static/app.js").text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and "https://" not in r.text


def test_temperature_reaches_a_model_whose_sample_takes_it(client, monkeypatch):
    model = client.app.state.catalog.get("vae").model
    seen = []

    def sample(n: int, *, temperature: float = 1.0) -> torch.Tensor:
        seen.append(temperature)
        return torch.full((n, 1, SIDE, SIDE), 0.5)

    monkeypatch.setattr(model, "sample", sample)
    assert client.get("/api/summary", params={"run": "vae"}).json()["has_prior"]
    image(client.get("/api/samples", params={"n": 2, "t": 0.7, "run": "vae"}))
    image(client.get("/api/samples", params={"n": 2, "t": 0, "run": "vae"}))  # deterministic, as on the CLI
    assert seen == [0.7, 0.0]


# ---- refusals: 422 for bad values, 400 for what the model cannot do, always a JSON message


REFUSED = [
    ("/api/decode?z=1,2&run=vae", 422, "3 dimensions"),
    ("/api/decode?z=1,2,3,4&run=vae", 422, "3 dimensions"),
    ("/api/decode?z=nan,0,0&run=vae", 422, "finite"),
    ("/api/decode?z=0,inf,0&run=vae", 422, "finite"),
    ("/api/decode?z=0,0,-Infinity&run=vae", 422, "finite"),
    ("/api/decode?z=a,b,c&run=vae", 422, "numbers"),
    ("/api/decode?z=&run=vae", 422, "z has 0 values but"),  # it said "1 values"
    ("/api/decode?z=1,,2&run=vae", 422, "numbers"),
    ("/api/decode?z=1_0,0,0&run=vae", 422, "numbers"),  # Python's float() read it as 10
    ("/api/decode?z=1e9,0,0&run=vae", 422, "within"),
    ("/api/decode?z=" + "1" * 200 + ",0,0&run=vae", 422, "too long"),
    ("/api/decode?z=" + "1," * 20_000 + "&run=vae", 422, "z"),
    ("/api/decode?run=vae", 422, "z"),
    (f"/api/reconstruct/{N_TEST}?run=vae", 422, "out of range"),
    ("/api/reconstruct/-1?run=vae", 422, "out of range"),
    ("/api/reconstruct/abc?run=vae", 422, "index"),
    ("/api/reconstruct/1_0?run=vae", 422, "path parameter index: Value error, '1_0' is not a plain number"),
    ("/api/reconstruct/99999999999999999999999?run=vae", 422, "index"),
    (f"/api/encoding/{N_TEST}?run=vae", 422, "out of range"),
    ("/api/interpolate?a=0&b=30&run=vae", 422, "b 30 is out of range"),
    ("/api/interpolate?a=-5&b=1&run=vae", 422, "a -5 is out of range"),
    ("/api/interpolate?a=0&b=1&n=33&run=vae", 422, "between 2 and 32"),
    ("/api/interpolate?a=0&b=1&n=1&run=vae", 422, "between 2 and 32"),
    ("/api/interpolate?a=0&run=vae", 422, "b"),
    ("/api/samples?n=0&run=vae", 422, "between 1 and 64"),
    ("/api/samples?n=1_6&run=vae", 422, "query parameter n: Value error, '1_6' is not a plain number"),
    ("/api/samples?t=0_5&run=vae", 422, "query parameter t: Value error, '0_5' is not a plain number"),
    ("/api/samples?n=65&run=vae", 422, "between 1 and 64"),
    ("/api/samples?n=100000000&run=vae", 422, "between 1 and 64"),
    ("/api/samples?t=-1&run=vae", 422, "temperature"),
    ("/api/samples?t=10.5&run=vae", 422, "temperature in [0, 10]"),
    ("/api/samples?t=nan&run=vae", 422, "temperature"),
    ("/api/samples?t=inf&run=vae", 422, "temperature"),
    ("/api/samples?t=hot&run=vae", 422, "t"),
    ("/api/samples?seed=-1&run=vae", 422, "seed"),
    ("/api/samples?t=0.5&run=vae", 400, "no sampling temperature"),
    ("/api/samples?run=pca", 400, "is not sampled from"),
    ("/api/samples", 400, "is not sampled from"),
    ("/api/summary?run=nope", 422, "unknown run"),
    ("/api/map?run=../../etc", 422, "unknown run"),
    ("/api/decode?z=0,0&run=..%2F..%2Fetc%2Fpasswd", 422, "unknown run"),
    ("/api/summary?run=/etc", 422, "unknown run"),
    ("/api/summary?run=vae/../pca", 422, "unknown run"),
    ("/api/summary?run=" + "x" * 300, 422, "run"),
]


# the ends of each range are answered (only values beyond them were tested): z at +-1000, and of 32 characters
# per dimension; 2 and 32 frames; 1 and 64 samples; the first and last test images
ENDS = ["/api/decode?z=1000,-1000,0&run=vae",
        "/api/decode?z=" + ",".join(["0." + "0" * 30] * 3)[:96] + "&run=vae",  # 96 = 32 x 3 characters
        f"/api/interpolate?a=0&b={N_TEST - 1}&n=2&run=vae", "/api/interpolate?a=0&b=1&n=32&run=vae",
        "/api/samples?n=1&run=vae", "/api/samples?n=64&run=vae", "/api/reconstruct/0?run=vae",
        f"/api/reconstruct/{N_TEST - 1}?run=vae"]


@pytest.mark.parametrize("path", ENDS)
def test_the_ends_of_each_range_are_answered(client, path):
    assert client.get(path).status_code == 200


@pytest.mark.parametrize(("path", "status", "message"), REFUSED)
def test_bad_requests_get_a_clear_json_message(client, path, status, message):
    r = client.get(path)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and message in detail
    assert "Traceback" not in r.text and len(r.text) < 600


def test_no_client_path_reaches_the_file_system(client, runs_root):
    for path in ("/static/../app.py", "/static/..%2f__init__.py", "/static/%2e%2e/catalog.py",
                 f"/static/{runs_root}/vae/config.json", "/api/reconstruct/..%2f..%2fetc%2fpasswd"):
        r = client.get(path)
        assert r.status_code in (404, 422) and "import" not in r.text and "model" not in r.text


def test_only_loopback_host_headers_are_answered_when_asked(runs_root):
    guarded = TestClient(create_app(runs_root / "pca", allowed_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1")
    assert guarded.get("/api/runs").status_code == 200
    assert guarded.get("/api/runs", headers={"host": "localhost:8000"}).status_code == 200
    assert guarded.get("/api/runs", headers={"host": "[::1]:8000"}).status_code == 200
    r = guarded.get("/api/runs", headers={"host": "evil.example:8000"})
    assert r.status_code == 400 and "this machine" in r.json()["detail"]


def test_decode_latency_p95_is_well_under_100_ms(client):
    rng = np.random.default_rng(0)
    client.get("/api/decode", params={"z": "0,0,0", "run": "vae"})  # warm-up
    times = []
    for _ in range(50):
        z = ",".join(f"{v:.4f}" for v in rng.normal(size=3))
        t0 = time.perf_counter()
        image(client.get("/api/decode", params={"z": z, "run": "vae"}))
        times.append(time.perf_counter() - t0)
    p95 = sorted(times)[math.ceil(0.95 * len(times)) - 1]
    print(f"decode latency over 50 requests: median {1e3 * sorted(times)[25]:.1f} ms, p95 {1e3 * p95:.1f} ms")
    assert p95 < 0.1


# ---- the CLI hook


def test_serve_subcommand_parses_with_safe_defaults():
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "runs/x"])
    assert (args.run, args.host, args.port, args.device) == (Path("runs/x"), "127.0.0.1", 8000, "cpu")
    args = parser.parse_args(["serve", "r", "--host", "0.0.0.0", "--port", "9000"])
    assert (args.host, args.port) == ("0.0.0.0", 9000) and callable(args.func)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_bind_refuses_a_taken_port_with_one_line():
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert url(sock) == f"http://127.0.0.1:{port}/"
        with pytest.raises(VaelabError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind("127.0.0.1", port)
    finally:
        sock.close()


SERVE = """import argparse, sys
from vaelab.web import add_serve_command
parser = argparse.ArgumentParser(prog="vaelab")
add_serve_command(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_serve_prints_its_address_and_serves(runs_root):
    import httpx

    # a loopback address other than 127.0.0.1: its own Host header was refused on every request
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", str(runs_root), "--port", "0",
                             "--host", "127.0.0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert "serving 2 runs" in line and "http://127.0.0.2:" in line, (line, proc.stderr.read())
        address = line.split(" at ")[1].split()[0]
        listing = httpx.get(address + "api/runs", timeout=10).json()
        assert [r["name"] for r in listing["runs"]] == ["pca", "vae"]
        assert httpx.head(address, timeout=10).status_code == 200  # `curl -I` and health checks: was 405
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---- the page in a real browser


def serve(root: Path):
    """The explorer of `root` served by uvicorn on a free loopback port, in a background thread: yields its URL."""
    import uvicorn

    app = create_app(root, allowed_hosts=LOOPBACK_HOSTS)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield url(sock)
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def live_url(runs_root):
    yield from serve(runs_root)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): the browser tests need it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need `pip install playwright`")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])  # no DNS: it still asked for Google's hosts
        yield browser
        browser.close()


def open_page(browser, address: str):
    """A page at `address` that records console errors and uncaught exceptions, once it is ready."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(address)
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)
    return page, errors


PIXELS = """() => { const img = document.querySelector('#decoded'); const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight; c.getContext('2d').drawImage(img, 0, 0);
  return c.toDataURL(); }"""


def decoded_after(page, action) -> tuple[str, str]:
    """The decoded image's pixels before and after `action`, once a new vector has been decoded."""
    before_z, before = page.get_attribute("#decoded", "data-z"), page.evaluate(PIXELS)
    action()
    page.wait_for_function("z => document.querySelector('#decoded').dataset.z !== z", arg=before_z,
                           timeout=10_000)
    page.wait_for_timeout(150)  # hover and click may queue one more decode of the same point
    return before, page.evaluate(PIXELS)


def test_live_server_answers_keep_alive_requests_without_stalls(live_url):
    import httpx

    rng = np.random.default_rng(1)
    times = []
    with httpx.Client(base_url=live_url, timeout=10) as http:  # one connection, as a browser keeps it
        for _ in range(51):
            z = ",".join(f"{v:.4f}" for v in rng.normal(size=3))
            t0 = time.perf_counter()
            image(http.get("/api/decode", params={"z": z, "run": "vae"}))
            times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    print(f"live decode over HTTP: median {1e3 * times[25]:.1f} ms, p95 {1e3 * times[47]:.1f} ms")
    assert times[47] < 0.1
    # a Nagle / delayed-ACK stall costs ~40 ms per response; decoding itself takes a few
    assert times[25] < 0.03


def test_page_map_sliders_interpolation_and_samples_in_chromium(browser, live_url):
    page, errors = open_page(browser, live_url + "?run=vae")
    assert page.locator("#metrics dd").count() >= 2
    assert page.locator("#run option").count() == 2 and page.input_value("#run") == "vae"
    box = page.locator("#map").bounding_box()
    before, after = decoded_after(page, lambda: page.mouse.click(box["x"] + 0.1 * box["width"],
                                                                 box["y"] + 0.9 * box["height"]))
    assert after != before, "clicking the map did not change the decoded image"

    sliders = page.locator("#sliders input[type=range]")
    assert sliders.count() == 3
    track = sliders.first.bounding_box()
    y = track["y"] + track["height"] / 2

    def drag():
        page.mouse.move(track["x"] + track["width"] / 2, y)
        page.mouse.down()
        page.mouse.move(track["x"] + track["width"] - 1, y, steps=5)
        page.mouse.up()

    before, after = decoded_after(page, drag)
    assert after != before, "moving a slider did not change the decoded image"

    page.fill("#interp-a", "2")
    page.fill("#interp-b", "7")
    page.fill("#interp-n", "6")
    page.click("#interp-go")
    page.wait_for_selector("#interp-strip[data-frames='6']", timeout=10_000)
    width = page.evaluate("document.querySelector('#interp-strip').naturalWidth")
    assert (width - 1) // (SIDE + 1) == 6
    page.fill("#interp-b", "")  # an empty box read as 0: "interpolated" 2 -> 0
    page.click("#interp-go")
    assert page.inner_text("#interp-msg").startswith("indices must be whole numbers")

    for index, status in (("-1", "test image index must be 0..29"), ("3", ""),  # a success clears the error
                          ("", "test image index must be 0..29")):  # empty read as 0, shown as image 0
        page.fill("#base-index", index)
        page.dispatch_event("#base-index", "change")
        page.wait_for_function("s => document.querySelector('#decoder-msg').textContent === s", arg=status,
                               timeout=10_000)

    seed = page.get_attribute("#samples", "data-seed")
    page.click("#resample")
    page.wait_for_function("s => document.querySelector('#samples').dataset.seed !== s", arg=seed, timeout=10_000)
    assert page.evaluate("document.querySelector('#samples').naturalWidth") > 0
    assert errors == [], errors
    page.close()


def test_the_page_works_from_the_keyboard_and_names_its_controls(browser, live_url):
    """The map answered the mouse alone (not focusable), arrow keys on the run list loaded every run they passed,
    Enter in a number box did nothing, sliders read out 15 digits, and the test image box had no name."""
    page, errors = open_page(browser, live_url + "?run=vae")
    assert page.get_attribute("#base-index", "aria-label") == "test image number"
    for box in ("interp-msg", "samples-msg", "decoder-msg"):
        assert page.get_attribute(f"#{box}", "role") == "status"
    value = page.get_attribute("#sliders input[type=range]", "aria-valuetext")
    assert re.fullmatch(r"-?\d+\.\d\d", value)

    page.focus("#map")
    before, after = decoded_after(page, lambda: page.keyboard.press("ArrowRight"))
    assert after != before, "an arrow key on the map did not decode another point"
    page.keyboard.press("Shift+ArrowUp")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#base-text').textContent.startsWith('the map point (')",
                           timeout=10_000)

    page.fill("#interp-n", "4")
    page.press("#interp-n", "Enter")
    page.wait_for_selector("#interp-strip[data-frames='4']", timeout=10_000)

    page.focus("#run")
    page.keyboard.press("ArrowUp")  # to "pca"
    page.wait_for_timeout(300)
    assert page.url.endswith("?run=vae") and page.input_value("#run") == "pca"
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url.endswith("?run=pca")
    # labels past the palette's 20 colours have their own shapes (label 20 was label 0 again)
    assert page.evaluate("[shapeOf(0), shapeOf(19), shapeOf(20), shapeOf(45)]") == [0, 0, 1, 2]
    assert errors == [], errors
    page.close()


def test_the_page_says_when_the_server_cannot_be_reached(browser, live_url):
    """It said "Failed to fetch" in the status line, out of view above the sliders, beside the last picture as if
    it were current; a page whose first requests failed kept "loading…" and buttons that did nothing."""
    page, errors = open_page(browser, live_url + "?run=vae")
    page.route("**/api/decode*", lambda route: route.abort())
    page.focus("#map")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.querySelector('#decoder-msg').textContent !== ''", timeout=10_000)
    assert page.inner_text("#decoder-msg").startswith("decode: cannot reach the vaelab server at 127.0.0.1:")
    assert "stale" in page.get_attribute("#decoded", "class")
    page.unroute("**/api/decode*")
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.querySelector('#decoder-msg').textContent === ''", timeout=10_000)
    assert "stale" not in page.get_attribute("#decoded", "class")
    page.close()

    page = browser.new_page()
    page.route("**/api/summary*", lambda route: route.abort())
    page.goto(live_url + "?run=vae")
    page.wait_for_function("() => document.querySelector('#summary').textContent === 'not loaded'", timeout=15_000)
    assert page.inner_text("#status").startswith("cannot reach the vaelab server")
    assert page.is_disabled("#interp-go") and page.is_disabled("#resample") and page.is_disabled("#base-index")
    page.close()
    assert [e for e in errors if "net::ERR_FAILED" not in e] == [], errors


def test_page_for_a_model_without_prior_says_so_in_chromium(browser, live_url):
    page, errors = open_page(browser, live_url)  # the default run: pca
    assert "is not sampled from" in page.inner_text("#samples-msg")
    assert page.is_disabled("#resample")
    assert page.is_hidden("#samples")
    assert page.locator("#sliders input[type=range]").count() == 2
    assert page.evaluate("document.querySelector('#decoded').naturalWidth") == SIDE
    assert errors == [], errors
    page.close()


# ---- text models: the same endpoints and page, with sentences for pictures


@pytest.fixture(scope="module")
def text_root(tmp_path_factory):
    """runs/text: a sentence VAE on tiny-text (runs of consecutive letters), registered as a data set by name
    for as long as the module's tests need to reload it."""
    registry.DATASETS["tiny-text"] = tiny_text
    root = tmp_path_factory.mktemp("web-text")
    config = RunConfig(data=DataConfig(name="tiny-text"),
                       model=ModelConfig(model="text-vae", hidden=(32,), latent_dim=4, embedding_dim=16),
                       train=TrainConfig(epochs=30, batch_size=8, lr=3e-3, device="cpu"))
    train(config, root / "text", progress=False)
    yield root
    del registry.DATASETS["tiny-text"]


@pytest.fixture(scope="module")
def text_client(text_root) -> TestClient:
    return TestClient(create_app(text_root), raise_server_exceptions=False)


def test_sample_on_the_command_line_refuses_image_and_hierarchy_flags_for_a_text_run(text_root, tmp_path, capsys):
    """--temperature 0.5 and --nrow 4 wrote sentences as if they were not there."""
    from vaelab.cli import main

    run, out = str(text_root / "text"), str(tmp_path / "s.txt")
    assert main(["sample", run, "--temperature", "0.5", "--out", out]) == 2
    assert "holds a text-vae model, whose prior has no temperature; drop --temperature" in capsys.readouterr().err
    assert main(["sample", run, "--nrow", "4", "--out", out]) == 2
    assert "--nrow lays out images" in capsys.readouterr().err
    assert main(["sample", run, "--n", "3", "--out", out]) == 0
    assert len((tmp_path / "s.txt").read_text().splitlines()) == 3


def test_text_commands_write_their_sentences_beside_the_run_by_default(text_root, tmp_path, capsys):
    from vaelab.cli import main

    run = tmp_path / "text"
    shutil.copytree(text_root / "text", run)
    assert main(["sample", str(run), "--n", "3"]) == 0
    assert main(["reconstruct", str(run), "--n", "2"]) == 0
    assert main(["interpolate", str(run), "--a", "0", "--b", "-1", "--steps", "4"]) == 0
    assert [len((run / name).read_text().splitlines())
            for name in ("samples.txt", "reconstructions.txt", "interpolate-0-4.txt")] == [3, 2 * 2, 4]


def sentences(response) -> list[str]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["sentences"]


def test_text_runs_answer_with_sentences(text_client):
    s = text_client.get("/api/summary").json()
    assert s["kind"] == "text" and s["model"] == "text-vae" and s["latent_dim"] == 4 and s["input_shape"] == [8]
    assert s["has_prior"] and not s["temperature"] and len(s["kl_per_dim"]) == 4
    test_x = tiny_text().test.x
    assert s["n_test"] == len(test_x) == 5
    original, reconstruction = sentences(text_client.get("/api/reconstruct/2"))
    assert original == tokens_to_text(test_x[2], tiny_text().vocab) and reconstruction
    # greedy decoding is deterministic: decoding a test sentence's code is its reconstruction
    z = ",".join(repr(v) for v in text_client.get("/api/encoding/2").json()["z"])
    assert sentences(text_client.get("/api/decode", params={"z": z})) == [reconstruction]
    path = sentences(text_client.get("/api/interpolate", params={"a": 1, "b": 2, "n": 5}))
    assert len(path) == 5 and path[-1] == reconstruction  # t = 0 and t = 1 are the two codes
    assert path[0] == sentences(text_client.get("/api/reconstruct/1"))[1]
    drawn = sentences(text_client.get("/api/samples", params={"n": 6, "seed": 3}))
    assert len(drawn) == 6 and all(isinstance(x, str) for x in drawn)
    assert sentences(text_client.get("/api/samples", params={"n": 6, "seed": 3})) == drawn  # a seed fixes them
    m = text_client.get("/api/map").json()
    assert len(m["points"]) == 5 and m["labels"] is None and m["projection"]["kind"] == "pca"


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/api/reconstruct/5", 422, "5 sentences"),
    ("/api/decode?z=1,2,3", 422, "4 dimensions"),
    ("/api/interpolate?a=0&b=1&n=40", 422, "between 2 and 32"),
    ("/api/samples?t=0.5", 400, "no sampling temperature"),
])
def test_text_runs_refuse_bad_requests_alike(text_client, path, status, message):
    r = text_client.get(path)
    assert r.status_code == status and message in r.json()["detail"]


def test_page_shows_sentences_for_a_text_model_in_chromium(browser, text_root):
    for address in serve(text_root):
        page, errors = open_page(browser, address)
        assert "5 test sentences" in page.inner_text("#summary")
        assert page.is_hidden("#decoded") and page.is_visible("#decoded-text")
        assert "test sentence" in page.inner_text("#decoder-panel")
        recon = page.locator("#recon-text li")
        assert recon.count() == 2 and recon.first.inner_text() == tokens_to_text(tiny_text().test.x[0],
                                                                                   tiny_text().vocab)
        assert page.locator("#decoded-text li").count() == 1
        assert page.locator("#samples-text li").count() == 16

        sliders = page.locator("#sliders input[type=range]")
        assert sliders.count() == 4
        z = page.get_attribute("#decoded-text", "data-z")
        track = sliders.first.bounding_box()
        page.mouse.click(track["x"] + track["width"] - 2, track["y"] + track["height"] / 2)
        page.wait_for_function("z => document.querySelector('#decoded-text').dataset.z !== z", arg=z,
                               timeout=10_000)
        assert page.locator("#decoded-text li").count() == 1

        page.fill("#interp-a", "1")
        page.fill("#interp-b", "3")
        page.fill("#interp-n", "5")
        page.click("#interp-go")
        page.wait_for_selector("#interp-strip-text[data-frames='5']", timeout=10_000)
        assert page.locator("#interp-strip-text li").count() == 5
        assert "greedy decodes" in page.inner_text("#interp-msg")

        # an empty decode read as a blank bullet
        page.route("**/api/samples*", lambda route: route.fulfill(json={"sentences": ["", "a b"]}))
        page.click("#resample")
        page.wait_for_function("() => document.querySelectorAll('#samples-text li').length === 2", timeout=10_000)
        assert page.locator("#samples-text li").all_inner_texts() == ["(empty)", "a b"]
        assert errors == [], errors
        page.close()


def test_the_page_labels_a_gaussian_s_nll_a_density(browser, live_url, runs_root):
    evaluation = runs_root / "vae" / "evaluation.json"
    evaluation.write_text(json.dumps({"nll": -812.25, "nll_stderr": 3.5, "nll_density": True,
                                           "format": EVALUATION_FORMAT}))
    try:
        page, errors = open_page(browser, live_url + "?run=vae")
        shown = dict(zip(page.locator("#metrics dt").all_inner_texts(), page.locator("#metrics dd").all_inner_texts()))
    finally:
        evaluation.unlink()
    assert shown["test −log p(x), nats (a density: Gaussian likelihood)"] == "-812.25 ± 3.50" and not errors


@pytest.mark.parametrize("bounds,shown", [({"mutual_information": 1.8236, "mutual_information_upper": 2.2012},
                                           "1.82 to 2.20"),
                                          ({"mutual_information": 7.6009, "mutual_information_upper": None}, "≥ 7.60")])
def test_the_page_shows_the_mutual_information_as_its_bounds(browser, live_url, runs_root, bounds, shown):
    """I(x; z) is known only between an InfoNCE lower bound and a leave-one-out upper one (or, where that is not
    finite, from below): one number read as the value."""
    evaluation = runs_root / "vae" / "evaluation.json"
    evaluation.write_text(json.dumps({"test_kl": 3.5, **bounds, "format": EVALUATION_FORMAT}))
    try:
        page, errors = open_page(browser, live_url + "?run=vae")
        terms = page.locator("#metrics dt").all_inner_texts()
        values = page.locator("#metrics dd").all_inner_texts()
    finally:
        evaluation.unlink()
    assert dict(zip(terms, values))["I(x; z), nats"] == shown and not errors


@pytest.fixture(scope="module")
def strip_root(tmp_path_factory) -> Path:
    """runs/line: a VAE with a 1-d latent on the bars."""
    root = tmp_path_factory.mktemp("strip")
    x, y = bars(120)
    np.savez(root / "bars.npz", x=x, y=y)
    config = RunConfig(data=DataConfig(name=f"npz:{root / 'bars.npz'}"),
                       model=ModelConfig(model="vae", hidden=(16,), latent_dim=1),
                       train=TrainConfig(epochs=2, batch_size=32, device="cpu"))
    train(config, root / "runs" / "line", progress=False)
    return root / "runs"


def test_the_map_of_a_one_dimensional_latent_is_a_strip_of_label_rows(browser, strip_root):
    """Every code of a 1-d latent sat on one line, all classes over each other; now z runs across, and each label
    has a jittered row (the height maps to no coordinate, so a point decodes as its z alone)."""
    client = TestClient(create_app(strip_root), raise_server_exceptions=False)
    shown = client.get("/api/map", params={"run": "line"}).json()
    points, labels = np.array(shown["points"]), np.array(shown["labels"])
    assert shown["projection"]["dims"] == 1 and len(set(labels.tolist())) == 3
    assert np.all(np.abs(points[:, 1] - labels) <= 0.3) and points[:, 1].std() > 0.5
    for address in serve(strip_root):
        page, errors = open_page(browser, address)
        assert "one row per label" in page.inner_text("#map-note")
        box = page.locator("#map").bounding_box()
        page.mouse.click(box["x"] + 0.6 * box["width"], box["y"] + 0.2 * box["height"])
        page.wait_for_timeout(300)
        assert re.fullmatch(r"the map point \(-?\d+\.\d\d\)", page.inner_text("#base-text"))  # z alone
        assert errors == [], errors
        page.close()


def test_the_nll_note_gives_the_command_for_the_run_and_only_where_there_is_an_nll(browser, live_url, runs_root):
    """It said `vaelab evaluate RUN --nll` for every run, autoencoders included, which have no NLL; PCA's is exact."""
    from vaelab.evaluate import evaluate_run

    errors = []
    for run in ("vae", "pca"):
        page, more = open_page(browser, live_url + f"?run={run}")
        note = f"No NLL yet: run `vaelab evaluate {runs_root / run} --nll` and reload."
        assert page.inner_text("#metrics-note") == note
        page.close()
        errors += more
    written = runs_root / "pca" / "evaluation.json"
    assert not written.exists()  # (other tests see the fixture's runs unevaluated)
    try:
        evaluate_run(runs_root / "pca", nll_k=1, probe=False)
        page, more = open_page(browser, live_url + "?run=pca")
        assert page.inner_text("#metrics-note") == ""
        assert "(exact; a density: PCA's Gaussian)" in page.inner_text("#metrics")
        page.close()
    finally:
        written.unlink(missing_ok=True)
    assert errors == more == []


def test_an_autoencoder_has_no_nll_to_ask_for(runs_root, tmp_path):
    config = RunConfig(data=DataConfig(name=f"npz:{runs_root.parent / 'bars.npz'}"),
                       model=ModelConfig(model="ae", hidden=(8,), latent_dim=2),
                       train=TrainConfig(epochs=1, batch_size=32, device="cpu"))
    train(config, tmp_path / "ae", progress=False)
    client = TestClient(create_app(tmp_path), raise_server_exceptions=False)
    assert client.get("/api/summary", params={"run": "ae"}).json()["has_nll"] is False  # the page shows no note
    assert client.get("/api/summary", params={"run": "ae"}).json()["has_prior"] is False


def test_a_vmf_model_decodes_the_direction_of_the_code_asked_for(tmp_path):
    """The sliders and the map point off the sphere, and a vMF model's decoder, trained on codes on it, decoded
    them there (the README said so)."""
    from vaelab.models import VAE
    from vaelab.web.explorer import Explorer, RequestError

    def explorer(model):
        return Explorer(name="m", model=model.eval(), test_x=torch.zeros(1, 1, 4, 4), codes=torch.zeros(1, 3),
                        labels=None, summary={}, map={}, run_dir=tmp_path, checkpoint_epoch=1)

    sphere = explorer(VAE(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,), latent="vmf"))
    torch.testing.assert_close(sphere.parse_z("0,3,-4"), torch.tensor([0.0, 0.6, -0.8]))
    with pytest.raises(RequestError, match=r"z = 0 has no direction: this model decodes codes on the sphere"):
        sphere.parse_z("0,0,0")
    plain = explorer(VAE(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,)))
    assert torch.equal(plain.parse_z("0,3,-4"), torch.tensor([0.0, 3.0, -4.0]))
    assert torch.equal(plain.parse_z("0,0,0"), torch.zeros(3))
