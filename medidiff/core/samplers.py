"""Samplers: plain functions over one denoiser, sharing one signature.

``fn(denoiser, x, process, steps, *, t_start=1.0, hook=None, callback=None, generator=None, **kw)``

- ``denoiser(x_t, t) -> x0_hat`` (``medidiff.core.denoiser``); eps and score are derived from it.
- ``x`` is the state at ``t_start``: prior noise when ``t_start == 1``, a partially noised image for
  partial diffusion (anomaly detection, warm starts).
- ``steps`` evaluation times come from ``process.time_grid(steps, t_start=..., kind=grid)``; the last
  step goes to ``t = 0``, where the sample is the denoised estimate.
- ``hook(x0_hat, x_t, t)`` may return a corrected ``x0_hat`` after every network evaluation (data
  consistency, guidance); ``callback(info)`` sees each step's ``i``, ``t``, ``x`` and ``x0_hat``.
- A hook with a true attribute ``needs_grad`` (gradient guidance) gets ``x0_hat`` computed under
  autograd from ``x_t.requires_grad_()``, so it can differentiate a loss on ``x0_hat`` with respect to
  ``x_t``; its result is detached. Still one network evaluation per denoiser call.
- ``generator``: one ``torch.Generator`` or a list with one per sample (per-sample seeds).
- ``noise(x, generator)``: the fresh noise of the stochastic samplers (``ddpm``, ``ddim`` with ``eta > 0``,
  ``masked_ddim``, ``euler_maruyama``), shaped like ``x``; default standard normal (``gaussian_like``). AnoDDPM
  (Wyatt et al. 2022) samples a model trained on simplex noise with simplex noise at every step.
- ``progress=True`` shows a progress bar.

``masked_ddim`` is DDIM with part of the state known (inpainting): before every step the known entries of the
state are replaced by the known values noised to that step's time (RePaint, Lugmayr et al. 2022, eq. 8, without
its resampling jumps), and the sample keeps them exactly.

Samplers run without autograd (``torch.no_grad``) except for such a hook's denoiser calls.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .denoiser import score_from_x0
from .noise import gaussian_like
from .processes import Process
from .utils import bcast

__all__ = [
    "ddpm",
    "ddim",
    "euler_maruyama",
    "predictor_corrector",
    "annealed_langevin",
    "euler",
    "heun",
    "dpm_solver_2m",
    "ddim_invert",
    "masked_ddim",
    "langevin_step_size",
    "SAMPLERS",
    "get_sampler",
    "nfe",
]

Hook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- shared pieces ---------------------------------------------------------------------------------
def _denoise(denoiser, x: torch.Tensor, t: float, hook: Hook | None) -> torch.Tensor:
    """Evaluate the denoiser at scalar time ``t`` (broadcast to the batch, on ``x``'s device) and apply the hook.

    A hook with ``needs_grad = True`` is called as ``hook(x0_hat, x_in, t)`` with ``x_in`` a leaf copy of
    ``x`` that requires grad and ``x0_hat`` computed from it under ``torch.enable_grad()`` (overriding the
    samplers' ``no_grad``), so the hook may take ``torch.autograd.grad`` of a loss on ``x0_hat`` with respect
    to ``x_in``; the corrected ``x0_hat`` it returns is detached.
    """
    tb = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
    if hook is not None and getattr(hook, "needs_grad", False):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            return hook(denoiser(x_in, tb), x_in, tb).detach()
    x0 = denoiser(x, tb)
    if hook is not None:
        x0 = hook(x0, x, tb)
    return x0


def _marginals(process: Process, times) -> tuple[list[float], list[float]]:
    """``(alpha, sigma)`` at each of ``times`` as Python floats (float64 maths, computed once per grid)."""
    alpha, sigma = process.marginal(torch.as_tensor(times, dtype=torch.float64))
    return alpha.tolist(), sigma.tolist()


Noise = Callable[[torch.Tensor, object], torch.Tensor]


def _ddim_step(x, x0, a_t: float, s_t: float, a_s: float, s_s: float, eta: float, generator,
               noise: Noise | None = None) -> torch.Tensor:
    """Generalised DDIM update (Song, Meng & Ermon 2021, eq. 12) from ``(a_t, s_t)`` to ``(a_s, s_s)``."""
    eps = (x - a_t * x0) / s_t
    if eta == 0:
        return a_s * x0 + s_s * eps
    # the eta = 1 variance is that of the posterior q(x_s | x_t, x0)
    var = (eta * s_s) ** 2 * max(0.0, 1 - (a_t * s_s / (a_s * s_t)) ** 2)
    return a_s * x0 + math.sqrt(s_s**2 - var) * eps + math.sqrt(var) * (noise or gaussian_like)(x, generator)


class _Grid:
    """A sampling grid: times ``t[0] > ... > t[steps] = 0`` with their ``(alpha, sigma)`` as floats."""

    def __init__(self, process: Process, steps: int, t_start: float, kind: str):
        self.process = process
        self.t = process.time_grid(steps, t_start=t_start, kind=kind).tolist()
        self.alpha, self.sigma = _marginals(process, self.t)
        self.steps = steps


def _integrate(name: str, denoiser, x, grid: _Grid, *, hook, callback, progress,
               update: Callable, before: Callable | None = None) -> torch.Tensor:
    """The loop every step-by-step sampler shares.

    At step ``i`` (time ``t_i``): optionally ``x = before(i, x)`` (corrector moves), evaluate
    ``x0_hat``, then move to ``t_{i+1}`` with ``x = update(i, x, x0_hat)``, or return ``x0_hat`` when
    ``t_{i+1} = 0``.
    """
    for i in tqdm(range(grid.steps), desc=name, disable=not progress, leave=False):
        if before is not None:
            x = before(i, x)
        x0 = _denoise(denoiser, x, grid.t[i], hook)
        x = x0 if grid.t[i + 1] == 0 else update(i, x, x0)
        if callback is not None:
            callback({"i": i, "t": grid.t[i], "x": x, "x0_hat": x0})
    return x


def _em_update(grid: _Grid, generator, noise: Noise | None = None) -> Callable:
    """Euler-Maruyama steps of the reverse-time SDE (Song et al. 2021, eq. 6) along ``grid``."""

    def update(i, x, x0):
        t, dt = grid.t[i], grid.t[i] - grid.t[i + 1]
        drift, diffusion = grid.process.sde(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
        g = bcast(diffusion, x)
        score = score_from_x0(x, x0, grid.alpha[i], grid.sigma[i])
        return x - (drift - g**2 * score) * dt + g * math.sqrt(dt) * (noise or gaussian_like)(x, generator)

    return update


def _langevin(denoiser, x, t: float, alpha: float, sigma: float, hook, generator, step_size) -> torch.Tensor:
    """One Langevin move ``x + eps * score + sqrt(2 eps) z`` at time ``t``.

    ``step_size`` is a number or a function ``(score, z) -> eps`` (a 0-d tensor on ``x``'s device).
    """
    score = score_from_x0(x, _denoise(denoiser, x, t, hook), alpha, sigma)
    z = gaussian_like(x, generator)
    eps = step_size(score, z) if callable(step_size) else step_size
    return x + eps * score + (2 * eps) ** 0.5 * z


def langevin_step_size(score: torch.Tensor, z: torch.Tensor, snr: float, alpha: float = 1.0) -> torch.Tensor:
    """The Langevin corrector's step ``eps = 2 alpha (snr ||z|| / ||score||)^2`` (Song et al. 2021, Algorithm 5).

    As in score_sde's ``LangevinCorrector``, ``||z||`` and ``||score||`` are the per-sample norms averaged
    over the batch, so every sample takes the same step (per-sample norms of small images make the ratio
    noisy and the samples too wide).

    Args:
        score: the score at the current state, ``(B, C, *spatial)``.
        z: the standard normal noise of the move, shaped like ``score``.
        snr: the corrector's signal-to-noise ratio ``r``.
        alpha: ``alpha_i = 1 - beta_i`` of the step (1 for variance-exploding processes).

    Returns:
        The step size, a 0-d tensor on the inputs' device (no host synchronisation).
    """
    z_norm = z.flatten(1).norm(dim=1).mean()
    s_norm = score.flatten(1).norm(dim=1).mean().clamp(min=1e-30)
    return 2 * alpha * (snr * z_norm / s_norm) ** 2


def _counts(fn: Callable) -> Callable:
    """Attach ``count(steps, **options) -> network evaluations`` to a sampler (used by ``nfe``)."""

    def attach(sampler: Callable) -> Callable:
        sampler.count_nfe = fn
        return sampler

    return attach


# -- samplers --------------------------------------------------------------------------------------
@torch.no_grad()
def ddim(denoiser, x, process, steps, *, t_start=1.0, hook=None, callback=None, generator=None,
         eta: float = 0.0, grid: str = "uniform", progress: bool = False, noise: Noise | None = None
         ) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12); ``eta=0`` is deterministic, ``eta=1`` is ancestral DDPM.

    Args:
        eta: scale of the fresh noise (0 deterministic, 1 the DDPM posterior variance).
        grid: time grid kind (``uniform``, ``quadratic``, ``logsnr``).
        noise: the fresh noise (default standard normal).
    """
    return _ddim("ddim", denoiser, x, process, steps, t_start=t_start, hook=hook, callback=callback,
                 generator=generator, eta=eta, grid=grid, progress=progress, noise=noise)


def _ddim(name: str, denoiser, x, process, steps, *, t_start, hook, callback, generator, eta, grid,
          progress, before: Callable[[_Grid], Callable] | None = None, noise: Noise | None = None) -> torch.Tensor:
    """DDIM steps along the grid; ``before(grid)`` makes ``_integrate``'s per-step ``before`` (e.g. replacements)."""
    g = _Grid(process, steps, t_start, grid)

    def update(i, x, x0):
        return _ddim_step(x, x0, g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1], eta, generator, noise)

    return _integrate(name, denoiser, x, g, hook=hook, callback=callback, progress=progress, update=update,
                      before=None if before is None else before(g))


def ddpm(denoiser, x, process, steps, *, t_start=1.0, hook=None, callback=None, generator=None,
         grid: str = "uniform", progress: bool = False, noise: Noise | None = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): each step samples the posterior ``q(x_s | x_t, x0_hat)``.

    With a ``DDPM`` process and ``steps == n_steps`` this is the original chain; fewer steps skip
    along the grid with the matching posterior. ``noise``: the posterior's fresh noise (default standard normal;
    AnoDDPM's simplex noise for a simplex-trained model).
    """
    with torch.no_grad():
        return _ddim("ddpm", denoiser, x, process, steps, t_start=t_start, hook=hook, callback=callback,
                     generator=generator, eta=1.0, grid=grid, progress=progress, noise=noise)


@torch.no_grad()
def euler_maruyama(denoiser, x, process, steps, *, t_start=1.0, hook=None, callback=None, generator=None,
                   grid: str = "uniform", progress: bool = False, noise: Noise | None = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE (Song et al. 2021, eq. 6); the last step returns ``x0_hat``."""
    g = _Grid(process, steps, t_start, grid)
    return _integrate("euler_maruyama", denoiser, x, g, hook=hook, callback=callback, progress=progress,
                      update=_em_update(g, generator, noise))


@_counts(lambda steps, n_corrector, **_: steps * (n_corrector + 1))
@torch.no_grad()
def predictor_corrector(denoiser, x, process, steps, *, t_start=1.0, hook=None, callback=None, generator=None,
                        snr: float = 0.16, n_corrector: int = 1, grid: str = "uniform",
                        progress: bool = False) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2-3 and 5): Langevin corrector, then reverse SDE.

    At each time ``t_i`` the corrector makes ``n_corrector`` Langevin moves of step
    ``eps = 2 alpha_i (snr ||z|| / ||score||)^2`` (norms averaged over the batch, see
    ``langevin_step_size``), with ``alpha_i = (alpha(t_i) / alpha(t_{i+1}))^2``: ``1 - beta_i`` of the
    discretised VP, sub-VP and DDPM processes, 1 for VE. The predictor is an Euler-Maruyama step of the
    reverse SDE. The batch-mean step couples the samples of a batch (as in score_sde). Network
    evaluations: ``steps * (n_corrector + 1)``.

    Args:
        snr: the corrector's signal-to-noise ratio.
        n_corrector: Langevin steps per noise level.
    """
    g = _Grid(process, steps, t_start, grid)

    def correct(i, x):
        alpha_i = (g.alpha[i] / g.alpha[i + 1]) ** 2

        def step_size(score, z):
            return langevin_step_size(score, z, snr, alpha_i)

        for _ in range(n_corrector):
            x = _langevin(denoiser, x, g.t[i], g.alpha[i], g.sigma[i], hook, generator, step_size)
        return x

    return _integrate("predictor_corrector", denoiser, x, g, hook=hook, callback=callback, progress=progress,
                      update=_em_update(g, generator), before=correct)


@_counts(lambda steps, n_inner, **_: steps * n_inner + 1)
@torch.no_grad()
def annealed_langevin(denoiser, x, process, steps, *, t_start=1.0, hook=None, callback=None, generator=None,
                      n_inner: int = 10, step_lr: float = 0.5, grid: str = "uniform",
                      progress: bool = False) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) with a final denoising step.

    At each of the ``steps`` noise levels ``sigma_i``, ``n_inner`` moves
    ``x + (a_i / 2) score + sqrt(a_i) z`` with ``a_i = step_lr * sigma_i^2``, then ``x0_hat`` at the last
    level (Jolicoeur-Martineau et al. 2021). Network evaluations: ``steps * n_inner + 1``.
    Made for variance-exploding processes (also fine for VP/DDPM); under sub-VP the last noise levels are
    too small for the moves to mix and the sample mean lags (use ``predictor_corrector`` there).

    Args:
        n_inner: Langevin moves per noise level.
        step_lr: step size as a fraction of each level's noise variance.
    """
    g = _Grid(process, steps, t_start, grid)
    for i in tqdm(range(steps), desc="annealed_langevin", disable=not progress, leave=False):
        level = 0.5 * step_lr * g.sigma[i] ** 2
        for _ in range(n_inner):
            x = _langevin(denoiser, x, g.t[i], g.alpha[i], g.sigma[i], hook, generator, level)
        if callback is not None:
            callback({"i": i, "t": g.t[i], "x": x, "x0_hat": None})
    return _denoise(denoiser, x, g.t[steps - 1], hook)


def _pf_ode(name: str, denoiser, x, process, steps, *, t_start, hook, callback, grid, progress,
            second_order: bool) -> torch.Tensor:
    """Probability-flow ODE in Karras et al.'s (2022, eq. 4) scaled variables ``x/alpha`` and ``sigma/alpha``.

    ``d(x/alpha) / d(sigma/alpha) = (x/alpha - x0_hat) / (sigma/alpha)`` holds for every process, so one
    integrator serves DDPM, VP, sub-VP and VE alike.
    """
    g = _Grid(process, steps, t_start, grid)

    def update(i, x, x0):
        a_t, a_s = g.alpha[i], g.alpha[i + 1]
        h_t, h_s = g.sigma[i] / a_t, g.sigma[i + 1] / a_s
        xh = x / a_t
        d = (xh - x0) / h_t
        xh_next = xh + (h_s - h_t) * d
        if second_order:
            d_next = (xh_next - _denoise(denoiser, a_s * xh_next, g.t[i + 1], hook)) / h_s
            xh_next = xh + (h_s - h_t) * (d + d_next) / 2
        return a_s * xh_next

    with torch.no_grad():
        return _integrate(name, denoiser, x, g, hook=hook, callback=callback, progress=progress, update=update)


def euler(denoiser, x, process, steps, *, t_start=1.0, hook=None, callback=None, generator=None,
          grid: str = "uniform", progress: bool = False) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, eq. 4); deterministic."""
    return _pf_ode("euler", denoiser, x, process, steps, t_start=t_start, hook=hook, callback=callback, grid=grid,
                   progress=progress, second_order=False)


@_counts(lambda steps, **_: 2 * steps - 1)
def heun(denoiser, x, process, steps, *, t_start=1.0, hook=None, callback=None, generator=None,
         grid: str = "uniform", progress: bool = False) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1).

    Network evaluations: ``2 * steps - 1`` (the step to ``t = 0`` is first order).
    """
    return _pf_ode("heun", denoiser, x, process, steps, t_start=t_start, hook=hook, callback=callback, grid=grid,
                   progress=progress, second_order=True)


@torch.no_grad()
def dpm_solver_2m(denoiser, x, process, steps, *, t_start=1.0, hook=None, callback=None, generator=None,
                  grid: str = "logsnr", progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep second order in the data prediction.

    Uses ``lambda = log(alpha / sigma)``; the first step is first order and the step to ``t = 0`` returns
    ``x0_hat``. One network evaluation per step.
    """
    g = _Grid(process, steps, t_start, grid)
    lam = [math.log(a / s) for a, s in zip(g.alpha[:-1], g.sigma[:-1])]
    previous: list = []  # (x0_hat, h) of the last step

    def update(i, x, x0):  # never called for the last step (to t = 0)
        h = lam[i + 1] - lam[i]
        d = x0
        if previous:
            x0_prev, h_prev = previous.pop()
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        previous.append((x0, h))
        return (g.sigma[i + 1] / g.sigma[i]) * x - g.alpha[i + 1] * math.expm1(-h) * d

    return _integrate("dpm_solver_2m", denoiser, x, g, hook=hook, callback=callback, progress=progress,
                      update=update)


@torch.no_grad()
def ddim_invert(denoiser, x0, process, steps, *, t_end=1.0, hook=None, callback=None, generator=None,
                grid: str = "uniform", progress: bool = False) -> torch.Tensor:
    """Deterministic DDIM inversion (Song, Meng & Ermon 2021, sec. 4.3; Dhariwal & Nichol 2021): image -> ``x_t``.

    Runs the ``eta = 0`` DDIM update forward in time along the reverse of the grid that
    ``ddim(..., steps, t_start=t_end)`` uses, so that sampling from the result retraces the path. The
    first step, from the image at ``t = 0``, uses the noise the model sees in the image at the smallest
    grid time: ``x = alpha x0 + sigma eps_hat``.

    Args:
        x0: clean images.
        t_end: the time to invert to.

    Returns:
        the latent ``x_{t_end}``.
    """
    g = _Grid(process, steps, t_end, grid)
    x = x0
    for k in tqdm(range(steps), desc="ddim_invert", disable=not progress, leave=False):
        i = steps - 1 - k  # the time to step to, from the smallest evaluation time up to t_end
        j = min(i + 1, steps - 1)  # the time of the current state (the image is evaluated at the smallest)
        x0_hat = _denoise(denoiser, x, g.t[j], hook)
        eps = (x - g.alpha[j] * x0_hat) / g.sigma[j]
        x = g.alpha[i] * (x if k == 0 else x0_hat) + g.sigma[i] * eps
        if callback is not None:
            callback({"i": k, "t": g.t[i], "x": x, "x0_hat": x0_hat})
    return x


@torch.no_grad()
def masked_ddim(denoiser, x, process, steps, *, known: torch.Tensor, keep: torch.Tensor, t_start=1.0, hook=None,
                callback=None, generator=None, eta: float = 0.0, grid: str = "uniform",
                progress: bool = False, noise: Noise | None = None) -> torch.Tensor:
    """DDIM that re-denoises only where ``keep`` is false (RePaint's replacement, Lugmayr et al. 2022, eq. 8).

    Before the network evaluation at each grid time ``t_i``, the kept entries of the state are replaced by
    ``alpha(t_i) known + sigma(t_i) z`` with fresh noise ``z`` (the known values noised to that time), so the
    network sees them at the noise level of the rest; the others follow the DDIM update. The sample is ``known``
    exactly where ``keep`` is true (the known values noised to ``t = 0``) and the last estimate elsewhere.
    RePaint's resampling jumps (going back up in time to harmonise) are not made.

    Args:
        x: the state at ``t_start`` (e.g. ``known`` noised to ``t_start``).
        known: the known values, shaped like ``x``.
        keep: where the known values are kept: a bool (or 0/1) tensor broadcastable to ``x``.
        eta: DDIM's noise scale (0 deterministic, 1 the DDPM posterior).
        grid: time grid kind.
        noise: the fresh noise of the steps and of the replacements (default standard normal).

    Returns:
        The sample: ``known`` where ``keep``, re-denoised elsewhere.
    """
    keep = torch.as_tensor(keep, device=x.device).bool()
    if keep.ndim != x.ndim:
        raise ValueError(f"keep has {keep.ndim} dims, the state {x.ndim}")

    def replacement(g: _Grid) -> Callable:
        def replace(i, x):
            noised = g.alpha[i] * known + g.sigma[i] * (noise or gaussian_like)(known, generator)
            return torch.where(keep, noised.to(x.dtype), x)
        return replace

    out = _ddim("masked_ddim", denoiser, x, process, steps, t_start=t_start, hook=hook, callback=callback,
                generator=generator, eta=eta, grid=grid, progress=progress, before=replacement, noise=noise)
    return torch.where(keep, known.to(out.dtype), out)


SAMPLERS: dict[str, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler_maruyama": euler_maruyama,
    "predictor_corrector": predictor_corrector,
    "annealed_langevin": annealed_langevin,
    "euler": euler,
    "heun": heun,
    "dpm_solver_2m": dpm_solver_2m,
}


def get_sampler(name: str) -> Callable:
    """The sampler function called ``name``."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None


def nfe(name: str, steps: int, **kw) -> int:
    """Network evaluations a sampler makes for ``steps`` steps (for reports and budgets).

    Options not given take the sampler's own defaults (read from its signature); samplers without a
    ``count_nfe`` attribute make one evaluation per step.

    Args:
        name: sampler name.
        steps: its ``steps`` argument.
        **kw: its keyword options (``n_corrector``, ``n_inner``...).

    Returns:
        The count.
    """
    fn = get_sampler(name)
    count = getattr(fn, "count_nfe", None)
    if count is None:
        return steps
    options = {k: p.default for k, p in inspect.signature(fn).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}
    return count(steps, **{**options, **kw})


