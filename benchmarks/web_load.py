"""Load on the latent explorer: many concurrent decode requests on loopback, all answered, latency percentiles.

Starts `vaelab serve`'s app (uvicorn, in this process, on a free 127.0.0.1 port) for one trained run,
then 8 clients (threads, each with its own keep-alive connection) send 2,000 requests in all: decode
requests with random latent vectors, each answer checked to be a PNG of the model's image size, and one
in ten a deliberately wrong request (a latent vector of the wrong length, or a non-finite number), whose
answer must be HTTP 422 with a message. The loop is bounded by a deadline; it always stops.
Writes benchmarks/results/web_load.json.

    python benchmarks/web_load.py [RUN] [--requests 2000] [--clients 8]
"""
from __future__ import annotations

import argparse
import io
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image

RESULTS = Path(__file__).parent / "results" / "web_load.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def serve(run_dir: Path) -> tuple[str, uvicorn.Server, threading.Thread]:
    """The explorer for run_dir on a free loopback port, served from a background thread."""
    from vaelab.web import bind, url
    from vaelab.web.app import LOOPBACK_HOSTS, create_app

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(run_dir, allowed_hosts=LOOPBACK_HOSTS), log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("uvicorn did not start within 60 s")
    return url(sock), server, thread


def load(base: str, *, requests: int = 2000, clients: int = 8, deadline_s: float = 300, seed: int = 0) -> dict:
    """Send `requests` requests from `clients` threads; returns counts, failures and latency percentiles (ms)."""
    with httpx.Client(base_url=base, timeout=10) as http:
        summary = http.get("/api/summary").raise_for_status().json()
    d, shape = summary["latent_dim"], summary["input_shape"]
    stop_at = time.monotonic() + deadline_s

    def client(index: int) -> tuple[list[float], list[str], int]:
        rng = np.random.default_rng([seed, index])
        times, failures, sent = [], [], 0
        with httpx.Client(base_url=base, timeout=10) as http:
            for i in range(index, requests, clients):
                if time.monotonic() > stop_at:
                    failures.append("deadline passed before every request was sent")
                    break
                bad = i % 10 == 9
                z = rng.normal(size=d + (1 if bad and i % 20 == 19 else 0)).round(4).astype(str).tolist()
                if bad and i % 20 != 19:
                    z[0] = "nan"
                t0 = time.perf_counter()
                try:
                    response = http.get("/api/decode", params={"z": ",".join(z)})
                except httpx.HTTPError as e:
                    failures.append(f"request {i}: {type(e).__name__}")
                    continue
                finally:
                    sent += 1
                times.append(time.perf_counter() - t0)
                failures.extend(f"request {i}: {problem}" for problem in check(response, bad, shape))
        return times, failures, sent

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    times = np.array(sorted(t for p in parts for t in p[0])) * 1e3
    failures = [f for p in parts for f in p[1]]
    sent = sum(p[2] for p in parts)
    return {"requests": requests, "sent": sent, "clients": clients, "answered": int(times.size),
            "errors": len(failures), "failures": failures[:20], "wall_s": wall,
            "requests_per_s": sent / wall if wall else math.nan,
            **{f"p{q}_ms": float(np.percentile(times, q)) for q in (50, 90, 99)},
            "max_ms": float(times.max()) if times.size else math.nan, "latent_dim": d}


def check(response: httpx.Response, bad: bool, shape: list[int]) -> list[str]:
    """What is wrong with an answer: a PNG of the model's size for a good request, a 422 message for a bad one."""
    if bad:
        ok = response.status_code == 422 and response.json().get("detail")
        return [] if ok else [f"bad request answered {response.status_code}"]
    if response.status_code != 200 or not response.content.startswith(PNG_MAGIC):
        return [f"answered {response.status_code} {response.headers.get('content-type')}"]
    try:
        width, height = Image.open(io.BytesIO(response.content)).size
    except OSError:  # PIL's UnidentifiedImageError and truncated files
        return ["not a readable PNG"]
    return [] if (height, width) == tuple(shape[1:]) else [f"image {width}x{height}, expected {shape[1:]}"]


def tiny_run(root: Path) -> Path:
    """A small MLP VAE on the embedded digits, trained for the load test (seconds)."""
    from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from vaelab.train import train

    out = root / "digits-vae"
    if not (out / "config.json").exists():
        config = RunConfig(data=DataConfig(name="digits"), model=ModelConfig(model="vae", hidden=(64,), latent_dim=4,
                                                                             likelihood="bernoulli"),
                           train=TrainConfig(epochs=3, batch_size=64, device="cpu"))
        train(config, out, progress=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?", help="a trained run (default: train a small digits VAE)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=300, help="seconds after which no request is sent")
    args = parser.parse_args()
    run = args.run or tiny_run(Path("runs"))
    base, server, thread = serve(run)
    try:
        result = load(base, requests=args.requests, clients=args.clients, deadline_s=args.deadline)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    result["run"] = str(run)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'requests':>9}{'clients':>9}{'errors':>8}{'req/s':>8}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'max ms':>8}")
    print(f"{result['sent']:>9}{result['clients']:>9}{result['errors']:>8}{result['requests_per_s']:>8.0f}"
          f"{result['p50_ms']:>8.1f}{result['p90_ms']:>8.1f}{result['p99_ms']:>8.1f}{result['max_ms']:>8.1f}")
    for failure in result["failures"]:
        print("  ", failure)
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
