"""Small shape helpers shared by the core: broadcasting per-sample values, batched times."""

from __future__ import annotations

import torch


def bcast(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample value of shape ``(B,)`` (or a scalar) against ``x`` of shape ``(B, C, *spatial)``.

    Args:
        v: a tensor of shape ``(B,)``, a 0-d tensor or a Python number.
        x: the tensor to broadcast against.

    Returns:
        ``v`` viewed as ``(B, 1, ..., 1)`` with ``x.ndim`` dimensions, on ``x``'s device and dtype.
    """
    v = torch.as_tensor(v, device=x.device, dtype=x.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Times as a ``(B,)`` float tensor matching ``x``'s batch, device and dtype (a scalar is repeated)."""
    t = torch.as_tensor(t, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t
