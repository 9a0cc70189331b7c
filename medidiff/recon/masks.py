"""k-space sampling masks: fastMRI's 1D random and equispaced column masks, 2D variable-density masks; seeded.

1D masks sample whole columns (the last array axis, fastMRI's phase-encoding direction) and keep a
fully sampled centre of ``round(num_cols * center_fraction)`` columns (fastMRI's settings: 4x with 0.08,
8x with 0.04). With the same integer seed they are the masks fastMRI's ``RandomMaskFunc`` and
``EquispacedMaskFractionFunc`` draw (the same ``numpy.random.RandomState`` stream, same arithmetic; tests
compare against masks recorded from fastmri 0.3.0). fastmri itself is not a dependency: its wheel pulls in
pytorch-lightning, torchvision and pandas for these few lines.

2D masks (for 3D Cartesian or 2D research settings) keep a fully sampled calibration square and either
draw each k-space point independently with a Gaussian variable density, scaled to hit the acceleration
(Lustig, Donoho & Pauly 2007, sec. 4: variable-density random undersampling), or place points by
variable-density Poisson-disc sampling (:func:`poisson_mask`): no two points closer than a radius that
grows with the distance from the centre (Bridson 2007's dart throwing with a variable radius; as in
Lustig's and sigpy's ``poisson``), which spreads the samples more evenly than independent draws.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["random_mask", "equispaced_mask", "gaussian_mask", "poisson_mask", "column_mask", "make_mask",
           "center_lines", "acceleration_of"]


def _check(acceleration: float, center_fraction: float, num_cols: int) -> int:
    if acceleration < 1:
        raise ValueError(f"acceleration must be >= 1, got {acceleration}")
    if not 0 <= center_fraction < 1:
        raise ValueError(f"center_fraction must lie in [0, 1), got {center_fraction}")
    if num_cols < 2:
        raise ValueError(f"need at least 2 columns, got {num_cols}")
    n_low = round(num_cols * center_fraction)
    if n_low > num_cols / acceleration:
        raise ValueError(f"the centre ({n_low} of {num_cols} columns) exceeds the budget of acceleration "
                         f"{acceleration}; lower center_fraction")
    return n_low


def _center(num_cols: int, n_low: int) -> np.ndarray:
    """The fully sampled centre: ``n_low`` columns starting at ``(num_cols - n_low + 1) // 2``."""
    mask = np.zeros(num_cols, dtype=bool)
    pad = (num_cols - n_low + 1) // 2
    mask[pad:pad + n_low] = True
    return mask


def _rng(seed: int | None) -> np.random.RandomState:
    rng = np.random.RandomState(seed)
    rng.randint(1)  # fastMRI draws which (center_fraction, acceleration) pair to use; one pair -> 0
    return rng


def random_mask(num_cols: int, acceleration: float = 4, center_fraction: float = 0.08,
                seed: int | None = None) -> torch.Tensor:
    """fastMRI's random column mask: the centre plus columns drawn with ``p = (N/R - N_low) / (N - N_low)``.

    Args:
        num_cols: number of k-space columns ``N``.
        acceleration: target acceleration ``R`` (the expected number of columns is ``N / R``).
        center_fraction: fraction of central columns always sampled.
        seed: integer seed (fastMRI's ``seed`` argument gives the same mask).

    Returns:
        a boolean tensor of shape ``(num_cols,)``.
    """
    n_low = _check(acceleration, center_fraction, num_cols)
    rng = _rng(seed)
    prob = (num_cols / acceleration - n_low) / (num_cols - n_low)
    mask = _center(num_cols, n_low) | (rng.uniform(size=num_cols) < prob)
    return torch.from_numpy(mask)


def equispaced_mask(num_cols: int, acceleration: float = 4, center_fraction: float = 0.08,
                    seed: int | None = None, offset: int | None = None) -> torch.Tensor:
    """fastMRI's equispaced mask with matched acceleration (``EquispacedMaskFractionFunc``, its multi-coil data's).

    Outside the centre, columns ``round(offset + k * R')`` with ``R' = R (N_low - N) / (N_low R - N)``, so that
    about ``N / R`` columns are sampled in all.

    Args:
        num_cols: number of columns ``N``.
        acceleration: target acceleration ``R``.
        center_fraction: fraction of central columns always sampled.
        seed: integer seed for the random offset.
        offset: first sampled column outside the centre (random in ``[0, round(R'))`` when not given).

    Returns:
        a boolean tensor of shape ``(num_cols,)``.
    """
    n_low = _check(acceleration, center_fraction, num_cols)
    if n_low * acceleration >= num_cols:
        raise ValueError(f"the centre ({n_low} of {num_cols} columns) leaves no equispaced lines at acceleration "
                         f"{acceleration}; lower center_fraction")
    rng = _rng(seed)
    adjusted = (acceleration * (n_low - num_cols)) / (n_low * acceleration - num_cols)
    if offset is None:
        offset = rng.randint(0, high=round(adjusted))
    mask = _center(num_cols, n_low)
    mask[np.around(np.arange(offset, num_cols - 1, adjusted)).astype(np.int64)] = True
    return torch.from_numpy(mask)


def gaussian_mask(shape: tuple[int, int], acceleration: float = 8, calib: int = 16, seed: int | None = None,
                  ) -> torch.Tensor:
    """2D variable-density mask: independent draws with a Gaussian density and a ``calib``-square centre.

    The density ``min(1, c exp(-r^2 / (2 s^2)))`` (``r`` in units of the half-width, ``s = 0.3``) has ``c``
    chosen by bisection so that the expected number of samples, centre included, is ``H W / R``.

    Args:
        shape: ``(H, W)`` of k-space.
        acceleration: target acceleration.
        calib: side of the fully sampled central square (0 for none).
        seed: integer seed.

    Returns:
        a boolean tensor of shape ``(H, W)``.
    """
    h, w = shape
    if acceleration < 1:
        raise ValueError(f"acceleration must be >= 1, got {acceleration}")
    if calib < 0 or calib > min(h, w):
        raise ValueError(f"calib must lie in [0, {min(h, w)}], got {calib}")
    if calib * calib > h * w / acceleration:
        raise ValueError(f"the calibration square ({calib}^2) exceeds the budget of acceleration {acceleration}")
    ky = (np.arange(h) - h // 2) / (h / 2)
    kx = (np.arange(w) - w // 2) / (w / 2)
    r2 = ky[:, None] ** 2 + kx[None, :] ** 2
    base = np.exp(-r2 / (2 * 0.3**2))
    centre = np.zeros((h, w), dtype=bool)
    y0, x0 = h // 2 - calib // 2, w // 2 - calib // 2
    centre[y0:y0 + calib, x0:x0 + calib] = True
    target = h * w / acceleration
    lo, hi = -20.0, 20.0  # bisection on log c
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        p = np.where(centre, 1.0, np.minimum(1.0, math.exp(mid) * base))
        lo, hi = (mid, hi) if p.sum() < target else (lo, mid)
    p = np.where(centre, 1.0, np.minimum(1.0, math.exp(hi) * base))
    rng = np.random.RandomState(seed)
    return torch.from_numpy(rng.uniform(size=(h, w)) < p)


def _poisson_points(h: int, w: int, r0: float, alpha: float, centre: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Dart throwing in the fixed random ``order``: a point is kept when no kept point lies within its radius.

    The radius at ``(ky, kx)`` is ``r0 * (1 + alpha * r)`` pixels, ``r`` the distance from the centre in units of
    the half-width; the calibration square is always kept and does not block other points.
    """
    ky = (np.arange(h) - h // 2) / (h / 2)
    kx = (np.arange(w) - w // 2) / (w / 2)
    radius = r0 * (1 + alpha * np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2))
    kept = centre.copy()
    taken = np.zeros((h, w), dtype=bool)
    reach = int(np.ceil(radius.max()))
    for flat in order:
        y, x = divmod(int(flat), w)
        if kept[y, x]:
            continue
        rad = radius[y, x]
        y0, y1, x0, x1 = max(0, y - reach), min(h, y + reach + 1), max(0, x - reach), min(w, x + reach + 1)
        window = taken[y0:y1, x0:x1]
        if window.any():
            yy, xx = np.nonzero(window)
            if bool(((yy + y0 - y) ** 2 + (xx + x0 - x) ** 2 < rad * rad).any()):
                continue
        kept[y, x] = taken[y, x] = True
    return kept


def poisson_mask(shape: tuple[int, int], acceleration: float = 8, calib: int = 16, seed: int | None = None,
                 alpha: float = 2.0, tol: float = 0.03) -> torch.Tensor:
    """2D variable-density Poisson-disc mask with a ``calib``-square centre (Bridson 2007; Lustig et al. 2007).

    Points are thrown in one seeded random order and kept when no kept point lies within the local radius
    ``r0 (1 + alpha r)``; ``r0`` is found by bisection on its logarithm so that the number of samples,
    centre included, is ``H W / R`` within ``tol`` (relative).

    Args:
        shape: ``(H, W)`` of k-space.
        acceleration: target acceleration ``R``.
        calib: side of the fully sampled central square (0 for none).
        seed: integer seed.
        alpha: how fast the radius grows towards the edge of k-space (0: uniform Poisson disc).
        tol: accepted relative error of the number of samples.

    Returns:
        a boolean tensor of shape ``(H, W)``.
    """
    h, w = shape
    if acceleration < 1:
        raise ValueError(f"acceleration must be >= 1, got {acceleration}")
    if calib < 0 or calib > min(h, w) or calib * calib > h * w / acceleration:
        raise ValueError(f"calib must lie in [0, {min(h, w)}] and fit the budget of acceleration {acceleration}, "
                         f"got {calib}")
    centre = np.zeros((h, w), dtype=bool)
    y0, x0 = h // 2 - calib // 2, w // 2 - calib // 2
    centre[y0:y0 + calib, x0:x0 + calib] = True
    order = np.random.RandomState(seed).permutation(h * w)
    target = h * w / acceleration
    lo, hi = math.log(0.3), math.log(max(h, w))  # log r0: more points at lo, fewer at hi
    best = None
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        mask = _poisson_points(h, w, math.exp(mid), alpha, centre, order)
        n = int(mask.sum())
        if best is None or abs(n - target) < abs(int(best.sum()) - target):
            best = mask
        if abs(n - target) <= tol * target:
            break
        lo, hi = (lo, mid) if n < target else (mid, hi)
    return torch.from_numpy(best)


def column_mask(shape: tuple[int, ...], columns: torch.Tensor) -> torch.Tensor:
    """Expand a column mask ``(W,)`` over the rows: a float tensor ``(H, W)`` (``shape`` ends in ``H, W``)."""
    h, w = shape[-2], shape[-1]
    if columns.shape != (w,):
        raise ValueError(f"a column mask of {w} entries is needed, got shape {tuple(columns.shape)}")
    return columns.to(torch.float32).expand(h, w).clone()


def make_mask(shape: tuple[int, ...], kind: str = "random", acceleration: float = 4,
              center_fraction: float | None = None, seed: int | None = None) -> torch.Tensor:
    """A float ``(H, W)`` 0/1 k-space mask: ``random``, ``equispaced`` (columns), ``gaussian`` or ``poisson`` (2D).

    Args:
        shape: k-space shape, ending in ``(H, W)``.
        kind: mask family.
        acceleration: target acceleration.
        center_fraction: fraction of central columns (default fastMRI's: 0.08 at 4x, 0.04 at 8x, else
            ``0.32 / R``); for ``gaussian`` and ``poisson`` the calibration square's side is
            ``round(center_fraction * W)``.
        seed: integer seed.

    Returns:
        the mask, float32, shape ``(H, W)``.
    """
    h, w = shape[-2], shape[-1]
    if center_fraction is None:
        center_fraction = {4: 0.08, 8: 0.04}.get(acceleration, 0.32 / acceleration)
    if kind == "random":
        return column_mask(shape, random_mask(w, acceleration, center_fraction, seed))
    if kind == "equispaced":
        return column_mask(shape, equispaced_mask(w, acceleration, center_fraction, seed))
    if kind == "gaussian":
        calib = round(center_fraction * w)
        return gaussian_mask((h, w), acceleration, calib, seed).to(torch.float32)
    if kind == "poisson":
        return poisson_mask((h, w), acceleration, round(center_fraction * w), seed).to(torch.float32)
    raise ValueError(f"unknown mask kind {kind!r}; choose random, equispaced, gaussian or poisson")


def center_lines(columns: torch.Tensor) -> int:
    """Number of contiguous sampled columns around the centre column ``W // 2`` (the calibration region)."""
    cols = columns.bool().tolist()
    c = len(cols) // 2
    if not cols[c]:
        return 0
    lo, hi = c, c
    while lo > 0 and cols[lo - 1]:
        lo -= 1
    while hi < len(cols) - 1 and cols[hi + 1]:
        hi += 1
    return hi - lo + 1


def acceleration_of(mask: torch.Tensor) -> float:
    """Achieved acceleration: number of k-space entries over number sampled."""
    return float(mask.numel() / mask.bool().sum().clamp(min=1))
