"""Multi-process training on torch.distributed: what the trainer needs to know about its place in a job.

Started by torchrun (`torchrun --nproc_per_node=N -m vaelab train ...`), each process reads RANK,
LOCAL_RANK and WORLD_SIZE from the environment; the backend is nccl on CUDA and gloo on the CPU.
A plain `vaelab train` is a job of one process and does no collective work at all.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError, TrainingError
from .system import resolve_device


@dataclass(frozen=True)
class Job:
    """This process's place in the job: world size, global rank and rank on this machine."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes config, metrics, checkpoints and reports; the others only compute."""
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of t over all processes (t itself in a job of one)."""
        if self.world > 1:
            t = t.clone()
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether flag is true in every process (flag itself in a job of one)."""
        return flag if self.world == 1 else int(self.sum(torch.tensor(int(flag), device=device))) == self.world

    def barrier(self) -> None:
        """Wait until every process gets here (e.g. until rank 0 has written a checkpoint)."""
        if self.world > 1:
            tdist.barrier()

    def wrap(self, model: nn.Module, device: torch.device, *, sync_bn: bool = True) -> nn.Module:
        """DistributedDataParallel around the model in a job of several processes (gradients averaged).

        With sync_bn its batch-norm layers are synchronised in place (synchronise_batch_norm: the same
        parameters, buffers and state-dict keys): training statistics over the step's global batch, as in
        one process; without, each process normalises by its own share of the batch.
        """
        if self.world == 1 or not any(p.requires_grad for p in model.parameters()):
            return model
        if sync_bn:
            model = synchronise_batch_norm(model, device)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _gather_rows(row: torch.Tensor, group: tdist.ProcessGroup | None) -> torch.Tensor:
    """(world, k): every process's row, by an all-reduce of a table in which each process fills its own."""
    table = row.new_zeros(tdist.get_world_size(group), row.numel())
    table[tdist.get_rank(group)] = row
    tdist.all_reduce(table, group=group)
    return table


class _GlobalBatchNorm(torch.autograd.Function):
    """Training-mode batch norm over the job's global batch: one exchange forward, one backward.

    Forward: each process's (count, mean, biased variance) per channel, gathered and combined as Chan et
    al. (1979) combine partial moments (no cancellation of sums of squares); then torch's own batch-norm
    kernel normalises with the global statistics. Backward, with x^ = (x - mean) * invstd, the sums
    S_g = sum(g) and S_gx = sum(g x^) over the global batch (each process's from torch's kernel, then
    all-reduced) give dx = weight * invstd * (g - (S_g + x^ S_gx) / N); the weight and bias get this
    process's sums only, which DistributedDataParallel then averages like every other gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        var, mean = torch.var_mean(x, dims, correction=0)
        n = x.new_full((1,), x.numel() // x.shape[1])
        table = _gather_rows(torch.cat([n, mean, var]), group)  # (world, 1 + 2C)
        counts = table[:, :1]
        moments = torch.where(counts > 0, table[:, 1:], 0.0)  # a process without examples adds nothing
        means, variances = moments.split(x.shape[1], dim=1)
        count = counts.sum()
        mean = (counts * means).sum(0) / count
        var = (counts * (variances + (means - mean).square())).sum(0) / count  # biased, as batch norm normalises
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.eps, ctx.group, ctx.shape = count, eps, group, shape
        y = F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx, g, *_):
        x, weight, mean, invstd = ctx.saved_tensors
        _, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True])  # this process's sums
        totals = torch.cat([sum_g, sum_gx])
        tdist.all_reduce(totals, group=ctx.group)
        global_g, global_gx = totals.chunk(2)
        scale = invstd if weight is None else weight * invstd
        # dx = scale * (g - S_g / N - (x - mean) * invstd * S_gx / N), as a * g - b * x - c per channel
        b = scale * invstd * global_gx / ctx.count
        c = scale * global_g / ctx.count - b * mean
        shape = ctx.shape
        dx = (g * scale.view(shape)).sub_(x * b.view(shape)).sub_(c.view(shape))
        return (dx, sum_gx if ctx.needs_input_grad[1] else None, sum_g if ctx.needs_input_grad[2] else None,
                None, None)


class JobBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the job's global batch, for CPU (gloo) jobs.

    torch's SyncBatchNorm does this on GPUs only (DDP refuses it on the CPU, and its kernels have no CPU
    version). Here training mode runs _GlobalBatchNorm over the layer's process group (synchronise_batch_norm
    gives the layers a group apart from the one DDP's gradient all-reduces use) and running statistics
    update as BatchNorm's do (unbiased variance; momentum, or a cumulative average when momentum is
    None). Evaluation mode, and a job of one process, is BatchNorm's. Inputs of 2 or more dimensions,
    channels in dimension 1, as BatchNorm1d/2d/3d.
    """

    process_group = None  # the default group unless synchronise_batch_norm sets one

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions (batch, channels, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and tdist.is_initialized() and tdist.get_world_size(self.process_group) > 1):
            return super().forward(x)
        self._check_input_dim(x)
        y, mean, var, count = _GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps, self.process_group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * count / (count - 1).clamp_min(1), factor)
        return y


def synchronise_batch_norm(module: nn.Module, device: torch.device,
                           group: tdist.ProcessGroup | None = None) -> nn.Module:
    """Every BatchNorm layer below module, replaced in place by one computing training statistics over the
    job's global batch, sharing the layer's parameters and buffers (so state-dict keys do not change):
    torch's SyncBatchNorm on GPUs, JobBatchNorm on the CPU (in a new process group, unless one is given,
    and only if there is a layer to synchronise; every process of the job must call this together)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    layers = [(name, m) for name, m in module.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, JobBatchNorm)]
    if layers and group is None:
        group = tdist.new_group(backend="gloo")
    for name, layer in layers:
        synced = JobBatchNorm(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        synced.process_group = group
        synced.weight, synced.bias = layer.weight, layer.bias
        synced.running_mean, synced.running_var = layer.running_mean, layer.running_var
        synced.num_batches_tracked = layer.num_batches_tracked
        synced.train(layer.training)
        if not name:  # module is itself the layer
            return synced
        parent, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent), attribute, synced)
    return module


_alone = False  # set by single_process()


@contextlib.contextmanager
def single_process():
    """Within it, join() gives a job of one process whatever torchrun's environment says: for work a process does
    by itself after its job has left the process group (rank 0 training the report's baselines, which would
    otherwise wait for ever for processes that have exited)."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


API_DEVICE = "TrainConfig.device"  # how a Python user gives the device (vaelab.train(config)), for errors


def one_gpu_per_process(device_name: str, what: str = "--device") -> None:
    """A ConfigError for a device naming one GPU (cuda:N) in a torchrun job: every process would train on it.

    what: where the name came from (the flag, a resumed run's config.json, or API_DEVICE), for the error.
    """
    if device_name.startswith("cuda:"):
        fix = "use TrainConfig(device='cuda')" if what == API_DEVICE else "pass --device cuda"
        raise ConfigError(f"{what} {device_name} names one GPU, but under torchrun each process takes its own "
                          f"(cuda:LOCAL_RANK); {fix}, and CUDA_VISIBLE_DEVICES to choose the GPUs")


def check(device_name: str, what: str = "--device") -> tuple[Job, torch.device]:
    """This process's Job and device, with every refusal, without joining the process group (connect does).

    The Trainer calls it before it loads data and connect after, so a wrong device or environment is refused
    at once, not after a download or the full Fashion-MNIST (the CLI checks the flag earlier still; the Python
    API did not). what: where the device name came from, for the errors (one_gpu_per_process).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or _alone:
        return Job(), resolve_device(device_name, what)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    one_gpu_per_process(device_name, what)
    device = resolve_device(device_name, what)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(f"rank {rank} wants cuda:{local_rank} but this machine has "
                                f"{torch.cuda.device_count()} GPUs; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing and not tdist.is_initialized():  # torch's ValueError came as a traceback from inside its rendezvous
        unset = f"{' and '.join(missing)} {'are' if len(missing) > 1 else 'is'} not set"
        raise ConfigError(f"WORLD_SIZE is {world} but {unset}: start a job of several processes with torchrun "
                          "(which sets them), or unset WORLD_SIZE for one process")
    return Job(world=world, rank=rank, local_rank=local_rank), device


def connect(job: Job, device: torch.device) -> None:
    """Joins the process group of a job of several processes, as check() found them (nothing for one)."""
    if job.world == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def join(device_name: str) -> tuple[Job, torch.device]:
    """This process's Job and device; joins the process group when torchrun started several processes."""
    job, device = check(device_name)
    connect(job, device)
    return job, device


# How long a process of a job waits, without the GIL, after leaving its process group and before it exits.
# Each gradient all-reduce that DDP starts inside backward() captures torch's thread-local state, which holds a
# Python object (the contextvars copy torch.autograd stashes for the engine); a gloo worker thread that releases
# such a work needs the GIL. If the main thread reaches interpreter shutdown first, that thread's GIL request ends
# it inside a C++ destructor and torch 2.13 aborts the process ("terminate called without an active exception",
# SIGABRT). A 9-line DDP-on-gloo script under gdb: 3 of 26 launches aborted as they were, 0 of 40 with a 50 ms
# sleep after the barrier (the waiting worker takes the GIL and finishes); tests/test_distributed.py's resume
# test: 6 of 72 runs failed before this wait, 0 of 40 with it. Twice the measured wait, for busier machines.
EXIT_GRACE_S = 0.1


def leave(job: Job) -> None:
    """Leave the process group at the end of training (all processes together)."""
    if job.world > 1 and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
        time.sleep(EXIT_GRACE_S)  # let gloo's worker threads take the GIL and release their last works
