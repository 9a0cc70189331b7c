"""Thresholds calibrated on healthy maps reach the target voxel false-positive rate; the JSON round trip."""

from __future__ import annotations

import numpy as np
import pytest

from medidiff.anomaly import thresholds
from medidiff.errors import DataError, RecipeError


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.10])
def test_calibrated_fpr_matches_the_target(fpr):
    rng = np.random.default_rng(0)
    maps = [np.abs(rng.normal(size=(20, 30, 40))) for _ in range(3)]
    masks = [rng.random((20, 30, 40)) < 0.7 for _ in range(3)]
    t = thresholds.calibrate(maps, masks, fpr=fpr)
    assert thresholds.false_positive_rate(maps, masks, t) == pytest.approx(fpr, abs=2e-4)
    # on fresh healthy maps of the same distribution the rate holds within sampling error
    fresh = np.abs(rng.normal(size=200_000))
    assert (fresh > t).mean() == pytest.approx(fpr, abs=0.004)
    # the half-normal's analytic quantile
    from scipy.stats import halfnorm

    assert t == pytest.approx(halfnorm.ppf(1 - fpr), rel=0.03)


def test_mask_restricts_the_voxels_and_rates_are_ordered():
    a = np.concatenate([np.zeros(900), np.full(100, 10.0)])
    mask = np.r_[np.ones(900, bool), np.zeros(100, bool)]
    assert thresholds.calibrate([a], [mask], fpr=0.05) == 0.0  # the tens are outside the mask
    t1, t5, t10 = thresholds.calibrate_many([np.arange(1000.0)], fprs=(0.01, 0.05, 0.10))
    assert t1 > t5 > t10
    assert thresholds.false_positive_rate([np.arange(1000.0)], None, t5) == pytest.approx(0.05, abs=1e-3)


def test_save_load_round_trip_and_errors(tmp_path):
    path = thresholds.save_threshold(tmp_path / thresholds.THRESHOLDS_FILE, 0.125, fpr=0.05, extra={"cases": ["a"]})
    assert thresholds.load_threshold(path) == 0.125
    with pytest.raises(DataError):
        thresholds.load_threshold(tmp_path / "missing.json")
    with pytest.raises(RecipeError):
        thresholds.calibrate([np.ones(4)], fpr=1.5)
    with pytest.raises(DataError):
        thresholds.calibrate([np.ones(4)], [np.zeros(4, bool)])
    assert thresholds.ORACLE_LABEL == "dice_best (oracle threshold)"
