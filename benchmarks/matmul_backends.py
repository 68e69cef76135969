"""float32 matmul rates of PyTorch's two CPU libraries on the MLP VAE's shapes: MKL (F.linear) and oneDNN.

vaelab.linear sends large fully connected products to oneDNN on non-Intel CPUs with AVX-512, because MKL
takes its AVX2 path on AMD CPUs (on Intel ones, and on AMD ones without AVX-512, MKL is the faster, and
layers stay on it); this prints, for each
product of a 784-512-256-16 VAE's training step at batch 128 (forward,
input gradient, weight gradient) and of the NLL estimator's decoder (a chunk of 10,000 rows), GFLOP/s
through each library, timed alternately in one process, and the ratio. Also square 2048 x 2048.

Instead of that table, --layouts: each product through MKL with its right operand in the layout the step has
and in the other one (a copy transposed in memory: the same values), to see whether storing weights or
activations the other way round would pay. --dispatch: the cost of a call of vaelab.linear.Sequential
(forward and backward; the MLP encoder 784-512-256 at batch 128, and 784-8-8 at batch 2, where the per-call
overhead shows) on its path for CPUs where nothing goes to oneDNN (nn.Sequential's own loop) against its
general path (each layer asked whether it fits oneDNN), and plain nn.Sequential.

    python benchmarks/matmul_backends.py [--repeats 50] [--layouts] [--dispatch]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from vaelab import linear
from vaelab.linear import MIN_MACS, matmul_nt

LAYERS = [(784, 512), (512, 256), (256, 512), (512, 784)]  # (in, out) of the MLP's large layers


def products(batch: int = 128) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, a, b) with the product a @ b.T, as the layers' forward and backward passes form them."""
    out = []
    for n_in, n_out in LAYERS:
        x, w, g = torch.randn(batch, n_in), torch.randn(n_out, n_in), torch.randn(batch, n_out)
        out += [(f"{n_in}->{n_out} forward", x, w), (f"{n_in}->{n_out} input grad", g, w.t()),
                (f"{n_in}->{n_out} weight grad", g.t(), x.t())]
    z = torch.randn(10_000, 512)
    out.append(("NLL decoder 512->784, 10k rows", z, torch.randn(784, 512)))
    out.append(("square 2048", torch.randn(2048, 2048), torch.randn(2048, 2048)))
    return out


def rate(product, a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """Best of five timings of `repeats` products, in GFLOP/s."""
    product(a, b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            product(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * a.shape[0] * a.shape[1] * b.shape[0] * repeats / best / 1e9


def repeats_for(a: torch.Tensor, b: torch.Tensor, repeats: int) -> int:
    """Products per timing: `repeats` for a 128 x 512 x 512 product, scaled to keep the FLOPs per timing."""
    return max(1, repeats * 128 * 512 * 512 // (a.shape[0] * a.shape[1] * b.shape[0]))


def other_layout(b: torch.Tensor) -> torch.Tensor:
    """b's values with the other memory order: row-major where b is column-major, and the reverse."""
    return b.t().contiguous().t() if b.is_contiguous() else b.contiguous()


def layouts(repeats: int) -> None:
    print(f"\n{'product (MKL)':<34}{'as in the step':>16}{'other layout':>14}{'ratio':>8}")
    for name, a, b in products():
        n = repeats_for(a, b, repeats)
        flipped = other_layout(b)
        # (one thread sums a length-~800 dot product in another order per layout: float32's rounding, not a bug)
        torch.testing.assert_close(F.linear(a, b), F.linear(a, flipped), rtol=1e-4, atol=1e-4)
        given, other = rate(F.linear, a, b, n), rate(F.linear, a, flipped, n)
        print(f"{name:<34}{given:>16.0f}{other:>14.0f}{other / given:>7.2f}x", flush=True)


def call_us(module: nn.Module, x: torch.Tensor, calls: int = 200) -> float:
    """Microseconds per forward + backward call of module on x (input gradient included, as inside a VAE)."""
    start = time.perf_counter()
    for _ in range(calls):
        module(x).sum().backward()
    return (time.perf_counter() - start) / calls * 1e6


def dispatch(rounds: int = 7, calls: tuple[int, int] = (200, 2000)) -> None:
    """Sequential call cost: the MLP encoder at batch 128, and a tiny one at batch 2 (the per-call overhead);
    calls: timed calls per round of each."""
    preferred = linear.PREFER_ONEDNN
    print(f"\n{'Sequential call, forward + backward (us)':<42}{'784-512-256, B=128':>20}{'784-8-8, B=2':>14}"
          f"  (PREFER_ONEDNN={preferred})")
    rows: dict[str, list[float]] = {}
    for (widths, batch), n_calls in zip((((784, 512, 256), 128), ((784, 8, 8), 2)), calls):
        torch.manual_seed(0)
        layers = [m for a, b in zip(widths, widths[1:]) for m in (linear.Linear(a, b), nn.ReLU())]
        ours, plain = linear.Sequential(*layers), nn.Sequential(*layers)
        x = torch.randn(batch, widths[0], requires_grad=True)

        def general(xb, ours=ours):  # the loop that asks each layer whether it fits oneDNN (none does here)
            linear.PREFER_ONEDNN = True
            try:
                with linear.onednn_off():
                    return ours(xb)
            finally:
                linear.PREFER_ONEDNN = preferred

        ways = {"nn.Sequential": plain, "vaelab, general path": general}
        if not preferred:  # the fast path is this CPU's own
            ways["vaelab, fast path"] = ours
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, way in ways.items():
                times[name].append(call_us(way, x, calls=n_calls))
        for name, t in times.items():
            rows.setdefault(name, []).append(statistics.median(t))
    for name, (big, tiny) in rows.items():
        print(f"{name:<42}{big:>20.0f}{tiny:>14.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--layouts", action="store_true", help="instead: each MKL product in both operand layouts")
    parser.add_argument("--dispatch", action="store_true", help="instead: vaelab.linear.Sequential's per-call cost")
    args = parser.parse_args()
    if args.layouts:
        layouts(args.repeats)
    if args.dispatch:
        dispatch()
    if args.layouts or args.dispatch:
        return
    uses = (f"uses oneDNN from {MIN_MACS:,} multiply-adds per product" if linear.PREFER_ONEDNN else
            "keeps nn.Linear's MKL products on this CPU (PREFER_ONEDNN=False)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; vaelab.linear {uses}\n")
    print(f"{'product':<34}{'MKL GFLOP/s':>13}{'oneDNN GFLOP/s':>16}{'ratio':>8}")
    for name, a, b in products():
        repeats = repeats_for(a, b, args.repeats)
        blas = rate(F.linear, a, b, repeats)
        onednn = rate(matmul_nt, a, b, repeats)
        print(f"{name:<34}{blas:>13.0f}{onednn:>16.0f}{onednn / blas:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
