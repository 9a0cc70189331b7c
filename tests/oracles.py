"""Exact posterior-mean denoisers for data whose distribution is known in closed form.

Every element of ``x0`` is drawn independently from a 1-D Gaussian mixture
``sum_k w_k N(m_k, s_k^2)`` (one component: plain Gaussian data). Under ``x_t = alpha x0 + sigma eps``
the posterior mean ``E[x0 | x_t]`` is the responsibility-weighted mean of the per-component linear
Gaussian posteriors, so samplers driven by it must reproduce the data distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medidiff.core.utils import bcast


@dataclass(frozen=True)
class Mixture:
    weights: tuple[float, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(w * m for w, m in zip(self.weights, self.means))

    @property
    def std(self) -> float:
        second = sum(w * (s**2 + m**2) for w, m, s in zip(self.weights, self.means, self.stds))
        return math.sqrt(second - self.mean**2)

    def sample(self, shape, generator) -> torch.Tensor:
        k = torch.multinomial(torch.tensor(self.weights), math.prod(shape), replacement=True, generator=generator)
        m, s = torch.tensor(self.means, dtype=torch.float64)[k], torch.tensor(self.stds, dtype=torch.float64)[k]
        return (m + s * torch.randn(math.prod(shape), generator=generator, dtype=torch.float64)).reshape(shape)

    def denoiser(self, process):
        """``D(x_t, t) = E[x0 | x_t]`` under ``process``."""

        def denoise(x, t):
            alpha, sigma = process.marginal(t)
            a, s = bcast(alpha.to(x.dtype), x), bcast(sigma.to(x.dtype), x)
            logits, posts = [], []
            for w, m, sd in zip(self.weights, self.means, self.stds):
                var = a**2 * sd**2 + s**2
                logits.append(math.log(w) - 0.5 * torch.log(var) - 0.5 * (x - a * m) ** 2 / var)
                posts.append(m + a * sd**2 / var * (x - a * m))
            r = torch.softmax(torch.stack(logits), dim=0)
            return (r * torch.stack(posts)).sum(0)

        return denoise


GAUSSIAN = Mixture((1.0,), (0.3,), (0.5,))
TWO_MODES = Mixture((0.3, 0.7), (-1.0, 0.8), (0.3, 0.4))


class GaussianPair:
    """Images of two classes, ``x0 | y ~ N(mu_y, tau^2 I)`` with ``p(y = 1) = prior``; exact answers under a process.

    With ``x_t = alpha x0 + sigma eps``, ``x_t | y ~ N(alpha mu_y, v_t I)`` with ``v_t = alpha^2 tau^2 + sigma^2``, so
    ``log p(y | x_t) = log pi_y - ||x_t - alpha mu_y||^2 / (2 v_t) + const``, ``E[x0 | x_t, y] = mu_y + (alpha tau^2 /
    v_t) (x_t - alpha mu_y)`` and ``E[x0 | x_t] = sum_y p(y | x_t) E[x0 | x_t, y]``.
    """

    def __init__(self, process, mu0: torch.Tensor, mu1: torch.Tensor, tau: float, prior: float = 0.5):
        self.process, self.mu, self.tau = process, torch.stack([mu0, mu1]), tau
        self.log_prior = torch.log(torch.tensor([1 - prior, prior], dtype=mu0.dtype))

    def _coefficients(self, x, t):
        alpha, sigma = self.process.marginal(t.to(torch.float64))
        alpha, sigma = bcast(alpha, x), bcast(sigma, x)
        return alpha, sigma, alpha**2 * self.tau**2 + sigma**2

    def logits(self, x_t, t):
        """Exact ``log p(y | x_t)`` up to a constant: ``(B, 2)``."""
        alpha, _, v = self._coefficients(x_t, t)
        d2 = torch.stack([((x_t - alpha * m) ** 2 / v).flatten(1).sum(1) for m in self.mu], dim=1)
        return self.log_prior - d2 / 2

    def class_means(self, x_t, t) -> list[torch.Tensor]:
        """Exact ``E[x0 | x_t, y]`` for ``y = 0, 1``."""
        alpha, _, v = self._coefficients(x_t, t)
        return [m + alpha * self.tau**2 / v * (x_t - alpha * m) for m in self.mu]

    def denoiser(self, x_t, t):
        """Exact ``E[x0 | x_t]``."""
        p = torch.softmax(self.logits(x_t, t), dim=1)
        return sum(bcast(p[:, y], x_t) * mean for y, mean in enumerate(self.class_means(x_t, t)))

    def conditional(self, x_t, t, labels):
        """Exact ``E[x0 | x_t, y]`` per sample for ``labels`` ``(B,)`` in ``{0, 1, 2}``, 2 being the null class (no
        condition: ``E[x0 | x_t]``), as a class-conditional model trained with classifier-free guidance learns it."""
        options = torch.stack([*self.class_means(x_t, t), self.denoiser(x_t, t)])
        return options[labels, torch.arange(x_t.shape[0])]

    def healthy_flow(self, x_t, t: float, s: float = 0.0):
        """Where the probability-flow ODE of the healthy class alone takes ``x_t`` at ``t`` to at time ``s`` (default
        0): the Gaussian's standardised value ``z = (x_t - alpha mu_0) / sqrt(v_t)`` is kept along the flow, so
        ``x_s = alpha_s mu_0 + sqrt(v_s) z`` (``mu_0 + tau z`` at 0)."""
        alpha, _, v = self._coefficients(x_t, torch.tensor([t]))
        alpha_s, _, v_s = self._coefficients(x_t, torch.tensor([s]))
        return alpha_s * self.mu[0] + v_s.sqrt() * (x_t - alpha * self.mu[0]) / v.sqrt()


def lesion_pair(process, n: int = 3, *, contrast: float = 1.5, tau: float = 0.3, spread: float = 1.0):
    """A healthy mean image (uniform in ``spread * [-0.5, 0.5]``) and a diseased one (a 2 x 2 'lesion' brighter by
    ``contrast``), and ``n`` diseased inputs drawn from the latter: ``(GaussianPair, x, lesion mask)``, 4 x 4
    float64."""
    g = torch.Generator().manual_seed(0)
    mu0 = spread * (torch.rand((1, 4, 4), generator=g, dtype=torch.float64) - 0.5)
    lesion = torch.zeros_like(mu0)
    lesion[:, 1:3, 1:3] = 1.0
    mu1 = mu0 + contrast * lesion
    toy = GaussianPair(process, mu0, mu1, tau=tau)
    x = mu1 + tau * torch.randn((n, 1, 4, 4), generator=g, dtype=torch.float64)
    return toy, x, lesion.bool().expand_as(x)
