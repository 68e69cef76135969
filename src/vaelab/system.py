"""The machine: which device to use, where a model lives, and the memory allocator's behaviour."""
from __future__ import annotations

import ctypes
import functools
import sys

import torch
from torch import nn

from .errors import TrainingError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


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
