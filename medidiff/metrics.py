"""Evaluation metrics shared by the tasks, computed with scikit-learn and scikit-image.

- detection: voxel AUROC and AUPRC (scikit-learn's ``roc_auc_score`` and ``average_precision_score``),
  Dice at a threshold and the best Dice over all thresholds (an oracle figure), per case and pooled
  over the voxels inside a foreground mask; case-level AUROC from case scores and labels;
- image quality: PSNR, SSIM (scikit-image) and NMSE;
- segmentation: Dice and HD95 per class of label maps with voxel spacing (MONAI's ``compute_dice`` and
  ``compute_hausdorff_distance``), the generalised energy distance between a set of sampled segmentations
  and a set of annotations, the expected calibration error of a soft map (MONAI's
  ``CalibrationErrorMetric``) and the AUROC of an uncertainty map against the voxels a segmentation gets
  wrong.

Dice: Dice (1945), ``2 |P & T| / (|P| + |T|)``; AUPRC is scikit-learn's average precision (the
step-wise area under the precision-recall curve, Zhu 2004). HD95: the 95th percentile of the distances
(mm) between the two masks' surface voxels, the larger of the two directions (Huttenlocher et al. 1993,
made robust). GED: Kohl et al. (2018), NeurIPS, ``D^2 = 2 E d(S, Y) - E d(S, S') - E d(Y, Y')`` with
``d = 1 - IoU``. ECE: Guo et al. (2017), ICML, ``sum_m |B_m| / n |acc(B_m) - conf(B_m)|``, per class.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

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
    "segmentation_dice",
    "hd95",
    "pairwise_iou_distance",
    "generalized_energy_distance",
    "expected_calibration_error",
    "uncertainty_error_auroc",
    "segmentation_metrics",
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
        "per_case": {case: {"auroc", "auprc", "dice_best", "n_voxels", "n_lesion_voxels", "dice"}}}``;
        ``n_voxels`` counts the voxels scored (the foreground), ``n_lesion_voxels`` the reference lesion voxels
        among them; ``dice_best`` uses an oracle threshold chosen on the labels.
    """
    pooled_s, pooled_y, per_case = [], [], {}
    for name, c in cases.items():
        s, y = _pairs(c["scores"], c["labels"], c.get("mask"))
        pooled_s.append(s)
        pooled_y.append(y)
        best, _ = dice_best(s, y)
        row = {"auroc": voxel_auroc(s, y), "auprc": voxel_auprc(s, y), "dice_best": best,
               "n_voxels": int(s.size), "n_lesion_voxels": int(y.sum())}
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
        out["case_auroc"] = case_auroc(case_scores, [r["n_lesion_voxels"] > 0 for r in per_case.values()])
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


# --------------------------------------------------------------------------------------- segmentation


def _label_maps(pred: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = (torch.as_tensor(to_numpy(a)) for a in (pred, target))
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from the target's {tuple(t.shape)}")
    if p.ndim not in (4, 5) or p.shape[1] != 1:
        raise ValueError(f"expected label maps (B, 1, *spatial) with 2 or 3 spatial dims, got {tuple(p.shape)}")
    return p.long(), t.long()


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    from monai.networks.utils import one_hot

    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return one_hot(labels, num_classes=num_classes, dim=1)


def _spacing(spacing: Sequence[float] | float | None, ndim: int) -> list[float] | None:
    if spacing is None:
        return None
    sp = np.broadcast_to(np.asarray(to_numpy(spacing), dtype=np.float64).ravel(), (ndim,))
    if not np.all(sp > 0):
        raise ValueError(f"spacing must be positive, got {spacing}")
    return [float(v) for v in sp]


def segmentation_dice(pred: Any, target: Any, num_classes: int = 2, include_background: bool = False) -> np.ndarray:
    """Dice per case and class of two label maps (MONAI's ``compute_dice``).

    Args:
        pred: predicted labels ``(B, 1, *spatial)`` (integers; bool for a binary mask).
        target: reference labels of the same shape.
        num_classes: number of classes, background included.
        include_background: also score class 0.

    Returns:
        float64 ``(B, num_classes - 1)`` (or ``(B, num_classes)`` with the background); 1 where both masks
        of a class are empty.
    """
    from monai.metrics import compute_dice

    p, t = _label_maps(pred, target)
    d = compute_dice(_one_hot(p, num_classes), _one_hot(t, num_classes), include_background=include_background,
                     ignore_empty=False)
    return d.double().numpy()


def hd95(pred: Any, target: Any, spacing: Sequence[float] | float | None = None, num_classes: int = 2,
         include_background: bool = False) -> np.ndarray:
    """95th-percentile Hausdorff distance per case and class, in mm (MONAI's ``compute_hausdorff_distance``).

    Surface voxels are those a mask loses under erosion; for each direction (prediction to reference and
    back) the 95th percentile of their Euclidean distances to the other surface, with ``spacing``; the
    larger of the two.

    Args:
        pred: predicted labels ``(B, 1, *spatial)``.
        target: reference labels of the same shape.
        spacing: voxel size per spatial axis in mm (a number for all; ``None``: 1).
        num_classes: number of classes, background included.
        include_background: also score class 0.

    Returns:
        float64 ``(B, num_classes - 1)`` (or with the background); NaN where either mask of a class is empty.
    """
    from monai.metrics import compute_hausdorff_distance

    p, t = _label_maps(pred, target)
    sp = _spacing(spacing, p.ndim - 2)
    with warnings.catch_warnings():  # empty masks (reported as NaN) and MONAI's own deprecations
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        d = compute_hausdorff_distance(_one_hot(p, num_classes), _one_hot(t, num_classes),
                                       include_background=include_background, percentile=95, spacing=sp)
    d = d.double().numpy()
    d[~np.isfinite(d)] = np.nan
    return d


def _label_set(masks: Any, name: str) -> np.ndarray:
    a = to_numpy(masks)
    if a.ndim < 2 or a.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty set of label maps (N, *spatial), got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating) and not np.array_equal(a, np.round(a)):
        raise ValueError(f"{name} must hold integer labels")
    return a.reshape(a.shape[0], -1).astype(np.int64)


def pairwise_iou_distance(a: Any, b: Any, num_classes: int = 2) -> np.ndarray:
    """``1 - IoU`` between every label map of one set and every one of another, averaged over foreground classes.

    Args:
        a: ``(N, *spatial)`` label maps (a channel axis of 1 may be included).
        b: ``(M, *spatial)`` label maps of the same spatial shape.
        num_classes: number of classes, background included.

    Returns:
        float64 ``(N, M)``; a class absent from both maps of a pair counts as distance 0.
    """
    x, y = _label_set(a, "a"), _label_set(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"label maps of {x.shape[1]} and {y.shape[1]} voxels")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    for arr in (x, y):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes})")
    total = np.zeros((x.shape[0], y.shape[0]))
    for c in range(1, num_classes):
        xc, yc = (x == c).astype(np.float64), (y == c).astype(np.float64)
        inter = xc @ yc.T
        union = xc.sum(1)[:, None] + yc.sum(1)[None, :] - inter
        total += np.where(union > 0, 1.0 - inter / np.maximum(union, 1.0), 0.0)
    return total / (num_classes - 1)


def generalized_energy_distance(samples: Any, annotations: Any, num_classes: int = 2) -> float:
    """Generalised energy distance between sampled segmentations and annotations (Kohl et al. 2018).

    ``D^2_GED = 2 E d(S, Y) - E d(S, S') - E d(Y, Y')`` with ``d = 1 - IoU`` (averaged over foreground
    classes), expectations over all pairs of the two empirical sets (self-pairs included, as in the
    probabilistic U-Net's and PHiSeg's evaluations).

    Args:
        samples: ``(N, *spatial)`` sampled label maps of one case.
        annotations: ``(M, *spatial)`` annotations of the same case.
        num_classes: number of classes, background included.

    Returns:
        The GED (0 for identical sets; lower is better).
    """
    d_sy = pairwise_iou_distance(samples, annotations, num_classes).mean()
    d_ss = pairwise_iou_distance(samples, samples, num_classes).mean()
    d_yy = pairwise_iou_distance(annotations, annotations, num_classes).mean()
    return float(2.0 * d_sy - d_ss - d_yy)


def expected_calibration_error(probability: Any, labels: Any, n_bins: int = 10, mask: Any = None,
                               include_background: bool = False) -> float:
    """Voxel-wise expected calibration error of a soft segmentation (MONAI's ``CalibrationErrorMetric``).

    For each class, voxels are put into ``n_bins`` equal-width bins ``[k / n, (k + 1) / n)`` of their
    predicted probability of that class; ECE is the voxel-weighted mean over bins of ``|fraction of the
    bin's voxels that are of the class - mean predicted probability|``, pooled over the batch; the
    result is the mean over the classes scored.

    Args:
        probability: ``(B, C, *spatial)``: ``C = 1`` foreground probability, else class probabilities.
        labels: ``(B, 1, *spatial)`` reference labels.
        n_bins: number of bins.
        mask: ``(B, 1, *spatial)`` voxels that count (``None``: all).
        include_background: with class probabilities, also score class 0.

    Returns:
        The ECE in ``[0, 1]`` (0 = calibrated), NaN without voxels.
    """
    from monai.metrics import CalibrationErrorMetric

    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = torch.as_tensor(to_numpy(probability)).double()
    y = torch.as_tensor(to_numpy(labels)).long()
    if p.ndim not in (4, 5) or y.shape != (p.shape[0], 1, *p.shape[2:]):
        raise ValueError(f"expected probabilities (B, C, *spatial) and labels (B, 1, *spatial), got "
                         f"{tuple(p.shape)} and {tuple(y.shape)}")
    if torch.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    c = p.shape[1]
    if c == 1:
        onehot = (y == 1).double()
        if y.numel() and (y.min() < 0 or y.max() > 1):
            raise ValueError("a single-channel probability needs binary labels")
    else:
        onehot = _one_hot(y, c).double()
    keep = torch.ones(y.shape, dtype=torch.bool) if mask is None else torch.as_tensor(to_numpy(mask)).bool()
    if keep.shape != y.shape:
        raise ValueError(f"mask of shape {tuple(keep.shape)} for labels of shape {tuple(y.shape)}")
    keep = keep[:, 0]
    # pool every kept voxel of the batch into one (1, C, n) "image"
    p_kept = p.movedim(1, -1)[keep].T[None].contiguous()
    y_kept = onehot.movedim(1, -1)[keep].T[None].contiguous()
    if p_kept.shape[-1] == 0:
        return float("nan")
    metric = CalibrationErrorMetric(num_bins=n_bins, include_background=include_background or c == 1,
                                    metric_reduction="mean")
    return float(metric(y_pred=p_kept, y=y_kept).mean())


def uncertainty_error_auroc(uncertainty: Any, pred: Any, target: Any, mask: Any = None) -> float:
    """How well an uncertainty map flags the voxels a segmentation gets wrong: AUROC of uncertainty vs error.

    Args:
        uncertainty: one value per voxel, ``(B, 1, *spatial)`` (or any shape with as many voxels as ``pred``).
        pred: predicted labels ``(B, 1, *spatial)``.
        target: reference labels of the same shape.
        mask: voxels that count (``None``: all).

    Returns:
        The AUROC (0.5 = uninformative, 1 = every wrong voxel more uncertain than every right one), NaN
        when there are no errors or only errors.
    """
    p, t = _label_maps(pred, target)
    return voxel_auroc(uncertainty, (p != t).numpy(), mask)


def segmentation_metrics(pred: Any, target: Any, *, spacing: Sequence[float] | float | None = None,
                         num_classes: int = 2, probability: Any = None, uncertainty: Any = None,
                         samples: Any = None, annotations: Any = None, n_bins: int = 10) -> dict[str, float]:
    """The segmentation metrics of one case, as far as its inputs allow.

    Args:
        pred: fused labels ``(1, 1, *spatial)``.
        target: reference labels, same shape.
        spacing: voxel size in mm per spatial axis.
        num_classes: number of classes, background included.
        probability: the fused soft map ``(1, C, *spatial)`` (for ``ece``).
        uncertainty: the uncertainty map ``(1, 1, *spatial)`` (for ``uncertainty_error_auroc``).
        samples: the members' labels ``(N, *spatial)`` (for ``ged``, with ``annotations``).
        annotations: every annotation of the case ``(M, *spatial)``.
        n_bins: ECE bins.

    Returns:
        ``{"dice", "hd95"}`` (means over foreground classes, NaN-aware), and ``"ece"``,
        ``"uncertainty_error_auroc"`` and ``"ged"`` when their inputs are given.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN HD95 rows
        out = {"dice": float(np.nanmean(segmentation_dice(pred, target, num_classes))),
               "hd95": float(np.nanmean(hd95(pred, target, spacing, num_classes)))}
    if probability is not None:
        out["ece"] = expected_calibration_error(probability, target, n_bins)
    if uncertainty is not None:
        out["uncertainty_error_auroc"] = uncertainty_error_auroc(uncertainty, pred, target)
    if samples is not None and annotations is not None:
        out["ged"] = generalized_energy_distance(samples, annotations, num_classes)
    return out
