"""Training augmentation for in-memory image tensors: what another subject or another scanner would show.

A model of healthy anatomy must learn the family of brains, not one template, so the augmentations mimic the
variation between subjects (affine pose and size, smooth local shape changes) and between scanners (resolution,
bias field, contrast, noise). Every one is switched off by a strength of 0, at which it returns its input
unchanged and takes no random draw, so runs that do not use it draw exactly as before.

Draws come from torch's global generator, whose state the training engine checkpoints, so augmented
runs resume exactly. Works on ``(C, *spatial)`` items in ``[-1, 1]`` with 2 or 3 spatial dims; the
background value ``-1`` fills what a warp brings in. Intensity changes work on the ``[0, 1]`` scale
``(x + 1) / 2``, on which the background is 0: they multiply or blur it, so a background of exactly ``-1``
stays ``-1``, and their results are clamped to ``[-1, 1]``.

:class:`Augmented` applies them in acquisition order: flip, geometry (affine and elastic, one interpolation),
resolution, bias field, gamma, contrast, noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "random_affine",
    "random_warp",
    "random_displacement",
    "random_smooth_field",
    "smooth_field",
    "warp",
    "random_flip",
    "random_gamma",
    "random_contrast",
    "random_bias_field",
    "gaussian_blur",
    "lower_resolution",
    "random_resolution",
    "rician_noise",
    "random_noise",
    "Augmented",
]

#: Cells of the elastic control grid per axis: a control point every quarter of the image.
ELASTIC_CELLS = 4
#: Cells of the bias field's control grid per axis: a control point every half image (a bias field varies
#: over the whole head, far more slowly than anatomy).
BIAS_CELLS = 2


# ----------------------------------------------------------------------------------------- smooth fields


def _cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline kernel: non-negative, support ``(-2, 2)``, its integer shifts sum to 1."""
    t = t.abs()
    return torch.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, torch.where(t < 2, (2 - t) ** 3 / 6, torch.zeros_like(t)))


def _bspline_weights(n: int, cells: int) -> torch.Tensor:
    """``(n, cells + 3)`` weights of the control points at ``n`` voxel centres spanning ``cells`` cells.

    The voxel centres lie at control coordinates ``1 + (j + 0.5) / n * cells`` in ``(1, cells + 1)``: one control
    point beyond each edge gives every voxel its four neighbours, so each row sums to 1.
    """
    u = 1 + (torch.arange(n, dtype=torch.float64) + 0.5) / n * cells
    return _cubic_bspline(u[:, None] - torch.arange(cells + 3, dtype=torch.float64))


def smooth_field(coarse: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A cubic B-spline field at voxel resolution from its control points.

    Every value is a convex combination of control values, so the field stays within their range, and it is
    twice continuously differentiable: its second difference between neighbouring voxels is at most
    ``4 * max|control| * (cells / n) ** 2`` along an axis of ``n`` voxels.

    Args:
        coarse: ``(K, *[cells + 3] * dims)`` control values, ``cells`` per axis as :func:`_bspline_weights` places them.
        shape: the spatial shape to evaluate at.

    Returns:
        ``(K, *shape)`` field.
    """
    field = coarse
    for axis, n in enumerate(shape):
        weights = _bspline_weights(n, coarse.shape[1 + axis] - 3).to(coarse.dtype)
        field = (field.movedim(1 + axis, -1) @ weights.T).movedim(-1, 1 + axis)
    return field


def random_smooth_field(shape: Sequence[int], *, channels: int, cells: int, amplitude: float) -> torch.Tensor:
    """A random smooth ``(channels, *shape)`` field, control values uniform in ``[-amplitude, amplitude]``.

    Args:
        shape: spatial shape.
        channels: independent fields.
        cells: control-grid cells per axis (the field's wavelength is about an image / ``cells``).
        amplitude: bound on ``|field|`` (see :func:`smooth_field`).
    """
    coarse = (torch.rand(channels, *[cells + 3] * len(shape)) * 2 - 1) * amplitude
    return smooth_field(coarse, shape)


# ------------------------------------------------------------------------------------------------ geometry


def _rotation(angles: torch.Tensor, dims: int) -> torch.Tensor:
    """Rotation matrix from one angle (2D) or three Euler angles (3D), in radians."""
    c, s = torch.cos(angles), torch.sin(angles)
    if dims == 2:
        return torch.stack([torch.stack([c[0], -s[0]]), torch.stack([s[0], c[0]])])
    rx = torch.tensor([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = torch.tensor([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = torch.tensor([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_theta(dims: int, rotate_deg: float, scale: float, translate: float) -> torch.Tensor:
    """A random ``(dims, dims + 1)`` affine matrix in grid coordinates (see :func:`random_affine`)."""
    n_angles = 1 if dims == 2 else 3
    angles = (torch.rand(n_angles) * 2 - 1) * math.radians(rotate_deg)
    zoom = 1 + (torch.rand(()) * 2 - 1) * scale
    shift = (torch.rand(dims) * 2 - 1) * translate * 2  # grid coordinates span [-1, 1]
    return torch.cat([_rotation(angles, dims) / zoom, shift[:, None]], dim=1)


def warp(x: torch.Tensor, theta: torch.Tensor, displacement: torch.Tensor | None = None, *,
         fill: float = -1.0) -> torch.Tensor:
    """Resample one item at ``theta @ p + displacement(p)`` for each output voxel ``p``: one interpolation.

    Args:
        x: ``(C, *spatial)`` image.
        theta: ``(dims, dims + 1)`` affine matrix in ``grid_sample``'s coordinates (``[-1, 1]`` across the image).
        displacement: ``(*spatial, dims)`` offsets added to the sampling positions, in the same coordinates
            and their order (the last spatial axis first); ``None`` for a purely affine warp.
        fill: value for voxels brought in from outside.
    """
    grid = F.affine_grid(theta[None].to(x.dtype), [1, *x.shape], align_corners=False)
    if displacement is not None:
        grid = grid + displacement.to(x.dtype)
    warped = F.grid_sample((x - fill)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[0] + fill


def random_affine(x: torch.Tensor, *, rotate_deg: float = 8.0, scale: float = 0.08, translate: float = 0.04,
                  fill: float = -1.0) -> torch.Tensor:
    """Warp one item by a random rotation, isotropic scaling and translation (fractions of the image).

    Args:
        x: ``(C, *spatial)`` image.
        rotate_deg: largest rotation angle in degrees (about each axis in 3D).
        scale: largest relative zoom in or out.
        translate: largest shift as a fraction of the image size.
        fill: value for voxels brought in from outside.
    """
    return warp(x, _random_theta(x.ndim - 1, rotate_deg, scale, translate), fill=fill)


def random_displacement(shape: Sequence[int], *, elastic: float) -> torch.Tensor:
    """A random smooth displacement field: a cubic B-spline through control points every quarter of the image.

    Control displacements are uniform in ``[-elastic, elastic]`` of the image size along each axis, so no voxel
    moves further than that along any axis; local shape changes of this wavelength (a quarter of the brain) are
    what separates subjects once their pose and size match. The field's derivative is at most
    ``2 * elastic * ELASTIC_CELLS`` per entry (image fractions per image fraction), so a square 2D image
    cannot fold below ``elastic = 1/16`` (1/24 in 3D).

    Args:
        shape: spatial shape.
        elastic: largest displacement along each axis, as a fraction of the image size.

    Returns:
        ``(*shape, dims)`` offsets in ``grid_sample`` coordinates (``2 * elastic`` at most), for :func:`warp`;
        the components are independent and identically drawn, in the grid's order.
    """
    return random_smooth_field(shape, channels=len(shape), cells=ELASTIC_CELLS, amplitude=2 * elastic).movedim(0, -1)


def random_warp(x: torch.Tensor, *, rotate_deg: float = 0.0, scale: float = 0.0, translate: float = 0.0,
                elastic: float = 0.0, fill: float = -1.0) -> torch.Tensor:
    """A random affine warp (:func:`random_affine`) composed with an elastic one (:func:`random_displacement`).

    Both go into one sampling grid, so the item is interpolated once. The affine draws come first and are
    those of :func:`random_affine`; with ``elastic=0`` the result is :func:`random_affine`'s, and with every
    strength 0 the item itself (no draws).

    Args:
        x: ``(C, *spatial)`` image.
        rotate_deg, scale, translate: see :func:`random_affine` (all 0: no affine part).
        elastic: see :func:`random_displacement` (0: no elastic part).
        fill: value for voxels brought in from outside.
    """
    affine = bool(rotate_deg or scale or translate)
    if not (affine or elastic):
        return x
    dims = x.ndim - 1
    theta = _random_theta(dims, rotate_deg, scale, translate) if affine else torch.eye(dims, dims + 1)
    displacement = random_displacement(x.shape[1:], elastic=elastic) if elastic else None
    return warp(x, theta, displacement, fill=fill)


def random_flip(x: torch.Tensor, *, p: float = 0.5) -> torch.Tensor:
    """Mirror ``(C, *spatial)`` along its first spatial axis (left-right in RAS) with probability ``p``.

    One draw is taken whatever ``p`` is, so runs with and without flips draw the same warps afterwards.
    """
    return x.flip(1) if float(torch.rand(())) < p else x


# ---------------------------------------------------------------------------------------------- resolution


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalised 1D Gaussian, truncated at 3 standard deviations."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, *spatial)``, edges replicated.

    Args:
        x: ``(C, *spatial)`` image.
        sigma: standard deviation in voxels per spatial axis (0 leaves an axis as it is).
    """
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        kernel = _gaussian_kernel(float(s)).to(x.dtype)
        radius = (len(kernel) - 1) // 2
        moved = x.movedim(1 + axis, -1)
        rows = F.pad(moved.reshape(-1, 1, moved.shape[-1]), (radius, radius), mode="replicate")
        x = F.conv1d(rows, kernel.view(1, 1, -1)).reshape(moved.shape).movedim(-1, 1 + axis)
    return x


def lower_resolution(x: torch.Tensor, factors: Sequence[float], *, fill: float = -1.0) -> torch.Tensor:
    """The item as voxels ``factors`` times larger would record it, interpolated back onto its grid.

    Each axis is blurred by the anti-aliasing Gaussian of ``skimage.transform.resize`` (``sigma = (f - 1) / 2``
    voxels), sampled at ``round(n / f)`` points and brought back to ``n`` by linear interpolation. Voxels at
    ``fill`` stay there, as in a scan skull-stripped or masked after it was acquired: the tissue's edge blurs
    inwards, and no blurred halo (which noise would then treat as tissue) grows into the background.

    Args:
        x: ``(C, *spatial)`` image.
        factors: voxel-size factor per spatial axis (1 leaves an axis as it is).
        fill: the background value.
    """
    if all(f <= 1 for f in factors):
        return x
    shape = list(x.shape[1:])
    coarse = [max(1, round(n / f)) for n, f in zip(shape, factors)]
    y = gaussian_blur(x - fill, [max(0.0, (f - 1) / 2) for f in factors])
    if coarse != shape:
        mode = "bilinear" if len(shape) == 2 else "trilinear"
        y = F.interpolate(y[None], size=coarse, mode=mode, align_corners=False)
        y = F.interpolate(y, size=shape, mode=mode, align_corners=False)[0]
    return torch.where(x == fill, x, y + fill)


def random_resolution(x: torch.Tensor, *, p: float, factor: float) -> torch.Tensor:
    """With probability ``p``, lower the resolution by a random voxel-size factor in ``[1, factor]`` per axis.

    Scanners differ most in resolution: thick slices, coarser in-plane matrices, smoother reconstruction
    filters. Independent factors per axis make the loss anisotropic, as thick slices are; items left alone
    (``1 - p``) keep the model's idea of a sharp brain.

    Args:
        x: ``(C, *spatial)`` image.
        p: probability of a change (0: off).
        factor: largest voxel-size factor (:func:`lower_resolution`; 1: off).
    """
    if not p or factor <= 1:
        return x
    if float(torch.rand(())) >= p:
        return x
    factors = 1 + torch.rand(x.ndim - 1) * (factor - 1)
    return lower_resolution(x, factors.tolist())


# ----------------------------------------------------------------------------------------------- intensity


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` intensities (clamped) on the ``[0, 1]`` scale, background 0."""
    return (x.clamp(-1, 1) + 1) / 2


def _signed(y: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` intensities (clamped) back on the ``[-1, 1]`` scale."""
    return y.clamp(0, 1) * 2 - 1


def random_bias_field(x: torch.Tensor, *, bias_field: float) -> torch.Tensor:
    """Multiply the intensities by a smooth random field ``exp(b)``, ``|b| <= bias_field`` (MRI's coil shading).

    ``b`` is a cubic B-spline through control points every half image (:func:`random_smooth_field`), as slow as
    the receive-coil sensitivity that makes one side of a head brighter than the other. The field multiplies
    the ``[0, 1]`` scale, so the background stays ``-1``; the result is clamped.

    Args:
        x: ``(C, *spatial)`` image.
        bias_field: largest log-amplitude (0: off); 0.3 lets tissue vary by up to about 35%.
    """
    if not bias_field:
        return x
    log_field = random_smooth_field(x.shape[1:], channels=1, cells=BIAS_CELLS, amplitude=bias_field)
    return _signed(_unit(x) * log_field.exp().to(x.dtype))


def random_gamma(x: torch.Tensor, *, gamma: float = 0.15) -> torch.Tensor:
    """Random intensity gamma ``exp(U(-gamma, gamma))`` applied to ``[-1, 1]`` intensities (kept in range).

    A monotone change of the contrast between tissues (grey and white matter, CSF) as sequences and field
    strengths give it; 0 returns the item.
    """
    if not gamma:
        return x
    g = torch.exp((torch.rand(()) * 2 - 1) * gamma)
    return _signed(_unit(x) ** g)


def random_contrast(x: torch.Tensor, *, contrast: float) -> torch.Tensor:
    """Scale the intensities on the ``[0, 1]`` scale by ``exp(U(-contrast, contrast))`` (clamped).

    The linear brightness and contrast change that intensity scaling by percentiles leaves between scans (a
    lesion, a vessel or a different field of view moves the 99.5th percentile, and with it every tissue). The
    map is linear through the background, which therefore stays ``-1``: an additive offset would lift the
    background, or need a tissue mask that blurred edges and scans with a skull break.

    Args:
        x: ``(C, *spatial)`` image.
        contrast: largest log-factor (0: off); 0.1 scales by 0.90 to 1.11.
    """
    if not contrast:
        return x
    factor = torch.exp((torch.rand(()) * 2 - 1) * contrast)
    return _signed(_unit(x) * factor)


def rician_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    """Rician noise of the given standard deviation on the tissue: ``|y + n_re + i n_im|`` on the ``[0, 1]`` scale.

    The noise of a magnitude MR image (Gudbjartsson & Patz 1995, MRM 34:910, eq. 2); above a signal-to-noise
    ratio of about 3 it is Gaussian with this standard deviation. Voxels at the background (0 on the
    ``[0, 1]`` scale, ``-1`` on the network's) stay there, as in the skull-stripped and zero-filled scans the
    foreground rule expects; the result is clamped.

    Args:
        x: ``(C, *spatial)`` image.
        std: standard deviation as a fraction of the intensity range (``2 * std`` on the ``[-1, 1]`` scale).
    """
    y = _unit(x)
    real, imag = torch.randn(2, *y.shape, dtype=y.dtype) * std
    return _signed(torch.where(y > 0, torch.sqrt((y + real) ** 2 + imag ** 2), y))


def random_noise(x: torch.Tensor, *, noise: float) -> torch.Tensor:
    """Rician noise (:func:`rician_noise`) of a random standard deviation, uniform in ``[0, noise]``.

    Scanners and protocols differ in signal-to-noise ratio; a uniform level mixes clean and noisy items.

    Args:
        x: ``(C, *spatial)`` image.
        noise: largest standard deviation, a fraction of the intensity range (0: off).
    """
    if not noise:
        return x
    return rician_noise(x, float(torch.rand(())) * noise)


# ------------------------------------------------------------------------------------------------- dataset


class Augmented(Dataset):
    """A dataset whose ``image`` items are randomly changed on each access, as another subject or scanner would.

    The order is the acquisition's: flip, geometry (affine and elastic warps in one interpolation), resolution,
    bias field, gamma, contrast, noise. Each strength 0 switches its augmentation off (it draws nothing then).

    Args:
        dataset: items ``{"image": (C, *spatial), ...}`` in ``[-1, 1]``.
        rotate_deg, scale, translate: see :func:`random_affine` (``rotate_deg=0`` and ``scale=0`` and
            ``translate=0`` switch the affine warp off).
        gamma: see :func:`random_gamma` (0 switches it off).
        flip: probability of a left-right mirror (:func:`random_flip`; 0 switches it off).
        elastic: largest elastic displacement, a fraction of the image (:func:`random_displacement`).
        resolution: probability of a lower resolution (:func:`random_resolution`).
        resolution_factor: its largest voxel-size factor per axis.
        bias_field: largest log-amplitude of a bias field (:func:`random_bias_field`).
        contrast: largest log-factor of a linear intensity scaling (:func:`random_contrast`).
        noise: largest Rician noise level, a fraction of the intensity range (:func:`random_noise`).
    """

    def __init__(self, dataset: Dataset, *, rotate_deg: float = 8.0, scale: float = 0.08, translate: float = 0.04,
                 gamma: float = 0.15, flip: float = 0.0, elastic: float = 0.0, resolution: float = 0.0,
                 resolution_factor: float = 2.0, bias_field: float = 0.0, contrast: float = 0.0, noise: float = 0.0):
        self.dataset = dataset
        self.rotate_deg, self.scale, self.translate, self.elastic = rotate_deg, scale, translate, elastic
        self.flip, self.gamma, self.contrast, self.noise = flip, gamma, contrast, noise
        self.resolution, self.resolution_factor, self.bias_field = resolution, resolution_factor, bias_field

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def warps(self) -> bool:
        """Whether :meth:`geometry` changes an item."""
        return bool(self.rotate_deg or self.scale or self.translate or self.elastic)

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """The random affine and elastic warp of one ``(C, *spatial)`` item (:func:`random_warp`)."""
        return random_warp(x, rotate_deg=self.rotate_deg, scale=self.scale, translate=self.translate,
                           elastic=self.elastic)

    def intensity(self, x: torch.Tensor) -> torch.Tensor:
        """Resolution, bias field, gamma, contrast and noise, in that order, on one ``(C, *spatial)`` image."""
        x = random_resolution(x, p=self.resolution, factor=self.resolution_factor)
        x = random_bias_field(x, bias_field=self.bias_field)
        x = random_gamma(x, gamma=self.gamma)
        x = random_contrast(x, contrast=self.contrast)
        return random_noise(x, noise=self.noise)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        x = item["image"]
        if self.flip:
            x = random_flip(x, p=self.flip)
        item["image"] = self.intensity(self.geometry(x))
        return item
