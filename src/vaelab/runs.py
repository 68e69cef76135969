"""Run directories on disk: atomic writes, checkpoints (safetensors + JSON, never pickled code), loading.

A run directory holds:
    config.json                  the RunConfig (strict JSON)
    metrics.jsonl                one JSON object per epoch
    checkpoints/latest.json      {"epoch": N, "dir": "epoch-000N"}, replaced atomically
    checkpoints/epoch-000N/      model.safetensors, optimizer.pt (tensors only), trainer.json
                                 (epoch-000N-<random> when epoch N is written a second time)
    report.html, figures/        written by `vaelab report`
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import RunConfig
from .errors import CheckpointError, ConfigError, VaelabError
from .fileio import atomic_write_text, fsync_dir, usual_mode
from .models import build_model
from .system import note, resolve_device

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / torch.compile wrappers, so no prefixes reach the disk."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory on disk and the trainer state stored with it."""

    path: Path
    epoch: int
    state: dict[str, Any]

    @property
    def complete(self) -> bool:
        """Whether training reached the end of its epochs with this checkpoint."""
        return bool(self.state.get("complete"))


def save_checkpoint(run_dir: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoints/epoch-N atomically (build in a temporary folder, then rename), then point latest.json at it."""
    epoch = int(state["epoch"])
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".partial"))
        tmp.chmod(usual_mode(directory=True))
        weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
        save_file(weights, tmp / "model.safetensors", metadata={"format": "vaelab", "epoch": str(epoch)})
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps(state, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(usual_mode())
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        final, replaced = root / name, None
        if final.exists():
            # The same epoch written again (a PCA run refitted on --resume): latest.json may point at the old
            # folder, so the new one takes a fresh name and the old one goes only once latest.json has moved.
            final, replaced = root / f"{name}-{uuid.uuid4().hex[:8]}", final
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, json.dumps({"epoch": epoch, "dir": final.name}) + "\n")
    except BaseException as e:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if _write_failure(e):  # a full disk (or a folder made read-only): tracebacks from safetensors and torch.save
            raise CheckpointError(f"cannot write checkpoint {name} into {root} ({write_refusal(e)}); the last good "
                                  "checkpoint is intact: free space there and --resume") from None
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    _prune(root, keep=keep, current=final.name)
    return final


def _write_failure(e: BaseException) -> bool:
    """Whether e is a file write refused by the system, as each writer of a checkpoint reports it."""
    text = str(e)
    return (isinstance(e, (OSError, SafetensorError)) or
            isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text))


def write_refusal(e: BaseException) -> str:
    """The system's words for a refused write: "No space left on device", or the first line of the message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).splitlines() or [type(e).__name__])[0]


def _epoch_folders(root: Path) -> list[Path]:
    """The checkpoint folders epoch-N (or epoch-N-xxxxxxxx) under root, oldest first by N (as text, epoch-9999
    sorted after epoch-10003 and was kept for good)."""
    def epoch(path: Path) -> int:
        number = path.name.split("-")[1]
        return int(number) if number.isdigit() else -1

    return sorted((p for p in root.glob("epoch-*") if p.is_dir()), key=lambda p: (epoch(p), p.name))


LOCK = ".lock"


@contextlib.contextmanager
def training_lock(run_dir: Path, *, create: bool = True) -> Iterator[None]:
    """Hold RUN/.lock (an advisory lock the system drops when the process ends) while training the run; a second
    trainer of it is refused with the first one's process id. create: make the run folder (a new run)."""
    run_dir = Path(run_dir)
    made = create and not run_dir.exists()
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # (Windows: no lock)
        fcntl = None
    if fcntl is None or not run_dir.is_dir():  # (a resume of a folder that is not there says so itself)
        yield
        return
    lock = run_dir / LOCK
    kept = lock.exists()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, usual_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            who = f"another process (PID {holder})" if holder else "another process"
            raise CheckpointError(f"{run_dir} is being trained by {who}; let it finish or stop it first "
                                  "(--resume then continues the run)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield
        except VaelabError:  # a refused run writes nothing: the lock goes (and the folder it made, if empty)
            if not kept:
                lock.unlink(missing_ok=True)
                if made and not any(run_dir.iterdir()):
                    run_dir.rmdir()
            raise
    finally:
        os.close(fd)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run got as far as a checkpoint (latest.json, or a checkpoint folder it would fall back to)."""
    root = Path(run_dir) / CHECKPOINTS
    return (root / LATEST).exists() or bool(_epoch_folders(root))


def unstarted(run_dir: Path) -> bool:
    """Whether a run folder shows no sign of training: no metrics line and no evaluation (a run stopped while its
    first checkpoint was written; one whose checkpoints were deleted afterwards still has its metrics)."""
    run_dir = Path(run_dir)
    return not read_metrics(run_dir) and not (run_dir / "evaluation.json").exists()


def _prune(root: Path, *, keep: int, current: str) -> None:
    """Keep the newest `keep` checkpoints, and remove what writes killed outright left (a .partial folder holds a
    copy of the weights and optimiser; only one process writes a run's checkpoints)."""
    done = [p for p in _epoch_folders(root) if p.name != current]
    for old in done[: max(0, len(done) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for debris in root.glob(".epoch-*.partial"):
        shutil.rmtree(debris, ignore_errors=True)
    for debris in root.glob(f".{LATEST}.*.tmp"):
        debris.unlink(missing_ok=True)


def _other_checkpoint(root: Path, damaged: Path | None = None, *, also: bool = True) -> str:
    """How to fall back to the newest other checkpoint folder whose trainer.json and weights read (finite): "; the
    run also holds epoch-0002: to use it, write {...} into .../latest.json", or "" when there is none (a run keeps
    two). (A fallback that was as damaged sent the user round in a circle.)"""
    for path in reversed(_epoch_folders(root)):
        if path == damaged:
            continue
        try:
            epoch = int(json.loads((path / "trainer.json").read_text())["epoch"])
            weights = load_file(path / "model.safetensors")
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            continue
        if _non_finite(weights) is not None:
            continue
        pointer = json.dumps({"epoch": epoch, "dir": path.name})
        return f"; the run {'also ' if also else ''}holds {path.name}: to use it, write {pointer} into {root / LATEST}"
    return ""


def latest_checkpoint(run_dir: Path) -> Checkpoint:
    """The checkpoint latest.json points to, with clear errors when it is missing or damaged (naming an
    intact earlier checkpoint to go back to, when the run has one)."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    try:
        raw = json.loads(pointer.read_text())
        path = root / str(raw["dir"])
        epoch = int(raw["epoch"])
    except FileNotFoundError:
        fallback = _other_checkpoint(root, also=False)
        raise CheckpointError(f"{pointer} is missing" + fallback if fallback else
                              f"{run_dir} has no checkpoint ({pointer} is missing); train it first") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pointer} is damaged ({e})"
                              + (_other_checkpoint(root) or "; train the run again")) from None
    if path.parent != root or not path.is_dir():
        raise CheckpointError(f"{pointer} points at {path}, which is not a checkpoint folder in {root}"
                              + _other_checkpoint(root))
    try:
        state = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'trainer.json'} is unreadable ({e}); the checkpoint is damaged"
                              + _other_checkpoint(root, path)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / 'trainer.json'} is not a JSON object; the checkpoint is damaged"
                              + _other_checkpoint(root, path))
    if state.get("epoch") != epoch:  # an edited pointer: resume would number the epochs after it from there
        raise CheckpointError(f"{pointer} says epoch {epoch}, but {path.name} holds epoch {state.get('epoch')!r}; "
                              f"write {json.dumps({'epoch': state.get('epoch'), 'dir': path.name})} into it")
    return Checkpoint(path=path, epoch=epoch, state=state)


def finished(checkpoint: Checkpoint, config: RunConfig) -> bool:
    """Whether `checkpoint` ends the training `config` asks for. A resume with more --epochs writes them into
    config.json before it trains, so a resume cut off leaves a checkpoint complete for the old length only."""
    return checkpoint.complete and (config.model.model == "pca" or checkpoint.epoch >= config.train.epochs)


def is_complete(run_dir: Path) -> bool:
    """Whether a run directory holds a run trained to the end of its epochs."""
    try:
        return finished(latest_checkpoint(run_dir), load_config(run_dir))
    except (CheckpointError, ConfigError):
        return False


def load_weights(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Load model.safetensors into `model` (strict: every key must match)."""
    file = checkpoint.path / "model.safetensors"
    try:
        weights = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); it is truncated or tampered with"
                              + _other_checkpoint(checkpoint.path.parent, checkpoint.path)) from None
    # training stops before it saves a non-finite value (vaelab.stops), so one here is damage: a flipped
    # exponent bit reads as inf or NaN, and every later command would fail deep inside torch
    damaged = _non_finite(weights)
    if damaged is not None:
        raise CheckpointError(f"{file} holds NaN or infinite values in {damaged}; it is damaged"
                              + _other_checkpoint(checkpoint.path.parent, checkpoint.path))
    try:
        unwrap(model).load_state_dict(weights, strict=True)
    except RuntimeError as e:  # torch's first line is "Error(s) in loading state_dict for VAE:"; the next says what
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{file} does not match the model config.json describes ({detail}); was config.json "
                              "edited, or (for --data folder:/npz:/npy:) has the data's image size or channel count "
                              "changed, or how vaelab reads it (README, Data)? Restore it") from None


def _non_finite(weights: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    return next((name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def load_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Load optimizer.pt with weights_only=True: plain tensors and containers, never code."""
    file = checkpoint.path / "optimizer.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError, ValueError, KeyError: all mean "damaged"
        kind = type(e).__name__
        raise CheckpointError(f"{file} cannot be loaded safely ({kind}); it is damaged or not vaelab's"
                              + _other_checkpoint(checkpoint.path.parent, checkpoint.path)) from None
    _match_layouts(optimizer)


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments) its parameter's memory layout.

    torch's fused Adam on CPU walks parameter, gradient and moments as flat memory: a channels-last parameter
    with contiguous moments (say, from a checkpoint written before the model went channels-last) is updated
    with the wrong moments, silently. The saved values are kept, only their layout changes.
    """
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def load_config(run_dir: Path) -> RunConfig:
    """The RunConfig of a run directory (with a note on stderr, once, for a run on the user's files that records no
    hash of them: nothing can tell whether they still read as they did)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; give the --out folder of a `vaelab train` run")
    try:
        config = RunConfig.load(run_dir / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if config.data.from_files and config.data.fingerprint is None:
        note(f"{run_dir} records no hash of its data (runs trained before 2026-12-01, or in Python on a data set "
             f"passed in prepared), so nothing checks that {config.data.name} still reads as it did; how files are "
             "read has changed (README, Data: uint16 arrays, hidden files, EXIF rotation, RGBA): if its numbers look "
             "wrong, train it again", once=("unhashed", run_dir.resolve()))
    return config


def load(run_dir: str | Path, *, device: str | torch.device = "cpu", checkpoint: Checkpoint | None = None) -> nn.Module:
    """The trained model of a run directory, in eval mode, from config.json and the latest checkpoint.

    Args:
        run_dir: the folder `vaelab train --out` wrote.
        device: where to put the model.
        checkpoint: the checkpoint to load (default latest_checkpoint(run_dir), read now), for a caller that
            read it already and must get the weights of that epoch even while training writes newer ones.
    """
    config = load_config(Path(run_dir))
    try:
        model = build_model(config.model)
    except ConfigError as e:  # e.g. config.json edited to a model too large to build, or without input_shape
        raise CheckpointError(f"{Path(run_dir) / 'config.json'} describes no model vaelab can build: {e}") from None
    load_weights(model, checkpoint or latest_checkpoint(Path(run_dir)))
    return model.to(resolve_device(device, "device")).eval()


_RECORD_KEYS = ("val_loss", "val_recon")  # in every epoch's record, whatever the model (PCA's has no train_loss)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of metrics.jsonl (empty when there are none yet).

    A damaged line is skipped, not the rest of the file (a resume rewrites the file from these records): one
    cut by a crash, or edited into something that is not a record (null, a list, an epoch that is not a whole
    number, a loss that is not a number), which reports, resume and the explorer would otherwise trip over.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except (json.JSONDecodeError, RecursionError):
            continue
        if _is_record(record):
            records.append(record)
    return records


def _is_record(record: Any) -> bool:
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return (isinstance(record, dict) and number(record.get("epoch")) and isinstance(record["epoch"], int)
            and record["epoch"] >= 0 and all(number(record.get(key)) for key in _RECORD_KEYS)
            and ("train_loss" not in record or number(record["train_loss"])))
