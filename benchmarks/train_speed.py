"""Training throughput: vaelab's Trainer against a plain pytorch/examples-style DataLoader loop, same run.

Model: MLP VAE 784-512-256 -> 16 -> 256-512-784, Bernoulli likelihood (BCE on grey values, as
pytorch/examples/vae does), Adam lr 1e-3, batch 128, on Fashion-MNIST's training split (mnist5k
when Fashion-MNIST is not available). Methods are run in interleaved rounds and the median of
each is reported, because the machine is shared and noisy. Each measurement runs 3 epochs in a fresh
process; its first epoch is warm-up and its rate is the median of the later ones.

The reference loop is pytorch/examples/vae/main.py's: a torchvision-style MNIST Dataset (uint8
images, each turned into a PIL image and through ToTensor on access), DataLoader(shuffle=True),
sigmoid + binary_cross_entropy, default Adam, loss.item() per batch. torchvision itself is not
installed (its wheels pull CUDA), so its per-sample steps (MNIST.__getitem__, ToTensor) are reproduced
with Pillow and numpy, and calibrated against the real ones (see TorchvisionStyleMNIST).

FLOPs: "model FLOPs" per training sample are 3x the forward pass (forward, then backward for
activations and weights), the convention of model-FLOPs utilisation; torch's FlopCounterMode
counts the forward. The FLOP limit is the machine's measured fp32 matmul rate divided by them.
Autograd skips the input gradient of the first layer, so the FLOPs actually executed are fewer;
both are printed. vaelab is timed as it trains by default and with --compile (the first epoch, the
warm-up, also compiles). Last line: `speedup_vs_dataloader=X fraction_of_limit=Y` for the default
trainer; the line before it gives the same for --compile (left out, with the reason printed, when
--compile fails on the machine).

    python benchmarks/train_speed.py [--rounds 5] [--examples 20000] [--results FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from vaelab import linear, runs
from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.data import Dataset, Split, load_dataset
from vaelab.errors import DataError
from vaelab.linear import matmul_nt, onednn_off
from vaelab.system import cpu_info
from vaelab.train import train

BATCH = 128
RESULTS = Path(__file__).parent / "results" / "train_speed.json"


class ExamplesVAE(nn.Module):
    """The pytorch/examples VAE, widened to the benchmark's 784-512-256-16 architecture."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 512), nn.Linear(512, 256)
        self.fc_mu, self.fc_logvar = nn.Linear(256, 16), nn.Linear(256, 16)
        self.fc3, self.fc4, self.fc5 = nn.Linear(16, 256), nn.Linear(256, 512), nn.Linear(512, 784)

    def logits(self, x):
        """Decoder logits at one reparameterised sample, with the posterior's mu and logvar."""
        h = F.relu(self.fc2(F.relu(self.fc1(x.view(-1, 784)))))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.fc5(F.relu(self.fc4(F.relu(self.fc3(z))))), mu, logvar

    def forward(self, x):
        logits, mu, logvar = self.logits(x)
        return torch.sigmoid(logits), mu, logvar


def examples_loss(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())  # Appendix B, Kingma & Welling 2014
    return bce + kld


def to_tensor(pic: Image.Image) -> torch.Tensor:
    """What torchvision's ToTensor does to a PIL image, step for step: type checks, HWC -> CHW, uint8 -> [0, 1]."""
    if not isinstance(pic, Image.Image):  # (torchvision also takes ndarrays, by another path not copied here)
        raise TypeError(f"pic should be a PIL Image, got {type(pic)}")
    float_dtype = torch.get_default_dtype()
    dtypes = {"I": np.int32, "I;16" if sys.byteorder == "little" else "I;16B": np.int16, "F": np.float32}
    img = torch.from_numpy(np.array(pic, dtypes.get(pic.mode, np.uint8), copy=True))
    if pic.mode == "1":
        img = 255 * img
    img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
    img = img.permute((2, 0, 1)).contiguous()
    return img.to(dtype=float_dtype).div(255) if isinstance(img, torch.ByteTensor) else img


class TorchvisionStyleMNIST(torch.utils.data.Dataset):
    """torchvision.datasets.MNIST(transform=ToTensor()) per item: uint8 -> PIL image -> transform.

    Calibrated against torchvision 0.28's own MNIST.__getitem__ + ToTensor, timed once outside this
    repository (its wheel unpacked without dependencies, C++ ops stubbed out): ~20 us per item there,
    ~18 us here (torchvision also logs API usage per call). An earlier two-line version of this class
    (no checks, no view/permute) took ~15 us, making the reference loop ~5% faster than the real one.
    """

    def __init__(self, x: torch.Tensor, transform=to_tensor, target_transform=None):
        self.data = (x[:, 0] * 255).round().to(torch.uint8)  # (N, 28, 28), as torchvision stores it
        self.targets = torch.zeros(len(x), dtype=torch.long)
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img, target = self.data[index], int(self.targets[index])
        img = Image.fromarray(img.numpy(), mode="L")
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


EPOCHS = 3  # per measurement; each method's first epoch is its warm-up, the median of the others counts


def steady_rate(rates: list[float]) -> float:
    """Samples/s of a measurement: the median over its epochs after the first."""
    return statistics.median(rates[1:])


def dataloader_loop(x: torch.Tensor) -> float:
    """pytorch/examples/vae/main.py's train(), epoch after epoch: DataLoader, shuffle, .item() per batch."""
    torch.manual_seed(0)
    model = ExamplesVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TorchvisionStyleMNIST(x), batch_size=BATCH, shuffle=True)
    model.train()
    rates = []
    for _ in range(EPOCHS):
        start = time.perf_counter()
        train_loss = 0.0
        for data, _ in loader:
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = examples_loss(recon_batch, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        rates.append(len(x) / (time.perf_counter() - start))
    return steady_rate(rates)


def tight_loop(x: torch.Tensor) -> float:
    """The same model in memory, batches by index permutation, default Adam: a plain fast reference."""
    torch.manual_seed(0)
    model = ExamplesVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rates = []
    for _ in range(EPOCHS):
        start = time.perf_counter()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), BATCH):
            data = x[perm[i:i + BATCH]]
            recon_batch, mu, logvar = model(data)
            loss = examples_loss(recon_batch, data, mu, logvar)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates.append(len(x) / (time.perf_counter() - start))
    return steady_rate(rates)


def vaelab_trainer(data: Dataset, workdir: Path, compile: bool = False) -> float:
    """vaelab's Trainer for EPOCHS epochs; training throughput (no validation, no I/O) as steady_rate.

    With compile (--compile), the first epoch also compiles the step; it is the warm-up epoch either way."""
    config = RunConfig(data=DataConfig(name=data.name, binarize="none"),
                       model=ModelConfig(model="vae", net="mlp", hidden=(512, 256), latent_dim=16,
                                         likelihood="bernoulli"),
                       train=TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=1e-3, device="cpu", compile=compile))
    out = Path(tempfile.mkdtemp(dir=workdir))
    train(config, out, dataset=data, progress=False)
    return steady_rate([r["samples_per_s"] for r in runs.read_metrics(out)])


def flops_per_sample(data: Dataset) -> tuple[float, float]:
    """(model FLOPs = 3 x forward, FLOPs executed by forward + backward) of vaelab's model, per example."""
    from vaelab.models import VAE
    from vaelab.objectives import elbo

    model = VAE(input_shape=data.shape, latent_dim=16, hidden=(512, 256))
    x = data.train.x[:BATCH]
    with onednn_off():  # aten matmuls, which the counter knows
        with FlopCounterMode(display=False) as forward:
            loss = elbo(model(x), x)["loss"].mean()
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    fwd = forward.get_total_flops() / BATCH
    return 3 * fwd, fwd + backward.get_total_flops() / BATCH


def machine() -> dict[str, object]:
    """What the numbers were measured on, for the results file (runs from different machines sit side by side):
    /proc/cpuinfo's vendor, family, model and name (Linux; empty elsewhere), torch's CPU capability, threads,
    torch's version and which library vaelab.linear's layers use there."""
    return {"cpu": cpu_info(), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "vaelab_linear": "oneDNN" if linear.PREFER_ONEDNN else "default BLAS (MKL)"}


def describe(about: dict[str, object]) -> str:
    """machine() in one line for a benchmark's header."""
    cpu = about["cpu"]
    family = f" (family {cpu['family']}, model {cpu['model']})" if "family" in cpu and "model" in cpu else ""
    return (f"{cpu.get('name', 'unknown CPU')}{family}, {about['capability']}, {about['threads']} threads, "
            f"torch {about['torch']}, vaelab.linear on {about['vaelab_linear']}")


def matmul_rate(repeats: int = 10) -> float:
    """The machine's fp32 matmul peak: best timing of square matmuls (1024, 2048), in FLOP/s, over both
    of PyTorch's CPU matmul libraries (MKL behind `@`, oneDNN behind vaelab.linear): the faster one is
    what the machine can do."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for product in (torch.mm, matmul_nt):  # a @ b, a @ b.T: the same FLOPs
            product(a, b)
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(repeats):
                    product(a, b)
                best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


def load(examples: int) -> Dataset:
    try:
        data = load_dataset("fashion-mnist")
    except DataError:
        data = load_dataset("mnist5k")
    x, y = data.train.x[:examples], data.train.y[:examples]
    return Dataset(name=data.name, train=Split(x, y), val=data.val, test=data.test, classes=data.classes)


METHODS = {"dataloader loop": dataloader_loop, "tight loop": tight_loop, "vaelab": None, "vaelab --compile": None}
OPTIONAL = ("vaelab --compile",)  # a failure drops it from the run; any other method's failure ends the run


def measure(method: str, examples: int) -> float:
    """One measurement in this process: samples/s of a method, or the matmul peak in FLOP/s."""
    if method == "matmul peak":
        return matmul_rate()
    data = load(examples)
    if method.startswith("vaelab"):
        with tempfile.TemporaryDirectory() as workdir:
            return vaelab_trainer(data, Path(workdir), compile=method.endswith("--compile"))
    return METHODS[method](data.train.x)


def stolen_ticks() -> int:
    """CPU time the hypervisor gave to other guests, in clock ticks since boot (Linux; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8])  # cpu user nice system idle iowait irq softirq steal
    except (OSError, IndexError, ValueError):
        return 0


class MeasurementFailed(Exception):
    """A measurement's process failed; the message names the method and gives the last line of its stderr."""


def measure_fresh(method: str, examples: int) -> tuple[float, float]:
    """measure() in a new Python process, so no method inherits another's process state (allocator, caches);
    also the share of the machine's CPU time stolen by the host meanwhile (a noisy neighbour's mark)."""
    start, stolen = time.perf_counter(), stolen_ticks()
    done = subprocess.run([sys.executable, __file__, "--measure", method, "--examples", str(examples)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:  # (its traceback was captured: say why, not "returned non-zero exit status 1")
        said = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise MeasurementFailed(f"{method}: {said[-1] if said else f'exit status {done.returncode}'}")
    cpu_ticks = (time.perf_counter() - start) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    return float(done.stdout.strip().splitlines()[-1]), (stolen_ticks() - stolen) / cpu_ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--examples", type=int, default=20000, help="training examples per epoch")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the JSON results go (default: benchmarks/results/train_speed.json)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(measure(args.measure, args.examples))
        return
    data = load(args.examples)
    flops, executed = flops_per_sample(data)
    about = machine()
    print(f"data: {data.name}, {len(data.train.x)} training examples per epoch, batch {BATCH}; each measurement "
          f"in a fresh process\nmachine: {describe(about)}")
    names = [*METHODS, "matmul peak"]
    rows: list[dict[str, float]] = []
    steal: list[dict[str, float]] = []  # per measurement, the share of CPU time the hypervisor took
    for r in range(args.rounds):  # interleaved, so slow phases of a shared machine hit every method
        measured = {}
        for name in list(names):
            try:
                measured[name] = measure_fresh(name, args.examples)
            except MeasurementFailed as e:
                if name not in OPTIONAL:
                    raise SystemExit(f"train_speed: {e}") from None
                # e.g. torch.compile failing on this machine: the default trainer's numbers still come out
                print(f"{e}; measuring without {name}", flush=True)
                names.remove(name)
                for earlier in (*rows, *steal):
                    earlier.pop(name, None)
        rows.append({name: value for name, (value, _) in measured.items()})
        steal.append({name: share for name, (_, share) in measured.items()})
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:,.0f}" if k != "matmul peak" else f"{k} {v / 1e9:.0f} GFLOP/s"
                                             for k, v in rows[-1].items())
              + "; CPU time stolen by the host: " + " ".join(f"{v:.0%}" for v in steal[-1].values()), flush=True)
    methods = [k for k in METHODS if k in names]
    # ratios are taken within each round, then the median over rounds
    ratio = {k: statistics.median(row[k] / row["dataloader loop"] for row in rows) for k in methods}
    fraction = {k: statistics.median(row[k] * flops / row["matmul peak"] for row in rows) for k in methods}
    median = {k: statistics.median(row[k] for row in rows) for k in names}
    print()
    print(f"{'method':<18}{'samples/s':>12}{'vs dataloader':>16}{'of FLOP limit':>16}")
    for name in methods:
        print(f"{name:<18}{median[name]:>12,.0f}{ratio[name]:>15.2f}x{fraction[name]:>15.0%}")
    peak = median["matmul peak"]
    print(f"\nmodel FLOPs per training sample {flops / 1e6:.2f} M (executed: {executed / 1e6:.2f} M); "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s (median); FLOP limit {peak / flops:,.0f} samples/s "
          f"({peak / executed:,.0f} counting executed FLOPs only); medians of per-round ratios")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"machine": about, "data": data.name, "examples": len(data.train.x),
                                        "rounds": rows,
                                        "stolen_cpu_share": steal,
                                        "model_flops_per_sample": flops, "executed_flops_per_sample": executed,
                                        "speedup_vs_dataloader_by_method": ratio,
                                        "fraction_of_limit_by_method": fraction,
                                        "speedup_vs_dataloader": ratio["vaelab"],
                                        "fraction_of_limit": fraction["vaelab"]}, indent=2) + "\n")
    if "vaelab --compile" in ratio:
        print(f"with --compile: speedup_vs_dataloader={ratio['vaelab --compile']:.2f} "
              f"fraction_of_limit={fraction['vaelab --compile']:.2f}")
    print(f"speedup_vs_dataloader={ratio['vaelab']:.2f} fraction_of_limit={fraction['vaelab']:.2f}")


if __name__ == "__main__":
    main()
