"""Thresholds for anomaly maps: calibrated on healthy cases at a chosen voxel false-positive rate.

Method: the threshold is the ``1 - fpr`` quantile of the map values of held-out healthy cases inside
their foreground masks (the operating point of Baur et al. 2021, MedIA 69:101952, sec. 3.4, set by
a false-positive rate instead of by the test labels). A best-Dice threshold chosen on the test labels
(``medidiff.metrics.dice_best``) is an oracle: it is reported as ``dice_best (oracle threshold)`` for
comparison, never used to flag voxels.

The calibration is saved as ``thresholds.json`` beside the outputs (and in the run's
``detection.json``); ``load_threshold`` reads it back for later runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import DataError, RecipeError
from medidiff.outputs import write_json

from ..arrays import to_numpy

__all__ = ["THRESHOLDS_FILE", "ORACLE_LABEL", "calibrate", "calibrate_many", "save_threshold", "load_threshold",
           "load_record", "false_positive_rate", "model_threshold_path", "saved_threshold"]

log = logging.getLogger("medidiff.anomaly")

THRESHOLDS_FILE = "thresholds.json"
#: How the best-Dice figure is labelled wherever it is reported.
ORACLE_LABEL = "dice_best (oracle threshold)"


def _healthy_values(maps: Iterable[Any], masks: Iterable[Any] | None) -> np.ndarray:

    maps = list(maps)
    masks = [None] * len(maps) if masks is None else list(masks)
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks for {len(maps)} maps")
    values = []
    for m, fg in zip(maps, masks):
        v = to_numpy(m).astype(np.float64).ravel()
        values.append(v if fg is None else v[to_numpy(fg).astype(bool).ravel()])
    values = np.concatenate(values) if values else np.zeros(0)
    if values.size == 0:
        raise DataError("no healthy voxels to calibrate the threshold on",
                        fix="give calibration cases whose foreground masks are not empty.")
    return values


def calibrate(maps: Iterable[Any], masks: Iterable[Any] | None = None, *, fpr: float = 0.05) -> float:
    """The threshold flagging a share ``fpr`` of the healthy voxels.

    Args:
        maps: anomaly maps of healthy cases (any shapes).
        masks: their foreground masks (``None``: every voxel counts).
        fpr: the target voxel false-positive rate in ``(0, 1)`` (e.g. 0.01, 0.05, 0.10).

    Returns:
        ``threshold`` such that ``map > threshold`` holds for a share ``fpr`` of the healthy voxels
        (up to ties).
    """
    return calibrate_many(maps, masks, fprs=(fpr,))[0]


def calibrate_many(maps: Iterable[Any], masks: Iterable[Any] | None = None, *,
                   fprs: Iterable[float] = (0.01, 0.05, 0.10)) -> list[float]:
    """Thresholds at several false-positive rates from one pass over the healthy maps (see :func:`calibrate`)."""
    fprs = [float(f) for f in fprs]
    if any(not 0 < f < 1 for f in fprs):
        raise RecipeError(f"false-positive rates must lie in (0, 1), got {fprs}", where="anomaly.fpr",
                          fix="use e.g. 0.01, 0.05 or 0.1.")
    values = _healthy_values(maps, masks)
    return [float(np.quantile(values, 1.0 - f, method="lower")) for f in fprs]


def false_positive_rate(maps: Iterable[Any], masks: Iterable[Any] | None, threshold: float) -> float:
    """The share of healthy voxels with ``map > threshold``."""
    values = _healthy_values(maps, masks)
    return float((values > threshold).mean())


def save_threshold(path: str | Path, threshold: float, *, fpr: float, extra: dict[str, Any] | None = None,
                   scan_quantile: float | None = None) -> Path:
    """Write a calibrated threshold as JSON (``threshold``, ``fpr``, ``units`` and any ``extra`` entries).

    Args:
        path: the JSON file (usually ``<out>/thresholds.json``).
        threshold: the threshold, on the model's intensity scale (or on the per-scan scale).
        fpr: the false-positive rate it was calibrated for.
        extra: more entries (calibration cases, voxel counts, thresholds at other rates...).
        scan_quantile: the maps' ``map.scan_quantile`` when each scan's map is divided by its own scale.

    Returns:
        The path written.
    """
    if scan_quantile is None:
        units = {"units": "anomaly map on the model's [-1, 1] intensity scale",
                 "in_scan_units": "differs per scan (its intensity scaling): each run's scores.csv "
                                  "threshold_scan_units and each heatmap's cal_min"}
    else:
        units = {"units": f"anomaly map divided by each scan's own {scan_quantile:g}-quantile of it (the heatmaps' "
                          "units: the same number for every scan)"}
    record = {"threshold": float(threshold), "fpr": float(fpr), **units, **(extra or {})}
    return write_json(record, path)


def load_record(path: str | Path) -> dict[str, Any]:
    """A JSON file written by :func:`save_threshold`, its ``threshold`` checked to be a number (as a float).

    Raises:
        DataError: the file is missing or has no numeric ``threshold``.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        record["threshold"] = float(record["threshold"])
        return record
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read a threshold from it ({e})", where=path,
                        fix=f"point at a {THRESHOLDS_FILE} written by medidiff detect, or give a number.") from None


def load_threshold(path: str | Path) -> float:
    """The ``threshold`` of a JSON file written by :func:`save_threshold` (see :func:`load_record`)."""
    return load_record(path)["threshold"]


def model_threshold_path(model_path: str | Path) -> Path:
    """Where a threshold saved with a model lives: ``<stem>.thresholds.json`` beside it, or in its folder."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path / THRESHOLDS_FILE
    return model_path.with_name(model_path.name.split(".")[0] + ".thresholds.json")


def saved_threshold(model_path: str | Path, settings: dict[str, Any], fpr: float | None = None
                    ) -> tuple[float | None, dict[str, Any]]:
    """The threshold saved with a model, if it was calibrated with the same map settings (and for ``fpr``).

    Args:
        model_path: the model's weights file or folder.
        settings: the map settings of this run (``AnomalySection.map_settings``).
        fpr: the false-positive rate asked for: the record's own threshold when it was calibrated for it, else
            its ``at_fpr`` entry for that rate (``None``: the record's own threshold).

    Returns:
        ``(threshold, record)``, or ``(None, {})`` when there is none, its settings differ or it has no
        threshold for ``fpr`` (logged).
    """
    path = model_threshold_path(model_path)
    if not path.is_file():
        log.warning("no calibration scans, no threshold and none saved with the model: no anomaly masks or Dice")
        return None, {}
    record = load_record(path)
    saved = record.get("settings") or {}
    if saved != settings:
        changed = sorted(_differences(saved, settings))
        log.warning("the threshold saved with the model (%s) was calibrated with other settings (%s): no anomaly "
                    "masks or Dice; give calibration scans or a threshold", path, ", ".join(changed))
        return None, {}
    value, rate = record["threshold"], record.get("fpr")
    if fpr is not None and rate != fpr:
        levels = record.get("at_fpr") or {}
        if f"{fpr:g}" not in levels:
            log.warning("the threshold saved with the model (%s) is for FPR %s and %s, not %g: no anomaly masks or "
                        "Dice; give calibration scans or a threshold", path, rate,
                        ", ".join(levels) or "no other rate", fpr)
            return None, {}
        value, rate = float(levels[f"{fpr:g}"]), fpr
    log.info("threshold %.4g saved with the model (%s, FPR %s)", value, path.name, rate)
    return value, {"threshold": value, "fpr": rate, "source": str(path)}


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in set(a) | set(b) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]
