"""DiffusionMBIR's coupling of 2D slice priors along z: an ADMM total-variation step after each evaluation.

Owns :class:`ZTotalVariation`, a sampler hook (``hook(x0_hat, x_t, t)``) for a batch whose images are the
slices of one volume, in order. After the 2D prior denoises every slice, one (or a few) ADMM iterations
of

    min_x  1/(2L) ||A x - y||^2 + weight * ||D_z x||_1

(Chung, Ryu, McCann, Klasky & Ye 2023, "Solving 3D inverse problems using pre-trained 2D diffusion
models", eqs. 13-16) couple the slices: ``D_z`` differences neighbouring slices, ``L = ||A||^2`` makes
``weight`` independent of the operator's scale, and the x-update is a few CG steps started from the
Tweedie estimate. As in the paper, the split variable ``z`` and the scaled dual ``u`` persist across the
sampling steps. CG runs over the whole stack (one inner product for the volume), since ``D_z`` couples
the slices.
"""

from __future__ import annotations

import torch

from medidiff.core.operators import LinearOperator, cg_solve

from .baselines import operator_norm

__all__ = ["ZTotalVariation", "z_diff", "z_diff_adjoint"]


def z_diff(x: torch.Tensor) -> torch.Tensor:
    """Forward differences between consecutive images of a batch, ``x[k+1] - x[k]`` (``(S-1, ...)``)."""
    return x[1:] - x[:-1]


def z_diff_adjoint(d: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`z_diff`: ``(S, ...)`` from ``(S-1, ...)``."""
    zero = torch.zeros_like(d[:1])
    return torch.cat([zero, d]) - torch.cat([d, zero])


class _Stack(LinearOperator):
    """``A^H A / L + rho D_z^T D_z`` on a volume held as one sample ``(1, S, C, *plane)``."""

    def __init__(self, op: LinearOperator, inv_l: float, rho: float):
        self.op, self.inv_l, self.rho = op, inv_l, rho

    def normal(self, v: torch.Tensor) -> torch.Tensor:
        x = v[0]
        return (self.inv_l * self.op.normal(x) + self.rho * z_diff_adjoint(z_diff(x)))[None]


class ZTotalVariation:
    """ADMM total variation along the slices with data consistency (DiffusionMBIR, Chung et al. 2023, eq. 13).

    Args:
        op: the slice-wise operator (the batch axis holds the slices).
        y: the slices' measurements.
        weight: TV weight along z, on the network's scale.
        rho: ADMM penalty (default ``10 * weight``).
        admm_iters: ADMM iterations per network evaluation (the paper uses 1).
        cg_iters: CG iterations per x-update.
    """

    needs_grad = False

    def __init__(self, op: LinearOperator, y: torch.Tensor, weight: float, *, rho: float | None = None,
                 admm_iters: int = 1, cg_iters: int = 5):
        if weight < 0 or admm_iters < 1 or cg_iters < 1:
            raise ValueError("z_tv: need weight >= 0, admm_iters >= 1 and cg_iters >= 1")
        self.op, self.y, self.weight = op, y, float(weight)
        self.rho = float(rho) if rho is not None else 10 * self.weight
        if self.rho <= 0:
            raise ValueError(f"z_tv: the ADMM penalty must be positive, got {self.rho}")
        self.admm_iters, self.cg_iters = admm_iters, cg_iters
        self.z = self.u = None
        self._aty = None
        self._inv_l = None

    def __call__(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x0_hat.shape[0] < 2:
            return x0_hat
        if self._aty is None:
            self._inv_l = 1.0 / float(operator_norm(self.op, x0_hat).max().clamp(min=1e-30))
            self._aty = self._inv_l * self.op.adjoint(self.y)
            self.z = z_diff(x0_hat)
            self.u = torch.zeros_like(self.z)
        normal = _Stack(self.op, self._inv_l, self.rho)
        x = x0_hat
        for _ in range(self.admm_iters):
            rhs = self._aty + self.rho * z_diff_adjoint(self.z - self.u)
            x = cg_solve(normal, rhs=rhs[None], x0=x[None], iters=self.cg_iters)[0]
            v = z_diff(x) + self.u
            self.z = torch.sign(v) * (v.abs() - self.weight / self.rho).clamp(min=0)
            self.u = v - self.z
        return x
