"""The hierarchical VAE against the single-layer VAE on dynamically binarised Fashion-MNIST, same CPU budget.

The VAE is the run of benchmarks/fashion_mnist_nll.py (run that first: it writes
benchmarks/results/fashion_mnist_nll.json and runs/fashion-mnist-nll). The HVAE (`--preset hvae-s`: four
latent groups of 8 channels at 4x4 and four at 7x7, cells without latents at 14x14, KL warm-up with
balancing, no spectral regularisation) trains on the same 50k/10k split for the same number of training
CPU seconds (process time), in whole epochs.

Each model is taken at its epoch with the best validation ELBO (early stopping, as in the published
protocol; kept in runs/<name>-best). Both models' log p(x) is then estimated with K importance samples
(default 1000) on the same test images, binarised once with seed 0: the first --n-test of the test set
(default 500; importance sampling through the whole hierarchy costs ~0.5 CPU ms per image and sample, so
all 10,000 at K = 1000 take ~1.5 CPU hours), and their per-image difference with its standard error (the
images are shared, so the spread of image difficulty cancels and the difference is far more precise than
either NLL). Writes benchmarks/results/hvae_fashion_mnist.json (keys nll_vae, nll_hvae, k, wall_s_vae,
wall_s_hvae, nll_hvae_minus_vae, and details) and a side-by-side grid of samples, hvae_fashion_mnist_samples.png.

The rate falls from --lr (default 3e-3) to --lr-min along a cosine over the whole CPU budget (NVAE's
schedule; the default). With --lr-schedule constant --finetune-lr X, the last --finetune-cpu-minutes
(default 20) run at X instead, the VAE's own schedule. --resume continues the run in --out and counts the
CPU time it has already used (the record kept in --out/budget.json, which --eval-only reads too). --groups
(latent groups per scale), --hidden (channels per scale) and --spectral-reg replace the preset's; give each
such run its own --name and --out.

    OMP_NUM_THREADS=1 python benchmarks/hvae_fashion_mnist.py --threads 1 --cpu-minutes 70.4 \
        [--resume] [--k 1000] [--eval-only] [--hidden 16,32,64 --groups 4,4,0 --spectral-reg 0 --name NAME --out DIR]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from budget import best_dir, cosine_lr, train_then_finetune

from vaelab import figures, fileio, runs
from vaelab.config import RunConfig
from vaelab.density import importance_sample, mean_and_stderr
from vaelab.evaluate import nll_test_set
from vaelab.flags import PRESETS, group_counts, positive_ints
from vaelab.prepare import prepare_data

RESULTS = Path(__file__).parent / "results"
TRAINING_RECORD = "budget.json"  # in the run directory: --resume and --eval-only read it, whatever --name is
PUBLISHED = {"HVAE (Gaussian prior)": 227.37, "ConvHVAE (Gaussian prior)": 225.38}  # Exemplar VAE, Table 1


def hvae_config(epochs: int = 0, lr: float = 1e-3, groups: tuple[int, ...] | None = None,
                spectral_reg: float | None = None, hidden: tuple[int, ...] | None = None) -> RunConfig:
    """--preset hvae-s on binarised Fashion-MNIST; groups, hidden and spectral_reg, when given, replace the preset's."""
    preset = PRESETS["hvae-s"]
    model = {**preset["model"], "likelihood": "bernoulli", **({"groups": groups} if groups else {}),
             **({"hidden": hidden} if hidden else {})}
    train = {**preset["train"], **({"spectral_reg": spectral_reg} if spectral_reg is not None else {})}
    return RunConfig.from_dict({
        "data": {"name": "fashion-mnist", "binarize": "dynamic"}, "model": model,
        "train": {**train, "epochs": epochs, "lr": lr, "seed": 0, "device": "cpu"},
    }, "hvae benchmark")


def read_result(name: str) -> dict:
    """A results file of benchmarks/results, or {} while it does not exist."""
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else {}


def training_record(out: Path, name: str) -> dict:
    """What a run has spent so far (epochs, CPU and wall seconds, its schedule): the record kept in its run
    directory, else (runs from before the record moved there) results/NAME_training.json, else {}."""
    kept = out / TRAINING_RECORD
    return json.loads(kept.read_text()) if kept.exists() else read_result(f"{name}_training.json")


def vae_training(vae: Path, name: str) -> dict:
    """results/NAME.json of fashion_mnist_nll.py, if it is of the run in `vae` (results written before it named
    its run are taken as they are), else {}: the VAE row showed the default run's training time for any --vae."""
    result = read_result(f"{name}.json")
    if result.get("run") not in (None, str(vae.resolve())):
        print(f"results/{name}.json is of {result['run']}, not of --vae {vae}: the VAE's training time is not shown "
              "(give the --vae-name that run was trained with)", flush=True)
        return {}
    return result


def estimate(run_dir: Path, x: torch.Tensor, k: int) -> tuple[dict, torch.Tensor, float]:
    """(summary, per-image log p(x) estimates, CPU seconds) of a run's model on the images x."""
    model = runs.load(run_dir)
    cpu0 = time.process_time()
    result = importance_sample(model, x, k=k, seed=0)
    return result.summary(784), result.log_px, time.process_time() - cpu0


def paired_difference(log_px_hvae: torch.Tensor, log_px_vae: torch.Tensor) -> dict[str, float]:
    """NLL(HVAE) - NLL(VAE) per image, its mean and standard error: the images are shared, so the spread of
    image difficulty (which dominates each model's own standard error) cancels."""
    mean, stderr = mean_and_stderr(log_px_vae.double() - log_px_hvae.double())
    return {"mean": mean, "stderr": stderr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the VAE had)")
    parser.add_argument("--vae", type=Path, default=Path("runs/fashion-mnist-nll"))
    parser.add_argument("--vae-name", default="fashion_mnist_nll",
                        help="the --name fashion_mnist_nll.py gave the --vae run: its results/<name>.json holds the "
                             "VAE's training time (default fashion_mnist_nll)")
    parser.add_argument("--out", type=Path, default=Path("runs/fashion-mnist-hvae"))
    parser.add_argument("--cpu-minutes", type=float, required=True,
                        help="training budget: the VAE's training CPU time (70.4 for the README's runs; --vae-name's "
                             "train_cpu_s, 80.0, also holds its first K = 5000 estimate, and gave the HVAE 9.6 more)")
    parser.add_argument("--finetune-lr", type=float, default=None,
                        help="spend the last --finetune-cpu-minutes at this lower rate, as the VAE's script does")
    parser.add_argument("--finetune-cpu-minutes", type=float, default=20.0)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's rate (the peak, with --lr-schedule cosine)")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine")
    parser.add_argument("--lr-min", type=float, default=2e-5, help="where the cosine schedule ends")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out; the CPU time it has used (--out/budget.json) counts")
    parser.add_argument("--name", default="hvae_fashion_mnist",
                        help="results/NAME.json, NAME_training.json and NAME_samples.png (for runs side by side)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the HVAE run in --out as it is")
    parser.add_argument("--groups", type=group_counts, default=None,
                        help="latent groups per scale, coarsest first, e.g. 5,5,0 (default: the preset's 4,4,0)")
    parser.add_argument("--hidden", type=positive_ints, default=None,
                        help="channels per scale, finest first, e.g. 16,32,64 (default: the preset's)")
    parser.add_argument("--spectral-reg", type=float, default=None, help="NVAE's lambda (default: the preset's, 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vae_result = vae_training(args.vae, args.vae_name)
    budget_s = 60 * args.cpu_minutes
    if args.lr_schedule == "cosine" and args.finetune_lr:
        parser.error("--lr-schedule cosine anneals over the whole budget; drop --finetune-lr")
    config = hvae_config(lr=args.lr, groups=args.groups, spectral_reg=args.spectral_reg, hidden=args.hidden)
    data = prepare_data(config)
    before = training_record(args.out, args.name) if args.resume or args.eval_only else {}
    spent = before or {"epochs": 0, "cpu_s": 0.0, "wall_s": 0.0}
    if not args.eval_only:
        finetune_s = 60 * args.finetune_cpu_minutes if args.finetune_lr else 0.0
        lr_at = cosine_lr(args.lr, args.lr_min, budget_s, spent["cpu_s"]) if args.lr_schedule == "cosine" else None
        now = train_then_finetune(config, args.out, cpu_s=budget_s - spent["cpu_s"] - finetune_s,
                                  finetune_s=finetune_s, finetune_lr=args.finetune_lr, dataset=data,
                                  resume=args.resume, best=best_dir(args.out), lr_at=lr_at)
        spent = {**now, "cpu_s": spent["cpu_s"] + now["cpu_s"], "wall_s": spent["wall_s"] + now["wall_s"],
                 "finetune_lr": args.finetune_lr, "lr": args.lr, "lr_schedule": args.lr_schedule,
                 "lr_min": args.lr_min if args.lr_schedule == "cosine" else None}
        record = json.dumps(spent, indent=2) + "\n"
        (RESULTS / f"{args.name}_training.json").write_text(record)
        fileio.atomic_write_text(args.out / TRAINING_RECORD, record)
    x, seed = nll_test_set(config, data)
    x = x[:args.n_test]
    nll, log_px = {}, {}
    best = {"hvae": best_dir(args.out), "vae": best_dir(args.vae)}  # each at its best validation epoch
    for name, run_dir in best.items():
        summary, log_px[name], cpu_s = estimate(run_dir, x, args.k)
        nll[name] = {"nll": summary["nll"], "stderr": summary["nll_stderr"], "eval_cpu_s": cpu_s,
                     "ess_fraction": summary["ess_fraction"], "epoch": runs.latest_checkpoint(run_dir).epoch}
    vae_result = vae_training(args.vae, args.vae_name) or vae_result  # the VAE's run may have finished meanwhile
    torch.manual_seed(0)
    samples = torch.cat([runs.load(best["vae"]).sample(32), runs.load(best["hvae"]).sample(32)])
    grid = figures.save_grid(samples, RESULTS / f"{args.name}_samples.png", nrow=8)
    result = {
        "nll_vae": nll["vae"]["nll"], "nll_hvae": nll["hvae"]["nll"], "k": args.k,
        "wall_s_vae": vae_result.get("train_s"), "wall_s_hvae": spent["wall_s"],
        "cpu_s_vae": vae_result.get("train_cpu_s"), "cpu_s_hvae": spent["cpu_s"],
        "nll_hvae_minus_vae": paired_difference(log_px["hvae"], log_px["vae"]),
        "n_test": int(x.shape[0]), "test_binarize_seed": seed, "details": nll,
        "nll_vae_full_test_k5000": vae_result.get("nll"), "published": PUBLISHED,
        # the trainer's own schedule in hvae_config is constant: the benchmark sets each epoch's rate from the
        # CPU time used (budget.cosine_lr); "training" holds the schedule that was actually run
        "hvae_config": config.to_dict(), "training": spent, "threads": args.threads, "samples": grid.name,
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':<8}{'test NLL (nats)':>18}{'epoch':>8}{'train CPU min':>15}{'train wall min':>16}")
    for name in ("vae", "hvae"):
        cpu, wall = result[f"cpu_s_{name}"], result[f"wall_s_{name}"]
        print(f"{name:<8}{nll[name]['nll']:>10.2f} +- {nll[name]['stderr']:.2f}{nll[name]['epoch']:>8}"
              + "".join(f"{'?' if s is None else f'{s / 60:.1f}':>{w}}" for s, w in ((cpu, 15), (wall, 16))))
    diff = result["nll_hvae_minus_vae"]
    print(f"HVAE - VAE per image: {diff['mean']:+.2f} +- {diff['stderr']:.2f} nats (negative: the HVAE is better)")
    print(f"first {x.shape[0]} test images, K = {args.k}; published: "
          + ", ".join(f"{k} {v}" for k, v in PUBLISHED.items()))
    print(f"samples (VAE top, HVAE bottom): {grid}")


if __name__ == "__main__":
    main()
