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


def test_per_axis_parameters_for_leading_and_spatial_axes():
    assert maps._per_axis(2.0, 4, 2, 0) == (0, 0, 2.0, 2.0)
    assert maps._per_axis((1, 2), 3, 2, 1) == (1, 1, 2)
    assert maps._per_axis([3, 1, 2], 5, 3, 0) == (0, 0, 3, 1, 2)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3 and at most the array's 5 dims, got 4"):
        maps._per_axis(1, 5, 4, 0)
    with pytest.raises(ValueError, match="at most the array's 2 dims, got 3"):
        maps._per_axis(1, 2, 3, 0)
    with pytest.raises(ValueError, match=r"has 3 entries for 2 spatial dims"):
        maps._per_axis((1, 2, 3), 4, 2, 0)


def test_residual_difference_dtype_channel_axis_and_messages():
    x = np.array([[[[3.0, 1.0]], [[1.0, 0.0]]]])  # float64 (1, 2, 1, 2)
    h = np.array([[[[1.0, 2.0]], [[0.5, 0.0]]]], np.float32)
    r = maps.residual(x, h)
    assert r.dtype == np.float32 and r.shape == (1, 1, 1, 2)
    np.testing.assert_allclose(r, [[[[2.5, 1.0]]]])  # |3-1|+|1-0.5|, |1-2|+0
    np.testing.assert_allclose(maps.residual(x, h, kind="squared"), [[[[4.25, 1.0]]]])
    none = maps.residual(x, h, channel_axis=None)
    assert none.shape == (1, 2, 1, 2)
    np.testing.assert_allclose(none[0, :, 0, 0], [2.0, 0.5])
    assert maps.residual(np.float32(x), np.float64(h)).dtype == np.float32
    spread = np.full(x.shape, 0.2)  # float64 spread: weight 0.2 / (0.2 + 0.2) = 0.5
    w = maps.residual(x, h, spread=spread, spread_floor=0.2)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [[[[1.25, 0.5]]]])
    np.testing.assert_allclose(maps.residual(x, h, kind="squared", spread=-spread, spread_floor=0.2),
                               [[[[4.25 / 4, 0.25]]]])  # |spread|, weight squared
    np.testing.assert_array_equal(maps.residual(x, h, spread=spread, spread_floor=0.0), r)
    with pytest.raises(ValueError, match=r"unknown residual 'cubed'; choose one of \('abs', 'squared'\)"):
        maps.residual(x, h, kind="cubed")
    with pytest.raises(ValueError, match="spread_floor must be positive, got -0.5"):
        maps.residual(x, h, spread=spread, spread_floor=-0.5)


def test_erosion_is_face_connected_bool_and_per_slice():
    plus = np.zeros((5, 5), np.int64)
    plus[2, 1:4] = plus[1:4, 2] = 1
    e = maps.erode(plus, 1)
    assert e.dtype == bool and e.sum() == 1 and e[2, 2]  # the centre has its 4 face neighbours
    assert maps.erode(plus, 0).dtype == bool and maps.erode(plus, 0).sum() == 5
    sq = np.zeros((9, 9), bool)
    sq[1:8, 1:8] = True
    assert np.array_equal(maps.erode(sq), maps.erode(sq, 1)) and maps.erode(sq).sum() == 25
    assert maps.erode(sq, 3).sum() == 1 and maps.erode(sq, 4).sum() == 0
    stack = np.ones((3, 5, 5), bool)  # 2D per slice: the first and last slices are not eroded away
    assert maps.erode(stack, 1).sum() == 27
    assert maps.erode(stack, 1, spatial_dims=3).sum() == 9
    assert maps.erode(np.ones((1, 5, 5, 5), bool), 1, spatial_dims=3).sum() == 27
    with pytest.raises(ValueError, match="spatial_dims"):
        maps.erode(sq, 1, spatial_dims=3)


def test_median_filter_sizes_mirrored_edges_and_batches():
    b = np.zeros((4, 4), np.int64)
    b[0, 0] = 1
    f2 = maps.median_filter(b, 2)  # size 2 filters: the mirrored corner spreads
    assert f2.dtype == np.float32 and f2[0, 1] == 1.0 and f2[1, 0] == 1.0 and f2.sum() == 3.0
    for size in (0, 1):
        out = maps.median_filter(b, size)
        assert out.dtype == np.float32 and np.array_equal(out, b)
    assert np.array_equal(maps.median_filter(np.float32(b)), maps.median_filter(np.float32(b), 5))
    # the default window is 5: a 4 x 4 block (16 voxels) holds the majority of a 5 x 5 window at its centre
    # (16 of 25) but not of a 6 x 6 one (16 of 36)
    block = np.zeros((12, 12), np.float32)
    block[4:8, 4:8] = 1.0
    assert maps.median_filter(block)[5, 5] == 1.0 and maps.median_filter(block, 6)[5, 5] == 0.0
    # mirrored edges: a 3x3 block in the corner keeps its corner under a 3x3 window
    c = np.zeros((6, 6), np.float32)
    c[:2, :2] = 1.0
    assert maps.median_filter(c, 3)[0, 0] == 1.0
    a = np.zeros((3, 5, 5), np.float32)
    a[1] = 1.0  # slices are filtered apart
    f = maps.median_filter(a, 3)
    assert f[1].min() == 1.0 and f[0].max() == 0.0 and f[2].max() == 0.0
    assert maps.median_filter(a, (1, 3)).sum() == 25.0
    assert maps.median_filter(a, 3, spatial_dims=3)[1, 2, 2] == 0.0


def test_smoothing_sigma_per_axis_and_batches():
    a = np.zeros((3, 9, 9), np.int64)
    a[1, 4, 4] = 1
    s = maps.smooth(a, 1.0)
    assert s.dtype == np.float32 and s[0].max() == 0.0 and s[2].max() == 0.0  # slices apart
    assert s[1].sum() == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(maps.smooth(a), s)
    for sigma in (0.0, -1.0):
        out = maps.smooth(a, sigma)
        assert out.dtype == np.float32 and np.array_equal(out, a)
    assert s[1, 4, 4] < 0.2  # sigma 1 smooths
    line = maps.smooth(a, (0.0, 1.0))  # only along the last axis
    assert line[1, 3, 4] == 0.0 and line[1, 4, 3] > 0.0
    v = maps.smooth(np.float32(a), 1.0, spatial_dims=3)
    assert v[0].max() > 0.0 and v.sum() == pytest.approx(1.0, abs=1e-5)


def test_anomaly_map_options_spread_and_mask_shapes():
    x = np.zeros((2, 1, 7, 7), np.float32)
    x[:, :, 3, 3] = 2.0
    h = np.zeros_like(x)
    plain = MapOptions(median_size=0, smooth_sigma=0, erode=0, spread_floor=None)
    assert maps.anomaly_map(x, h, plain).sum() == 4.0  # no mask
    sq = MapOptions(residual="squared", median_size=0, smooth_sigma=0, erode=0, spread_floor=None)
    assert maps.anomaly_map(x, h, sq)[0, 0, 3, 3] == 4.0
    weighted = MapOptions(median_size=0, smooth_sigma=0, erode=0, spread_floor=0.5)
    spread = np.full(x.shape, 0.5, np.float32)
    assert maps.anomaly_map(x, h, weighted, spread=spread)[0, 0, 3, 3] == 1.0  # 2 * 0.5 / (0.5 + 0.5)
    assert maps.anomaly_map(x, h, weighted)[0, 0, 3, 3] == 2.0
    mask = np.zeros((2, 7, 7), bool)  # (B, *spatial): one mask per image
    mask[0] = True
    m = maps.anomaly_map(x, h, plain, mask=mask)
    assert m.shape == (2, 1, 7, 7) and m.dtype == np.float32 and m[0, 0, 3, 3] == 2.0 and m[1].max() == 0.0
    shared = np.ones((1, 7, 7), bool)  # one mask broadcast over the batch
    assert maps.anomaly_map(x, h, plain, mask=shared).shape == (2, 1, 7, 7)
    two = MapOptions(median_size=0, smooth_sigma=0, erode=2, spread_floor=None)
    ring = np.zeros((2, 1, 7, 7), bool)
    ring[:, :, 1:6, 1:6] = True  # eroded twice: only the centre is left
    assert maps.anomaly_map(x, h, two, mask=ring).sum() == 4.0
    ring[:, :, 1:6, 1] = False
    assert maps.anomaly_map(x, h, two, mask=ring).sum() == 0.0


def test_anomaly_map_of_volumes():
    x = np.zeros((1, 1, 5, 5, 5), np.float32)
    x[0, 0, 2] = 1.0  # a plane: kept by a 2D median per slice, removed by a 3D one
    h = np.zeros_like(x)
    med = MapOptions(median_size=3, smooth_sigma=0, erode=0, spread_floor=None)
    assert maps.anomaly_map(x, h, med, spatial_dims=3).max() == 0.0
    assert maps.anomaly_map(x, h, med.model_copy(update={"median_size": 0}), spatial_dims=3).sum() == 25.0
    smo = MapOptions(median_size=0, smooth_sigma=1.0, erode=0, spread_floor=None)
    assert maps.anomaly_map(x, h, smo, spatial_dims=3)[0, 0, 1, 2, 2] > 0.1  # smoothed across slices
    mask = np.ones((1, 1, 5, 5, 5), bool)
    ero = MapOptions(median_size=0, smooth_sigma=0, erode=1, spread_floor=None)
    assert maps.anomaly_map(x, h, ero, mask=mask, spatial_dims=3).sum() == 9.0  # 3x3 of the plane's 5x5
    mask[0, 0, 1] = False  # the slice next to the plane is outside: a 3D erosion removes the plane
    assert maps.anomaly_map(x, h, ero, mask=mask, spatial_dims=3).max() == 0.0


def test_case_score_bounds_and_precision():
    a = np.arange(1, 11, dtype=np.float32)
    assert maps.case_score(a, top_k=1.0) == pytest.approx(5.5)
    assert maps.case_score(a, top_k=0.2) == pytest.approx(9.5)
    assert maps.case_score(np.array([16777216.0, 1.0], np.float32), top_k=1.0) == 8388608.5  # float64 mean
    for bad in (1.5, 2.0, -0.1):
        with pytest.raises(ValueError, match=f"top_k must lie in \\(0, 1\\], got {bad}"):
            maps.case_score(a, top_k=bad)


def test_scan_scale_is_the_quantile_of_the_covered_brain_voxels():
    a = np.zeros((1, 4, 5), np.float32)
    a[0, 1:3, 1:4] = np.arange(1, 7).reshape(2, 3)  # the map covers 6 voxels: 1..6
    region = np.ones_like(a, bool)
    assert maps.scan_scale(a, region, 0.5) == pytest.approx(3.5)  # zeros (outside the eroded mask) do not count
    region[0, 2] = False  # 4, 5, 6 left out
    assert maps.scan_scale(a, region, 0.5) == pytest.approx(2.0)
    assert maps.scan_scale(np.zeros_like(a), region, 0.9) == 1.0  # nothing covered: left as it is
    with pytest.raises(ValueError, match="quantile"):
        maps.scan_scale(a, region, 1.0)


def test_per_scan_maps_share_one_threshold_across_gains():
    from medidiff.anomaly import thresholds

    base = np.random.default_rng(0).gamma(2.0, 1.0, size=(30, 30)).astype(np.float32)
    region = np.ones_like(base, bool)
    dim, bright = base * 0.5, base * 3.0  # one healthy pattern in two scans of other contrasts
    a, scale = maps.per_scan(dim, region, 0.9)
    assert scale == pytest.approx(np.quantile(dim, 0.9)) and np.allclose(a * scale, dim, rtol=1e-6)
    b = maps.per_scan(bright, region, 0.9)[0]
    # a threshold calibrated on one scan flags the same share of the other only on the per-scan scale
    assert thresholds.false_positive_rate([b], None, thresholds.calibrate([a], fpr=0.05)) == pytest.approx(0.05,
                                                                                                          abs=0.002)
    assert thresholds.false_positive_rate([bright], None, thresholds.calibrate([dim], fpr=0.05)) > 0.5
    same, one = maps.per_scan(bright, region, None)  # off: unchanged
    assert one == 1.0 and np.array_equal(same, bright)
