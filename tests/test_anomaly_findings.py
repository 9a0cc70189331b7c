"""Findings: connected flagged regions described by hand-checkable numbers, and lesion-level detection."""

from __future__ import annotations

import numpy as np
import pytest

from medidiff.anomaly.findings import finding_slices, findings, lesion_detection


def _affine():
    a = np.diag([2.0, 1.5, 3.0, 1.0])
    a[:3, 3] = [-10.0, 5.0, 20.0]
    return a


def test_regions_by_hand():
    flagged = np.zeros((10, 8, 6), bool)
    flagged[1:4, 1:3, 1] = True          # 6 voxels
    flagged[6, 6, 4] = flagged[7, 7, 5] = True  # 2 voxels touching at a corner: one region (26-connectivity)
    heat = np.zeros(flagged.shape)
    heat[2, 2, 1], heat[7, 7, 5] = 5.0, 9.0
    big, small = findings(flagged, heat, _affine())
    assert (big.rank, big.voxels, small.rank, small.voxels) == (1, 6, 2, 2)
    assert big.volume_mm3 == pytest.approx(6 * 2.0 * 1.5 * 3.0)
    # centroid voxel (2, 1.5, 1) -> world (-10 + 2*2, 5 + 1.5*1.5, 20 + 3*1)
    assert (big.x_mm, big.y_mm, big.z_mm) == pytest.approx((-6.0, 7.25, 23.0))
    assert (big.peak, big.peak_voxel) == (5.0, "2 2 1") and (small.peak, small.peak_voxel) == (9.0, "7 7 5")
    assert finding_slices([big, small], 6) == [1, 5] and finding_slices([big, small], 1) == [1]
    assert findings(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), np.eye(4)) == []
    with pytest.raises(ValueError):
        findings(flagged, heat[:5], _affine())


def test_lesion_level_detection_by_hand():
    ref = np.zeros((12, 12, 4), bool)
    ref[1:3, 1:3, 1] = True    # lesion A: found
    ref[8:10, 8:10, 2] = True  # lesion B: missed
    flagged = np.zeros_like(ref)
    flagged[2:5, 2, 1] = True   # overlaps A (and extends beyond it): a true finding
    flagged[5, 9, 0] = True     # away from both: a false positive
    flagged[0, 11, 3] = True    # another false positive
    assert lesion_detection(flagged, ref) == {"lesions": 2, "lesions_found": 1, "false_positive_findings": 2}
    assert lesion_detection(ref, ref) == {"lesions": 2, "lesions_found": 2, "false_positive_findings": 0}
    assert lesion_detection(np.zeros_like(ref), ref)["lesions_found"] == 0
