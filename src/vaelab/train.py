"""The Trainer: one loop for every gradient-trained model, with schedules, checkpoints and resume.

The training set lives on the device as one tensor and batches are drawn by index permutation:
no DataLoader, no per-sample collation. Every epoch reseeds from (seed, epoch), so a run resumed
from a checkpoint continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, runs, stops
from .config import RunConfig, check_trainable
from .data import (
    Dataset,
    binarize,
    dequantize,
    fingerprint,
    load_dataset,
)
from .errors import CheckpointError, ConfigError, TrainingError, VaelabError, is_out_of_memory
from .flags import without_ignored_settings
from .models import PCA, build_model
from .models.common import has_prior
from .objectives import check_free_bits
from .prepare import EVAL_SEED, check_unchanged, prepare_data
from .schedules import check_cycles, kl_weight, learning_rate, resume_note, warmup_note
from .steps import (
    check_grad_clip,
    compile_step,
    make_optimizer,
    mean_terms,
    objective_for,
    optimizer_step,
    step_loss,
)
from .system import flush_denormals, keep_freed_memory

PROGRESS_EVERY = 20  # steps between progress-bar updates, which are also the NaN checks (one sync each)


def epoch_seed(seed: int, epoch: int, *rank: int) -> int:
    """A well-mixed seed per (run seed, epoch), and per process of a distributed job when rank is given."""
    return int(np.random.SeedSequence([seed, epoch, *rank]).generate_state(1)[0])


class Trainer:
    """Trains one run into its run directory; `fit` returns the trained model.

    Under torchrun each process trains a DistributedDataParallel replica: every step's global batch
    (N x --batch-size examples of a permutation all processes share) is split among them, gradients are
    averaged, metrics summed over processes, and only rank 0 writes to the run directory.

    Args:
        config: the run's configuration (input_shape may be left empty: it comes from the data).
        run_dir: where config.json, metrics.jsonl and checkpoints go.
        dataset: an already loaded Dataset (else config.data.name is loaded).
        progress: show a progress bar and per-epoch lines on stderr.
    """

    def __init__(self, config: RunConfig, run_dir: str | Path, *, dataset: Dataset | None = None,
                 progress: bool = True):
        self.run_dir = Path(run_dir)
        self.progress = progress
        # refused before the data loads, not after; named as a Python user gives it (vaelab train checks first)
        job, device = distributed.check(config.train.device, distributed.API_DEVICE)
        record = config.data.from_files and config.data.fingerprint is None and (dataset is None or
                                                                                dataset.prepared_as is None)
        if record:
            dataset = dataset if dataset is not None else load_dataset(config.data.name)
        self.data = prepare_data(config, dataset)  # (checks a fingerprint the config has)
        if record:
            config = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                          fingerprint=fingerprint(dataset)))
        model_config = dataclasses.replace(config.model, input_shape=self.data.shape,
                                           vocab_size=len(self.data.vocab) if self.data.is_text else None)
        self.config = dataclasses.replace(config, model=model_config)
        distributed.connect(job, device)
        self.job, self.device = job, device
        # steps per epoch: the job's global batches (the last may be short)
        self.steps = math.ceil(self.data.train.x.shape[0] / (config.train.batch_size * self.job.world))
        check_cycles(config.train, self.steps)
        if self.device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(config.train.seed)  # initial weights, the same in every process
        self.model = build_model(self.config.model).to(self.device)
        # what training steps call: DDP in a job of several
        self.net = self.job.wrap(self.model, self.device, sync_bn=self.config.train.sync_bn)
        self.loss_terms = objective_for(self.config)
        self.train_x = self.data.train.x.to(self.device)
        self.val_x = self.data.val.x.to(self.device)
        self.optimizer = None if isinstance(self.model, PCA) else make_optimizer(self.model, config.train.lr)
        self.parameters = list(self.model.parameters())
        # batch norm in training mode needs two examples for its statistics (BatchNorm1d raises, as a 1x1 feature
        # map's BatchNorm2d would): with batches of 2 or more, a one-example tail batch is skipped (the permutation
        # changes every epoch); --batch-size 1 is the user's choice (an HVAE's maps of 2x2 and more take it; config
        # refuses it for BN-VAE and for an HVAE whose coarsest scale is 1x1)
        self.has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self.min_batch = 2 if self.has_bn and config.train.batch_size >= 2 else 1
        self.compiled = None  # compile_step(...) with --compile, made at the first step
        self.compiled_batch = 0  # the batch size it compiled for
        # its beta: one 0-d tensor filled at every step (torch.tensor(beta) copied it from the host: on a GPU, a wait)
        self.compiled_beta = torch.zeros((), device=self.device)

    def _log(self, message: str, *, notice: bool = False) -> None:
        """Progress lines; a notice (what the run does differently from what was asked) shows under --quiet too."""
        if (self.progress or notice) and self.job.is_main:
            tqdm.write(message, file=sys.stderr)

    @contextlib.contextmanager
    def _by_rank_0(self, what: str) -> Iterator[None]:
        """Work rank 0 does alone while the other processes of a torchrun job wait; its refusal (a VaelabError) stops
        every process. The others went on, and printed the traceback of a collective whose peer had gone
        ("Connection closed by peer") under rank 0's one line."""
        failure = None
        try:
            yield
        except VaelabError as e:
            failure = e
        except OSError as e:  # (a metrics line or config.json on a full disk)
            where = f": {e.filename}" if e.filename else ""
            failure = CheckpointError(f"could not {what}: {runs.write_refusal(e)}{where}")
        if not self.job.all_true(failure is None, self.device):
            raise failure or TrainingError(f"rank 0 of this torchrun job could not {what} (its error says why)")

    def _save(self, state: dict[str, Any], record: dict[str, Any] | None = None) -> None:
        """Rank 0 appends the epoch's metrics and writes the checkpoint; every process waits for it."""
        with self._by_rank_0("save the run"):
            if self.job.is_main:
                if record is not None:
                    self._append_metrics(record)
                state = {**state, "processes": self.job.world}  # the global batch is --batch-size times this
                runs.save_checkpoint(self.run_dir, model=self.model, optimizer=self.optimizer, state=state)

    def fit(self, *, resume: bool = False) -> nn.Module:
        """Train from scratch (the run directory must not hold a run yet) or resume from its last checkpoint."""
        if isinstance(self.model, PCA):  # refusals that depend on the data come before anything is written
            self.model.check_data(self.train_x)
        if not resume:
            check_trainable(self.config, self.job.world)
            check_grad_clip(self.config.train.grad_clip, self.optimizer)
            check_free_bits(self.config.train.free_bits, self.train_x.shape[0])
        with contextlib.ExitStack() as held:
            # one trainer per run: a --resume started beside a live run pruned its half-written checkpoint, and both
            # appended metrics
            with self._by_rank_0("start the run"):
                if self.job.is_main:
                    held.enter_context(runs.training_lock(self.run_dir, create=not resume))
                    if not resume:
                        self._check_new_run()
            start_epoch = self._resume() if resume else self._start()
            if isinstance(self.model, PCA):
                model = self._fit_pca()
            else:
                # a new run's (a budgeted benchmark resumes to one more epoch at a time)
                if not resume and self.config.train.epochs and (note := warmup_note(self.config.train)):
                    self._log(note, notice=True)
                cpu = self.device.type == "cpu"  # converging models make denormals, which Intel CPUs compute slowly
                with flush_denormals() if cpu else contextlib.nullcontext():
                    for epoch in range(start_epoch, self.config.train.epochs + 1):
                        try:
                            record = self._epoch(epoch)
                        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
                            if not is_out_of_memory(e):
                                raise
                            raise stops.out_of_memory(self.config, self.run_dir, self.device, epoch) from None
                        self._save({"epoch": epoch, "complete": epoch == self.config.train.epochs,
                                    "metrics": record}, record)
                        self._log(_format_record(record, self.config.train.epochs))
                model = self.model.eval()
        distributed.leave(self.job)
        return model

    def _check_new_run(self) -> None:
        """Rank 0: the run directory must not hold a run yet (one stopped before its first checkpoint starts again)."""
        if (self.run_dir / "config.json").exists():
            try:
                runs.load_config(self.run_dir)
            except (ConfigError, CheckpointError):  # another tool's config.json: --resume would not help
                raise TrainingError(f"{self.run_dir} holds a config.json that is not a vaelab run's; choose "
                                    "another --out") from None
            if runs.has_checkpoint(self.run_dir) or not runs.unstarted(self.run_dir):
                raise TrainingError(f"{self.run_dir} already holds a run; pass --resume to continue it, "
                                    "or choose another --out")
            # stopped while writing its first checkpoint: nothing was trained, and --resume has nothing to load
            self._log(f"{self.run_dir} holds a run stopped before its first checkpoint: starting it again",
                      notice=True)

    def _start(self) -> int:
        with self._by_rank_0("write config.json"):  # (a full disk left the other processes waiting)
            if self.job.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.config.save(self.run_dir / "config.json")
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        self._save({"epoch": 0, "complete": self.config.train.epochs == 0})
        return 1

    def _resume(self) -> int:
        stored = runs.load_config(self.run_dir)
        if None not in (stored.data.fingerprint, self.config.data.fingerprint):  # (a config built in Python)
            check_unchanged(stored.data.name, self.config.data.fingerprint, stored.data.fingerprint)
        shape = self.config.model.input_shape
        if stored.model.input_shape not in (None, shape):  # an MLP's weights fit any shape of as many pixels
            raise TrainingError(f"--resume: {stored.data.name} now reads as examples of shape {shape}, the run trained "
                                f"on {stored.model.input_shape}: the data changed, or how vaelab reads it (README, "
                                "Data); resume on the data it trained on, or start a new --out")
        in_run, asked = _identity(stored), _identity(self.config)
        if in_run != asked:
            before, now = in_run.to_dict(), asked.to_dict()
            differ = ", ".join(f"{section}.{key} {before[section][key]!r} in the run, {value!r} here"
                               for section in ("data", "model", "train")
                               for key, value in now[section].items() if before[section][key] != value)
            raise TrainingError(f"--resume: the settings differ from {self.run_dir / 'config.json'} in more than "
                                f"--epochs/--lr/--device/--compile/--no-sync-bn ({differ}); resume with the run's own "
                                "settings, or start a new --out")
        checkpoint = runs.latest_checkpoint(self.run_dir)
        processes = checkpoint.state.get("processes", self.job.world)
        if "processes" not in checkpoint.state and checkpoint.epoch < self.config.train.epochs:
            self._log(f"note: {self.run_dir} does not record how many processes trained it (vaelab before "
                      f"2026-12-01): it goes on as a job of {self.job.world}; if it was a torchrun job of another "
                      "size, stop and resume it on that size, or its global batch changes", notice=True)
        elif processes != self.job.world and checkpoint.epoch < self.config.train.epochs:
            raise TrainingError(
                f"--resume: {self.run_dir} was trained on {processes} process(es), this job has {self.job.world}: each "
                f"step's batch is --batch-size per process, so the run would go on with another global batch and "
                f"not reach its result; resume it on {processes} (torchrun --nproc_per_node ...), or start a new --out")
        runs.load_weights(self.model, checkpoint)
        if self.optimizer is not None:
            runs.load_optimizer(self.optimizer, checkpoint)  # (its saved rate is replaced at every step)
        self.job.barrier()  # everyone has read the checkpoint before rank 0 writes anything
        # at or past --epochs nothing is trained, and the run keeps the settings it was trained with (it took
        # on the --lr or smaller --epochs of a resume that changed nothing)
        idle = checkpoint.epoch >= self.config.train.epochs
        with self._by_rank_0("resume the run"):  # (a full disk left the other processes waiting)
            if self.job.is_main:
                if self.config.train != stored.train and not idle:
                    self.config.save(self.run_dir / "config.json")  # training extended (or shortened) by --epochs
                kept = [r for r in runs.read_metrics(self.run_dir) if r.get("epoch", 0) <= checkpoint.epoch]
                runs.atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        if self.job.is_main:
            self._log(f"resuming {self.run_dir} after epoch {checkpoint.epoch}")
            last = next((r for r in kept if r.get("epoch") == checkpoint.epoch), None)
            if not idle and (note := resume_note(stored.train, self.config.train, checkpoint.epoch, last)):
                self._log(note, notice=True)
        return checkpoint.epoch + 1

    def _fit_pca(self) -> nn.Module:
        t0 = time.perf_counter()
        self.model.fit(self.train_x)
        val = mean_terms(self.model, self.loss_terms, self.val_x)
        record = _without_kl_unless(False, {"epoch": 1, "seconds": time.perf_counter() - t0,
                                            **{f"val_{k}": v for k, v in val.items()}})
        self._save({"epoch": 1, "complete": True, "metrics": record}, record)
        return self.model.eval()

    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, job = self.config.train, self.job
        n = self.train_x.shape[0]
        global_batch, steps = cfg.batch_size * job.world, self.steps
        torch.manual_seed(epoch_seed(cfg.seed, epoch, job.rank))  # reparameterisation noise, per process
        noise = torch.Generator(device=self.device).manual_seed(epoch_seed(cfg.seed, epoch, job.rank))
        shared = torch.Generator(device=self.device).manual_seed(epoch_seed(cfg.seed, epoch))
        perm = torch.randperm(n, generator=shared, device=self.device)  # the same in every process
        dynamic = self.config.data.binarize == "dynamic"
        dequantized = self.config.data.dequantize
        self.model.train()
        totals = torch.zeros(3, device=self.device)  # loss, recon, kl summed over examples
        examples = stepped = 0  # this process's weighted examples; the job's steps (the same in every process)
        beta, lr = kl_weight(cfg, epoch - 1), learning_rate(cfg, epoch - 1)  # (as logged if no step ran)
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=None if self.progress and job.is_main else True,  # None: only on a terminal
                   file=sys.stderr, dynamic_ncols=True)
        for i in range(steps):
            step_idx = perm[i * global_batch:(i + 1) * global_batch]
            if self.has_bn and step_idx.numel() < job.world * self.min_batch:  # a tail too short to give every
                break  # process its minimum is skipped (an example in batch norm's statistics counts, weight or not)
            mine, weight = step_idx[job.rank::job.world], 1.0
            if not mine.numel():  # a tail shorter than the job (one process trained on it, two skipped it): this
                mine, weight = step_idx[:1], 0.0  # process steps on an example weighted 0, joining the all-reduce
            xb = torch.index_select(self.train_x, 0, mine)  # faster than x[idx]
            if dynamic:
                xb = binarize(xb, noise)
            elif dequantized:  # fresh noise every batch, as for dynamic binarisation
                xb = dequantize(xb, noise)
            beta = kl_weight(cfg, epoch - 1 + i / steps)
            lr = learning_rate(cfg, epoch - 1 + i / steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, step_totals = self._step_loss(xb, beta)
            # the mean over the step's global batch: DDP averages gradients over the job's processes
            loss = loss * (weight * job.world / step_idx.numel())
            if cfg.spectral_reg:  # NVAE's spectral regulariser, lambda * sum_i sigma_max(W_i) (Sec. 3.3.2)
                loss = loss + cfg.spectral_reg * self.model.spectral_penalty()
            for p in self.parameters:  # what zero_grad(set_to_none=True) does, without its bookkeeping
                p.grad = None
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.parameters, cfg.grad_clip)
            optimizer_step(self.optimizer)
            totals += weight * step_totals
            examples += int(weight) * mine.numel()
            stepped += 1
            if (i + 1) % PROGRESS_EVERY == 0 or i + 1 == steps:
                self._check_finite(totals, epoch, i + 1)
                bar.set_postfix(loss=f"{totals[0].item() / max(examples, 1):.2f}", refresh=False)
                bar.update((i + 1) - bar.n)
        bar.close()
        if stepped == 0:  # (the same in every process: they share the permutation)
            raise TrainingError(f"no training step in epoch {epoch}: the training split has {n} example(s), fewer "
                                f"than the {job.world * self.min_batch} a step needs here; give more data")
        # over all processes: logged losses cover all the data
        sums = job.sum(torch.cat([totals, totals.new_tensor([float(examples)])]))
        seconds = time.perf_counter() - t0
        val = self._validate()
        self._check_finite(torch.tensor(list(val.values()), dtype=torch.float64), epoch, steps, where="validation loss")
        self._check_finite_state(epoch, steps)
        loss, recon, kl = (sums[:3] / sums[3]).tolist()
        return _without_kl_unless(has_prior(self.model), {
            "epoch": epoch, "step": epoch * steps, "beta": beta, "lr": lr,
            "train_loss": loss, "train_recon": recon, "train_kl": kl, **{f"val_{k}": v for k, v in val.items()},
            "seconds": seconds, "samples_per_s": float(sums[3]) / seconds})

    def _step_loss(self, xb: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """step_loss for a training step: eager, or compiled with --compile."""
        cfg = self.config.train
        options = {"free_bits": cfg.free_bits, "kl_balance": cfg.kl_balance}
        first = cfg.compile and self.compiled is None
        if first:
            self.compiled = compile_step(self.loss_terms, self.net, xb, **options)
            self.compiled_batch = xb.shape[0]
        if not cfg.compile or xb.shape[0] != self.compiled_batch:
            # an epoch's last, short batch runs eagerly: compiling its own graph cost ~8 s for a small MLP VAE
            # and ~75 s for the text VAE's traced RNNs (README), to save a fraction of one step per epoch
            return step_loss(self.loss_terms, self.net, xb, beta=beta, **options)
        try:
            return self.compiled(self.net, xb, beta=self.compiled_beta.fill_(beta), **options)
        except Exception as e:  # inductor's failures come as many types; the eager pass below tells them apart
            if not first or isinstance(e, (TrainingError, ConfigError)) or is_out_of_memory(e):
                raise
            step_loss(self.loss_terms, self.net, xb, beta=beta, **options)
            reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise TrainingError(f"--compile: torch.compile could not compile the training step ({reason}); "
                                "train without --compile") from None

    def _validate(self) -> dict[str, float]:
        """The true bound (beta 1, no free bits) on the validation set, each process on its share."""
        torch.manual_seed(EVAL_SEED + self.job.rank)  # the same noise for every validation pass
        mine = self.val_x[self.job.rank::self.job.world]
        local = mean_terms(self.model, self.loss_terms, mine) if mine.shape[0] else {}
        keys = ("loss", "recon", "kl")
        sums = torch.tensor([local.get(k, 0.0) * mine.shape[0] for k in keys] + [float(mine.shape[0])],
                            dtype=torch.float64, device=self.device)
        sums = self.job.sum(sums)
        return {k: float(sums[j] / sums[3]) for j, k in enumerate(keys)}

    def _check_finite(self, sums: torch.Tensor, epoch: int, step: int, where: str = "training loss") -> None:
        if not bool(torch.isfinite(sums).all()):
            raise stops.non_finite(self.config, self.run_dir, epoch, step, where)

    def _check_finite_state(self, epoch: int, step: int) -> None:
        if (bad := stops.non_finite_state(self.model, self.optimizer)) is not None:
            raise stops.non_finite(self.config, self.run_dir, epoch, step, f"{bad} (with a finite loss)")

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def _identity(config: RunConfig) -> RunConfig:
    """What must not change when a run is resumed: everything but the epoch budget, the learning rate (to
    fine-tune at a lower one; each epoch's rate is in metrics.jsonl), the device, --compile and --no-sync-bn;
    settings the model ignores do not count (a new run drops them from config.json; older runs kept them)."""
    config = without_ignored_settings(config)[0]
    train = dataclasses.replace(config.train, epochs=0, lr=max(1.0, config.train.lr_min), device="auto",
                                compile=False, sync_bn=True)
    return dataclasses.replace(config, train=train, model=dataclasses.replace(config.model, input_shape=None),
                               data=dataclasses.replace(config.data, fingerprint=None))  # checked in _resume


def _without_kl_unless(has_kl: bool, record: dict[str, Any]) -> dict[str, Any]:
    """An epoch's metrics; PCA and autoencoders have no KL term to log (its 0 read as a collapsed posterior)."""
    return record if has_kl else {k: v for k, v in record.items() if k not in ("beta", "train_kl", "val_kl")}


def _format_record(r: dict[str, Any], epochs: int) -> str:
    kl = f", kl {r['val_kl']:.2f}" if "val_kl" in r else ""
    return (f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.2f}  val {r['val_loss']:.2f} "
            f"(recon {r['val_recon']:.2f}{kl})  {r['samples_per_s']:.0f} samples/s")


def train(config: RunConfig, run_dir: str | Path, *, resume: bool = False, dataset: Dataset | None = None,
          progress: bool = True) -> nn.Module:
    """Train (or resume) a run; returns the trained model in eval mode.

    Args:
        config: flags as a RunConfig.
        run_dir: the run directory (created).
        resume: continue from the run directory's last checkpoint.
        dataset: data already in memory (e.g. from `vaelab.data.load_dataset`), else config.data.name.
        progress: show progress on stderr.
    """
    if not isinstance(config, RunConfig):
        raise ConfigError(f"train: config must be a vaelab.config.RunConfig, got {type(config).__name__} (e.g. "
                          "RunConfig(data=DataConfig(name='digits')), or RunConfig.from_dict(a config.json's dict))")
    if dataset is not None and not isinstance(dataset, Dataset):
        raise ConfigError(f"train: dataset must be a vaelab.data.Dataset (from vaelab.data.load_dataset), "
                          f"got {type(dataset).__name__}")
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ConfigError(f"train: run_dir {run_dir} is a file; give a folder for the run (vaelab creates it)")
    if not resume:  # (a run of an older vaelab resumes with the settings it has)
        config, ignored = without_ignored_settings(config)
        if ignored:
            warnings.warn(f"vaelab.train: {ignored}", UserWarning, stacklevel=2)
    return Trainer(config, run_dir, dataset=dataset, progress=progress).fit(resume=resume)
