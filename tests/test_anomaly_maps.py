"""Anomaly maps: residuals, median filter, erosion, smoothing and the top-k case score on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medidiff.anomaly import maps
from medidiff.anomaly.config import MapOptions


def test_residual_abs_and_squared_sum_over_channels():
    x = np.zeros((1, 2, 3, 3), np.float32)
    h = np.zeros_like(x)
    x[0, 0, 1, 1], x[0, 1, 1, 1] = 2.0, -1.0
    assert maps.residual(x, h).shape == (1, 1, 3, 3)
    assert maps.residual(x, h)[0, 0, 1, 1] == 3.0
    assert maps.residual(torch.from_numpy(x), torch.from_numpy(h), kind="squared")[0, 0, 1, 1] == 5.0
    with pytest.raises(ValueError):
        maps.residual(x, h, kind="cubed")


def test_median_filter_removes_small_spots_keeps_plateaus_and_batches_apart():
    a = np.zeros((2, 1, 15, 15), np.float32)
    a[0, 0, 7, 7] = 9.0  # a one-pixel spot: gone with 3x3 and 5x5
    a[1, 0, 3:12, 3:12] = 1.0  # a 9x9 plateau in the other image
    f5 = maps.median_filter(a, 5)
    assert f5[0, 0, 7, 7] == 0.0 and f5[0].max() == 0.0
    assert f5[1, 0, 5:10, 5:10].min() == 1.0 and f5[1, 0, 7, 7] == 1.0  # interior kept
    assert f5[1, 0, 3, 3] == 0.0  # a 5x5 window at the plateau's corner sees 9 of 25 ones
    assert f5[1, 0].sum() < a[1, 0].sum()
    # 3x3 keeps what 5x5 removes: a 3x3 block is 9 of 9 at its centre, 9 of 25 under a 5x5 window
    b = np.zeros((9, 9), np.float32)
    b[3:6, 3:6] = 1.0
    assert maps.median_filter(b, 3)[4, 4] == 1.0 and maps.median_filter(b, 5)[4, 4] == 0.0
    assert np.array_equal(maps.median_filter(b, 1), b)


def test_median_filter_2d_per_slice_versus_3d():
    v = np.zeros((7, 7, 7), np.float32)
    v[3] = 1.0  # one whole plane of ones
    assert maps.median_filter(v, 3, spatial_dims=2)[3].min() == 1.0  # each 2D slice is uniform
    assert maps.median_filter(v, 3, spatial_dims=3).max() == 0.0  # 9 of 27 in a 3D window


def test_erosion_counts_the_border_as_outside():
    m = np.zeros((1, 9, 9), bool)
    m[0, 2:7, 2:7] = True
    e = maps.erode(m, 1)
    assert e.sum() == 9 and e[0, 3:6, 3:6].all()
    assert maps.erode(m, 2).sum() == 1
    full = np.ones((5, 5), bool)
    assert maps.erode(full, 1).sum() == 9  # the image border erodes too
    assert np.array_equal(maps.erode(m, 0), m)
    cube = np.ones((5, 5, 5), bool)
    assert maps.erode(cube, 1, spatial_dims=3).sum() == 27


def test_smoothing_keeps_mass_and_zero_sigma_is_identity():
    a = np.zeros((1, 21, 21), np.float32)
    a[0, 10, 10] = 1.0
    s = maps.smooth(a, 2.0)
    assert s.sum() == pytest.approx(1.0, abs=1e-4) and s[0, 10, 10] < 0.1
    assert s[0, 10, 10] == s.max()
    assert np.array_equal(maps.smooth(a, 0.0), a)


def test_anomaly_map_masks_after_filtering():
    x = np.zeros((1, 1, 12, 12), np.float32)
    x[0, 0, 4:9, 4:9] = 1.0  # a 5x5 "lesion"
    mask = np.zeros((1, 1, 12, 12), bool)
    mask[0, 0, 1:11, 1:11] = True
    m = maps.anomaly_map(x, np.zeros_like(x), MapOptions(median_size=3, erode=1, smooth_sigma=0,
                                                             spread_floor=None), mask=mask)
    assert m.shape == (1, 1, 12, 12)
    assert m[0, 0, 1, :].max() == 0.0 and m[0, 0, :, 10].max() == 0.0  # the eroded rim is zero
    assert m[0, 0, 5:8, 5:8].min() == 1.0 and m.sum() == 21.0  # 5x5 block less its 4 corners


def test_case_score_is_the_mean_of_the_top_k():
    a = np.arange(1, 101, dtype=np.float32).reshape(10, 10)
    assert maps.case_score(a, top_k=0.05) == pytest.approx(98.0)
    assert maps.case_score(a, top_k=0.001) == 100.0  # at least one voxel
    mask = a <= 50
    assert maps.case_score(a, mask, top_k=0.1) == pytest.approx(48.0)  # 46..50
    assert maps.case_score(a, np.zeros_like(mask)) == 0.0
    with pytest.raises(ValueError):
        maps.case_score(a, top_k=0.0)


def test_uncertainty_weighting_of_the_residual():
    residual = maps.residual
    x = np.array([[[[1.0, 1.0, 0.4]]]], dtype=np.float32)  # (B, C, H, W)
    healthy = np.zeros_like(x)
    spread = np.array([[[[0.0, 0.6, 0.0]]]], dtype=np.float32)
    plain = residual(x, healthy)
    weighted = residual(x, healthy, spread=spread, spread_floor=0.2)
    np.testing.assert_allclose(weighted, [[[[1.0, 0.25, 0.4]]]], rtol=1e-6)  # 0.2 / (0.2 + 0.6) = 0.25
    np.testing.assert_allclose(residual(x, healthy, kind="squared", spread=spread, spread_floor=0.2),
                               [[[[1.0, 0.0625, 0.16]]]], rtol=1e-6)
    # an unsure voxel with a large residual now ranks below a sure one with a smaller residual
    assert plain[0, 0, 0, 1] > plain[0, 0, 0, 2] and weighted[0, 0, 0, 1] < weighted[0, 0, 0, 2]
    np.testing.assert_array_equal(residual(x, healthy, spread=spread, spread_floor=None), plain)
    np.testing.assert_array_equal(residual(x, healthy, spread=np.zeros_like(x), spread_floor=0.2), plain)
    with pytest.raises(ValueError, match="positive"):
        residual(x, healthy, spread=spread, spread_floor=-1.0)
