"""Reduced-precision network evaluation: bf16 autocast where the device computes it natively."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_for", "bf16_native"]


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA, or a CPU with AVX512-BF16/AMX."""
    return device.type == "cuda" or (device.type == "cpu"
                                     and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX"))


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on ``device`` where it is native (:func:`bf16_native`); else a null context."""
    if enabled and bf16_native(device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
