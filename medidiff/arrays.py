"""Conversion of tensors, MONAI MetaTensors and array-likes to plain NumPy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy view or copy of ``a`` (tensor on any device, MetaTensor, array or sequence), without metadata."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        return (a.as_tensor() if hasattr(a, "as_tensor") else a).numpy()
    return np.asarray(a)
