"""The explorer under concurrent load: every request answered correctly (benchmarks/web_load.py, scaled down)."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
SPEC = importlib.util.spec_from_file_location("web_load", Path(__file__).parents[2] / "benchmarks" / "web_load.py")
web_load = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(web_load)


def test_400_requests_from_8_clients_all_answered_correctly(tmp_path):
    base, server, thread = web_load.serve(web_load.tiny_run(tmp_path))
    try:
        result = web_load.load(base, requests=400, clients=8, deadline_s=120)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert result["errors"] == 0, result["failures"]
    assert result["sent"] == result["answered"] == 400
    assert result["p50_ms"] < 100


def test_the_checker_catches_wrong_answers():
    import httpx

    png = httpx.Response(200, content=web_load.PNG_MAGIC + b"junk", headers={"content-type": "image/png"})
    assert web_load.check(httpx.Response(500, text="boom"), False, [1, 8, 8])
    assert web_load.check(httpx.Response(200, json={"detail": "x"}), True, [1, 8, 8])  # a bad request accepted
    assert web_load.check(httpx.Response(422, json={"detail": "wrong length"}), True, [1, 8, 8]) == []
    assert web_load.check(png, False, [1, 8, 8]) == ["not a readable PNG"]
