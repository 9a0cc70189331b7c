"""Forward diffusion processes on continuous time ``t`` in ``(0, 1]``.

Every process gives the Gaussian marginal ``x_t = alpha(t) * x0 + sigma(t) * noise`` through
``marginal(t) -> (alpha, sigma)``, the forward SDE ``dx = f(x, t) dt + g(t) dW`` through
``sde(x, t) -> (drift, diffusion)``, and ``prior_sample(shape, generator)``.

- ``DDPM``: the discrete variance-preserving chain of Ho et al. (2020) with ``N`` steps, seen as the VP
  process on the grid ``t_i = (i + 1) / N``; between grid points ``log alpha_bar`` is linear in ``t``.
- ``VPSDE``, ``SubVPSDE``, ``VESDE``: Song et al. (2021), eqs. 11, 12 and 9 (and Appendix B).

Samplers and losses use only this interface; none of them checks which process it got.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import schedules
from .noise import Generator, gaussian
from .utils import bcast

__all__ = ["Process", "DDPM", "VPSDE", "SubVPSDE", "VESDE", "PROCESSES", "make_process"]


class Process:
    """Base class: a forward noising process with Gaussian marginals.

    Subclasses implement ``_log_alpha(t)`` and ``_sigma(t)`` (float64 maths), ``sde`` and ``prior_sample``.
    """

    #: smallest time at which a model is evaluated or trained
    t_min: float = 1e-3
    #: whether time is a discrete grid (``snap`` then rounds to it)
    discrete: bool = False

    # -- marginals -------------------------------------------------------------------------------
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def marginal(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal scale and noise level at time ``t``.

        Args:
            t: times, shape ``(B,)`` (or a scalar).

        Returns:
            ``(alpha, sigma)`` with the shape, device and dtype of ``t`` (float32 for Python numbers).
        """
        t_in = torch.as_tensor(t)
        out_dtype = t_in.dtype if t_in.is_floating_point() else torch.float32
        t64 = t_in.to(torch.float64)
        alpha, sigma = torch.exp(self._log_alpha(t64)), self._sigma(t64)
        return alpha.to(out_dtype), sigma.to(out_dtype)

    def log_snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """``lambda(t) = log(alpha^2 / sigma^2)``, decreasing in ``t`` (float64)."""
        t64 = torch.as_tensor(t, dtype=torch.float64)
        return 2 * (self._log_alpha(t64) - torch.log(self._sigma(t64)))

    def t_of_log_snr(self, lam: torch.Tensor | float) -> torch.Tensor:
        """Inverse of ``log_snr`` on ``[t_min, 1]`` (bisection; subclasses may give a closed form)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.ones_like(lam)
        for _ in range(64):
            mid = (lo + hi) / 2
            above = self.log_snr(mid) > lam  # log-SNR decreases with t: go later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (lo + hi) / 2

    # -- dynamics --------------------------------------------------------------------------------
    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift ``f(x, t)`` (shaped like ``x``) and diffusion ``g(t)`` (shape ``(B,)``) of the forward SDE."""
        raise NotImplementedError

    def prior_sample(
        self,
        shape: Sequence[int],
        generator: Generator = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """A sample of the prior ``p_1`` (the starting point of sampling from ``t = 1``)."""
        alpha, sigma = self.marginal(torch.ones((), dtype=torch.float64))
        scale = math.sqrt(float(alpha) ** 2 + float(sigma) ** 2)
        return gaussian(shape, generator, device=device, dtype=dtype) * scale

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha(t) x0 + sigma(t) noise`` for per-sample times ``t`` of shape ``(B,)``."""
        alpha, sigma = self.marginal(t.to(x0.dtype) if x0.is_floating_point() else t)
        return bcast(alpha, x0) * x0 + bcast(sigma, x0) * noise

    # -- time handling ---------------------------------------------------------------------------
    def snap(self, t: torch.Tensor) -> torch.Tensor:
        """Round times to those the process is defined on (identity for continuous processes)."""
        return t

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time value fed to a network's sinusoidal embedding: ``999 * t`` (score_sde's convention)."""
        return 999.0 * t

    def time_grid(self, steps: int, *, t_start: float = 1.0, kind: str = "uniform") -> torch.Tensor:
        """Descending sampling times: ``steps`` evaluation times from ``t_start``, then 0 (float64).

        See ``schedules.time_grid``: evaluation times are strictly decreasing in ``[t_min, t_start]``.
        Discrete processes snap them to their grid (``snap_grid``); more steps than grid points up to
        ``t_start`` raise ``ValueError``.
        """
        grid = schedules.time_grid(
            steps, kind, t_start=t_start, t_min=self.t_min, log_snr=self.log_snr, t_of_log_snr=self.t_of_log_snr
        )
        return torch.cat([self.snap_grid(grid[:-1]), grid[-1:]])

    def snap_grid(self, times: torch.Tensor) -> torch.Tensor:
        """Snap a descending grid of evaluation times to the process's times, keeping it strictly descending."""
        return times

    def sample_time(
        self, batch: int, generator: torch.Generator | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Training times: uniform on ``[t_min, 1]`` (float32, shape ``(batch,)``)."""
        u = torch.rand(batch, generator=generator, device=device)
        return self.t_min + (1 - self.t_min) * u

    def config(self) -> dict:
        """Keyword arguments that rebuild this process with ``make_process``."""
        raise NotImplementedError


class VPSDE(Process):
    """Variance-preserving SDE with linear ``beta(t)`` (Song et al. 2021, eq. 11).

    Args:
        beta_min: ``beta(0)``.
        beta_max: ``beta(1)``.
        t_min: smallest time used for training and sampling.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        self.beta_min, self.beta_max, self.t_min = float(beta_min), float(beta_max), float(t_min)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def t_of_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        # log alpha^2 = logsigmoid(lambda) = -t^2 d / 2 - t beta_min
        d = self.beta_max - self.beta_min
        c = torch.nn.functional.logsigmoid(lam)
        return (-self.beta_min + torch.sqrt(self.beta_min**2 - 2 * d * c)) / d

    def sde(self, x, t):
        beta = self.beta(t.to(x.dtype))
        return -0.5 * bcast(beta, x) * x, torch.sqrt(beta)

    def config(self):
        return {"name": "vpsde", "beta_min": self.beta_min, "beta_max": self.beta_max, "t_min": self.t_min}


class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021, eq. 12): VP drift, variance ``(1 - alpha^2)^2``."""

    def _sigma(self, t):
        return -torch.expm1(2 * self._log_alpha(t))

    def t_of_log_snr(self, lam):
        return Process.t_of_log_snr(self, lam)

    def sde(self, x, t):
        t = t.to(x.dtype)
        beta = self.beta(t)
        discount = -torch.expm1(4 * self._log_alpha(t))
        return -0.5 * bcast(beta, x) * x, torch.sqrt(beta * discount)

    def config(self):
        return {**super().config(), "name": "subvpsde"}


class VESDE(Process):
    """Variance-exploding SDE, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` (Song et al. 2021, eq. 9).

    Args:
        sigma_min: noise level at ``t = 0``.
        sigma_max: noise level at ``t = 1`` (about the largest distance between training images).
        t_min: smallest time used for training and sampling.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        self.sigma_min, self.sigma_max, self.t_min = float(sigma_min), float(sigma_max), float(t_min)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _log_alpha(self, t):
        return torch.zeros_like(t)

    def _sigma(self, t):
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def t_of_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio

    def sde(self, x, t):
        sigma = self._sigma(t.to(torch.float64)).to(x.dtype)
        return torch.zeros_like(x), sigma * math.sqrt(2 * self._log_ratio)

    def prior_sample(self, shape, generator=None, device=None, dtype=torch.float32):
        return gaussian(shape, generator, device=device, dtype=dtype) * self.sigma_max

    def config(self):
        return {"name": "vesde", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "t_min": self.t_min}


class DDPM(Process):
    """Discrete VP chain of Ho et al. (2020) with ``n_steps`` steps, on times ``t_i = (i + 1) / N``.

    Step ``i`` (MONAI's and diffusers' timestep index) is time ``(i + 1) / N``; ``alpha(t_i)^2`` is
    ``alpha_bar_i = prod_{j<=i} (1 - beta_j)``. Between grid points ``log alpha_bar`` is linear in ``t``, so
    the process is also a VP SDE with piecewise-constant ``beta(t) = N * log((1 - ...))`` increments.

    Args:
        n_steps: number of diffusion steps ``N``.
        schedule: beta schedule name (``linear``, ``scaled_linear``, ``cosine``, ``sigmoid``).
        **schedule_kw: schedule parameters (``beta_start``, ``beta_end``...).
    """

    discrete = True

    def __init__(self, n_steps: int = 1000, schedule: str = "linear", **schedule_kw):
        self.n_steps, self.schedule, self.schedule_kw = int(n_steps), schedule, dict(schedule_kw)
        self.betas = schedules.betas(schedule, self.n_steps, **schedule_kw)
        log_abar = torch.cumsum(torch.log1p(-self.betas), 0)
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), log_abar])  # knot k at t = k / N
        self.t_min = 1.0 / self.n_steps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.exp(self._log_abar[1:])

    def _interp_log_abar(self, t: torch.Tensor) -> torch.Tensor:
        knots = self._log_abar.to(t.device)
        pos = (t.clamp(0, 1) * self.n_steps).to(torch.float64)
        lo = pos.floor().clamp(max=self.n_steps - 1)
        w = pos - lo
        lo = lo.long()
        return knots[lo] * (1 - w) + knots[lo + 1] * w

    def _log_alpha(self, t):
        return 0.5 * self._interp_log_abar(t)

    def _sigma(self, t):
        return torch.sqrt(-torch.expm1(self._interp_log_abar(t)))

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """Piecewise-constant continuous-time ``beta(t) = -d log(alpha_bar) / dt``."""
        knots = self._log_abar.to(t.device)
        k = torch.ceil(t.to(torch.float64).clamp(1e-12, 1) * self.n_steps).long().clamp(1, self.n_steps)
        return (knots[k - 1] - knots[k]) * self.n_steps

    def sde(self, x, t):
        beta = self.beta(t).to(x.dtype)
        return -0.5 * bcast(beta, x) * x, torch.sqrt(beta)

    def snap(self, t):
        return (torch.round(t * self.n_steps).clamp(1, self.n_steps) / self.n_steps).to(t.dtype)

    def snap_grid(self, times):
        """Snap to grid indices, keeping them strictly decreasing from the first time's index.

        Where several times round to one index, earlier ones move up the grid; where that would pass the
        first time's index, later ones move down instead. Any ``len(times)`` up to the number of grid
        points at or below the first time fits.

        Raises:
            ValueError: more times than grid points up to the first one.
        """
        idx = self.index(self.snap(times)).tolist()
        if not idx:
            return times
        top = idx[0]
        if len(idx) > top + 1:
            raise ValueError(
                f"{len(idx)} steps do not fit below t={float(times[0]):.4g} on a {self.n_steps}-step DDPM grid;"
                f" use at most {top + 1} steps"
            )
        for k in range(len(idx) - 2, -1, -1):  # strictly decreasing, pushing repeats towards t_start
            idx[k] = max(idx[k], idx[k + 1] + 1)
        idx[0] = top
        for k in range(1, len(idx)):  # ... but never above the first index: push those down again
            idx[k] = min(idx[k], idx[k - 1] - 1)
        return (torch.tensor(idx, dtype=times.dtype) + 1) / self.n_steps

    def net_time(self, t):
        return t * self.n_steps - 1.0

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """The integer step index ``i`` of grid times ``t_i = (i + 1) / N``."""
        return (torch.round(t * self.n_steps) - 1).long()

    def sample_time(self, batch, generator=None, device=None):
        i = torch.randint(0, self.n_steps, (batch,), generator=generator, device=device)
        return (i + 1).float() / self.n_steps

    def config(self):
        return {"name": "ddpm", "n_steps": self.n_steps, "schedule": self.schedule, **self.schedule_kw}


PROCESSES = {"ddpm": DDPM, "vpsde": VPSDE, "subvpsde": SubVPSDE, "vesde": VESDE}


def make_process(name: str, **kw) -> Process:
    """Build a process by name (``ddpm``, ``vpsde``, ``subvpsde``, ``vesde``) with its keyword arguments."""
    try:
        cls = PROCESSES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown process {name!r}; choose one of {sorted(PROCESSES)}") from None
    return cls(**kw)
