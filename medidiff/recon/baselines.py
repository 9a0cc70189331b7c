"""Classical reconstructions to set beside the diffusion solvers: zero-filled/adjoint, FBP, total variation.

Owns :func:`zero_filled`, :func:`fbp`, :func:`tv_reconstruct` (isotropic TV by ADMM, Goldstein & Osher's
split Bregman form), :func:`operator_norm` and :data:`TV_WEIGHT`, the TV weight chosen once per modality.

TV solves ``min_x 1/(2L) ||A x - y||^2 + lam TV(x)`` with ``L = ||A||^2`` (power iteration) and
``lam = weight * s``, ``s`` the 99th percentile of the initial estimate's magnitude. Both normalisations make
``weight`` independent of the image's units and of the operator's scale (number of views, detector
bins), so one value serves a whole modality. The values in :data:`TV_WEIGHT` were picked once on a 64 x 64
Shepp-Logan phantom with Gaussian noise of 1e-3 of the largest measurement (MRI: fastMRI random mask at 4x,
single coil, weight from {3e-3, 1e-2, 3e-2}: 23.4 dB against 18.4 zero-filled; CT: 60 views over 180 degrees,
weight from {3e-5, 1e-4, 3e-4}: 48.9 dB against 28.0 for FBP), with the ADMM penalty ``rho = 10 weight``
(better than 30 and 100 times), 100 iterations; they are not tuned per case.
"""

from __future__ import annotations

import torch

from ..core.operators import LinearOperator, cg_solve
from ..core.utils import bcast

__all__ = ["zero_filled", "fbp", "tv_reconstruct", "operator_norm", "grad", "grad_adjoint", "TV_WEIGHT"]

TV_WEIGHT = {"mri": 3e-3, "ct": 3e-5}


def zero_filled(op: LinearOperator, y: torch.Tensor) -> torch.Tensor:
    """The adjoint reconstruction ``A^H y`` (for Cartesian MRI: the inverse FFT of the zero-filled k-space)."""
    return op.adjoint(y)


def fbp(op, y: torch.Tensor, filter: str = "ramp") -> torch.Tensor:
    """Filtered back-projection through a CT operator's ``fbp`` (Kak & Slaney 1988, ch. 3)."""
    if not hasattr(op, "fbp"):
        raise ValueError(f"{type(op).__name__} has no filtered back-projection")
    return op.fbp(y, filter)


def operator_norm(op: LinearOperator, like: torch.Tensor, iters: int = 20,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample ``||A||^2`` (largest eigenvalue of ``A^H A``) by power iteration (von Mises 1929).

    Args:
        op: the operator.
        like: a tensor shaped like the images (sets shape, dtype and device).
        iters: power iterations.
        generator: for the random start.

    Returns:
        ``(B,)`` estimates.
    """
    v = torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)
    lam = torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
    for _ in range(iters):
        v = v / bcast(v.flatten(1).norm(dim=1).clamp(min=1e-30), v)
        w = op.normal(v)
        lam = (v * w).flatten(1).sum(dim=1)
        v = w
    return lam


def grad(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Forward differences along ``dims`` (Neumann boundary) on a new axis 2: ``(B, C, len(dims), *spatial)``."""
    out = []
    for d in dims:
        diff = torch.diff(x, dim=d)
        pad = [0, 0] * (x.ndim - 1 - d) + [0, 1]
        out.append(torch.nn.functional.pad(diff, pad))
    return torch.stack(out, dim=2)


def grad_adjoint(g: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The adjoint of :func:`grad`: minus the backward-difference divergence."""
    return -_div(g, dims)


def _div(g: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Backward-difference divergence, ``-grad^T``."""
    x = torch.zeros_like(g[:, :, 0])
    for i, d in enumerate(dims):
        gi = g[:, :, i]
        n = gi.shape[d]
        inner = gi.narrow(d, 0, n - 1)
        pad_front = [0, 0] * (x.ndim - 1 - d) + [1, 0]
        pad_back = [0, 0] * (x.ndim - 1 - d) + [0, 1]
        x = x + torch.nn.functional.pad(inner, pad_back) - torch.nn.functional.pad(inner, pad_front)
    return x


class _TVNormal(LinearOperator):
    """``A^H A / L + rho D^T D`` as a normal operator for the ADMM x-update."""

    def __init__(self, op, inv_l, rho, dims):
        self.op, self.inv_l, self.rho, self.dims = op, inv_l, rho, dims

    def normal(self, x):
        return bcast(self.inv_l, x) * self.op.normal(x) + self.rho * grad_adjoint(grad(x, self.dims), self.dims)


def tv_reconstruct(op: LinearOperator, y: torch.Tensor, x_init: torch.Tensor, *, weight: float | None = None,
                   modality: str | None = None, iters: int = 100, rho: float | None = None, cg_iters: int = 5,
                   dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """Isotropic total-variation reconstruction (Rudin, Osher & Fatemi 1992) by ADMM (Goldstein & Osher 2009, sec. 3).

    Minimises ``1/(2L) ||A x - y||^2 + weight * s * sum |grad x|`` where the gradient magnitude groups the
    channels (real and imaginary parts of MRI images) and the differentiated axes.

    Args:
        op: the forward operator.
        y: measurements.
        x_init: initial estimate (zero-filled for MRI, FBP for CT); also sets the intensity scale ``s``.
        weight: TV weight; default ``TV_WEIGHT[modality]``.
        modality: ``mri`` or ``ct`` (for the default weight).
        iters: ADMM iterations.
        rho: ADMM penalty (default ``10 * weight``).
        cg_iters: CG steps per x-update (warm-started).
        dims: tensor axes to differentiate (default: every spatial axis; ``(3, 4)`` for in-plane TV of a volume).

    Returns:
        the reconstruction, shaped like ``x_init``.
    """
    if weight is None:
        if modality not in TV_WEIGHT:
            raise ValueError(f"give weight or modality in {sorted(TV_WEIGHT)}, got {modality!r}")
        weight = TV_WEIGHT[modality]
    if rho is None:
        rho = 10 * weight if weight > 0 else 1e-3
    if weight < 0 or rho <= 0 or iters < 1 or cg_iters < 1:
        raise ValueError("need weight >= 0, rho > 0, iters >= 1 and cg_iters >= 1")
    dims = tuple(range(2, x_init.ndim)) if dims is None else tuple(dims)
    if any(d < 2 or d >= x_init.ndim for d in dims):
        raise ValueError(f"dims must be spatial axes of a {x_init.ndim}-d tensor, got {dims}")
    mag = x_init.abs().pow(2).sum(dim=1).sqrt().flatten(1)
    scale = torch.quantile(mag.float(), 0.99, dim=1).to(x_init.dtype).clamp(min=1e-12)
    inv_l = 1.0 / operator_norm(op, x_init).clamp(min=1e-30)
    thresh = bcast(weight * scale / rho, x_init).unsqueeze(2)
    normal = _TVNormal(op, inv_l, rho, dims)
    aty = bcast(inv_l, x_init) * op.adjoint(y)
    x = x_init.clone()
    d = grad(x, dims)
    u = torch.zeros_like(d)
    for _ in range(iters):
        x = cg_solve(normal, rhs=aty + rho * grad_adjoint(d - u, dims), x0=x, iters=cg_iters)
        gx = grad(x, dims)
        v = gx + u
        norm = v.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
        d = v * (1 - thresh / norm.clamp(min=1e-30)).clamp(min=0)
        u = v - d
    return x
