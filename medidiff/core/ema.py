"""Exponential moving average of model weights (Polyak averaging, as used by Ho et al. 2020)."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * weights`` after each ``update``.

    Args:
        model: the trained module (its parameters and floating-point buffers are averaged).
        decay: the averaging factor.
        warmup: with warm-up, the effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n``
            updates, so early averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        d = self.current_decay()
        for s, p in zip(self.shadow.state_dict().values(), model.state_dict().values()):
            if s.dtype.is_floating_point:
                s.lerp_(p.detach().to(s.dtype), 1 - d)
            else:
                s.copy_(p)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        self.shadow.load_state_dict(state["shadow"])

    @contextmanager
    def swapped(self, model: nn.Module):
        """Temporarily load the averaged weights into ``model`` (e.g. for validation or samples)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow.state_dict())
        try:
            yield model
        finally:
            model.load_state_dict(backup)
