"""The machine: which device to use, where a model lives, and the memory allocator's behaviour."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from .config import device_name
from .errors import ConfigError

T = TypeVar("T")


_NOTED: set[Hashable] = set()  # the keys of notes given once, in this process


def note(text: str, *, once: Hashable | None = None) -> None:
    """"vaelab: note: text" on stderr, from rank 0 alone under torchrun; with `once`, only the first time that key
    is noted in this process (a note per split, per load or per process repeated itself)."""
    if os.environ.get("RANK", "0") != "0" or (once is not None and once in _NOTED):
        return
    if once is not None:
        _NOTED.add(once)
    print(f"vaelab: note: {text}", file=sys.stderr)


def cpu_info() -> dict[str, str]:
    """The CPU's "vendor" ("GenuineIntel", "AuthenticAMD", ...), "family", "model" and "name", as the first
    processor's block of /proc/cpuinfo gives them (Linux); elsewhere the vendor alone where
    platform.processor() names it (Windows: "Intel64 Family 6 ..., GenuineIntel"), else nothing."""
    fields = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "model name": "name"}
    cpu: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in fields and fields[key.strip()] not in cpu:
                    cpu[fields[key.strip()]] = value.strip()
                if not line.strip() and cpu:  # the first processor's block is enough
                    break
    except OSError:
        pass
    if "vendor" not in cpu:
        processor = platform.processor()
        cpu.update(("vendor", v) for v in ("GenuineIntel", "AuthenticAMD") if v in processor)
    return cpu


def resolve_device(name: str | torch.device, what: str = "--device") -> torch.device:
    """'auto' -> cuda when available, else cpu; cpu, cuda and cuda:N checked against what torch sees.

    what: how the caller's user gave the name (the flag, or the device argument of load), for errors.
    """
    if isinstance(name, torch.device):
        if name.type not in ("cpu", "cuda"):
            raise ConfigError(f"{what} {str(name)!r} is not a device vaelab runs on; use cpu or cuda")
        device = name
    elif device_name(name, what) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{what} {name} was asked for but torch sees no CUDA device; use cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{what} {name}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def model_tensor(module: nn.Module) -> torch.Tensor | None:
    """A parameter (or, for PCA, a buffer) of the model: its dtype and device are the model's.

    The first of parameters(), else of buffers(), found by walking the modules' own dictionaries in the same
    order: the input checks call it every training step, and parameters()' generators took ~10 us a call.
    """
    buffer = None
    stack = [module]
    while stack:
        m = stack.pop()
        for t in m._parameters.values():
            if t is not None:
                return t
        if buffer is None:
            buffer = next((t for t in m._buffers.values() if t is not None), None)
        stack.extend(reversed([c for c in m._modules.values() if c is not None]))
    return buffer


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (model_tensor), the CPU for a model with neither."""
    t = model_tensor(model)
    return torch.device("cpu") if t is None else t.device


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks instead of returning them to the OS (once per process).

    By default glibc serves blocks above 128 KiB with mmap and trims freed heap memory, so every
    training step page-faults its activations and gradients in again (~200 faults per step for the
    784-512-256 MLP VAE, ~15% of the step). Raising both thresholds keeps that memory for reuse:
    the effect PyTorch's CPU performance guide gets from jemalloc or tcmalloc. No-op elsewhere.
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 512 << 20))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


def _flushes_denormals() -> bool:
    """Whether this thread's floating-point unit treats denormal inputs as zero (read off one scalar product)."""
    tiny = torch.tensor([1], dtype=torch.int32).view(torch.float32)  # 1.4e-45, the smallest denormal
    return bool(tiny.mul(1.0).item() == 0)


def _on_every_thread(function) -> bool:
    """Run function() once on each thread of torch's OpenMP intra-op pool, the calling thread included.

    Through the OpenMP runtime's GOMP_parallel (libgomp's, which LLVM's and Intel's runtimes also export),
    with as many threads as torch uses: the team is the pool torch's own parallel regions run on. Returns
    False where that is not possible (another parallel backend, no such symbol), having run nothing.
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        gomp_parallel = ctypes.CDLL(None).GOMP_parallel  # the symbols already loaded (with torch's runtime)
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return False
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    callback = callback_type(lambda _: function())  # runs on each pool thread, taking the GIL in turn
    gomp_parallel.argtypes = [callback_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    gomp_parallel.restype = None
    gomp_parallel(callback, None, torch.get_num_threads(), 0)  # ctypes releases the GIL for the call
    return True


def in_eval_mode(function: Callable[..., T]) -> Callable[..., T]:
    """function(model, ...) run with the model in eval mode, which it is given back in the mode it had: helpers
    called on a model in training (text samples, latent statistics) left it in eval mode, with no dropout and
    frozen batch-norm statistics from then on."""
    @functools.wraps(function)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> T:
        was_training = model.training
        model.eval()
        try:
            return function(model, *args, **kwargs)
        finally:  # also when the model refuses its input
            model.train(was_training)
    return wrapper


@contextlib.contextmanager
def flush_denormals() -> Iterator[bool]:
    """Within it, CPU float arithmetic flushes denormal numbers (|x| < 1.2e-38) to zero, on every thread.

    Training produces denormals as it converges: sigmoid gradients of pixels the decoder is sure of
    (logits below -87), Adam's first moments of dead units decaying by 0.9 a step. Intel CPUs take a
    microcode assist for each one: an MLP VAE's step on Fashion-MNIST went from ~6 ms to 10-12 ms after
    ~700 steps (15-19 ms on uniform noise). Flush-to-zero and denormals-are-zero (what TensorFlow and
    XLA set for their CPU threads) cost nothing and change values only below 1.2e-38.

    torch.set_flush_denormal sets only the calling thread, and OpenMP workers copy the setting of the
    thread that creates them, so workers started earlier keep theirs: the setting is made on each thread
    of the pool. Yields whether it took effect everywhere (False on CPUs without the flags, or where the
    pool cannot be reached: then the calling thread and workers started later still flush). The previous
    state is restored on exit.
    """
    before = _flushes_denormals()  # already asked for on this thread: make the pool agree, and leave it so
    if not torch.set_flush_denormal(True):
        yield False
        return
    everywhere = torch.get_num_threads() == 1 or _on_every_thread(lambda: torch.set_flush_denormal(True))
    try:
        yield everywhere
    finally:
        if not before:
            torch.set_flush_denormal(False)
            # a context left open until the interpreter shuts down: its pool threads cannot take the GIL
            # any more (they exit trying), and the parallel region would wait for them for ever
            if everywhere and not sys.is_finalizing():
                _on_every_thread(lambda: torch.set_flush_denormal(False))
