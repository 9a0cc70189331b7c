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

    Min-SNR-gamma (Hang et al. 2023, eq. 5) weights the x0-error ``|x0_hat - x0|^2`` by ``min(SNR, gamma)``,
    ``SNR = alpha^2 / sigma^2``. A network's target error maps to the x0-error by a fixed factor: with
    ``x_t = alpha x0 + sigma eps``,

    - ``eps`` (and ``score``, whose target is ``-eps``): ``x0_hat - x0 = -(sigma / alpha) (eps_hat - eps)``,
      factor ``1 / SNR``;
    - ``x0``: factor 1;
    - ``v = alpha eps - sigma x0``: ``x0_hat = (alpha x_t - sigma v_hat) / (alpha^2 + sigma^2)``, so
      ``x0_hat - x0 = -sigma (v_hat - v) / (alpha^2 + sigma^2)``, factor
      ``sigma^2 / (alpha^2 + sigma^2)^2 = 1 / ((SNR + 1) (alpha^2 + sigma^2))``.

    The weight on the target's squared error is ``min(SNR, gamma)`` times that factor, for every process
    (for variance-preserving ones ``alpha^2 + sigma^2 = 1`` and the ``v`` weight is ``min(SNR, gamma) / (SNR + 1)``).

    Args:
        prediction: the network's parametrisation (``eps``, ``x0``, ``v``, ``score``).
        alpha: signal scales ``(B,)``.
        sigma: noise levels ``(B,)``.
        weighting: ``uniform`` or ``min_snr``.
        gamma: the Min-SNR clipping value.

    Returns:
        Weights ``(B,)``.
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
        return clipped / ((snr + 1) * (alpha**2 + sigma**2))
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
    class_labels: torch.Tensor | None = None,
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
        class_labels: ``(B,)`` classes of a class-conditional network (classifier-free guidance: the caller
            has already replaced some by the null class, ``medidiff.core.cfg.drop_classes``).

    Returns:
        The scalar loss.
    """
    process = denoiser.process
    if t is None:
        t = process.sample_time(x0.shape[0], generator=generator, device=x0.device)
    eps = noise if isinstance(noise, torch.Tensor) else noise_like(x0, noise, generator, **(noise_kw or {}))
    alpha, sigma = process.marginal(t.to(x0.dtype))
    x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps
    out = denoiser.net_output(x_t, t, cond, class_labels=class_labels)
    target = target_for(denoiser.prediction, x0, eps, bcast(alpha, x0), bcast(sigma, x0))
    err = (out.float() - target.float()) ** 2
    if mask is not None:
        err = err * mask
    per_sample = err.flatten(1).mean(1)
    return (snr_weight(denoiser.prediction, alpha.float(), sigma.float(), weighting, gamma) * per_sample).mean()
