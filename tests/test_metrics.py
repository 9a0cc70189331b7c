"""Metrics cross-checked against scikit-learn, brute force and analytic values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from medidiff import metrics


@pytest.fixture
def scored():
    rng = np.random.default_rng(1)
    labels = rng.random((4, 16, 16)) < 0.1
    scores = rng.normal(size=labels.shape) + 1.5 * labels
    mask = rng.random(labels.shape) < 0.8
    return scores, labels, mask


def test_auroc_auprc_match_sklearn_inside_the_mask(scored):
    s, y, m = scored
    assert metrics.voxel_auroc(s, y, m) == pytest.approx(roc_auc_score(y[m], s[m]), abs=1e-12)
    assert metrics.voxel_auprc(torch.from_numpy(s), torch.from_numpy(y), m) == pytest.approx(
        average_precision_score(y[m], s[m]), abs=1e-12)
    assert np.isnan(metrics.voxel_auroc(s, np.zeros_like(y)))
    assert metrics.voxel_auroc([0.1, 0.9], [0, 1]) == 1.0


def test_dice_analytic_and_best_dice_against_brute_force(scored):
    p = np.zeros(10, bool)
    t = np.zeros(10, bool)
    p[:4], t[2:8] = True, True  # overlap 2, sizes 4 and 6
    assert metrics.dice(p, t) == pytest.approx(0.4)
    assert metrics.dice(np.zeros(3), np.zeros(3)) == 1.0
    s, y, m = scored
    best, thr = metrics.dice_best(s, y, m)
    brute = max(metrics.dice(s[m] >= u, y[m]) for u in np.unique(s[m]))
    assert best == pytest.approx(brute, abs=1e-12)
    assert metrics.dice_at(s, y, thr, m) == pytest.approx(best, abs=1e-12)  # the threshold reproduces it
    assert metrics.dice_at(s, y, 10.0, m) == 0.0


def test_detection_metrics_pool_voxels_and_rank_cases(scored):
    s, y, m = scored
    cases = {f"c{i}": {"scores": s[i], "labels": y[i], "mask": m[i], "score": float(s[i].max())} for i in range(4)}
    cases["healthy"] = {"scores": s[0] * 0, "labels": np.zeros_like(y[0]), "mask": m[0], "score": -1.0}
    out = metrics.detection_metrics(cases, threshold=1.0)
    pooled_s = np.concatenate([s[i][m[i]] for i in range(4)] + [np.zeros(m[0].sum())])
    pooled_y = np.concatenate([y[i][m[i]] for i in range(4)] + [np.zeros(m[0].sum(), bool)])
    assert out["auroc"] == pytest.approx(roc_auc_score(pooled_y, pooled_s), abs=1e-12)
    assert out["auprc"] == pytest.approx(average_precision_score(pooled_y, pooled_s), abs=1e-12)
    assert out["dice"] == pytest.approx(metrics.dice(pooled_s > 1.0, pooled_y), abs=1e-12)
    assert out["per_case"]["c1"]["auroc"] == pytest.approx(roc_auc_score(y[1][m[1]], s[1][m[1]]), abs=1e-12)
    assert np.isnan(out["per_case"]["healthy"]["auroc"])
    assert out["case_auroc"] == 1.0 and out["n_cases"] == 5
    # names say what they count: the foreground voxels scored and the reference lesion voxels among them
    assert out["per_case"]["c1"]["n_voxels"] == int(m[1].sum())
    assert out["per_case"]["c1"]["n_lesion_voxels"] == int(y[1][m[1]].sum())
    assert out["per_case"]["healthy"]["n_lesion_voxels"] == 0 and "n_anomalous" not in out["per_case"]["c1"]


def test_image_quality_helpers():
    ref = np.zeros((8, 8))
    ref[2:6, 2:6] = 1.0
    img = ref + 0.1
    assert metrics.psnr(img, ref) == pytest.approx(10 * np.log10(1 / 0.01))
    assert metrics.nmse(img, ref) == pytest.approx(64 * 0.01 / 16)
    assert metrics.ssim(ref, ref) == pytest.approx(1.0)
    assert metrics.ssim(img * 0.5, ref) < 1.0
