"""Findings: the flagged voxels of a scan as connected regions, and lesion-level detection against a reference.

A voxel map above a threshold is what a researcher thresholds; what they read is its regions. ``findings``
labels the flagged voxels' 26-connected components and describes each (voxels, volume in mm³, centroid in
the scan's world coordinates, peak heatmap value and where it lies), largest first; ``finding_slices`` picks
the slices that show the largest ones (the report's overlays); ``lesion_detection`` counts, against a
reference lesion mask, the lesions found (a reference component touched by a flagged voxel) and the false
positives (flagged components touching no lesion), the lesion-level view beside voxel AUROC/Dice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ..arrays import to_numpy

__all__ = ["Finding", "findings", "finding_slices", "lesion_detection", "FINDING_COLUMNS"]

#: ``<case>_findings.csv`` columns (``Finding`` fields).
FINDING_COLUMNS = ("rank", "voxels", "volume_mm3", "x_mm", "y_mm", "z_mm", "peak", "peak_voxel")

_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: voxels touching at a corner are one region


@dataclass
class Finding:
    """One connected flagged region.

    Attributes:
        rank: 1 for the largest region.
        voxels: its voxel count.
        volume_mm3: its volume (voxels times the voxel volume of the affine).
        x_mm, y_mm, z_mm: its centroid in the scan's world (RAS) coordinates.
        peak: the largest heatmap value in it.
        peak_voxel: where that value lies, as voxel indices ``"i j k"`` (0-based).
    """

    rank: int
    voxels: int
    volume_mm3: float
    x_mm: float
    y_mm: float
    z_mm: float
    peak: float
    peak_voxel: str

    def row(self) -> dict[str, Any]:
        return asdict(self)


def _volume3d(x: Any) -> np.ndarray:
    a = to_numpy(x)
    return a[0] if a.ndim == 4 else a


def findings(flagged: Any, heatmap: Any, affine: Any) -> list[Finding]:
    """The flagged voxels' connected regions, largest first (ties: the higher peak first).

    Args:
        flagged: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` mask.
        heatmap: the heatmap on the same grid (its values give each region's peak).
        affine: the voxel-to-world 4 x 4 affine.

    Returns:
        The ``Finding`` of each region.
    """
    mask = _volume3d(flagged) > 0.5
    heat = _volume3d(heatmap).astype(np.float64)
    if mask.shape != heat.shape:
        raise ValueError(f"mask {mask.shape} and heatmap {heat.shape} differ")
    affine = np.asarray(to_numpy(affine), dtype=np.float64)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    labels, n = ndimage.label(mask, structure=_FULL)
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(mask, labels, index).astype(int)
    centroids = np.asarray(ndimage.center_of_mass(mask, labels, index), dtype=np.float64).reshape(n, 3)
    peaks = ndimage.maximum(heat, labels, index)
    where = ndimage.maximum_position(heat, labels, index)
    world = centroids @ affine[:3, :3].T + affine[:3, 3]
    order = sorted(range(n), key=lambda k: (-sizes[k], -peaks[k]))
    return [Finding(rank=r + 1, voxels=int(sizes[k]), volume_mm3=round(float(sizes[k]) * voxel_mm3, 3),
                    x_mm=round(float(world[k, 0]), 2), y_mm=round(float(world[k, 1]), 2),
                    z_mm=round(float(world[k, 2]), 2), peak=float(peaks[k]),
                    peak_voxel=" ".join(str(int(v)) for v in where[k]))
            for r, k in enumerate(order)]


def finding_slices(found: list[Finding], n: int, axis: int = 2) -> list[int]:
    """The slices (along ``axis``) through the peaks of the largest findings: at most ``n``, distinct, sorted."""
    out: list[int] = []
    for f in found:
        k = int(f.peak_voxel.split()[axis])
        if k not in out:
            out.append(k)
        if len(out) == n:
            break
    return sorted(out)


def lesion_detection(flagged: Any, reference: Any) -> dict[str, int]:
    """Lesion-level detection: ``{"lesions", "lesions_found", "false_positive_findings"}``.

    A reference lesion (a 26-connected component of ``reference``) is found when a flagged voxel lies in it;
    a flagged region touching no reference lesion is a false positive.
    """
    mask, ref = _volume3d(flagged) > 0.5, _volume3d(reference) > 0.5
    if mask.shape != ref.shape:
        raise ValueError(f"mask {mask.shape} and reference {ref.shape} differ")
    lesion_labels, n_lesions = ndimage.label(ref, structure=_FULL)
    flagged_labels, n_flagged = ndimage.label(mask, structure=_FULL)
    found = len(set(np.unique(lesion_labels[mask]).tolist()) - {0})
    touching = set(np.unique(flagged_labels[ref]).tolist()) - {0}
    return {"lesions": int(n_lesions), "lesions_found": int(found),
            "false_positive_findings": int(n_flagged - len(touching))}
