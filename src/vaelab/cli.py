"""The command line: `vaelab train | evaluate | sample | reconstruct | interpolate | report | demo`.

Flags of `train` map one to one onto RunConfig fields (flags.FLAGS).
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from .config import RunConfig
from .errors import ConfigError, VaelabError, out_of_memory_message
from .flags import FLAGS, PRESETS, config_from_args, dest, device_arg


def _default_out(config: RunConfig) -> Path:
    """runs/<data>-<model>, numbered when taken; a file's data set by its file name (npz:/a/b/mine.npz: mine)."""
    prefix, colon, path = config.data.name.partition(":")
    data = f"{prefix}-{Path(path).stem}" if colon else config.data.name
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in f"{data}-{config.model.model}")
    out, i = Path("runs") / stem, 2
    while out.exists():
        out, i = Path("runs") / f"{stem}-{i}", i + 1
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from . import runs
    from .distributed import one_gpu_per_process
    from .reports import write_report
    from .system import resolve_device
    from .train import train

    stored = None
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN, the run directory to continue")
        if getattr(args, "preset", None) is not None:  # (it was dropped without a word)
            raise ConfigError(f"--preset {args.preset} sets up a new run; a resumed run keeps its own settings: "
                              "drop --preset")
        stored = runs.load_config(args.out)
        config = config_from_args(args, stored)
    else:
        config = config_from_args(args)
    # where the device came from, for its errors: a resumed run's own unless --device is given
    source = "--device" if args.device is not None or not args.resume else f"{args.out}/config.json's device"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        if args.out is None:  # each process would otherwise pick its own default folder
            raise ConfigError("a torchrun job needs --out DIR, the one run directory all processes share")
        # before the data loads (train() would refuse it only then), naming where the device came from
        one_gpu_per_process(config.train.device, source)
    out = _run_folder(args.out or _default_out(config))
    checkpoint = runs.latest_checkpoint(out) if args.resume else None
    done = checkpoint.epoch if checkpoint else 0
    # a fitted PCA has no epochs to continue; asked for another model or other settings, train() names them
    fitted = bool(checkpoint and checkpoint.complete and stored.model.model == "pca" and config.model == stored.model)
    t0 = time.perf_counter()
    if not fitted:  # (a fitted PCA is not trained again: its report falls back to the CPU, with a note)
        resolve_device(config.train.device, source)  # train() checks it too, in the Python API's words
        train(config, out, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":  # only rank 0 speaks and writes the report
        return 0
    if fitted:
        print(f"{out} holds a fitted PCA (closed form, no epochs to continue): nothing to train")
    elif args.resume and done >= config.train.epochs:
        print(f"{out} is at epoch {done} already (--epochs {config.train.epochs}): nothing to train; "
              "give a larger --epochs to continue it")
    elif config.train.epochs == 0 and config.model.model != "pca":
        print(f"initialised {config.model.model} on {config.data.name} without training (--epochs 0): {out}")
    else:
        print(f"trained {config.model.model} on {config.data.name} in {time.perf_counter() - t0:.1f} s: {out}")
    if not args.no_report:
        from .distributed import single_process

        with single_process():  # the job's other processes have left: baselines train in this one alone
            report = write_report(out, baselines=not args.no_baselines, progress=not args.quiet,
                                  device=config.train.device)
        print(f"report: {report}")
    return 0


def _run_folder(out: Path) -> Path:
    """--out of train and demo: a folder, made if missing; an existing file there is refused by name."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the run (vaelab creates it)")
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import runs
    from .evaluate import evaluate_run, write_evaluation

    if args.k is not None and args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    if args.chunk is not None and args.chunk < 1:
        raise ConfigError(f"--chunk must be >= 1 (samples per pass), got {args.chunk}")
    given = [flag for flag, value in (("--k", args.k), ("--chunk", args.chunk)) if value is not None]
    if given and (not args.nll or runs.load_config(args.run).model.model == "pca"):
        them = "them" if len(given) > 1 else "it"
        why = (f"{'they set' if len(given) > 1 else 'it sets'} the importance-sampled NLL; add --nll or drop {them}"
               if not args.nll else f"PCA's log p(x) is exact, with no importance sampling; drop {them}")
        raise ConfigError(f"{' and '.join(given)} would be ignored: {why}")
    result = evaluate_run(args.run, nll_k=(args.k or 5000) if args.nll else None, probe=not args.no_probe,
                          chunk=args.chunk, device=args.device, write=False, progress=True)
    for key, value in result.items():  # printed before the file is written: a run that cannot take it (read-only,
        if isinstance(value, list):  # a full disk) lost a long --nll estimate with the error
            value = "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
        print(f"{key:>28}  {value:.4f}" if isinstance(value, float) else f"{key:>28}  {value}", flush=True)
    print(f"written: {write_evaluation(args.run, result)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluate import compare_runs
    from .fileio import atomic_write_text

    out = _output(args.out, Path("compare.md"))
    _, markdown = compare_runs(args.runs)
    print(markdown, end="")
    atomic_write_text(out, markdown)
    print(f"written: {out}")
    return 0


def _run_and_data(run: Path, device: str):
    from . import runs
    from .prepare import prepare_data

    config = runs.load_config(run)
    return runs.load(run, device=device), prepare_data(config)


def _index(value: int, n: int, flag: str) -> int:
    if not -n <= value < n:
        images = "1 image (0, or -1" if n == 1 else f"{n} images (0..{n - 1}, or -{n}..-1"
        raise ConfigError(f"{flag} {value} is out of range: the test split has {images} counting from the end)")
    return value % n


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from . import figures, runs
    from .models.common import has_prior, no_prior
    from .models.hvae import MAX_TEMPERATURE

    model = runs.load(args.run, device=args.device)
    if not has_prior(model):
        kind = runs.load_config(args.run).model.model
        raise ConfigError(f"{args.run} holds a --model {kind} run, which vaelab does not sample from: {no_prior('it')}")
    if args.n < 1 or args.n > 10_000:
        raise ConfigError(f"--n must be between 1 and 10000, got {args.n}")
    if args.nrow is not None and args.nrow < 1:
        raise ConfigError(f"--nrow must be >= 1 (images per row), got {args.nrow}")
    if not -2**63 <= args.seed < 2**64:  # torch.manual_seed's range (beyond it, a traceback from it before)
        raise ConfigError(f"--seed must be between -2**63 and 2**64 - 1, got {args.seed}")
    if not 0 <= args.temperature <= MAX_TEMPERATURE:  # (NaN fails it too)
        raise ConfigError(f"--temperature must be between 0 and {MAX_TEMPERATURE:g}, got {args.temperature}")
    kwargs = {}
    if "temperature" in inspect.signature(model.sample).parameters:
        kwargs["temperature"] = args.temperature
    elif args.temperature != 1:  # (a text model's too: it was ignored)
        raise ConfigError(f"{args.run} holds a {runs.load_config(args.run).model.model} model, whose prior has no "
                          "temperature; drop --temperature (it applies to --model hvae)")
    torch.manual_seed(args.seed)
    vocab = _vocab(args.run)
    if vocab is not None:
        from . import text_views

        if args.nrow is not None:  # (it was ignored)
            raise ConfigError("--nrow lays out images; a text model's samples are sentences, one per line: drop it")
        return _write_lines(text_views.samples(model, vocab, args.n), _output(args.out, Path(args.run) / "samples.txt"))
    out = figures.save_grid(model.sample(args.n, **kwargs), _output(args.out, Path(args.run) / "samples.png"),
                            nrow=args.nrow or 8)
    print(f"written: {out}")
    return 0


def _vocab(run: Path) -> tuple[str, ...] | None:
    """The vocabulary of a text run (rebuilt from its data set), None for images."""
    from . import runs
    from .config import TEXT_MODELS
    from .prepare import prepare_data

    config = runs.load_config(run)
    return prepare_data(config).vocab if config.model.model in TEXT_MODELS else None


def _output(out: Path | None, default: Path) -> Path:
    """--out, or the command's default file in the run directory. A folder is refused (it was a traceback from
    PIL or the text writer), and so is a picture's name without .png (PIL picks the format by extension)."""
    if out is None:
        return default
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / default.name}")
    if default.suffix == ".png" and out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the picture is written as PNG; give a name ending in .png, such as "
                          f"{out.with_suffix('.png')}")
    from .data.custom import IMAGE_SUFFIXES

    if default.suffix == ".txt" and out.suffix.lower() in IMAGE_SUFFIXES:  # (a text file under a picture's name)
        raise ConfigError(f"--out {out}: a text model's output is sentences, written as text; give a name such as "
                          f"{out.with_suffix('.txt')}")
    return out


def _write_lines(lines: list[str], out: Path) -> int:
    from .fileio import atomic_write_text

    print("\n".join(lines))
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"written: {out}")
    return 0


MAX_RECONSTRUCTIONS = 100  # in one row


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from . import figures

    if not 1 <= args.n <= MAX_RECONSTRUCTIONS:
        raise ConfigError(f"--n must be between 1 and {MAX_RECONSTRUCTIONS} (one row of test images above one of "
                          f"their reconstructions), got {args.n}")
    model, data = _run_and_data(args.run, args.device)
    n = min(args.n, data.test.x.shape[0])
    if data.is_text:
        from . import text_views

        pairs = text_views.reconstructions(model, data.test.x[:n], data.vocab)
        lines = [f"{a}\n  -> {b}" for a, b in pairs]
        return _write_lines(lines, _output(args.out, Path(args.run) / "reconstructions.txt"))
    out = figures.save_grid(figures.reconstructions(model, data.test.x[:n]),
                            _output(args.out, Path(args.run) / "reconstructions.png"), nrow=n)
    print(f"written: {out} (originals on top, reconstructions below)")
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from . import figures

    model, data = _run_and_data(args.run, args.device)
    n = data.test.x.shape[0]
    a, b = _index(args.a, n, "--a"), _index(args.b, n, "--b")
    if args.steps < 2 or args.steps > 100:
        raise ConfigError(f"--steps must be between 2 and 100, got {args.steps}")
    if data.is_text:
        from . import text_views

        lines = text_views.interpolation(model, data.test.x[a], data.test.x[b], data.vocab, steps=args.steps)
        return _write_lines(lines, _output(args.out, Path(args.run) / f"interpolate-{a}-{b}.txt"))
    strip = figures.interpolations(model, data.test.x[a:a + 1], data.test.x[b:b + 1], steps=args.steps)
    out = figures.save_grid(strip, _output(args.out, Path(args.run) / f"interpolate-{a}-{b}.png"), nrow=args.steps)
    print(f"written: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .reports import write_report

    report = write_report(args.run, baselines=not args.no_baselines, progress=not args.quiet, device=args.device)
    print(f"report: {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(_run_folder(Path(args.out)), epochs=args.epochs, progress=not args.quiet)
    print(f"demo report: {report.resolve()}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, as every other error of vaelab's (argparse prints its usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def user_path(text: str) -> Path:
    """A path argument with "~" expanded, as the shell does not in --out=~/x or a quoted '~/x' (it made a folder
    named "~"; `serve` expanded it, `evaluate` did not)."""
    return Path(text).expanduser()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (their parsers are Parsers too)."""
    parser = Parser(prog="vaelab", description="Variational autoencoders: train, evaluate, "
                    "sample and explore. Run `vaelab demo` for a first look.")
    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model into a run directory and write its report",
                       description="Train PCA, an autoencoder or a VAE; writes config.json, metrics.jsonl, "
                                   "checkpoints/ and report.html into --out.")
    for _, _, flag, kwargs in FLAGS:
        p.add_argument(flag, dest=dest(flag), default=None, **kwargs)
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration (hvae-s: a small "
                                                             "hierarchical VAE for 28x28 images); flags override it")
    p.add_argument("--out", type=user_path, metavar="DIR", help="run directory (default runs/<data>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                                                          "(a larger --epochs extends it; --lr changes the rate "
                                                          "from there)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--no-baselines", action="store_true", help="report without training PCA/AE/VAE baselines")
    p.add_argument("--quiet", action="store_true", help="no progress lines (notices about the run still print)")
    p.set_defaults(func=cmd_train)

    def run_command(name: str, help: str, func, device: str = "where to run the model (default cpu)",
                    default: str | None = "cpu") -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help, description=help)
        q.add_argument("run", type=user_path, metavar="RUN", help="a run directory written by `vaelab train`")
        q.add_argument("--device", default=default, type=device_arg, metavar="{auto,cpu,cuda,cuda:N}", help=device)
        q.set_defaults(func=func)
        return q

    q = run_command("evaluate", "the evaluation suite on the test set (ELBO, KL per dimension, active units, "
                                "I(x;z), linear probes, reconstruction error; NLL with --nll); writes "
                                "RUN/evaluation.json", cmd_evaluate)
    q.add_argument("--nll", action="store_true", help="log p(x) of the test set: importance-sampled for a VAE "
                   "(IWAE bound), exact for PCA")
    q.add_argument("--k", type=int, default=None, help="importance samples per test image (default 5000)")
    q.add_argument("--chunk", type=int, default=None,
                   help="samples per pass (memory knob; default 200, fewer for large outputs)")
    q.add_argument("--no-probe", action="store_true", help="skip the logistic-regression probes")
    q = sub.add_parser("compare", help="a table of several evaluated runs, printed and written as Markdown",
                       description="Compare runs by their evaluation.json (runs without one, or whose one is of an "
                                "earlier checkpoint or another vaelab's format, are evaluated again).")
    q.add_argument("runs", type=user_path, nargs="+", metavar="RUN")
    q.add_argument("--out", type=user_path, default=Path("compare.md"), help="Markdown file (default compare.md)")
    q.set_defaults(func=cmd_compare)
    q = run_command("sample", "a grid of samples from the prior, as PNG (sentences, as text, for text models)",
                    cmd_sample)
    q.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    q.add_argument("--nrow", type=int, default=None, help="images per row (default 8)")
    q.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="hvae: scale the priors' standard deviations by T (0 <= T <= 10; default 1)")
    q.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    q.add_argument("--out", type=user_path, help="PNG path (default RUN/samples.png; text models: RUN/samples.txt)")
    q = run_command("reconstruct", "test images and their reconstructions, as PNG", cmd_reconstruct)
    q.add_argument("--n", type=int, default=10, help="number of test images (1-100, default 10)")
    q.add_argument("--out", type=user_path, help="PNG path (default RUN/reconstructions.png; text models: .txt)")
    q = run_command("interpolate", "decode the line between the codes of two test images, as PNG",
                    cmd_interpolate)
    q.add_argument("--a", type=int, default=0, help="index of the first test image (default 0)")
    q.add_argument("--b", type=int, default=1, help="index of the second test image (default 1)")
    q.add_argument("--steps", type=int, default=10, help="images along the line (default 10)")
    q.add_argument("--out", type=user_path, help="PNG path (default RUN/interpolate-A-B.png; text models: .txt)")
    q = run_command("report", "write RUN/report.html with figures, metrics and the PCA/AE/VAE table", cmd_report,
                    "where the model runs and missing baselines train (default: the run's own device if this "
                    "machine has it, else cuda:0 for a GPU run on a machine with a GPU, else cpu)", default=None)
    q.add_argument("--no-baselines", action="store_true", help="do not train missing baselines for the table")
    q.add_argument("--quiet", action="store_true", help="no progress output")

    q = sub.add_parser("demo", help="train a VAE on the embedded MNIST digits and write its report (~1 min)",
                       description="Train PCA, an AE and a VAE on mnist5k and write the VAE's report.")
    q.add_argument("--out", type=user_path, default=Path("runs/demo"),
                   help="folder for the demo runs (default runs/demo)")
    q.add_argument("--epochs", type=int, default=30, help="VAE/AE epochs (default 30)")
    q.add_argument("--quiet", action="store_true", help="no progress output")
    q.set_defaults(func=cmd_demo)

    from .web import add_serve_command  # (FastAPI and uvicorn load only when `serve` runs)

    add_serve_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs a subcommand; vaelab errors and running out of memory become one line on stderr and
    exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        # a GPU this machine lacks: refused before any work, in the flag's words (runs.load would say "device");
        # train checks its device itself, after its torchrun checks and naming where it came from (demo has none)
        if args.func is not cmd_train and isinstance(getattr(args, "device", None), str):
            from .system import resolve_device

            resolve_device(args.device)
        return args.func(args)
    except VaelabError as e:
        print(f"vaelab: error{_rank()}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output piped into `head` and the like, which stopped reading: nothing is wrong
        sys.stderr.close()  # (and no second error when Python flushes stdout at exit)
        return 0
    except KeyboardInterrupt:
        after = {cmd_train: "; the last checkpoint is intact (resume with --resume)",
                 cmd_demo: "; the last checkpoint is intact (the same command continues the demo)"}
        print("vaelab: interrupted" + after.get(args.func, ""), file=sys.stderr)
        return 130
    except OSError as e:  # a named file the system refused (permissions, a full disk, a file where a folder
        if e.filename is None:  # should be): one line naming it; anything else is a bug to see whole
            raise
        target = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        print(f"vaelab: error{_rank()}: {e.strerror or e}: {target}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        message = out_of_memory_message(e, evaluating=getattr(args, "command", None) in ("evaluate", "compare"))
        if message is None:
            raise
        print(f"vaelab: error{_rank()}: {message}", file=sys.stderr)
        return 2


def _rank() -> str:
    """The suffix " (rank R)" in a job of several processes, where each prints its own errors; else ""."""
    return f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""



if __name__ == "__main__":
    sys.exit(main())

