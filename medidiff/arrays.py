"""Conversion of tensors, MONAI MetaTensors and array-likes to plain tensors and NumPy arrays (no metadata)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["plain", "to_numpy"]


def plain(a: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A plain tensor: a MetaTensor's data without its metadata, an array or sequence as a tensor.

    Args:
        a: a tensor (MetaTensor or not), NumPy array, number or sequence.
        dtype: cast to this type when given (no copy when it already has it).

    Returns:
        A ``torch.Tensor`` sharing memory with ``a`` where it can (same device).
    """
    if hasattr(a, "as_tensor"):
        t = a.as_tensor()
    elif isinstance(a, np.ndarray):
        t = torch.as_tensor(np.ascontiguousarray(a))  # negative strides (flipped arrays) are not tensors
    else:
        t = torch.as_tensor(a)
    return t if dtype is None else t.to(dtype)


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy view or copy of ``a`` (tensor on any device, MetaTensor, array or sequence), without metadata."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        return (a.as_tensor() if hasattr(a, "as_tensor") else a).numpy()
    return np.asarray(a)
