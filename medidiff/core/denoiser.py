"""The one model contract: a denoiser ``D(x_t, t) -> x0_hat``.

A network predicts one of four targets (its *parametrisation*); ``Denoiser`` turns any of them into
the posterior-mean estimate ``x0_hat`` that every sampler consumes, given the process's
``(alpha, sigma)`` at ``t``. With ``x_t = alpha x0 + sigma eps``:

- ``eps``: the noise (Ho et al. 2020); ``x0 = (x_t - sigma eps) / alpha``;
- ``x0``: the clean image;
- ``v``: ``v = alpha eps - sigma x0`` (Salimans & Ho 2022); ``x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)``;
- ``score``: the network output divided by ``sigma`` is the score (Song & Ermon 2020, sec. 4.2),
  ``x0 = (x_t + sigma * out) / alpha``.

Conditioning images (for segmentation, guidance maps...) are concatenated to the network input along
the channel axis. A class-conditional network (classifier-free guidance, ``medidiff.core.cfg``) takes
``class_labels``: ``D(x_t, t, class_labels=y)`` passes ``y`` (an int or a ``(B,)`` tensor) to the network as
``net(x, t_net, class_labels=y)``; without them the network is called as ``net(x, t_net)``, as always, so the
contract ``D(x_t, t)`` is unchanged for every other network (and a class-conditional ``medidiff.nets.UNet``
called without a class uses its null class: it is then the unconditional model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .processes import Process
from .utils import batch_time, bcast

__all__ = ["Denoiser", "PARAMETRISATIONS", "x0_from_output", "target_for", "eps_from_x0", "score_from_x0",
           "class_batch"]

PARAMETRISATIONS = ("eps", "x0", "v", "score")


def x0_from_output(kind: str, out: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Convert a network output of parametrisation ``kind`` into ``x0_hat`` (alpha, sigma broadcastable)."""
    if kind == "eps":
        return (x_t - sigma * out) / alpha
    if kind == "x0":
        return out
    if kind == "v":
        return (alpha * x_t - sigma * out) / (alpha**2 + sigma**2)
    if kind == "score":
        return (x_t + sigma * out) / alpha
    raise ValueError(f"unknown parametrisation {kind!r}; choose one of {PARAMETRISATIONS}")


def target_for(kind: str, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The regression target of parametrisation ``kind`` for ``x_t = alpha x0 + sigma eps``."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "score":
        return -eps
    raise ValueError(f"unknown parametrisation {kind!r}; choose one of {PARAMETRISATIONS}")


def eps_from_x0(x_t: torch.Tensor, x0_hat: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Noise estimate implied by ``x0_hat``."""
    return (x_t - alpha * x0_hat) / sigma


def score_from_x0(x_t: torch.Tensor, x0_hat: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Score of the noisy marginal implied by ``x0_hat`` (Tweedie's formula)."""
    return (alpha * x0_hat - x_t) / sigma**2


def class_batch(labels: torch.Tensor | int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Class labels as a ``(n,)`` long tensor: an int is repeated, a ``(n,)`` tensor is checked and kept.

    Raises:
        ValueError: a tensor of another shape.
    """
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.ndim == 0:
        return labels.expand(n)
    if labels.shape != (n,):
        raise ValueError(f"class_labels must be an int or a ({n},) tensor, got shape {tuple(labels.shape)}")
    return labels


class Denoiser(nn.Module):
    """Wraps a network ``net(x, t_net)`` into a denoiser ``D(x_t, t) -> x0_hat``.

    Args:
        net: a module called as ``net(x, timesteps)`` (e.g. from ``medidiff.nets.build_unet``).
        process: the forward process the network was trained with.
        prediction: the network's parametrisation: ``eps``, ``x0``, ``v`` or ``score``.
        scale_input: divide the network input by ``sqrt(alpha^2 + sigma^2)`` (unit variance for
            unit-variance data; a no-op for variance-preserving processes, needed for ``VESDE``).
        cond: conditioning channels concatenated to the input, ``(B or 1, C_cond, *spatial)``.
        time_fn: maps ``t`` to the network's time input; defaults to ``process.net_time``.
    """

    def __init__(
        self,
        net: nn.Module,
        process: Process,
        prediction: str = "eps",
        *,
        scale_input: bool = True,
        cond: torch.Tensor | None = None,
        time_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if prediction not in PARAMETRISATIONS:
            raise ValueError(f"unknown parametrisation {prediction!r}; choose one of {PARAMETRISATIONS}")
        self.net, self.process, self.prediction = net, process, prediction
        self.scale_input, self.cond = scale_input, cond
        self.time_fn = time_fn or process.net_time

    def with_cond(self, cond: torch.Tensor | None) -> Denoiser:
        """The same denoiser (sharing the network) bound to conditioning channels ``cond``."""
        return Denoiser(
            self.net, self.process, self.prediction, scale_input=self.scale_input, cond=cond, time_fn=self.time_fn
        )

    def _coefficients(self, x: torch.Tensor, t: torch.Tensor):
        alpha, sigma = self.process.marginal(t)
        return bcast(alpha, x), bcast(sigma, x)

    def net_output(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None, *,
                   class_labels: torch.Tensor | int | None = None) -> torch.Tensor:
        """The raw network output for ``x_t`` at times ``t`` (what the training losses regress); ``class_labels``
        go to a class-conditional network (see the module docstring)."""
        t = batch_time(t, x_t)
        alpha, sigma = self._coefficients(x_t, t)
        return self._net_output(x_t, t, alpha, sigma, cond, class_labels)

    def _net_output(self, x_t, t, alpha, sigma, cond, class_labels=None) -> torch.Tensor:
        x_in = x_t / torch.sqrt(alpha**2 + sigma**2) if self.scale_input else x_t
        cond = self.cond if cond is None else cond
        if cond is not None:
            if cond.shape[0] != x_in.shape[0]:
                cond = cond.expand(x_in.shape[0], *cond.shape[1:])
            x_in = torch.cat([x_in, cond.to(x_in.dtype)], dim=1)
        t_net = self.time_fn(t).to(x_in.dtype)
        if class_labels is None:
            out = self.net(x_in, t_net)
        else:
            out = self.net(x_in, t_net, class_labels=class_batch(class_labels, x_in.shape[0], x_in.device))
        return out.to(x_t.dtype)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None, *,
                class_labels: torch.Tensor | int | None = None) -> torch.Tensor:
        """``x0_hat``: the model's estimate of the clean image given ``x_t`` at times ``t`` (shape ``(B,)``), of
        class ``class_labels`` for a class-conditional network (an int or ``(B,)``; ``None``: not passed)."""
        t = batch_time(t, x_t)
        alpha, sigma = self._coefficients(x_t, t)  # once per call, shared by the input scaling and x0_hat
        out = self._net_output(x_t, t, alpha, sigma, cond, class_labels)
        return x0_from_output(self.prediction, out, x_t, alpha, sigma)
