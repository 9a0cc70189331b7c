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


def test_quantile_is_the_lower_value_and_ties_are_not_false_positives():
    values = np.arange(10.0)
    assert thresholds.calibrate([values], fpr=0.25) == 6.0  # the lower 0.75 quantile, not 6.75
    assert thresholds.calibrate_many([values[:5], values[5:]], fprs=(0.25, 0.5)) == [6.0, 4.0]
    ties = np.array([0.0, 0.0, 1.0, 1.0])
    assert thresholds.false_positive_rate([ties], None, 1.0) == 0.0  # strictly above
    assert thresholds.false_positive_rate([ties], None, 0.5) == 0.5
    masks = [np.array([True, True, True, False])]
    assert thresholds.false_positive_rate([ties], masks, 0.5) == pytest.approx(1 / 3)


def test_calibration_errors_name_the_problem():
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(RecipeError, match=r"false-positive rates must lie in \(0, 1\), got") as e:
            thresholds.calibrate_many([np.ones(4)], fprs=(0.05, bad))
        assert e.value.where == "anomaly.fpr" and e.value.fix == "use e.g. 0.01, 0.05 or 0.1."
    with pytest.raises(ValueError, match="2 masks for 1 maps"):
        thresholds.calibrate([np.ones(4)], [np.ones(4, bool), np.ones(4, bool)])
    for maps, masks in (([], None), ([np.ones(4)], [np.zeros(4, bool)]), ([np.zeros(0)], None)):
        with pytest.raises(DataError, match="no healthy voxels to calibrate the threshold on") as e:
            thresholds.calibrate(maps, masks)
        assert e.value.message == "no healthy voxels to calibrate the threshold on"
        assert e.value.fix == "give calibration cases whose foreground masks are not empty."
        with pytest.raises(DataError):
            thresholds.false_positive_rate(maps, masks, 0.0)


def test_saved_record_keys_and_load_checks(tmp_path):
    import json

    units = {"units": "anomaly map on the model's [-1, 1] intensity scale",
             "in_scan_units": "differs per scan (its intensity scaling): each run's scores.csv threshold_scan_units "
                              "and each heatmap's cal_min"}
    path = thresholds.save_threshold(tmp_path / "t.json", np.float32(0.5), fpr=0.1, extra={"cases": 3})
    assert json.loads(path.read_text(encoding="utf-8")) == {"threshold": 0.5, "fpr": 0.1, **units, "cases": 3}
    plain = thresholds.save_threshold(tmp_path / "p.json", 1, fpr=0.05)
    assert thresholds.load_record(plain) == {"threshold": 1.0, "fpr": 0.05, **units}
    text = tmp_path / "s.json"
    text.write_text('{"threshold": "0.25", "note": "\u00e9"}', encoding="utf-8")
    record = thresholds.load_record(text)
    assert record["threshold"] == 0.25 and isinstance(record["threshold"], float) and "XXthresholdXX" not in record
    assert thresholds.load_threshold(text) == 0.25
    for i, body in enumerate(('{"fpr": 0.1}', '{"threshold": "abc"}', '{"threshold": null}', "[", "[1]")):
        bad = tmp_path / f"bad{i}.json"
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(DataError, match="cannot read a threshold from it") as e:
            thresholds.load_record(bad)
        assert e.value.where == str(bad)
        assert e.value.fix == "point at a thresholds.json written by medidiff detect, or give a number."


def test_model_threshold_path_for_files_and_folders(tmp_path):
    assert thresholds.model_threshold_path(tmp_path) == tmp_path / "thresholds.json"
    assert thresholds.model_threshold_path(str(tmp_path)) == tmp_path / "thresholds.json"
    model = tmp_path / "run" / "model.ema.safetensors"
    assert thresholds.model_threshold_path(model) == tmp_path / "run" / "model.thresholds.json"
    assert thresholds.model_threshold_path("weights") == thresholds.Path("weights.thresholds.json")


def test_saved_threshold_with_equal_and_different_settings(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="medidiff.anomaly")
    model = tmp_path / "model.safetensors"
    assert thresholds.saved_threshold(model, {}) == (None, {})
    assert caplog.messages == [
        "no calibration scans, no threshold and none saved with the model: no anomaly masks or Dice"]
    settings = {"map": {"residual": "abs", "median_size": 5}, "top_k": 0.01}
    path = thresholds.save_threshold(tmp_path / "model.thresholds.json", 0.3, fpr=0.05, extra={"settings": settings})
    caplog.clear()
    value, info = thresholds.saved_threshold(model, {"map": {"residual": "abs", "median_size": 5}, "top_k": 0.01})
    assert value == 0.3 and info == {"threshold": 0.3, "fpr": 0.05, "source": str(path)}
    assert caplog.messages == ["threshold 0.3 saved with the model (model.thresholds.json, FPR 0.05)"]
    caplog.clear()
    other = {"map": {"residual": "squared", "median_size": 5}, "top_k": 0.01, "erode": 1}
    assert thresholds.saved_threshold(model, other) == (None, {})
    assert caplog.messages == [
        f"the threshold saved with the model ({path}) was calibrated with other settings (erode, map.residual): "
        "no anomaly masks or Dice; give calibration scans or a threshold"]
    # a record without settings matches only empty settings
    thresholds.save_threshold(tmp_path / "thresholds.json", 0.7, fpr=0.1)
    assert thresholds.saved_threshold(tmp_path, {})[0] == 0.7
    assert thresholds.saved_threshold(tmp_path, {"top_k": 0.01}) == (None, {})


def test_differences_of_nested_settings():
    a = {"map": {"residual": "abs", "erode": 2, "x": {"y": 1}}, "fpr": 0.05, "only_a": 1}
    b = {"map": {"residual": "abs", "erode": 3, "x": {"y": 2}}, "fpr": 0.05, "only_b": None}
    assert sorted(thresholds._differences(a, b)) == ["map.erode", "map.x.y", "only_a"]
    assert thresholds._differences(a, a) == []
    assert thresholds._differences(1, 2) == [""]
    assert thresholds._differences({"a": 1}, 5) == [""]
    assert thresholds._differences({"a": 1}, {"a": 2}, "p.") == ["p.a"]
    assert thresholds._differences({"aX": {"bX": 1}}, {"aX": {"bX": 2}}) == ["aX.bX"]


def test_saved_threshold_for_another_rate_comes_from_its_levels(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="medidiff.anomaly")
    settings = {"map": {"residual": "abs"}}
    thresholds.save_threshold(tmp_path / "thresholds.json", 0.3, fpr=0.05,
                              extra={"settings": settings, "at_fpr": {"0.01": 0.5, "0.05": 0.3, "0.1": 0.2}})
    assert thresholds.saved_threshold(tmp_path, settings, 0.05) == (0.3, {"threshold": 0.3, "fpr": 0.05,
                                                                         "source": str(tmp_path / "thresholds.json")})
    assert thresholds.saved_threshold(tmp_path, settings, 0.01)[1]["threshold"] == 0.5
    assert thresholds.saved_threshold(tmp_path, settings, 0.1)[0] == 0.2
    assert thresholds.saved_threshold(tmp_path, settings)[0] == 0.3  # no rate asked: the record's own
    caplog.clear()
    assert thresholds.saved_threshold(tmp_path, settings, 0.02) == (None, {})
    assert "is for FPR 0.05 and 0.01, 0.05, 0.1, not 0.02" in caplog.messages[0]
