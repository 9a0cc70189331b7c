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
