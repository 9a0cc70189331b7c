"""Reconstruction problems: the operator, measurements and classical estimate of a stack of slices, in two scales.

Owns :class:`Problem` (what a solver needs about one stack of 2D slices), :class:`RealImage` (a complex
MRI operator restricted to real images), :class:`Scale` (the affine map between the network's scale and
the physical one) and the retrospective simulations :func:`simulate_mri` and :func:`simulate_ct`.
Measured data (fastMRI k-space, sinograms) are turned into problems by ``medidiff.recon.measured``.

Conventions (the recon task documents them to users):

- Images are stacks ``(S, 1, H, W)`` of real slices in physical units: the scan's own units for MRI;
  for CT the attenuation relative to water ``mu / mu_water = (HU + 1000) / 1000`` (air 0, water 1), so
  that line integrals are physical, ``-log(I / I0) = mu_water * pixel_mm * (A x)``.
- MRI images are reconstructed as real images ``x`` with the phase in the coil maps: ``A = M F S`` applied to
  ``x + 0i`` (:class:`RealImage`). For simulated data the maps are birdcage coils (one coil: no phase); for
  multi-coil data the maps are estimated from the calibration region (low-resolution coil images over
  their root-sum-of-squares), so a measured object's smooth phase lives in the maps (one coil: the maps
  are the low-resolution phase, ``medidiff.recon.mri.estimate_maps``).
- The network's scale: ``physical = a * network + b``. MRI: ``b = a``, so that 0 (background) is -1 and the
  99.5th percentile of the zero-filled image's foreground is 1 (measured from the measurements, never from
  the reference); CT: the model's HU window is ``[-1, 1]``.
- Simulated measurements are seeded: the MRI mask by ``seed`` (one mask for every slice of a volume, as a
  2D multi-slice acquisition), noise by ``seed + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from medidiff.core.operators import LinearOperator

from . import baselines, masks
from .ct import ParallelBeamCT, poisson_noise, view_angles
from .mri import MultiCoilMRI, SingleCoilMRI, birdcage_maps, estimate_maps, ifft2c, rss

__all__ = ["Problem", "RealImage", "Scale", "simulate_mri", "simulate_ct", "mri_problem", "ct_problem",
           "MU_WATER", "hu_to_mu", "mu_to_hu"]

#: Linear attenuation of water (1/mm) at about 70 keV, for dose simulation and measured sinograms.
MU_WATER = 0.0192


def hu_to_mu(hu: torch.Tensor) -> torch.Tensor:
    """Hounsfield units to attenuation relative to water, ``(HU + 1000) / 1000``."""
    return (hu + 1000.0) / 1000.0


def mu_to_hu(mu: torch.Tensor) -> torch.Tensor:
    """Attenuation relative to water to Hounsfield units."""
    return mu * 1000.0 - 1000.0


class RealImage(LinearOperator):
    """A complex-image MRI operator applied to real images ``(B, 1, *spatial)`` (zero imaginary part).

    Its adjoint is the real part of the complex adjoint. :meth:`merge` is the data-consistency step of
    score-MRI: ``x + lam Re(A^H (y - A x))``, the projection in complex image space followed by the real
    part (exact for one coil and a mask symmetric about the k-space centre; a contraction otherwise, since
    ``||A|| <= 1`` for a mask and normalised coil maps).

    Args:
        op: an operator on complex images as ``(B, 2, *spatial)`` channels.
    """

    def __init__(self, op: LinearOperator):
        self.op = op

    def forward(self, x):
        return self.op.forward(torch.cat([x, torch.zeros_like(x)], dim=1))

    def adjoint(self, y):
        return self.op.adjoint(y)[:, :1]

    def merge(self, x, y, lam=1.0):
        from medidiff.core.utils import bcast

        return x + bcast(lam, x) * self.adjoint(y - self.forward(x))


class Scale(NamedTuple):
    """``physical = a * network + b``."""

    a: float
    b: float

    def to_network(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b) / self.a

    def to_physical(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a + self.b


@dataclass
class Problem:
    """One stack of slices to reconstruct.

    Attributes:
        modality: ``mri`` or ``ct``.
        op: the operator on physical images ``(S, 1, H, W)``.
        y: the measurements.
        baseline: the classical estimate in physical units: zero-filled magnitude (MRI) or FBP (CT).
        scale: the map between the network's scale and the physical one.
        reference: the true image in physical units, when known (simulations, fully sampled k-space).
        settings: what was simulated or read (acceleration achieved, views, dose...), for reports.
    """

    modality: str
    op: LinearOperator
    y: torch.Tensor
    baseline: torch.Tensor
    scale: Scale
    reference: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline_kind(self) -> str:
        return "zerofilled" if self.modality == "mri" else "fbp"

    def network(self, dtype: torch.dtype = torch.float32) -> tuple[LinearOperator, torch.Tensor, torch.Tensor]:
        """``(op, y, x_init)`` on the network's scale: ``y' = (y - A(b 1)) / a``, ``x_init = (baseline - b) / a``.

        Args:
            dtype: the real dtype of the result (complex measurements get the matching complex dtype).
        """
        a, b = self.scale
        offset = self.op.forward(torch.full_like(self.baseline, b))
        y = (self.y - offset) / a
        y = y.to(torch.complex64 if dtype == torch.float32 else torch.complex128) if y.is_complex() else y.to(dtype)
        return self.op, y, self.scale.to_network(self.baseline).to(dtype)

    def select(self, index: slice | list[int]) -> Problem:
        """The problem of some of the slices (the same scale: one per volume)."""
        op = self.op
        inner = getattr(op, "op", None)
        if isinstance(inner, MultiCoilMRI) and inner.maps.shape[0] > 1:
            op = RealImage(MultiCoilMRI(inner.mask, inner.maps[index]))
        ref = None if self.reference is None else self.reference[index]
        return replace(self, op=op, y=self.y[index], baseline=self.baseline[index], reference=ref)

    def tv(self, weight: float | None = None, iters: int = 100) -> torch.Tensor:
        """The TV-regularised reconstruction (``baselines.tv_reconstruct``, the modality's documented weight)."""
        return baselines.tv_reconstruct(self.op, self.y, self.baseline, weight=weight, modality=self.modality,
                                        iters=iters)

    def to_output(self, x: torch.Tensor) -> torch.Tensor:
        """Physical values in the output's units (CT: HU; MRI: the scan's units)."""
        return mu_to_hu(x) if self.modality == "ct" else x


def _mri_scale(baseline: torch.Tensor) -> Scale:
    from medidiff.data.foreground import foreground

    mag = baseline.abs()
    fg = foreground(mag.movedim(1, 0))[0].bool()
    values = mag[:, 0][fg] if bool(fg.any()) else mag.flatten()
    high = float(torch.quantile(values.float().flatten()[:4_000_000], 0.995))
    high = high if high > 0 else 1.0
    return Scale(high / 2, high / 2)


def _zero_filled(kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero-filled magnitude (coils combined by root-sum-of-squares, fastMRI's), ``(S, 1, H, W)``."""
    return rss(ifft2c(kspace * mask.to(kspace.real.dtype)))


def mri_problem(kspace: torch.Tensor, mask: torch.Tensor, *, reference: torch.Tensor | None = None,
                maps: torch.Tensor | None = None, settings: dict | None = None) -> Problem:
    """A problem from (undersampled) k-space ``(S, coils, H, W)`` and its mask ``(H, W)``.

    Args:
        kspace: complex k-space, zero where not measured.
        mask: the 0/1 sampling mask.
        reference: the true image, if known.
        maps: coil maps ``(S or 1, coils, H, W)``; ``None`` estimates them from the calibration region.
        settings: recorded with the problem.

    Returns:
        The ``Problem``.
    """
    mask = mask.to(torch.float32)
    y = kspace * mask.to(kspace.real.dtype)
    if maps is None:
        maps = estimate_maps(y, mask=mask)
    inner = SingleCoilMRI(mask) if maps.shape[1] == 1 and bool((maps == 1).all()) else MultiCoilMRI(mask, maps)
    baseline = _zero_filled(y, mask).to(y.real.dtype)
    info = {"acceleration_achieved": round(masks.acceleration_of(mask), 3), "coils": int(kspace.shape[1]),
            **(settings or {})}
    return Problem("mri", RealImage(inner), y, baseline, _mri_scale(baseline), reference, info)


def simulate_mri(image: torch.Tensor, *, acceleration: float = 4, center_fraction: float | None = None,
                 mask: str = "random", coils: int = 1, noise: float = 0.0, known_maps: bool = False,
                 seed: int = 0) -> Problem:
    """Retrospectively undersampled k-space of real slices (single- or multi-coil), seeded.

    Args:
        image: real slices ``(S, 1, H, W)`` in the scan's units.
        acceleration: target acceleration.
        center_fraction: fully sampled centre (``masks.make_mask``'s default: fastMRI's).
        mask: ``random``, ``equispaced`` (fastMRI columns), ``gaussian`` or ``poisson`` (2D variable density).
        coils: 1 (single coil) or the number of simulated birdcage coils; multi-coil reconstructions use maps
            estimated from the calibration region, not the simulated ones.
        noise: complex Gaussian noise with standard deviation ``noise * max |k|`` (0: none).
        known_maps: reconstruct with the simulated coil maps instead of maps estimated from the data.
        seed: the mask's seed (noise: ``seed + 1``).

    Returns:
        The ``Problem`` (with the image as its reference).
    """
    if image.ndim != 4 or image.shape[1] != 1:
        raise ValueError(f"expected real slices (S, 1, H, W), got {tuple(image.shape)}")
    if coils < 1:
        raise ValueError(f"coils must be >= 1, got {coils}")
    x = image.double()
    m = masks.make_mask(tuple(x.shape[-2:]), mask, acceleration, center_fraction, seed).double()
    true_maps = birdcage_maps(tuple(x.shape[-2:]), coils, dtype=torch.complex128) if coils > 1 else None
    full = SingleCoilMRI(torch.ones_like(m)) if coils == 1 else MultiCoilMRI(torch.ones_like(m), true_maps)
    k = RealImage(full).forward(x)
    if noise > 0:
        g = torch.Generator().manual_seed(seed + 1)
        sigma = noise * float(k.abs().max()) / math.sqrt(2)
        k = k + sigma * torch.complex(torch.randn(k.shape, generator=g, dtype=torch.float64),
                                      torch.randn(k.shape, generator=g, dtype=torch.float64))
    settings = {"mask": mask, "acceleration": acceleration, "center_fraction": center_fraction, "noise": noise,
                "maps": "simulated" if known_maps or coils == 1 else "estimated", "seed": seed}
    maps = torch.ones((1, 1, *x.shape[-2:]), dtype=k.dtype) if coils == 1 else (true_maps if known_maps else None)
    return mri_problem(k, m, reference=x, maps=maps, settings=settings)


def ct_problem(y: torch.Tensor, op: ParallelBeamCT, *, reference: torch.Tensor | None = None,
               window: tuple[float, float] = (-1000.0, 1000.0), settings: dict | None = None) -> Problem:
    """A CT problem from a sinogram ``(S, 1, views, detectors)`` in ``mu / mu_water`` pixel units.

    Args:
        y: line integrals of ``mu / mu_water`` in pixel units.
        op: the geometry.
        reference: the true image (``mu / mu_water``), if known.
        window: the model's HU window, mapped to ``[-1, 1]``.
        settings: recorded with the problem.

    Returns:
        The ``Problem``.
    """
    lo, hi = (float(v) for v in window)
    scale = Scale((hi - lo) / 2000.0, (hi + lo) / 2000.0 + 1.0)  # HU = (hi-lo)/2 n + (hi+lo)/2, mu = HU/1000 + 1
    info = {"views": op.n_views, "detectors": op.n_det, **(settings or {})}
    return Problem("ct", op, y, op.fbp(y), scale, reference, info)


def simulate_ct(hu: torch.Tensor, *, views: int = 60, limited_angle: float | None = None, dose: float | None = None,
                pixel_mm: float = 1.0, window: tuple[float, float] = (-1000.0, 1000.0), seed: int = 0) -> Problem:
    """Sparse-view or limited-angle parallel-beam sinograms of CT slices, optionally low dose; seeded.

    Args:
        hu: slices ``(S, 1, H, W)`` in HU.
        views: number of views.
        limited_angle: the arc in degrees (``None``: 180, sparse view).
        dose: incident photons per detector bin (``None``: noiseless); Poisson counts with
            ``mu_water = MU_WATER`` per mm and ``pixel_mm``.
        pixel_mm: pixel size (for the dose).
        window: the model's HU window.
        seed: the noise seed.

    Returns:
        The ``Problem`` (with the image as its reference, in ``mu / mu_water``).
    """
    if hu.ndim != 4 or hu.shape[1] != 1:
        raise ValueError(f"expected slices (S, 1, H, W), got {tuple(hu.shape)}")
    arc = 180.0 if limited_angle is None else float(limited_angle)
    angles = view_angles(views, arc=arc)
    full = _full_grid(angles, arc / views)
    op = ParallelBeamCT(tuple(hu.shape[-2:]), angles, full_angles=full)
    x = hu_to_mu(hu.double())
    y = op.forward(x)
    if dose is not None:
        y = poisson_noise(y, dose, scale=MU_WATER * pixel_mm, generator=torch.Generator().manual_seed(seed + 1))
    settings = {"limited_angle": limited_angle, "dose": dose, "pixel_mm": pixel_mm, "seed": seed}
    return ct_problem(y, op, reference=x, window=window, settings=settings)


def _full_grid(angles: torch.Tensor, spacing: float) -> torch.Tensor | None:
    """A grid of views over 180 degrees, at least 180 of them, that contains ``angles`` (for Song et al.'s merge)."""
    n = round(180.0 / spacing)
    if abs(n * spacing - 180.0) > 1e-6:
        return None
    k = max(1, math.ceil(180 / n))
    return view_angles(n * k)
