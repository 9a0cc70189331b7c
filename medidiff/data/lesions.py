"""Synthetic lesions for anomaly-detection demos and benchmarks: textured, smooth-edged blobs sized in mm.

``insert_lesions`` places ``n`` blobs at random inside a region (e.g. the brain mask), each far enough
from the region's edge and from the other blobs to lie wholly inside it. A blob is a ball of radius
``r`` mm (optionally made irregular by a smooth random field) with a sigmoid edge; inside it the
intensity changes by ``contrast`` times the local mean intensity (hyper- or hypo-intense), modulated by
a smooth random texture. An optional mass effect pushes the surrounding tissue outward before the blob
is drawn. All distances are in mm, so anisotropic voxels give round lesions; 2D and 3D images work
alike. Everything is drawn from one NumPy generator, so a seed reproduces the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from medidiff.errors import DataError

from ..arrays import to_numpy

Range = float | tuple[float, float]


def _as_range(value: Range, name: str) -> tuple[float, float]:
    lo, hi = (float(value), float(value)) if np.isscalar(value) else (float(value[0]), float(value[1]))
    if not 0 <= lo <= hi:
        raise ValueError(f"{name} must be a non-negative number or a (min, max) range, got {value!r}")
    return lo, hi


def _like(array: np.ndarray, template: Any) -> Any:
    """``array`` as the same kind of object as ``template`` (ndarray, tensor or MetaTensor with its meta)."""
    if not isinstance(template, torch.Tensor):
        return array
    out = torch.from_numpy(np.ascontiguousarray(array)).to(template.device)
    if hasattr(template, "as_tensor"):  # MetaTensor: keep affine and meta
        from monai.data import MetaTensor

        out = MetaTensor(out, meta=dict(template.meta))
    return out


def smooth_field(shape: Sequence[int], sigma_vox: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """A smooth random field: Gaussian-filtered white noise scaled to zero mean and unit standard deviation.

    Args:
        shape: field shape.
        sigma_vox: filter width per axis, in voxels.
        rng: NumPy generator.

    Returns:
        A float64 array of ``shape``.
    """
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma=list(sigma_vox), mode="wrap")
    std = field.std()
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _spacing_of(image: Any, ndim: int, spacing: Sequence[float] | float | None) -> np.ndarray:
    if spacing is None:
        pixdim = getattr(image, "pixdim", None)
        spacing = to_numpy(pixdim)[:ndim] if pixdim is not None and len(pixdim) >= ndim else 1.0
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,)).copy()
    if (spacing <= 0).any():
        raise ValueError(f"spacing must be positive, got {spacing}")
    return spacing


def _mass_effect(image: np.ndarray, grid: np.ndarray, centre: np.ndarray, radius: float, strength: float,
                 spacing: np.ndarray) -> np.ndarray:
    """Push the tissue around ``centre`` outward: backward warp ``x -> c + (x - c) * q(|x - c|)``.

    ``q(d) = 1 - strength * exp(-d^2 / (2 r)^2)`` keeps the map one-to-one for ``strength < 1``; tissue
    at the centre is pulled in from ``(1 - strength)`` of its distance.
    """
    offset = grid - centre.reshape((-1,) + (1,) * (grid.ndim - 1))  # mm
    d2 = (offset**2).sum(axis=0)
    q = 1.0 - strength * np.exp(-d2 / (2.0 * radius) ** 2)
    source = (centre.reshape((-1,) + (1,) * (grid.ndim - 1)) + offset * q) / spacing.reshape(
        (-1,) + (1,) * (grid.ndim - 1))
    return np.stack([ndimage.map_coordinates(ch, source, order=1, mode="nearest") for ch in image])


def insert_lesions(
    image: Any,
    *,
    mask: Any = None,
    spacing: Sequence[float] | float | None = None,
    n: int = 3,
    radius_mm: Range = (3.0, 8.0),
    contrast: Range = (0.3, 0.6),
    polarity: str = "both",
    edge_mm: float = 0.7,
    irregularity: float = 0.15,
    texture: float = 0.15,
    texture_mm: float = 2.0,
    mass_effect: float = 0.0,
    seed: int | np.random.Generator | None = None,
    return_info: bool = False,
) -> tuple[Any, Any] | tuple[Any, Any, list[dict[str, Any]]]:
    """Insert ``n`` synthetic lesions into a 2D or 3D image.

    Args:
        image: ``(C, *spatial)`` array, tensor or MetaTensor (2 or 3 spatial dims), in any units.
        mask: where lesions may go (``(*spatial)`` or ``(1, *spatial)``, nonzero = allowed), e.g. the
            brain mask; ``None`` allows the whole image. Each lesion lies wholly inside it.
        spacing: voxel size in mm per spatial axis (a number for all); default: the MetaTensor's
            ``pixdim``, else 1 mm.
        n: number of lesions.
        radius_mm: lesion radius in mm, a number or a ``(min, max)`` range drawn uniformly.
        contrast: size of the intensity change relative to the mean intensity under the lesion (0.4 =
            40 % brighter or darker), a number or a ``(min, max)`` range drawn per lesion.
        polarity: ``"hyper"`` (brighter), ``"hypo"`` (darker) or ``"both"`` (each lesion at random).
        edge_mm: width of the sigmoid edge (the profile goes from 12 % to 88 % over ``4 * edge_mm``).
        irregularity: relative amplitude of smooth radius variations (0 = a ball).
        texture: relative amplitude of the smooth random texture inside the lesion (0 = uniform change).
        texture_mm: correlation length of the texture in mm.
        mass_effect: strength in ``[0, 0.9]`` of the outward push of the surrounding tissue (0 = none).
        seed: an int seed or a NumPy ``Generator``.
        return_info: also return a list with each lesion's centre (voxel), radius (mm) and contrast.

    Returns:
        ``(image_with_lesions, lesion_mask)`` (and ``info`` if asked): the image as the same type,
        shape and dtype as ``image``; the mask as ``(1, *spatial)`` bool of the same kind, true where the
        lesion profile is at least one half (at ``|x - c| <= r`` for a ball).

    Raises:
        DataError: the region has no room left for a lesion of the drawn radius.
    """
    if polarity not in ("hyper", "hypo", "both"):
        raise ValueError(f"polarity must be 'hyper', 'hypo' or 'both', got {polarity!r}")
    if not 0.0 <= mass_effect <= 0.9:
        raise ValueError(f"mass_effect must lie in [0, 0.9], got {mass_effect}")
    radius_range = _as_range(radius_mm, "radius_mm")
    contrast_range = _as_range(contrast, "contrast")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    data = to_numpy(image)
    dtype = data.dtype
    work = data.astype(np.float64)
    if work.ndim not in (3, 4):
        raise DataError(f"expected a (C, H, W) or (C, X, Y, Z) image, got shape {data.shape}",
                        fix="add a channel axis: image[None].")
    spatial = work.shape[1:]
    ndim = len(spatial)
    sp = _spacing_of(image, ndim, spacing)
    if mask is None:
        allowed = np.ones(spatial, dtype=bool)
    else:
        allowed = to_numpy(mask).astype(bool)
        allowed = allowed.reshape(allowed.shape[-ndim:]) if allowed.ndim == ndim + 1 else allowed
        if allowed.shape != spatial:
            raise DataError(f"mask shape {allowed.shape} differs from the image's spatial shape {spatial}")
    # distance (mm) from the region's border, padded so the image's own border also counts as outside
    padded = np.pad(allowed, 1, constant_values=False)
    room = ndimage.distance_transform_edt(padded, sampling=sp)[(slice(1, -1),) * ndim]
    grid = np.stack(np.meshgrid(*[np.arange(s) * h for s, h in zip(spatial, sp)], indexing="ij"))

    # 1. place the lesions: each wholly inside the region and apart from the others
    occupied = np.zeros(spatial, dtype=bool)
    placed = []
    for k in range(n):
        radius = rng.uniform(*radius_range)
        reach = radius * (1.0 + 2.0 * irregularity) + 2.0 * edge_mm  # mm the lesion may extend to
        free = room >= reach
        if occupied.any():
            free &= ndimage.distance_transform_edt(~occupied, sampling=sp) >= reach + edge_mm
        candidates = np.flatnonzero(free)
        if candidates.size == 0:
            raise DataError(
                f"no room for lesion {k + 1} of {n} (radius {radius:.1f} mm) inside the mask",
                fix="use fewer or smaller lesions, or a larger mask.",
            )
        centre_vox = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], spatial))
        occupied |= ((grid - (centre_vox * sp).reshape((-1,) + (1,) * ndim)) ** 2).sum(axis=0) <= reach**2
        placed.append((centre_vox, radius, reach))

    # 2. push the tissue around each lesion outward
    if mass_effect > 0:
        for centre_vox, radius, _ in placed:
            work = _mass_effect(work, grid, centre_vox * sp, radius, mass_effect, sp)

    # 3. draw each lesion: a textured intensity change under a sigmoid-edged profile
    lesions = np.zeros(spatial, dtype=bool)
    info: list[dict[str, Any]] = []
    for centre_vox, radius, reach in placed:
        half = np.ceil((reach + 4.0 * edge_mm) / sp).astype(int)  # the blob's box keeps the work local
        box = tuple(slice(max(c - h, 0), min(c + h + 1, s)) for c, h, s in zip(centre_vox, half, spatial))
        local = grid[(slice(None), *box)] - (centre_vox * sp).reshape((-1,) + (1,) * ndim)
        dist = np.sqrt((local**2).sum(axis=0))
        r_eff = np.full(dist.shape, radius)
        if irregularity > 0:
            r_eff *= 1.0 + irregularity * np.clip(smooth_field(dist.shape, radius / 2.0 / sp, rng), -2, 2)
        weight = allowed[box] / (1.0 + np.exp(-(r_eff - dist) / max(edge_mm, 1e-6)))
        inside = weight >= 0.5
        sign = {"hyper": 1.0, "hypo": -1.0}.get(polarity) or float(rng.choice([-1.0, 1.0]))
        c = sign * rng.uniform(*contrast_range)
        modulation = 1.0 + texture * smooth_field(dist.shape, texture_mm / sp, rng) if texture > 0 else 1.0
        for ch in range(work.shape[0]):
            region = work[(ch, *box)]  # a view: changed in place
            level = abs(region[inside].mean()) if inside.any() else 0.0
            region += weight * c * level * modulation
        lesions[box] |= inside
        info.append({"centre": tuple(int(i) for i in centre_vox), "radius_mm": float(radius),
                     "contrast": float(c)})

    if np.issubdtype(dtype, np.integer):
        work = np.clip(np.rint(work), np.iinfo(dtype).min, np.iinfo(dtype).max)
    out = _like(work.astype(dtype), image)
    lesion_mask = _like(lesions[None], image)
    return (out, lesion_mask, info) if return_info else (out, lesion_mask)
