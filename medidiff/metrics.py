"""Evaluation metrics shared by the tasks, computed with scikit-learn and scikit-image.

- detection: voxel AUROC and AUPRC (scikit-learn's ``roc_auc_score`` and ``average_precision_score``),
  Dice at a threshold and the best Dice over all thresholds (an oracle figure), per case and pooled
  over the voxels inside a foreground mask; case-level AUROC from case scores and labels;
- image quality: PSNR, SSIM (scikit-image) and NMSE.

Dice: Dice (1945), ``2 |P & T| / (|P| + |T|)``; AUPRC is scikit-learn's average precision (the
step-wise area under the precision-recall curve, Zhu 2004).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .arrays import to_numpy

__all__ = [
    "voxel_auroc",
    "voxel_auprc",
    "dice",
    "dice_at",
    "dice_best",
    "case_auroc",
    "detection_metrics",
    "psnr",
    "ssim",
    "nmse",
]


def _flat(a: Any) -> np.ndarray:
    return to_numpy(a).ravel()


def _pairs(scores: Any, labels: Any, mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    s, y = _flat(scores).astype(np.float64), _flat(labels) > 0.5
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if mask is not None:
        m = _flat(mask).astype(bool)
        if m.shape != s.shape:
            raise ValueError(f"mask of {m.size} voxels for {s.size} scores")
        s, y = s[m], y[m]
    return s, y


def _defined(y: np.ndarray) -> bool:
    return bool(y.any()) and not bool(y.all())


def voxel_auroc(scores: Any, labels: Any, mask: Any = None) -> float:
    """Area under the ROC curve of voxel scores against binary labels, inside ``mask``.

    Args:
        scores: anomaly scores (any shape).
        labels: ground truth of the same shape (nonzero / > 0.5 = anomalous).
        mask: voxels that count (``None``: all).

    Returns:
        The AUROC, or NaN when only one class is present.
    """
    from sklearn.metrics import roc_auc_score

    s, y = _pairs(scores, labels, mask)
    return float(roc_auc_score(y, s)) if _defined(y) else float("nan")


def voxel_auprc(scores: Any, labels: Any, mask: Any = None) -> float:
    """Average precision (area under the precision-recall curve) of voxel scores, inside ``mask``.

    Args:
        scores: anomaly scores.
        labels: ground truth of the same shape.
        mask: voxels that count.

    Returns:
        The AUPRC, or NaN without positives.
    """
    from sklearn.metrics import average_precision_score

    s, y = _pairs(scores, labels, mask)
    return float(average_precision_score(y, s)) if y.any() else float("nan")


def dice(pred: Any, target: Any, mask: Any = None) -> float:
    """Dice overlap of two binary masks, inside ``mask``.

    Returns:
        ``2 |P & T| / (|P| + |T|)``; 1.0 when both are empty.
    """
    p, t = _pairs(pred, target, mask)
    p = p > 0.5
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2 * (p & t).sum() / total)


def dice_at(scores: Any, labels: Any, threshold: float, mask: Any = None) -> float:
    """Dice of ``scores > threshold`` against the labels, inside ``mask``."""
    s, y = _pairs(scores, labels, mask)
    return dice(s > threshold, y)


def dice_best(scores: Any, labels: Any, mask: Any = None) -> tuple[float, float]:
    """The best Dice over every threshold and the threshold giving it (an oracle: it looks at the labels).

    Exact: voxels sorted by score, Dice ``2 TP(k) / (P + k)`` for the top ``k`` voxels at each distinct score.

    Args:
        scores: anomaly scores.
        labels: ground truth.
        mask: voxels that count.

    Returns:
        ``(dice, threshold)``: predict ``scores > threshold``; ``(nan, nan)`` without positives.
    """
    s, y = _pairs(scores, labels, mask)
    if not y.any():
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="stable")
    s_sorted, tp = s[order], np.cumsum(y[order])
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]  # last index of each distinct score
    k = last + 1
    d = 2.0 * tp[last] / (y.sum() + k)
    best = int(np.argmax(d))
    i = last[best]
    below = float(s_sorted[i + 1]) if i + 1 < s_sorted.size else float(s_sorted[i]) - 1.0
    threshold = (float(s_sorted[i]) + below) / 2  # between the last voxel kept and the first one left out
    return float(d[best]), threshold


def case_auroc(scores: Sequence[float], labels: Sequence[Any]) -> float:
    """AUROC of case scores against case labels (anomalous or not); NaN unless both kinds are present."""
    return voxel_auroc(np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64))


def detection_metrics(cases: Mapping[str, Mapping[str, Any]], threshold: float | None = None) -> dict[str, Any]:
    """Voxel metrics per case and pooled over all cases' foreground voxels.

    Args:
        cases: ``{case: {"scores": map, "labels": ground truth, "mask": foreground or None,
            "score": case score (optional)}}``.
        threshold: the calibrated threshold for ``dice`` (``None``: no ``dice``).

    Returns:
        ``{"auroc", "auprc", "dice", "dice_best", "dice_best_threshold", "case_auroc", "n_cases",
        "per_case": {case: {...}}}``; ``dice_best`` uses an oracle threshold chosen on the labels.
    """
    pooled_s, pooled_y, per_case = [], [], {}
    for name, c in cases.items():
        s, y = _pairs(c["scores"], c["labels"], c.get("mask"))
        pooled_s.append(s)
        pooled_y.append(y)
        best, _ = dice_best(s, y)
        row = {"auroc": voxel_auroc(s, y), "auprc": voxel_auprc(s, y), "dice_best": best,
               "n_voxels": int(s.size), "n_anomalous": int(y.sum())}
        if threshold is not None:
            row["dice"] = dice_at(s, y, threshold) if y.any() else float("nan")
        per_case[name] = row
    s = np.concatenate(pooled_s) if pooled_s else np.zeros(0)
    y = np.concatenate(pooled_y) if pooled_y else np.zeros(0, dtype=bool)
    best, best_t = dice_best(s, y)
    out: dict[str, Any] = {"auroc": voxel_auroc(s, y), "auprc": voxel_auprc(s, y)}
    if threshold is not None:
        out["dice"] = dice_at(s, y, threshold)
        out["threshold"] = float(threshold)
    out.update({"dice_best": best, "dice_best_threshold": best_t, "n_cases": len(per_case)})
    case_scores = [c["score"] for c in cases.values() if "score" in c]
    if len(case_scores) == len(per_case):
        out["case_auroc"] = case_auroc(case_scores, [r["n_anomalous"] > 0 for r in per_case.values()])
    out["per_case"] = per_case
    return out


# --------------------------------------------------------------------------------------- image quality


def _pair_images(image: Any, reference: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = to_numpy(image).astype(np.float64), to_numpy(reference).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shape {a.shape} differs from the reference's {b.shape}")
    return a, b


def psnr(image: Any, reference: Any, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB (scikit-image), with ``data_range`` defaulting to the reference's range."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _pair_images(image, reference)
    rng = float(b.max() - b.min()) if data_range is None else float(data_range)
    return float(peak_signal_noise_ratio(b, a, data_range=rng))


def ssim(image: Any, reference: Any, data_range: float | None = None) -> float:
    """Structural similarity (scikit-image; 2D or 3D, Gaussian-free 7-pixel windows), data range as in ``psnr``."""
    from skimage.metrics import structural_similarity

    a, b = _pair_images(image, reference)
    a, b = np.squeeze(a), np.squeeze(b)
    rng = float(b.max() - b.min()) if data_range is None else float(data_range)
    return float(structural_similarity(b, a, data_range=rng))


def nmse(image: Any, reference: Any) -> float:
    """Normalised mean squared error ``|image - reference|^2 / |reference|^2``."""
    a, b = _pair_images(image, reference)
    return float(((a - b) ** 2).sum() / max((b**2).sum(), np.finfo(np.float64).tiny))
