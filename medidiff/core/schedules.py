"""Noise schedules and time grids, as pure functions selected by name.

- beta schedules for the discrete VP process (DDPM): ``linear`` (Ho et al. 2020), ``scaled_linear``
  (Rombach et al. 2022), ``cosine`` (Nichol & Dhariwal 2021, eq. 17), ``sigmoid`` (Jabri et al. 2023);
- sigma sequences for variance-exploding models: geometric (Song & Ermon 2019) and Karras et al.
  (2022, eq. 5) grids;
- time grids on ``(0, t_start]`` for samplers: ``uniform``, ``quadratic`` and ``logsnr`` (uniform in
  log signal-to-noise ratio).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "betas",
    "BETA_SCHEDULES",
    "ve_sigmas",
    "karras_sigmas",
    "time_grid",
    "TIME_GRIDS",
]


def _linear(n: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def _scaled_linear(n: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2


def _cosine(n: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    steps = torch.arange(n + 1, dtype=torch.float64) / n
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def _sigmoid(n: int, beta_start: float = 1e-4, beta_end: float = 0.02, start: float = -6.0,
             end: float = 6.0) -> torch.Tensor:
    x = torch.linspace(start, end, n, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


BETA_SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "cosine": _cosine,
    "sigmoid": _sigmoid,
}


def betas(name: str, n: int, **kw) -> torch.Tensor:
    """Betas of an ``n``-step discrete VP schedule, float64, shape ``(n,)``.

    Args:
        name: one of ``linear``, ``scaled_linear``, ``cosine``, ``sigmoid``.
        n: number of diffusion steps.
        **kw: schedule parameters (``beta_start``, ``beta_end``, ``s``...).
    """
    try:
        fn = BETA_SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}") from None
    return fn(n, **kw)


def ve_sigmas(sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    """Geometric sigmas from ``sigma_max`` down to ``sigma_min`` (Song & Ermon 2019), shape ``(n,)``."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022, eq. 5) sigmas, descending from ``sigma_max`` to ``sigma_min``, shape ``(n,)``."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _uniform(n: int, t_start: float, t_min: float, log_snr=None, t_of_log_snr=None) -> torch.Tensor:
    return torch.linspace(t_start, 0.0, n + 1, dtype=torch.float64)[:-1]


def _quadratic(n: int, t_start: float, t_min: float, log_snr=None, t_of_log_snr=None) -> torch.Tensor:
    u = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
    return t_start * u**2


def _logsnr(n: int, t_start: float, t_min: float, log_snr=None, t_of_log_snr=None) -> torch.Tensor:
    if log_snr is None or t_of_log_snr is None:
        raise ValueError("the 'logsnr' grid needs the process's log_snr and its inverse")
    lam = torch.linspace(float(log_snr(t_start)), float(log_snr(t_min)), n, dtype=torch.float64)
    return t_of_log_snr(lam)


TIME_GRIDS = {"uniform": _uniform, "quadratic": _quadratic, "logsnr": _logsnr}


def _spread_tail(t: torch.Tensor, t_start: float, t_min: float) -> torch.Tensor:
    """Make evaluation times strictly decreasing in ``[t_min, t_start]`` without clamping them onto one value.

    The first time is ``t_start``. Times at or below ``t_min`` (a grid can put several there: the
    quadratic grid with many steps, any grid from a small ``t_start``) are spread evenly between the last
    time above ``t_min`` and ``t_min`` itself, which the last one then equals. Times above ``t_min`` are
    kept as they are, so a grid that fits is unchanged.
    """
    t = t.clone()
    t[0] = t_start
    below = torch.nonzero(t[1:] <= t_min * (1 + 1e-6)).flatten()  # a time a rounding error above t_min counts
    if len(below):
        j = int(below[0]) + 1  # the first time at or below t_min; t[j - 1] > t_min
        m = len(t) - j
        t[j:] = torch.linspace(float(t[j - 1]), t_min, m + 1, dtype=torch.float64)[1:]
    return t


def time_grid(
    n: int,
    kind: str = "uniform",
    *,
    t_start: float = 1.0,
    t_min: float = 1e-3,
    log_snr: Callable | None = None,
    t_of_log_snr: Callable | None = None,
) -> torch.Tensor:
    """Descending sampling times: ``n`` evaluation times from ``t_start`` followed by a terminal 0.

    The last step of every sampler goes from the last evaluation time to ``t = 0``, where the sample is
    the denoised estimate. Evaluation times are strictly decreasing within ``[t_min, t_start]``: where a
    grid kind would put times at or below ``t_min``, those times are spread evenly between the last time
    above ``t_min`` and ``t_min`` (clamping them would repeat ``t_min``: zero-length steps that waste
    network evaluations and divide by zero in multistep solvers). Grids that fit are not changed.

    Args:
        n: number of evaluation times (network evaluations of a first-order sampler).
        kind: ``uniform`` (equal steps ending at 0), ``quadratic`` (denser near 0) or ``logsnr``
            (uniform in log-SNR between ``t_start`` and ``t_min``; needs ``log_snr``/``t_of_log_snr``).
        t_start: first time (1 for pure noise; less for partial diffusion); above ``t_min`` unless ``n == 1``.
        t_min: smallest time the model is evaluated at.

    Returns:
        float64 tensor of shape ``(n + 1,)``, strictly decreasing; element 0 is ``t_start``, element ``n`` is 0.

    Raises:
        ValueError: ``n < 1``, an unknown ``kind``, ``t_start <= 0``, or ``n > 1`` times that cannot
            fit strictly between ``t_start <= t_min`` and ``t_min``.
    """
    if n < 1:
        raise ValueError(f"need at least one step, got {n}")
    try:
        fn = TIME_GRIDS[kind]
    except KeyError:
        raise ValueError(f"unknown time grid {kind!r}; choose one of {sorted(TIME_GRIDS)}") from None
    t_start, t_min = float(t_start), float(t_min)
    if not t_start > 0:
        raise ValueError(f"t_start must be positive, got {t_start}")
    if n > 1 and t_start <= t_min:
        raise ValueError(f"{n} steps need t_start > t_min = {t_min:g}, got t_start = {t_start:g}")
    t = _spread_tail(fn(n, t_start, t_min, log_snr, t_of_log_snr).clamp(max=t_start), t_start, t_min)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])
