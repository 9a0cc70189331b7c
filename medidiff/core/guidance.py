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

Classifier guidance (:class:`ClassifierGuidance`, with :class:`NoisyClassifier` adapting a network trained on
noisy images) steers a sample toward a class ``y``. Dhariwal & Nichol 2021 (eq. 14, Algorithm 2) shift the
noise estimate, ``eps' = eps - s sqrt(1 - alpha_bar_t) grad_{x_t} log p(y | x_t)``; with this module's
``x_t = alpha x0 + sigma eps`` that is ``eps' = eps - s sigma g``. Every sampler derives ``eps`` from
``x0_hat`` as ``(x_t - alpha x0_hat) / sigma``, so the same shift is ``x0' = x0_hat + (sigma^2 / alpha) s g``:
then ``(x_t - alpha x0') / sigma = eps - s sigma g`` exactly, and the score ``(alpha x0_hat - x_t) / sigma^2``
moves by ``s g``, the guided score ``grad log p_t(x) + s grad log p(y | x)`` of Song et al. 2021 (sec. 5)
for every process (VP, sub-VP, VE with ``alpha = 1``, DDPM). The gradient is taken through the classifier
only, so the denoiser runs without autograd (``needs_grad = False``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .operators import LinearOperator, cg_solve, sq_norm
from .utils import batch_time, bcast

__all__ = ["Projection", "MeasurementMerge", "ConjugateGradient", "DPS", "ddim_slope", "ddim_gain", "Compose",
           "NoisyClassifier", "ClassifierGuidance"]


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

    A DDIM sampler takes its noise estimate from the ``x0`` a hook returns, ``(x_t - alpha_t x0) / sigma_t``;
    DDS (Algorithm 1) keeps the network's own estimate and puts only the corrected ``x0'`` into the step. With
    ``gain`` (:func:`ddim_gain`) the hook returns ``x0_hat + gain (x0' - x0_hat)``, whose DDIM step is DDS's.

    Args:
        op: the operator.
        y: measurements.
        iters: CG iterations per network evaluation (DDS uses 5).
        rho: Tikhonov weight towards ``x0_hat`` (``>= 0``).
        gain: ``gain(t) -> (B,)``, DDS's step through the sampler (``None``: the sampler's own noise estimate).
        clip: CG starts from ``x0_hat`` clamped to ``[-clip, clip]`` (``None``: as it is).
    """

    needs_grad = False

    def __init__(self, op: LinearOperator, y: torch.Tensor, *, iters: int = 5, rho: float = 0.0,
                 gain: Callable | None = None, clip: float | None = None):
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.op, self.y, self.iters, self.rho, self.gain, self.clip = op, y, iters, rho, gain, clip
        self._aty = None

    def __call__(self, x0_hat, x_t, t):
        if self._aty is None or self._aty.dtype != x0_hat.dtype:
            self._aty = self.op.adjoint(self.y)
        start = x0_hat if self.clip is None else x0_hat.clamp(-self.clip, self.clip)
        rhs = self._aty + self.rho * start if self.rho else self._aty
        x0 = cg_solve(self.op, rhs=rhs, rho=self.rho, x0=start, iters=self.iters)
        if self.gain is None:
            return x0
        return x0_hat + bcast(self.gain(t), x0) * (x0 - x0_hat)


def ddim_gain(process, times: Sequence[float] | torch.Tensor, eta: float = 0.0) -> Callable:
    """``alpha_s / c``: how much a correction of ``x0`` must be scaled for a DDIM step to keep the network's noise
    estimate (DDS's step, see :class:`ConjugateGradient`), with ``c`` the step's slope (:func:`ddim_slope`) and
    ``alpha_s`` the next time's; 1 on the last step.

    Returns:
        a function ``gain(t) -> (B,)`` for the evaluation times ``t`` of shape ``(B,)``.
    """
    coefficients = _ddim_coefficients(process, times, eta)

    def gain(t: torch.Tensor) -> torch.Tensor:
        a_s, c = coefficients(t)
        return torch.full(t.shape, a_s / c, dtype=t.dtype, device=t.device)

    return gain


def ddim_slope(process, times: Sequence[float] | torch.Tensor, eta: float = 0.0) -> Callable:
    """The slope ``d x_s / d x0_hat`` of a DDIM step along ``times`` (Song, Meng & Ermon 2021, eq. 12).

    Args:
        process: the process (its ``marginal``).
        times: the sampler's grid ``t_0 > ... > t_N = 0`` (``process.time_grid(steps, t_start=..., kind=...)``).
        eta: the sampler's ``eta``.

    Returns:
        a function ``slope(t) -> (B,)`` for the evaluation times ``t`` of shape ``(B,)``.
    """
    coefficients = _ddim_coefficients(process, times, eta)

    def slope(t: torch.Tensor) -> torch.Tensor:
        return torch.full(t.shape, coefficients(t)[1], dtype=t.dtype, device=t.device)

    return slope


def _ddim_coefficients(process, times, eta: float) -> Callable:
    """``(alpha_s, c)`` of the DDIM step from an evaluation time ``t`` to the next on ``times``: the next time's
    ``alpha`` and the slope ``d x_s / d x0_hat`` (``(1, 1)`` on the last step)."""
    grid = torch.as_tensor(times, dtype=torch.float64).flatten()
    alpha, sigma = process.marginal(grid)
    alpha, sigma = alpha.double().tolist(), sigma.double().tolist()
    g = grid.tolist()

    def coefficients(t: torch.Tensor) -> tuple[float, float]:
        i = int(torch.argmin((grid - float(t.flatten()[0])).abs()))
        if i + 1 >= len(g) or g[i + 1] == 0:
            return 1.0, 1.0
        a_t, s_t, a_s, s_s = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        var = (eta * s_s) ** 2 * max(0.0, 1 - (a_t * s_s / (a_s * s_t)) ** 2)
        return a_s, a_s - math.sqrt(max(s_s**2 - var, 0.0)) * a_t / s_t

    return coefficients


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


class NoisyClassifier(torch.nn.Module):
    """A classifier of noisy images ``net(x_in, t_net) -> logits`` as a function of ``(x_t, t)``.

    The input and time are prepared as ``medidiff.core.denoiser.Denoiser`` prepares them: ``x_t`` divided by
    ``sqrt(alpha^2 + sigma^2)`` when ``scale_input`` (a no-op for VP processes), ``t`` mapped by
    ``process.net_time``. Training (``p(y | x_t, t)`` on ``process.noised`` images) and guidance use the same
    adapter, so they agree on both.

    Args:
        net: a module called as ``net(x, timesteps) -> (B, classes)`` (``medidiff.nets.build_classifier``).
        process: the forward process whose ``x_t`` it classifies.
        scale_input: scale the input to unit variance (as the denoiser does).
        time_fn: maps ``t`` to the network's time input; defaults to ``process.net_time``.
    """

    def __init__(self, net: torch.nn.Module, process, *, scale_input: bool = True,
                 time_fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.net, self.process, self.scale_input = net, process, scale_input
        self.time_fn = time_fn or process.net_time

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Class logits ``(B, classes)`` of ``x_t`` at times ``t`` (``(B,)`` or a number)."""
        t = batch_time(t, x_t)
        x_in = x_t
        if self.scale_input:
            alpha, sigma = self.process.marginal(t)
            x_in = x_t / bcast(torch.sqrt(alpha**2 + sigma**2), x_t)
        return self.net(x_in, self.time_fn(t).to(x_in.dtype))


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, eq. 14) toward class ``target`` as an ``x0_hat`` correction.

    Returns ``x0_hat + s (sigma_t^2 / alpha_t) grad_{x_t} log p(target | x_t, t)``, the noise-space shift
    ``eps - s sigma_t grad log p`` of the paper written for ``x0_hat`` (derived in the module docstring). With
    DDIM (``eta = 0``) it is Dhariwal & Nichol's Algorithm 2 and Wolleb et al. 2022's decoding step. The
    gradient is computed in (at least) float32 through the classifier alone, per sample.

    Args:
        classifier: ``classifier(x_t, t) -> logits (B, classes)`` at continuous times ``t`` of shape ``(B,)``
            (e.g. a :class:`NoisyClassifier`).
        process: the process of the sampler (its ``marginal`` gives ``alpha_t`` and ``sigma_t``).
        scale: the guidance scale ``s >= 0`` (0: no correction).
        target: the class steered toward: an int or a ``(B,)`` tensor of classes.
    """

    needs_grad = False

    def __init__(self, classifier: Callable, process, scale: float, target: int | torch.Tensor = 0):
        if scale < 0:
            raise ValueError(f"the guidance scale must be >= 0, got {scale}")
        self.classifier, self.process, self.scale, self.target = classifier, process, float(scale), target

    def log_prob_grad(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grad_{x_t} log p(target | x_t, t), log p(target | x_t, t))``, shaped like ``x_t`` and ``(B,)``."""
        with torch.enable_grad():
            dtype = torch.promote_types(x_t.dtype, torch.float32)  # at least float32
            x = x_t.detach().to(dtype).requires_grad_(True)
            log_p = torch.log_softmax(self.classifier(x, t.to(dtype)).to(dtype), dim=-1)
            target = torch.as_tensor(self.target, device=x.device, dtype=torch.long).expand(x.shape[0])
            chosen = log_p.gather(1, target[:, None])[:, 0]
            (grad,) = torch.autograd.grad(chosen.sum(), x)
        return grad.to(x_t.dtype), chosen.detach()

    def __call__(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.scale == 0:
            return x0_hat
        grad, _ = self.log_prob_grad(x_t, t)
        alpha, sigma = self.process.marginal(t.to(torch.float64))
        shift = (self.scale * sigma**2 / alpha).to(x0_hat.dtype)
        return (x0_hat + bcast(shift, grad) * grad).detach()
