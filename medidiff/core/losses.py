"""Denoising score matching losses.

One loss serves every parametrisation: noise ``x0`` to a random time, ask the network for its target
(``eps``, ``x0``, ``v`` or the scaled score) and regress it. For ``score`` networks this is denoising
score matching with ``lambda(sigma) = sigma^2`` (Song & Ermon 2019, eq. 6; Vincent 2011). Weightings:

- ``uniform``: the plain mean squared error of the network's target;
- ``min_snr``: Min-SNR-gamma (Hang et al. 2023, eq. 5), clipping each time's weight at SNR ``gamma``
  and expressed for the network's parametrisation.
"""

from __future__ import annotations

import torch

from .denoiser import Denoiser, target_for
from .noise import Generator, noise_like
from .utils import bcast

__all__ = ["snr_weight", "diffusion_loss", "WEIGHTINGS"]

WEIGHTINGS = ("uniform", "min_snr")


def snr_weight(prediction: str, alpha: torch.Tensor, sigma: torch.Tensor, weighting: str = "uniform",
               gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weights ``(B,)`` for a parametrisation and weighting.

    Min-SNR weights the x0-error by ``min(SNR, gamma)``; dividing by the factor that relates each
    target's error to the x0-error gives ``min(SNR, gamma) / SNR`` for ``eps`` and ``score``,
    ``min(SNR, gamma)`` for ``x0`` and ``min(SNR, gamma) / (SNR + 1)`` for ``v``.
    """
    if weighting == "uniform":
        return torch.ones_like(alpha)
    if weighting != "min_snr":
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    snr = (alpha / sigma) ** 2
    clipped = snr.clamp(max=gamma)
    if prediction in ("eps", "score"):
        return clipped / snr
    if prediction == "x0":
        return clipped
    if prediction == "v":
        return clipped / (snr + 1)
    raise ValueError(f"unknown parametrisation {prediction!r}")


def diffusion_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    weighting: str = "uniform",
    gamma: float = 5.0,
    noise: str | torch.Tensor = "gaussian",
    noise_kw: dict | None = None,
    t: torch.Tensor | None = None,
    generator: Generator = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean denoising loss of ``denoiser`` on a batch of clean images.

    Args:
        denoiser: the model (its network, process and parametrisation).
        x0: clean images ``(B, C, *spatial)``.
        cond: conditioning channels for the network.
        weighting: ``uniform`` or ``min_snr``.
        gamma: the Min-SNR clipping value.
        noise: ``gaussian``, ``simplex`` (``medidiff.core.noise``) or a noise tensor shaped like ``x0``.
        noise_kw: options of the noise generator (e.g. simplex octaves).
        t: training times ``(B,)``; drawn with ``process.sample_time`` when omitted.
        generator: random generator for times and noise (one ``torch.Generator``).
        mask: optional ``(B, 1 or C, *spatial)`` weights restricting the loss to a region.

    Returns:
        The scalar loss.
    """
    process = denoiser.process
    if t is None:
        t = process.sample_time(x0.shape[0], generator=generator, device=x0.device)
    eps = noise if isinstance(noise, torch.Tensor) else noise_like(x0, noise, generator, **(noise_kw or {}))
    alpha, sigma = process.marginal(t.to(x0.dtype))
    x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps
    out = denoiser.net_output(x_t, t, cond)
    target = target_for(denoiser.prediction, x0, eps, bcast(alpha, x0), bcast(sigma, x0))
    err = (out.float() - target.float()) ** 2
    if mask is not None:
        err = err * mask
    per_sample = err.flatten(1).mean(1)
    return (snr_weight(denoiser.prediction, alpha.float(), sigma.float(), weighting, gamma) * per_sample).mean()
