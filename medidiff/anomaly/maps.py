"""Anomaly maps: residuals between an image and its healthy reconstruction, masked, filtered and scored.

Method: the residual map with a median filter and an eroded brain mask, as in the unsupervised
anomaly-detection comparison of Baur et al. 2021 (MedIA 69:101952, sec. 3.3); case score = mean of
the top-k voxels.

Arrays are ``(..., *spatial)`` NumPy arrays or tensors: the leading axes (batch, channels of a map, a
stack of 2D slices) are filtered independently, ``spatial_dims`` trailing axes are filtered together,
so one set of functions serves 2D slices, stacks of slices and 3D volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from ..arrays import to_numpy
from .config import MapOptions

__all__ = ["residual", "erode", "median_filter", "smooth", "anomaly_map", "scan_scale", "per_scan", "case_score",
           "RESIDUALS"]

RESIDUALS = ("abs", "squared")


def _per_axis(value: float | Sequence[float], ndim: int, spatial_dims: int, lead: float) -> tuple:
    """A filter parameter for every axis: ``lead`` on the leading axes, ``value`` on the spatial ones."""
    if spatial_dims not in (2, 3) or spatial_dims > ndim:
        raise ValueError(f"spatial_dims must be 2 or 3 and at most the array's {ndim} dims, got {spatial_dims}")
    values = [value] * spatial_dims if np.isscalar(value) else list(value)
    if len(values) != spatial_dims:
        raise ValueError(f"{value} has {len(values)} entries for {spatial_dims} spatial dims")
    return (lead,) * (ndim - spatial_dims) + tuple(values)


def residual(x: Any, healthy: Any, *, kind: str = "abs", channel_axis: int | None = 1, spread: Any = None,
             spread_floor: float | None = None) -> np.ndarray:
    """The residual ``|x - healthy|`` (or its square) summed over channels, optionally uncertainty-weighted.

    With ``spread`` (the per-voxel spread between several healthy reconstructions) and ``spread_floor``
    ``f``, each voxel's residual is multiplied by ``f / (f + spread)`` (squared for ``squared``): where
    the reconstructions disagree (the model is unsure of the healthy anatomy: ventricle edges, the
    cortex) a residual counts less; where they agree (``spread << f``) it counts in full, in the
    image's units. The ranking is that of the residual over ``spread + f``, a z-score with a floor.

    Args:
        x: images, e.g. ``(B, C, *spatial)``.
        healthy: their reconstructions, same shape.
        kind: ``abs`` or ``squared``.
        channel_axis: the axis summed over, kept with length 1 (``None``: no channel axis).
        spread: the spread between reconstructions, same shape (``None``: no weighting).
        spread_floor: ``f`` above, on the images' scale (``None`` or 0: no weighting).

    Returns:
        A float32 array, ``x``'s shape with one channel.
    """
    if kind not in RESIDUALS:
        raise ValueError(f"unknown residual {kind!r}; choose one of {RESIDUALS}")
    diff = to_numpy(x).astype(np.float32) - to_numpy(healthy).astype(np.float32)
    r = np.abs(diff) if kind == "abs" else diff**2
    if spread is not None and spread_floor:
        if spread_floor < 0:
            raise ValueError(f"spread_floor must be positive, got {spread_floor}")
        weight = spread_floor / (spread_floor + np.abs(to_numpy(spread).astype(np.float32)))
        r = r * (weight if kind == "abs" else weight**2)
    return r if channel_axis is None else r.sum(axis=channel_axis, keepdims=True)


def erode(mask: Any, iterations: int = 1, *, spatial_dims: int = 2) -> np.ndarray:
    """Binary erosion of a mask within each slice/volume (face connectivity), borders counting as outside.

    Args:
        mask: ``(..., *spatial)``, nonzero = foreground.
        iterations: erosion steps (voxels removed from the rim); 0 returns the mask as bool.
        spatial_dims: trailing axes eroded together.

    Returns:
        A bool array of the same shape.
    """
    m = to_numpy(mask).astype(bool)
    if iterations <= 0:
        return m
    lead = m.ndim - spatial_dims
    _per_axis(1, m.ndim, spatial_dims, 1)  # checks spatial_dims
    base = ndimage.generate_binary_structure(spatial_dims, 1)
    structure = base.reshape((1,) * lead + base.shape)
    return ndimage.binary_erosion(m, structure=structure, iterations=int(iterations), border_value=0)


def median_filter(a: Any, size: int | Sequence[int] = 5, *, spatial_dims: int = 2) -> np.ndarray:
    """Median filter of each slice/volume (``size`` per spatial axis; edges mirrored).

    Args:
        a: ``(..., *spatial)``.
        size: window per spatial axis (1 or less: no filtering).
        spatial_dims: trailing axes filtered together.

    Returns:
        A float32 array of the same shape.
    """
    a = to_numpy(a).astype(np.float32)
    if np.isscalar(size) and size <= 1:
        return a
    return ndimage.median_filter(a, size=_per_axis(size, a.ndim, spatial_dims, 1), mode="reflect")


def smooth(a: Any, sigma: float | Sequence[float] = 1.0, *, spatial_dims: int = 2) -> np.ndarray:
    """Gaussian smoothing of each slice/volume (``sigma`` in voxels per spatial axis; 0: none).

    Args:
        a: ``(..., *spatial)``.
        sigma: standard deviation per spatial axis, in voxels.
        spatial_dims: trailing axes smoothed together.

    Returns:
        A float32 array of the same shape.
    """
    a = to_numpy(a).astype(np.float32)
    if np.isscalar(sigma) and sigma <= 0:
        return a
    return ndimage.gaussian_filter(a, sigma=_per_axis(sigma, a.ndim, spatial_dims, 0), mode="reflect")


def anomaly_map(x: Any, healthy: Any, opts: MapOptions | None = None, *, mask: Any = None, spread: Any = None,
                spatial_dims: int = 2) -> np.ndarray:
    """The anomaly map of images and their healthy reconstructions.

    Residual (optionally uncertainty-weighted, summed over channels) -> median filter -> optional Gaussian
    smoothing -> zero outside the eroded mask. The mask is applied after filtering, so the bright rim of a
    masked region does not leak inwards through the filter.

    Args:
        x: images ``(B, C, *spatial)``.
        healthy: reconstructions, same shape.
        opts: the map's options (``MapOptions``: residual, spread_floor, median_size, smooth_sigma, erode;
            default: the defaults).
        mask: foreground ``(B, 1, *spatial)`` or ``(B, *spatial)`` (``None``: everywhere).
        spread: the spread between several reconstructions, same shape as ``x`` (see ``residual``).
        spatial_dims: 2 for slices, 3 for volumes.

    Returns:
        A float32 map ``(B, 1, *spatial)``.
    """
    o = opts or MapOptions()
    r = residual(x, healthy, kind=o.residual, spread=spread, spread_floor=o.spread_floor)
    r = smooth(median_filter(r, o.median_size, spatial_dims=spatial_dims), o.smooth_sigma, spatial_dims=spatial_dims)
    if mask is not None:
        m = to_numpy(mask).astype(bool)
        m = m.reshape(r.shape) if m.size == r.size else m
        r = np.where(erode(m, o.erode, spatial_dims=spatial_dims), r, 0.0).astype(np.float32)
    return r


def scan_scale(a: Any, region: Any, quantile: float) -> float:
    """A scan's own scale: the ``quantile`` of its map over ``region``'s voxels that the map covers.

    The map is zero outside the eroded foreground (``anomaly_map``), so only its nonzero voxels inside
    ``region`` count: the brain the map was made on.

    Args:
        a: the scan's map (any shape).
        region: its foreground, same number of voxels.
        quantile: in ``(0, 1)``.

    Returns:
        The scale (1.0 when no voxel counts or the quantile is 0: the map is left as it is).
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    v = to_numpy(a).astype(np.float64).ravel()
    v = v[to_numpy(region).astype(bool).ravel() & (v > 0)]
    scale = float(np.quantile(v, quantile)) if v.size else 0.0
    return scale if scale > 0 else 1.0


def per_scan(a: Any, region: Any, quantile: float | None) -> tuple[np.ndarray, float]:
    """A scan's map in multiples of its own scale (``scan_scale``); ``quantile`` ``None``: unchanged (scale 1).

    A residual map's level differs between scans of other subjects and scanners (contrast, noise, how far the
    anatomy lies from what the model learned); divided by the scan's own quantile, a threshold flags about
    the same share of every healthy scan. Lesions cover a small share of a scan's voxels, so they move the
    quantile little. Within one scan the ranking is unchanged (its AUROC and AUPRC too).

    Returns:
        ``(map / scale, scale)`` as float32.
    """
    a = to_numpy(a).astype(np.float32)
    if quantile is None:
        return a, 1.0
    scale = scan_scale(a, region, quantile)
    return (a / scale).astype(np.float32), scale


def case_score(a: Any, mask: Any = None, *, top_k: float = 0.01) -> float:
    """A case's anomaly score: the mean of its ``top_k`` share of highest voxels (inside ``mask``).

    Args:
        a: the case's map (any shape).
        mask: voxels that count (``None``: all).
        top_k: share of the voxels averaged, in ``(0, 1]`` (at least one voxel).

    Returns:
        The score (0 for an empty mask).
    """
    if not 0 < top_k <= 1:
        raise ValueError(f"top_k must lie in (0, 1], got {top_k}")
    v = to_numpy(a).astype(np.float64).ravel()
    if mask is not None:
        v = v[to_numpy(mask).astype(bool).ravel()]
    if v.size == 0:
        return 0.0
    k = max(1, int(round(top_k * v.size)))
    return float(np.partition(v, v.size - k)[v.size - k:].mean())
