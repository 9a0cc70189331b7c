"""Reduced-precision network evaluation: bf16 autocast where the device computes it natively."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_for", "bf16_native", "Autocast"]


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA, or a CPU with AVX512-BF16/AMX."""
    return device.type == "cuda" or (device.type == "cpu"
                                     and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX"))


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on ``device`` where it is native (:func:`bf16_native`); else a null context."""
    if enabled and bf16_native(device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Autocast(torch.nn.Module):
    """A denoiser ``D(x_t, t) -> x0_hat`` evaluated under :func:`autocast_for`; its output keeps ``x_t``'s dtype.

    Args:
        denoiser: the wrapped denoiser (its ``process`` stays reachable).
        enabled: ``False`` makes the wrapper a plain pass-through.
    """

    def __init__(self, denoiser, enabled: bool = True):
        super().__init__()
        self.denoiser, self.enabled = denoiser, bool(enabled)

    @property
    def process(self):
        return self.denoiser.process

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with autocast_for(x.device, self.enabled):
            out = self.denoiser(x, t, *args, **kwargs)
        return out.to(x.dtype)
