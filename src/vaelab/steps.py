"""The training step's pieces, below the Trainer's loop: the loss function of a run's objective, one step's
loss and metrics (eager or through torch.compile), the optimiser and its step, and loss terms averaged over a set.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import optimizer as optimizer_module
from torch.optim.adam import adam

from .config import RunConfig
from .errors import ConfigError
from .objectives import OBJECTIVES, reconstruction
from .system import in_eval_mode, model_device


@torch.no_grad()
@in_eval_mode
def mean_terms(model: nn.Module, loss_terms: Callable, x: torch.Tensor, *, batch_size: int = 1000,
               beta: float = 1.0) -> dict[str, float]:
    """Loss terms (from objective_for) averaged over x, in eval mode and batches (no gradients)."""
    device = model_device(model)
    sums: dict[str, float] = {}
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        for k, v in loss_terms(model, xb, beta=beta).items():
            sums[k] = sums.get(k, 0.0) + v.sum().item()
    return {k: v / x.shape[0] for k, v in sums.items()}


def _loss_terms(model: nn.Module, x: torch.Tensor, *, beta: float, objective: Callable, k: int | None,
                free_bits: float = 0.0, kl_balance: bool = False) -> dict[str, torch.Tensor]:
    out = model(x) if k is None else model(x, k=k)
    return objective(out, x, beta=beta, free_bits=free_bits, kl_balance=kl_balance)


def objective_for(config: RunConfig) -> Callable[..., dict[str, torch.Tensor]]:
    """loss_terms(model, x, beta=..., free_bits=...): a forward pass (K samples for IWAE), then the objective.

    Validation and evaluation call it with the defaults (beta=1, no free bits): the true bound.

    Autoencoders and PCA use their reconstruction loss; VAEs the configured --objective, with
    --k samples per example (the IWAE bound's K, or a K-sample average for the ELBO).
    """
    if config.model.model in ("ae", "pca"):
        return functools.partial(_loss_terms, objective=reconstruction, k=None)
    k = config.train.k
    return functools.partial(_loss_terms, objective=OBJECTIVES[config.train.objective],
                             k=k if k > 1 or config.train.objective == "iwae" else None)


def step_loss(loss_terms: Callable[..., dict[str, torch.Tensor]], net: nn.Module, x: torch.Tensor,
              **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A training step's summed loss, and its (loss, recon, kl) sums without gradients, for the metrics."""
    terms = loss_terms(net, x, **kwargs)
    loss = terms["loss"].sum()
    with torch.no_grad():
        totals = torch.stack([loss, terms["recon"].sum(), terms["kl"].sum()])
    return loss, totals


def compile_step(loss_terms: Callable[..., dict[str, torch.Tensor]], model: nn.Module,
                 x: torch.Tensor, **options: Any) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """step_loss with loss_terms through torch.compile; call it with beta as a 0-d tensor.

    Inductor fuses the elementwise work around the matmuls (likelihood, KL, reparameterisation, ReLUs) and
    runs the pass without Python: 5-15% per step for the MLP VAE on a CPU (benchmarks/train_speed.py).
    A tensor beta keeps KL warm-up from compiling a graph per value; shapes are static (the trainer runs
    the last, short batch of an epoch eagerly rather than compile it again). torch.distributions picks a KL
    function with min() over a generator, which dynamo cannot trace, so one eager pass on two examples (eval
    mode, no gradients, the random state restored after) fills its lookup table first and the step compiles
    as one graph. That pass takes the step's options (free bits and KL balancing ask for KLs per unit,
    another lookup) and a beta below 1, so that every KL the step can ask for has been looked up.
    """
    _look_up_kls(model, loss_terms, x, options)
    compiled = torch.compile(functools.partial(step_loss, loss_terms), dynamic=False)
    # dynamo leaves nn.LSTM/GRU out of its graphs unless allow_rnn is set (read at trace time: the first call),
    # and the text VAE's step was nine graphs around them. Traced, the step is one graph, 1.08x (LSTM) and
    # 1.19x (GRU) faster on a CPU than in pieces, after ~70 s of compiling instead of ~20
    # (benchmarks/text_step.py). The setting is patched for these calls only, never left on globally. (On a GPU
    # tracing would replace cuDNN's fused RNN kernels: not measured, not done.)
    rnns = x.device.type == "cpu" and any(isinstance(m, nn.RNNBase) for m in model.modules())
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)  # a torchrun job's model
    if not (rnns or ddp):
        return compiled

    def step(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with (torch._dynamo.config.patch(allow_rnn=True) if rnns else contextlib.nullcontext()), \
                (_quiet_profiler_note() if ddp else contextlib.nullcontext()):
            return compiled(*args, **kwargs)
    return step


class _ProfilerNoteFilter(logging.Filter):
    """Drops dynamo's "Profiler record function ... will be ignored": under torchrun each process printed it
    once, about DistributedDataParallel.forward's profiler range, which the step does not need."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Profiler record function %s will be ignored"


_DYNAMO_CONTEXTS_LOG = logging.getLogger("torch._dynamo.variables.ctx_manager")  # the logger that says it
_PROFILER_NOTE_FILTER = _ProfilerNoteFilter()


@contextlib.contextmanager
def _quiet_profiler_note() -> Iterator[None]:
    """Within it (a compiled step's calls: tracing happens in the first), that note is dropped; elsewhere,
    e.g. a user's own torch.compile, dynamo's log is left as it is."""
    _DYNAMO_CONTEXTS_LOG.addFilter(_PROFILER_NOTE_FILTER)
    try:
        yield
    finally:
        _DYNAMO_CONTEXTS_LOG.removeFilter(_PROFILER_NOTE_FILTER)


@in_eval_mode
def _look_up_kls(model: nn.Module, loss_terms: Callable[..., dict[str, torch.Tensor]], x: torch.Tensor,
                 options: dict[str, Any]) -> None:
    """compile_step's eager pass on two examples, in eval mode (the model's mode given back, also if it fails),
    without gradients, the random state restored after."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
        loss_terms(model, x[:2], beta=0.5, **options)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam over the model's parameters, fused where torch has the kernel."""
    try:  # the fused kernel is ~15% faster per step on CPU for these models
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def check_grad_clip(grad_clip: float | None, optimizer: torch.optim.Optimizer | None) -> None:
    """Refuse a --grad-clip under which Adam cannot step: clipped to a global norm c, n gradients have a root mean
    square of at most c / sqrt(n), and below Adam's eps its denominator sqrt(v) + eps is eps, so each step shrinks
    with the gradient (at 1e-30 the loss did not move in three epochs, without an error)."""
    if grad_clip is None or optimizer is None:
        return
    n = sum(p.numel() for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
    eps = min(group.get("eps", 0.0) for group in optimizer.param_groups)
    floor = eps * math.sqrt(n)
    if grad_clip < floor:
        raise ConfigError(f"--grad-clip {grad_clip:g} clips the gradients' global norm to at most {grad_clip:g}: "
                          f"over this model's {n:,} parameters that is at most {grad_clip / math.sqrt(n):.1g} each "
                          f"(root mean square), under Adam's eps {eps:g}, so its steps shrink with the gradients and "
                          f"training stalls; give --grad-clip {floor:.2g} or more (clip norms are usually 1-100), or "
                          "leave it out")


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step(); for a fused Adam whose state exists, its fused kernel called directly.

    The same kernel on the same state, without Optimizer.step's per-call bookkeeping (hooks, profiler
    ranges, state and device checks): ~0.1 ms, 2% of an MLP VAE's step on a CPU. Other optimizers and
    Adam variants, the first step (which creates the state) and hooked optimizers take optimizer.step().
    The step counts are advanced by one add on a tensor that holds them all (_step_counts).
    """
    hooks = [getattr(owner, name, True) for owner, name in (
        (optimizer, "_optimizer_step_pre_hooks"), (optimizer, "_optimizer_step_post_hooks"),
        (optimizer_module, "_global_optimizer_pre_hooks"), (optimizer_module, "_global_optimizer_post_hooks"))]
    plain = type(optimizer) is torch.optim.Adam and not any(hooks)
    updates = []
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        states = [optimizer.state.get(p) for p in params]
        if not (plain and group.get("fused") and all(states) and not any(p.is_complex() for p in params)
                and not any(group.get(k) for k in ("capturable", "differentiable", "decoupled_weight_decay"))):
            optimizer.step()
            return
        updates.append((group, params, states))
    for group, params, states in updates:
        beta1, beta2 = group["betas"]
        steps = [s["step"] for s in states]
        counts = _step_counts(params, states, steps)
        tensors = (params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                   [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], steps)
        options = dict(amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                       weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
        if counts is None or not all(isinstance(v, float) for v in (beta1, beta2, group["lr"])):
            adam(*tensors, fused=True, **options)
            continue
        # what torch.optim.adam._fused_adam does for one device and dtype, except that the counts advance in one
        # add: its torch._foreach_add_(steps, 1) falls back to an add and two scalar copies per parameter on a CPU
        # (~70 us a step for the MLP VAE's 14 parameters, ~1.5% of it)
        counts.add_(1)
        torch._fused_adam_(*tensors, grad_scale=None, found_inf=None, **options)


# the tensors _step_counts made, by id (a WeakSet compares tensors with ==); a user's views are not among them
_STEP_COUNTS: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def _step_counts(params: list[torch.Tensor], states: list[dict[str, Any]],
                 steps: list[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D tensor whose elements are these parameters' Adam step counts, each state's "step" a view of it;
    None where the parameters do not share a device and dtype (the fused kernel takes one of each).

    Made once: the states then hold the views, and it is made again when they no longer do, or hold more or
    fewer of them (a state loaded from a checkpoint, a parameter that got its first gradient).
    """
    counts = steps[0]._base if steps else None
    if (counts is not None and _STEP_COUNTS.get(id(counts)) is counts and counts.numel() == len(steps)
            and all(t._base is counts for t in steps)):
        return counts
    if not steps or len({(p.device, p.dtype) for p in params}) > 1 or any(t.dim() for t in steps):
        return None
    counts = torch.stack(steps)
    _STEP_COUNTS[id(counts)] = counts
    for i, state in enumerate(states):
        state["step"] = counts[i]
    steps[:] = [state["step"] for state in states]
    return counts
