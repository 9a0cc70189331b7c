"""Sampler hooks for inverse problems, built on the linear-operator protocol of ``medidiff.core.operators``.

Every hook follows the samplers' contract ``hook(x0_hat, x_t, t) -> corrected x0_hat`` (``t`` of shape
``(B,)``) and is called after each network evaluation; the sampler then steps with the corrected
estimate. They know nothing about medicine: give them an operator ``A`` and measurements ``y``.

- :class:`Projection`: hard data consistency for coisometries (``A A^H = I``: masks, masked unitary
  transforms): ``x0 + A^H (y - A x0)`` (score-MRI's k-space replacement, Chung & Ye 2022; RePaint-style
  patch replacement, Lugmayr et al. 2022).
- :class:`MeasurementMerge`: Song et al. 2022's merge in measurement space with weight ``lam``.
- :class:`ConjugateGradient`: a few CG steps on the Tweedie estimate (DDS, Chung, Lee & Ye 2023).
- :class:`DPS`: diffusion posterior sampling's gradient step (Chung et al. 2023, Algorithm 1), expressed
  as a shift of ``x0_hat``; it sets ``needs_grad = True``, for which the samplers evaluate the denoiser
  under autograd with ``x_t.requires_grad``, one network evaluation per step.

How DPS goes through a hook. DPS moves the state after an ordinary step ``x'_s`` by
``-zeta_t * grad_{x_t} ||y - A x0_hat(x_t)||^2`` with ``zeta_t = zeta / ||y - A x0_hat||``. A DDIM step from
``(alpha_t, sigma_t)`` to ``(alpha_s, sigma_s)`` with noise scale ``eta`` is
``x_s = alpha_s x0 + c_eps (x_t - alpha_t x0) / sigma_t + noise`` with ``c_eps = sqrt(sigma_s^2 - var)``, so it
is affine in ``x0`` with slope ``c = alpha_s - c_eps alpha_t / sigma_t`` (and ``c = 1`` on the last step,
which returns ``x0_hat``). Returning ``x0_hat - (zeta_t / c) g`` therefore moves the next state by exactly
``-zeta_t g``. :func:`ddim_slope` builds ``c`` for a time grid; without it the hook uses ``c = 1`` (a step
of ``-zeta_t g`` on the estimate itself, which is the right slope for any sampler's final step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .operators import LinearOperator, cg_solve, sq_norm
from .utils import bcast

__all__ = ["Projection", "MeasurementMerge", "ConjugateGradient", "DPS", "ddim_slope", "Compose"]


class Projection:
    """Replace what was measured: ``x0 + A^H (y - A x0)`` (exact for ``A A^H = I``; Chung & Ye 2022, eq. 10).

    Args:
        op: a coisometry (``op.coisometry`` true), e.g. a ``MaskOperator`` or single-coil Cartesian MRI.
        y: measurements, shaped like ``op(x)``.
    """

    needs_grad = False

    def __init__(self, op: LinearOperator, y: torch.Tensor):
        if not getattr(op, "coisometry", False):
            raise ValueError(f"projection needs A A^H = I; {type(op).__name__} is not a coisometry "
                             "(use ConjugateGradient)")
        self.op, self.y = op, y

    def __call__(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x0_hat + self.op.adjoint(self.y - self.op.forward(x0_hat))


class MeasurementMerge:
    """Song et al. 2022 (eq. 9): measured entries become ``(1 - lam) A x0 + lam y``, then back to the image.

    Uses ``op.merge``: every coisometry has it; sparse-view CT defines its own on a full grid of views.

    Args:
        op: the operator.
        y: measurements.
        lam: weight of the measurement in ``[0, 1]`` (1: replacement), a number or a function of ``t``.
    """

    needs_grad = False

    def __init__(self, op: LinearOperator, y: torch.Tensor, lam: float | Callable = 1.0):
        if not callable(lam) and not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        self.op, self.y, self.lam = op, y, lam

    def __call__(self, x0_hat, x_t, t):
        lam = self.lam(t) if callable(self.lam) else self.lam
        return self.op.merge(x0_hat, self.y, lam)


class ConjugateGradient:
    """DDS data consistency (Chung, Lee & Ye 2023, eq. 13): CG on ``min ||A x - y||^2 + rho ||x - x0_hat||^2``.

    Starts at the Tweedie estimate ``x0_hat``; with ``rho = 0`` the few Krylov steps are the regulariser.

    Args:
        op: the operator.
        y: measurements.
        iters: CG iterations per network evaluation (DDS uses 5).
        rho: Tikhonov weight towards ``x0_hat`` (``>= 0``).
    """

    needs_grad = False

    def __init__(self, op: LinearOperator, y: torch.Tensor, *, iters: int = 5, rho: float = 0.0):
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.op, self.y, self.iters, self.rho = op, y, iters, rho
        self._aty = None

    def __call__(self, x0_hat, x_t, t):
        if self._aty is None or self._aty.dtype != x0_hat.dtype:
            self._aty = self.op.adjoint(self.y)
        rhs = self._aty + self.rho * x0_hat if self.rho else self._aty
        return cg_solve(self.op, rhs=rhs, rho=self.rho, x0=x0_hat, iters=self.iters)


def ddim_slope(process, times: Sequence[float] | torch.Tensor, eta: float = 0.0) -> Callable:
    """The slope ``d x_s / d x0_hat`` of a DDIM step along ``times`` (Song, Meng & Ermon 2021, eq. 12).

    Args:
        process: the process (its ``marginal``).
        times: the sampler's grid ``t_0 > ... > t_N = 0`` (``process.time_grid(steps, t_start=..., kind=...)``).
        eta: the sampler's ``eta``.

    Returns:
        a function ``slope(t) -> (B,)`` for the evaluation times ``t`` of shape ``(B,)``.
    """
    grid = torch.as_tensor(times, dtype=torch.float64).flatten()
    alpha, sigma = process.marginal(grid)
    alpha, sigma = alpha.double().tolist(), sigma.double().tolist()
    g = grid.tolist()

    def slope(t: torch.Tensor) -> torch.Tensor:
        i = int(torch.argmin((grid - float(t.flatten()[0])).abs()))
        if i + 1 >= len(g) or g[i + 1] == 0:
            c = 1.0
        else:
            a_t, s_t, a_s, s_s = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
            var = (eta * s_s) ** 2 * max(0.0, 1 - (a_t * s_s / (a_s * s_t)) ** 2)
            c = a_s - math.sqrt(max(s_s**2 - var, 0.0)) * a_t / s_t
        return torch.full(t.shape, c, dtype=t.dtype, device=t.device)

    return slope


class DPS:
    """Diffusion posterior sampling (Chung et al. 2023, Algorithm 1) as an ``x0_hat`` correction.

    ``g = grad_{x_t} ||y - A x0_hat(x_t)||^2``; the hook returns ``x0_hat - (zeta_t / c) g`` with
    ``zeta_t = zeta / ||y - A x0_hat||`` (per sample; or ``zeta`` when ``normalize=False``) and ``c`` the
    sampler's slope (``slope(t)``, e.g. :func:`ddim_slope`; 1 when not given), so that the next state
    moves by ``-zeta_t g``. Needs the samplers to run the denoiser under autograd (``needs_grad``).

    Args:
        op: the operator (its ``forward`` must be differentiable).
        y: measurements.
        zeta: step size.
        slope: ``slope(t) -> (B,)``: how the sampler's next state depends on ``x0_hat``.
        normalize: divide ``zeta`` by the residual norm (DPS's choice).
    """

    needs_grad = True

    def __init__(self, op: LinearOperator, y: torch.Tensor, zeta: float, *, slope: Callable | None = None,
                 normalize: bool = True):
        if zeta < 0:
            raise ValueError(f"zeta must be >= 0, got {zeta}")
        self.op, self.y, self.zeta, self.slope, self.normalize = op, y, float(zeta), slope, normalize

    def gradient(self, x0_hat: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, ||y - A x0_hat||^2)``: the gradient with respect to ``x_t`` and the per-sample loss."""
        if not x_t.requires_grad or x0_hat.grad_fn is None:
            raise ValueError("DPS needs x0_hat computed under autograd from x_t with requires_grad=True "
                             "(run it through a sampler that honours hook.needs_grad)")
        with torch.enable_grad():
            loss = sq_norm(self.y - self.op.forward(x0_hat))
            (g,) = torch.autograd.grad(loss.sum(), x_t)
        return g, loss.detach()

    def __call__(self, x0_hat, x_t, t):
        g, loss = self.gradient(x0_hat, x_t)
        step = torch.full_like(loss, self.zeta)
        if self.normalize:
            step = step / loss.sqrt().clamp(min=1e-12)
        if self.slope is not None:
            step = step / self.slope(t).to(step)
        return (x0_hat - bcast(step, g) * g).detach()


class Compose:
    """Apply hooks in order; needs gradients when any of them does (put a ``DPS`` hook first)."""

    def __init__(self, *hooks):
        self.hooks = hooks
        self.needs_grad = any(getattr(h, "needs_grad", False) for h in hooks)

    def __call__(self, x0_hat, x_t, t):
        for h in self.hooks:
            x0_hat = h(x0_hat, x_t, t)
        return x0_hat
