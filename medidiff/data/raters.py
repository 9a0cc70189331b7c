"""Segmentation cases with several plausible annotations each, so that ambiguity is real.

``annotated_lesion_case`` inserts synthetic lesions (``medidiff.data.lesions.insert_lesions``) into an
image and has ``K`` simulated raters outline them. Each rater draws the border where the lesion's
visible relative contrast falls to that rater's level: the lesion's intensity change divided by its
peak contrast, i.e. its smooth sigmoid edge profile times its texture, so a lenient rater (low level)
draws a wider border than a strict one (high level); holes are filled, as a rater would. Optionally each
border is then moved by a smooth random field of a few tenths of a mm to a few mm
(``perturb_boundary``): hand-drawn outlines wobble.

The levels are fixed per rater (evenly spread over a range), the perturbations are drawn from one
NumPy generator: a seed reproduces the case. Distances are in mm, so anisotropic voxels work; 2D and 3D
images work alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ..arrays import to_numpy
from .lesions import insert_lesions, smooth_field

__all__ = ["AnnotatedCase", "annotated_lesion_case", "lesion_profile", "perturb_boundary", "rater_levels"]


@dataclass
class AnnotatedCase:
    """An image with lesions and several raters' outlines of them.

    Attributes:
        image: the image with lesions, the same kind, shape and dtype as the input image.
        annotations: ``(K, 1, *spatial)`` bool, one outline per rater (a tensor if the image was one).
        reference: ``(1, *spatial)`` bool, the lesion generator's own mask (its profile at one half).
        profile: ``(*spatial)`` float, the relative contrast the raters outlined (0 outside the lesions).
        levels: ``(K,)`` the raters' contrast levels.
        info: each lesion's centre (voxel), radius (mm) and contrast, as ``insert_lesions`` reports them.
    """

    image: Any
    annotations: Any
    reference: Any
    profile: np.ndarray
    levels: np.ndarray
    info: list[dict[str, Any]] = field(default_factory=list)


def rater_levels(n_raters: int, levels: tuple[float, float] = (0.3, 0.7)) -> np.ndarray:
    """``n_raters`` contrast levels evenly spread over ``levels`` (one rater: the middle).

    Args:
        n_raters: number of raters, at least 1.
        levels: ``(lowest, highest)`` level, both in ``(0, 1)``.

    Returns:
        float64 ``(n_raters,)``, ascending.
    """
    if int(n_raters) != n_raters or n_raters < 1:
        raise ValueError(f"n_raters must be a positive integer, got {n_raters}")
    lo, hi = (float(v) for v in levels)
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"levels must be a (low, high) range inside (0, 1), got {levels!r}")
    return np.array([(lo + hi) / 2.0]) if n_raters == 1 else np.linspace(lo, hi, int(n_raters))


def _spacing(image: Any, ndim: int, spacing: Sequence[float] | float | None) -> np.ndarray:
    if spacing is None:
        pixdim = getattr(image, "pixdim", None)
        spacing = to_numpy(pixdim)[:ndim] if pixdim is not None and len(pixdim) >= ndim else 1.0
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,)).copy()
    if (sp <= 0).any():
        raise ValueError(f"spacing must be positive, got {sp}")
    return sp


def lesion_profile(image: Any, *, spacing: Sequence[float] | float | None = None, seed: int = 0,
                   **lesion_kwargs: Any) -> tuple[Any, Any, np.ndarray, list[dict[str, Any]]]:
    """Insert lesions and also return their relative contrast profile.

    The profile is the intensity change ``insert_lesions`` makes, divided by each lesion's contrast and the
    local intensity it scales: the sigmoid edge profile times the texture (about 1 inside, 1/2 on the
    generator's border, falling to 0 outside). It is recovered exactly by replaying the same seed on a
    constant image (the random draws do not depend on the intensities).

    Args:
        image: ``(C, *spatial)`` array, tensor or MetaTensor (2 or 3 spatial dims).
        spacing: voxel size in mm per spatial axis (default: the MetaTensor's ``pixdim``, else 1 mm).
        seed: integer seed of the lesions.
        **lesion_kwargs: ``insert_lesions``' other arguments (``mask``, ``n``, ``radius_mm``, ``contrast``,
            ``edge_mm``, ...).

    Returns:
        ``(image_with_lesions, lesion_mask, profile, info)``: the first two and ``info`` as
        ``insert_lesions`` returns them; ``profile`` float64 ``(*spatial)``.
    """
    if "seed" in lesion_kwargs or "return_info" in lesion_kwargs or "spacing" in lesion_kwargs:
        raise ValueError("pass seed and spacing as this function's own arguments")
    shape = tuple(to_numpy(image).shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"expected a (C, H, W) or (C, X, Y, Z) image, got shape {shape}")
    sp = _spacing(image, len(shape) - 1, spacing)
    out, lesion_mask, info = insert_lesions(image, spacing=sp, seed=int(seed), return_info=True, **lesion_kwargs)
    ones = np.ones((1, *shape[1:]), dtype=np.float64)
    change, _, _ = insert_lesions(ones, spacing=sp, seed=int(seed), return_info=True, **lesion_kwargs)
    change = np.abs(change[0] - 1.0)
    if not info:
        return out, lesion_mask, np.zeros(shape[1:]), info
    # each voxel belongs to its nearest lesion centre (the lesions lie apart); divide by that lesion's contrast
    grid = np.stack(np.meshgrid(*[np.arange(s) * h for s, h in zip(shape[1:], sp)], indexing="ij"), axis=-1)
    d2 = np.stack([((grid - np.asarray(les["centre"]) * sp) ** 2).sum(-1) for les in info])
    contrast = np.array([abs(les["contrast"]) for les in info])[np.argmin(d2, axis=0)]
    profile = np.where(contrast > 0, change / np.maximum(contrast, np.finfo(np.float64).tiny), 0.0)
    return out, lesion_mask, profile, info


def perturb_boundary(mask: Any, *, amplitude_mm: float, correlation_mm: float = 4.0,
                     spacing: Sequence[float] | float = 1.0, seed: int | np.random.Generator | None = None,
                     allowed: Any = None) -> np.ndarray:
    """Move a mask's border in and out by a smooth random field (a hand-drawn outline's wobble).

    The voxels kept are those whose signed distance to the border (mm, negative inside) is below
    ``amplitude_mm * f``, with ``f`` a smooth unit-variance random field of correlation length
    ``correlation_mm`` clipped to ``[-2, 2]``: the border moves by ``amplitude_mm`` (one standard
    deviation) at most twice that, and never farther.

    Args:
        mask: ``(*spatial)`` or ``(1, *spatial)`` binary mask.
        amplitude_mm: standard deviation of the border's displacement in mm (0: the mask unchanged).
        correlation_mm: length over which the displacement varies, in mm.
        spacing: voxel size in mm per spatial axis.
        seed: an int seed or a NumPy ``Generator``.
        allowed: voxels the result may cover (same shape as ``mask``; ``None``: all).

    Returns:
        A bool array of ``mask``'s shape.
    """
    if amplitude_mm < 0 or correlation_mm <= 0:
        raise ValueError(f"amplitude_mm must be >= 0 and correlation_mm > 0, got {amplitude_mm}, {correlation_mm}")
    m = to_numpy(mask).astype(bool)
    shape = m.shape
    core = m[0] if m.ndim in (3, 4) and m.shape[0] == 1 else m
    if core.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D mask, got shape {shape}")
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (core.ndim,))
    if (sp <= 0).any():
        raise ValueError(f"spacing must be positive, got {spacing}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    f = np.clip(smooth_field(core.shape, correlation_mm / sp, rng), -2.0, 2.0)  # drawn even if unused: same stream
    if amplitude_mm == 0 or not core.any() or core.all():
        out = core.copy()
    else:
        signed = ndimage.distance_transform_edt(~core, sampling=sp) - ndimage.distance_transform_edt(core, sampling=sp)
        out = signed < amplitude_mm * f
    if allowed is not None:
        a = to_numpy(allowed).astype(bool).reshape(core.shape)
        out &= a
    return out.reshape(shape)


def annotated_lesion_case(image: Any, *, n_raters: int = 3, levels: tuple[float, float] = (0.3, 0.7),
                          boundary_mm: float = 0.0, correlation_mm: float = 4.0,
                          spacing: Sequence[float] | float | None = None, seed: int | np.random.Generator | None = None,
                          edge_mm: float = 1.0, **lesion_kwargs: Any) -> AnnotatedCase:
    """Insert lesions into an image and outline them as ``n_raters`` raters would.

    Rater ``k`` keeps the voxels whose relative contrast (``lesion_profile``) is at least ``levels_k``, fills
    holes, and (with ``boundary_mm > 0``) moves the border by its own smooth random field. With the sigmoid
    edge of width ``edge_mm``, a level ``l`` puts the border ``edge_mm * ln((1 - l) / l)`` mm outside the
    generator's (``+-0.85 edge_mm`` for levels 0.3 and 0.7), give or take the texture.

    Args:
        image: ``(C, *spatial)`` array, tensor or MetaTensor (2 or 3 spatial dims).
        n_raters: number of annotations.
        levels: ``(lowest, highest)`` relative contrast at which raters put the border, inside ``(0, 1)``.
        boundary_mm: standard deviation of each rater's border wobble in mm (0: none).
        correlation_mm: length over which a wobble varies, in mm.
        spacing: voxel size in mm per spatial axis (default: the MetaTensor's ``pixdim``, else 1 mm).
        seed: an int seed or a NumPy ``Generator``.
        edge_mm: the lesions' edge width (wider edges: more disagreement between levels).
        **lesion_kwargs: ``insert_lesions``' other arguments (``mask``, ``n``, ``radius_mm``, ``contrast``, ...).

    Returns:
        An ``AnnotatedCase``.
    """
    lv = rater_levels(n_raters, levels)
    if boundary_mm < 0:
        raise ValueError(f"boundary_mm must be >= 0, got {boundary_mm}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    lesion_seed = int(rng.integers(2**63 - 1))
    shape = tuple(to_numpy(image).shape)
    sp = _spacing(image, len(shape) - 1, spacing)
    out, reference, profile, info = lesion_profile(image, spacing=sp, seed=lesion_seed, edge_mm=edge_mm,
                                                   **lesion_kwargs)
    allowed = profile > 0
    annotations = []
    for level in lv:
        a = ndimage.binary_fill_holes(profile >= level)
        if boundary_mm > 0:
            a = perturb_boundary(a, amplitude_mm=boundary_mm, correlation_mm=correlation_mm, spacing=sp, seed=rng,
                                 allowed=allowed)
        annotations.append(a)
    stack = np.stack(annotations)[:, None]
    if isinstance(image, torch.Tensor):
        stack = torch.from_numpy(stack).to(image.device)
    return AnnotatedCase(image=out, annotations=stack, reference=reference, profile=profile, levels=lv, info=info)
