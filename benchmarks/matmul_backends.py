"""float32 matmul rates of PyTorch's two CPU libraries on the MLP VAE's shapes: MKL (F.linear) and oneDNN.

vaelab.linear sends large fully connected products to oneDNN on non-Intel CPUs, because MKL takes its
AVX2 path on AMD CPUs (on Intel ones MKL is the faster, and layers stay on it); this prints, for each
product of a 784-512-256-16 VAE's training step at batch 128 (forward,
input gradient, weight gradient) and of the NLL estimator's decoder (a chunk of 10,000 rows), GFLOP/s
through each library, timed alternately in one process, and the ratio. Also square 2048 x 2048.

    python benchmarks/matmul_backends.py [--repeats 50]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; vaelab.linear uses oneDNN from "
          f"{MIN_MACS:,} multiply-adds per product\n")
    print(f"{'product':<34}{'MKL GFLOP/s':>13}{'oneDNN GFLOP/s':>16}{'ratio':>8}")
    for name, a, b in products():
        repeats = max(1, args.repeats * 128 * 512 * 512 // (a.shape[0] * a.shape[1] * b.shape[0]))
        blas = rate(F.linear, a, b, repeats)
        onednn = rate(matmul_nt, a, b, repeats)
        print(f"{name:<34}{blas:>13.0f}{onednn:>16.0f}{onednn / blas:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
