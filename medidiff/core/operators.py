"""Linear operators for inverse problems: a small protocol, a mask operator, batched conjugate gradients.

Owns the measurement side of the core, free of any modality: an operator ``A`` maps images
``x`` of shape ``(B, C, *spatial)`` (2 or 3 spatial dims) to measurements ``y`` of any shape with the
same batch size, real or complex. It offers

- ``forward(x) = A x`` (also ``A(x)``), ``adjoint(y) = A^H y`` and ``normal(x) = A^H A x``;
- ``coisometry``: ``True`` when ``A A^H = I`` on the measurement space (a sampling mask, a masked
  unitary transform), so that ``A^H A`` is an orthogonal projection and ``x + A^H (y - A x)`` enforces
  the data exactly;
- ``merge(x, y, lam)``: Song et al. 2022's measurement-space merge, available for coisometries (and for
  operators that define their own, such as sparse-view CT on a full grid of views).

Adjoints are taken with respect to the real inner product ``<a, b> = Re sum(conj(a) b)``, so an operator
from real images to complex measurements (MRI: two image channels, real and imaginary) has an exact
adjoint in the same sense; :func:`adjoint_test` checks ``<A x, y> = <x, A^H y>``.

:func:`cg_solve` solves ``(A^H A + rho I) x = A^H y + rho z`` for every sample of a batch at once
(Hestenes & Stiefel 1952); it serves the data-consistency steps of ``medidiff.core.guidance``.

Written here rather than taken from a library: deepinv's ``LinearPhysics`` has the same three methods,
but deepinv pulls in torchvision and a CUDA build of torch; the protocol is twenty lines.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .utils import bcast

__all__ = [
    "LinearOperator",
    "MaskOperator",
    "Scaled",
    "inner",
    "sq_norm",
    "cg_solve",
    "adjoint_test",
]


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample real inner product ``Re sum(conj(a) * b)`` over all but the batch dimension.

    Args:
        a: tensor of shape ``(B, ...)``, real or complex.
        b: tensor of the same shape.

    Returns:
        a real tensor of shape ``(B,)``.
    """
    prod = a.conj() * b if a.is_complex() else a * b
    if prod.is_complex():
        prod = prod.real
    return prod.reshape(prod.shape[0], -1).sum(dim=1)


def sq_norm(a: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm ``sum |a|^2``, shape ``(B,)``."""
    return inner(a, a)


class LinearOperator:
    """A linear map ``A`` from images ``(B, C, *spatial)`` to measurements; subclasses define ``forward``/``adjoint``.

    Attributes:
        coisometry: ``True`` when ``A A^H = I`` (then ``A^H A`` is an orthogonal projection).
    """

    coisometry: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``."""
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^H y`` (adjoint for the real inner product)."""
        raise NotImplementedError

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H A x``."""
        return self.adjoint(self.forward(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def merge(self, x: torch.Tensor, y: torch.Tensor, lam: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Measurement-space merge (Song et al. 2022, eq. 9): measured entries become ``(1 - lam) A x + lam y``.

        For a coisometry ``A = M T`` (``T`` unitary, ``M`` a 0/1 mask) this is ``x + lam A^H (y - A x)``;
        ``lam = 1`` is the hard projection onto ``{x : A x = y}``.

        Args:
            x: images ``(B, C, *spatial)``.
            y: measurements, shaped like ``A x``.
            lam: weight of the measurement, a number or ``(B,)``, in ``[0, 1]``.

        Returns:
            the merged images.
        """
        if not self.coisometry:
            raise ValueError(f"{type(self).__name__} has no measurement-space merge (it is not a coisometry)")
        return x + bcast(lam, x) * self.adjoint(y - self.forward(x))

    def __mul__(self, c: float) -> LinearOperator:
        return Scaled(self, c)

    __rmul__ = __mul__


class Scaled(LinearOperator):
    """``c * A`` for a real number ``c`` (used to balance data terms)."""

    def __init__(self, op: LinearOperator, c: float):
        self.op, self.c = op, float(c)
        self.coisometry = op.coisometry and abs(self.c) == 1.0

    def forward(self, x):
        return self.c * self.op.forward(x)

    def adjoint(self, y):
        return self.c * self.op.adjoint(y)


class MaskOperator(LinearOperator):
    """Elementwise mask ``A x = m * x`` (inpainting, patch replacement); self-adjoint, a coisometry for 0/1 masks.

    Measurements keep the image's shape, with zeros where nothing is measured.

    Args:
        mask: a tensor broadcastable against the images, e.g. ``(B, 1, *spatial)`` or ``(*spatial)``.
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = torch.as_tensor(mask)
        binary = bool(((self.mask == 0) | (self.mask == 1)).all())
        self.coisometry = binary

    def _m(self, x):
        return self.mask.to(device=x.device, dtype=x.real.dtype if x.is_complex() else x.dtype)

    def forward(self, x):
        return self._m(x) * x

    def adjoint(self, y):
        return self._m(y) * y

    def normal(self, x):
        m = self._m(x)
        return m * m * x


def cg_solve(op: LinearOperator, y: torch.Tensor | None = None, *, rho: float | torch.Tensor = 0.0,
             z: torch.Tensor | None = None, x0: torch.Tensor | None = None, rhs: torch.Tensor | None = None,
             iters: int = 10, tol: float = 0.0, callback: Callable | None = None) -> torch.Tensor:
    """Batched conjugate gradients on ``(A^H A + rho I) x = A^H y + rho z`` (Hestenes & Stiefel 1952).

    Every sample runs its own CG (per-sample step sizes); a sample whose residual is below ``tol``
    relative to its right-hand side stops moving, and so does one whose residual has reached rounding
    level (``10 eps`` of the dtype relative to the right-hand side): there CG breaks down (a step of
    ``r^H r / p^H A p`` with both at rounding level), e.g. after converging exactly in as many steps as the
    normal operator has distinct eigenvalues (a real image under a single-coil Cartesian mask: two).

    Args:
        op: the operator ``A``.
        y: measurements (or give ``rhs`` directly).
        rho: Tikhonov weight, a number or ``(B,)``, ``>= 0``; ``0`` solves the normal equations.
        z: the point the Tikhonov term pulls towards (default 0).
        x0: the starting point (default ``z``, else zeros); DDS starts from the Tweedie estimate.
        rhs: the right-hand side, if already computed (then ``y`` and ``z`` are ignored).
        iters: number of CG iterations.
        tol: relative residual at which a sample stops.
        callback: called as ``callback(k, x)`` after each iteration.

    Returns:
        the approximate solution, shaped like the images.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if rhs is None:
        if y is None:
            raise ValueError("give the measurements y or the right-hand side rhs")
        rhs = op.adjoint(y)
        if z is not None:
            rhs = rhs + bcast(rho, rhs) * z
    rho_t = torch.as_tensor(rho, dtype=rhs.dtype, device=rhs.device)
    if bool((rho_t < 0).any()):
        raise ValueError("rho must be >= 0")

    def apply(v):
        return op.normal(v) + bcast(rho_t, v) * v

    x = (x0 if x0 is not None else (z if z is not None else torch.zeros_like(rhs))).clone()
    r = rhs - apply(x)
    p = r.clone()
    rr = sq_norm(r)
    floor = 10 * torch.finfo(r.real.dtype if r.is_complex() else r.dtype).eps
    stop = max(tol, floor) ** 2 * sq_norm(rhs)
    for k in range(iters):
        active = rr > stop
        if not bool(active.any()):
            break
        ap = apply(p)
        pap = inner(p, ap)
        alpha = torch.where(active & (pap > 0), rr / pap.clamp(min=torch.finfo(pap.dtype).tiny), 0.0)
        x = x + bcast(alpha, x) * p
        r = r - bcast(alpha, r) * ap
        rr_new = sq_norm(r)
        beta = torch.where(active, rr_new / rr.clamp(min=torch.finfo(rr.dtype).tiny), 0.0)
        p = r + bcast(beta, p) * p
        rr = rr_new
        if callback is not None:
            callback(k, x)
    return x


def adjoint_test(op: LinearOperator, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative mismatch of the dot-product test ``|<A x, y> - <x, A^H y>| / max(|<A x, y>|, |<x, A^H y>|)``.

    Use float64 inputs; a correct adjoint gives ~1e-15.

    Args:
        op: the operator.
        x: images ``(B, C, *spatial)``.
        y: measurements shaped like ``A x``.

    Returns:
        the largest relative mismatch over the batch, a Python float.
    """
    ax = op.forward(x)
    if ax.shape != y.shape:
        raise ValueError(f"y has shape {tuple(y.shape)}, A x has shape {tuple(ax.shape)}")
    lhs = inner(ax, y)
    rhs = inner(x, op.adjoint(y))
    scale = torch.maximum(lhs.abs(), rhs.abs()).clamp(min=torch.finfo(lhs.dtype).tiny)
    return float(((lhs - rhs).abs() / scale).max())
