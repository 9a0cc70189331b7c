"""Diffusion solvers for linear inverse problems ``y = A x + n``: the core's samplers with data-consistency hooks.

Owns the four solvers of the recon task, each a thin composition of a sampler of ``medidiff.core.samplers``
and a hook of ``medidiff.core.guidance`` (no sampling loop is written here), with one signature
``solver(denoiser, op, y, x_init, *, steps, t_start, z_tv, generator, progress, **options) -> Solved``:

- :func:`dds` (default): DDIM with a few conjugate-gradient steps on the Tweedie estimate
  (Chung, Lee & Ye 2023, "Decomposed diffusion sampler", Algorithm 1, eq. 13): ~50 network evaluations.
- :func:`dps`: diffusion posterior sampling (Chung et al. 2023, Algorithm 1): ancestral DDIM (``eta=1``)
  with the gradient of ``||y - A x0_hat(x_t)||`` through the network, one evaluation per step.
- :func:`pc`: predictor-corrector with hard data consistency after every network evaluation (score-MRI,
  Chung & Ye 2022, Algorithm 1). Differences from the paper, which samples a VE-SDE and projects the
  noisy state ``x_i`` onto the clean data: our priors are VP/DDPM models, whose state carries the factor
  ``alpha_t`` (projecting it onto unscaled data would be wrong), so the projection is applied to the
  Tweedie estimate ``x0_hat``, from which the sampler then steps (the two agree as ``t -> 0`` and for a VE
  process up to the noise that the paper keeps in the projected state). The predictor is the reverse SDE
  (Euler-Maruyama), the corrector Langevin dynamics with ``snr``; ~1,000-4,000 evaluations.
- :func:`merge`: Song et al. 2022 ("Solving inverse problems in medical imaging with score-based
  generative models", eq. 9): measured entries become ``(1 - lam) A x0_hat + lam y`` (``op.merge``),
  with the reverse SDE; ``lam = 1`` is the hard projection.

Every solver takes a warm start (CCDF, Chung, Sim & Ye 2022, eq. 7): with ``t_start < 1`` the sampler
begins from the classical estimate ``x_init`` diffused forward to ``t_start``
(``alpha x_init + sigma z``), which saves ``1 - t_start`` of the steps' range. With ``z_tv > 0`` the
images of a batch are the slices of one volume, in order, and an ADMM step of total variation along
the slices couples them after every evaluation (DiffusionMBIR, ``medidiff.recon.mbir``).

Operators and measurements are on the network's scale (``medidiff.recon.problems``); ``x_init`` too.
A solver returns the image and the number of network evaluations it made (``Solved``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from medidiff.core import samplers
from medidiff.core.guidance import DPS, Compose, ConjugateGradient, MeasurementMerge, ddim_gain, ddim_slope
from medidiff.core.noise import gaussian_like
from medidiff.core.operators import LinearOperator

from .mbir import ZTotalVariation

__all__ = ["Solved", "dds", "dps", "pc", "merge", "SOLVERS", "get_solver", "start_state", "snap_time", "solver_nfe"]


class Solved(NamedTuple):
    """A solver's result: the image on the network's scale and the network evaluations spent on it."""

    image: torch.Tensor
    nfe: int


def start_state(process, x_init: torch.Tensor, t_start: float, generator=None) -> tuple[torch.Tensor, float]:
    """The sampler's starting state: prior noise at ``t_start = 1``, else ``x_init`` diffused to ``t_start`` (CCDF).

    Args:
        process: the model's forward process.
        x_init: the classical estimate on the network's scale, ``(B, C, *spatial)``.
        t_start: start time in ``(0, 1]`` (snapped to a discrete process's grid).
        generator: one generator or one per sample.

    Returns:
        ``(x, t_start)``: the state and the (snapped) start time.
    """
    t = snap_time(process, t_start)
    noise = gaussian_like(x_init, generator)
    if t >= 1.0:
        alpha, sigma = process.marginal(torch.ones((), dtype=torch.float64))
        return noise * float((alpha**2 + sigma**2).sqrt()), 1.0
    tb = torch.full((x_init.shape[0],), t, dtype=x_init.dtype, device=x_init.device)
    return process.noised(x_init, tb, noise), t


def snap_time(process, t_start: float) -> float:
    """``t_start`` checked to lie in ``(0, 1]`` and snapped to a discrete process's grid."""
    if not 0 < t_start <= 1:
        raise ValueError(f"t_start must lie in (0, 1], got {t_start}")
    return float(process.snap(torch.tensor([float(t_start)], dtype=torch.float64))[0])


def _coupled(hook, op, y, z_tv: float, replace: bool):
    """The data hook, with DiffusionMBIR's z-TV ADMM step after it (or instead of it, for ``replace``)."""
    if z_tv <= 0:
        return hook
    tv = ZTotalVariation(op, y, z_tv)
    return tv if replace else Compose(hook, tv)


def _run(name: str, denoiser, hook, x_init, *, steps: int, t_start: float, generator, progress: bool,
         **kw) -> torch.Tensor:
    process = denoiser.process
    x, t = start_state(process, x_init, t_start, generator)
    fn = samplers.get_sampler(name)
    try:
        process.time_grid(steps, t_start=t)
    except ValueError as e:
        raise ValueError(f"steps: {e}") from None
    return fn(denoiser, x, process, steps, t_start=t, hook=hook, generator=generator, progress=progress, **kw)


def dds(denoiser, op: LinearOperator, y: torch.Tensor, x_init: torch.Tensor, *, steps: int = 50,
        cg_iters: int = 5, rho: float = 0.0, eta: float = 0.15, t_start: float = 1.0, z_tv: float = 0.0,
        noise_estimate: str = "corrected", clip: float | None = None, generator=None,
        progress: bool = False) -> Solved:
    """Decomposed diffusion sampler (Chung, Lee & Ye 2023, Algorithm 1): DDIM + CG on the Tweedie estimate.

    Args:
        denoiser: ``D(x_t, t) -> x0_hat`` (any size: ``medidiff.recon.prior.AnySize``).
        op: the forward operator on the network's scale.
        y: measurements on the network's scale.
        x_init: classical estimate (warm start, and shape of the result).
        steps: DDIM steps (= network evaluations).
        cg_iters: CG iterations on ``||A x - y||^2 + rho ||x - x0_hat||^2`` per evaluation.
        rho: Tikhonov weight towards ``x0_hat`` (0: the Krylov subspace regularises, as DDS).
        eta: DDIM noise (DDS uses a small stochastic part).
        t_start: start time (``< 1``: warm start from ``x_init``).
        noise_estimate: the DDIM step's noise estimate: ``corrected`` (from the CG-corrected ``x0``, as a DDIM
            step from any hook's ``x0``) or ``network`` (the network's own, DDS's Algorithm 1).
        clip: CG starts from the Tweedie estimate clamped to ``[-clip, clip]`` (``None``: as it is).
        z_tv: weight of DiffusionMBIR's total variation along the slices (0: off).
        generator: one generator or one per image.
        progress: progress bar.

    Returns:
        ``Solved(image, nfe)``.
    """
    if noise_estimate not in ("corrected", "network"):
        raise ValueError(f"noise_estimate must be 'corrected' or 'network', got {noise_estimate!r}")
    gain = None
    if noise_estimate == "network":
        gain = ddim_gain(denoiser.process, denoiser.process.time_grid(steps, t_start=snap_time(denoiser.process,
                                                                                             t_start)), eta)
    cg = ConjugateGradient(op, y, iters=cg_iters, rho=rho, gain=gain, clip=clip)
    hook = _coupled(cg, op, y, z_tv, replace=True)
    out = _run("ddim", denoiser, hook, x_init, steps=steps, t_start=t_start, generator=generator,
               progress=progress, eta=eta)
    return Solved(out, samplers.nfe("ddim", steps))


def dps(denoiser, op: LinearOperator, y: torch.Tensor, x_init: torch.Tensor, *, steps: int = 200,
        zeta: float = 1.0, eta: float = 1.0, t_start: float = 1.0, z_tv: float = 0.0, generator=None,
        progress: bool = False) -> Solved:
    """Diffusion posterior sampling (Chung et al. 2023, Algorithm 1): ``x_s -= zeta / ||y - A x0_hat|| * grad``.

    Args:
        zeta: step size of the normalised gradient step (DPS's ``zeta_i``; 1.0 for MRI in its paper).
        eta: DDIM noise (1: DDPM's ancestral steps, as DPS).
        steps, t_start, z_tv, generator, progress: as :func:`dds`.

    Returns:
        ``Solved(image, nfe)``.
    """
    process = denoiser.process
    grid = process.time_grid(steps, t_start=snap_time(process, t_start))
    hook = _coupled(DPS(op, y, zeta, slope=ddim_slope(process, grid, eta)), op, y, z_tv, replace=False)
    out = _run("ddim", denoiser, hook, x_init, steps=steps, t_start=t_start, generator=generator,
               progress=progress, eta=eta)
    return Solved(out, samplers.nfe("ddim", steps))


def _merge_hook(op: LinearOperator, y: torch.Tensor, lam: float, x_init: torch.Tensor) -> MeasurementMerge:
    try:  # one merge up front: an operator without one fails here, before any network evaluation
        op.merge(x_init, y, lam)
    except ValueError as e:
        raise ValueError(f"solver: {type(op).__name__} has no measurement-space merge here ({e}); use dds or dps"
                         ) from None
    return MeasurementMerge(op, y, lam)


def pc(denoiser, op: LinearOperator, y: torch.Tensor, x_init: torch.Tensor, *, steps: int = 500,
       n_corrector: int = 1, snr: float = 0.16, t_start: float = 1.0, z_tv: float = 0.0, generator=None,
       progress: bool = False) -> Solved:
    """Score-MRI (Chung & Ye 2022, Algorithm 1): predictor-corrector with hard data consistency (see module).

    Args:
        steps: noise levels (each one predictor and ``n_corrector`` corrector evaluations).
        n_corrector: Langevin corrector moves per level.
        snr: the corrector's signal-to-noise ratio.
        t_start, z_tv, generator, progress: as :func:`dds`.

    Returns:
        ``Solved(image, nfe)``.
    """
    hook = _coupled(_merge_hook(op, y, 1.0, x_init), op, y, z_tv, replace=False)
    out = _run("predictor_corrector", denoiser, hook, x_init, steps=steps, t_start=t_start, generator=generator,
               progress=progress, n_corrector=n_corrector, snr=snr)
    return Solved(out, samplers.nfe("predictor_corrector", steps, n_corrector=n_corrector))


def merge(denoiser, op: LinearOperator, y: torch.Tensor, x_init: torch.Tensor, *, steps: int = 200,
          lam: float = 0.9, sampler: str = "euler_maruyama", t_start: float = 1.0, z_tv: float = 0.0,
          generator=None, progress: bool = False) -> Solved:
    """Song et al. 2022 (eq. 9): measurement-space merge with weight ``lam`` after every evaluation.

    Args:
        lam: weight of the measurement in ``[0, 1]`` (1: hard projection).
        sampler: the core sampler that steps (``euler_maruyama``: the reverse SDE, as the paper's predictor;
            ``predictor_corrector`` adds its corrector).
        steps, t_start, z_tv, generator, progress: as :func:`dds`.

    Returns:
        ``Solved(image, nfe)``.
    """
    hook = _coupled(_merge_hook(op, y, lam, x_init), op, y, z_tv, replace=False)
    out = _run(sampler, denoiser, hook, x_init, steps=steps, t_start=t_start, generator=generator,
               progress=progress)
    return Solved(out, samplers.nfe(sampler, steps))


SOLVERS: dict[str, Callable[..., Solved]] = {"dds": dds, "dps": dps, "pc": pc, "merge": merge}


def get_solver(name: str) -> Callable[..., Solved]:
    """The solver called ``name``."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"solver: unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


def solver_nfe(name: str, steps: int, **options) -> int:
    """Network evaluations of solver ``name`` with ``steps`` (and its options) per image."""
    if name == "pc":
        return samplers.nfe("predictor_corrector", steps, **{k: v for k, v in options.items() if k == "n_corrector"})
    if name == "merge":
        return samplers.nfe(options.get("sampler", "euler_maruyama"), steps)
    get_solver(name)
    return steps
