"""Segmentation metrics against hand-computed values: Dice, HD95 with anisotropic spacing, GED, ECE, AUROC."""

import math

import numpy as np
import pytest
import torch

from medidiff.metrics import (
    expected_calibration_error,
    generalized_energy_distance,
    hd95,
    pairwise_iou_distance,
    segmentation_dice,
    segmentation_metrics,
    uncertainty_error_auroc,
)


def _case(spatial):
    return torch.zeros((1, 1, *spatial), dtype=torch.long)


def test_dice_and_hd95_2d_anisotropic():
    # a 2x2 square against a 2x3 rectangle that extends it by one column along axis 1 (spacing 2.5 mm)
    pred, target = _case((6, 7)), _case((6, 7))
    pred[0, 0, 2:4, 2:4] = 1
    target[0, 0, 2:4, 2:5] = 1
    assert segmentation_dice(pred, target)[0, 0] == pytest.approx(2 * 4 / (4 + 6))
    # every voxel is a surface voxel; target -> pred distances are 0,0,0,0,2.5,2.5: 95th percentile 2.5
    assert hd95(pred, target, spacing=(1.0, 2.5))[0, 0] == pytest.approx(2.5)
    assert hd95(pred, target, spacing=(2.5, 1.0))[0, 0] == pytest.approx(1.0)
    # two single voxels three columns apart: distance 3 x 2.5 mm, Dice 0
    a, b = _case((5, 8)), _case((5, 8))
    a[0, 0, 2, 2] = 1
    b[0, 0, 2, 5] = 1
    assert hd95(a, b, spacing=(1.0, 2.5))[0, 0] == pytest.approx(7.5)
    assert segmentation_dice(a, b)[0, 0] == 0.0


def test_dice_and_hd95_3d_anisotropic():
    a, b = _case((4, 5, 6)), _case((4, 5, 6))
    a[0, 0, 1, 1, 1] = 1
    b[0, 0, 1, 2, 3] = 1
    assert hd95(a, b, spacing=(1.0, 2.0, 3.0))[0, 0] == pytest.approx(math.sqrt(2.0**2 + 6.0**2))
    # a 2x2x2 cube against a 2x2x3 box (one more slice along axis 2, spacing 3 mm)
    p, t = _case((5, 5, 6)), _case((5, 5, 6))
    p[0, 0, 1:3, 1:3, 1:3] = 1
    t[0, 0, 1:3, 1:3, 1:4] = 1
    assert segmentation_dice(p, t)[0, 0] == pytest.approx(2 * 8 / (8 + 12))
    # 12 target surface voxels: 8 at 0 and 4 at 3 mm; np.percentile's 95th of that is 3
    assert hd95(p, t, spacing=(1.0, 2.0, 3.0))[0, 0] == pytest.approx(3.0)


def test_dice_hd95_multiclass_and_empty():
    pred, target = _case((4, 4)), _case((4, 4))
    pred[0, 0, 0, 0] = 1
    target[0, 0, 0, 0] = 1
    pred[0, 0, 3, 3] = 2  # class 2 predicted but absent from the reference
    d = segmentation_dice(pred, target, num_classes=3)
    assert d.shape == (1, 2) and d[0].tolist() == [1.0, 0.0]
    h = hd95(pred, target, num_classes=3)
    assert h[0, 0] == 0.0 and np.isnan(h[0, 1])
    both_empty = _case((4, 4))
    assert segmentation_dice(both_empty, both_empty)[0, 0] == 1.0
    m = segmentation_metrics(pred, target, num_classes=3)
    assert m == {"dice": 0.5, "hd95": 0.0}


def test_ged_identical_sets_and_hand_computed_pair():
    g = np.random.default_rng(0)
    masks = (g.random((3, 4, 5)) > 0.5).astype(np.int64)
    assert generalized_energy_distance(masks, masks) == pytest.approx(0.0, abs=1e-12)
    # A = {0, 1}, B = {0, 1, 2} in a 1x4 image: IoU 2/3, d = 1/3
    a = np.array([[[1, 1, 0, 0]]])
    b = np.array([[[1, 1, 1, 0]]])
    assert pairwise_iou_distance(a, b)[0, 0] == pytest.approx(1 / 3)
    # samples {A}, annotations {B}: 2 d(A, B) - 0 - 0
    assert generalized_energy_distance(a, b) == pytest.approx(2 / 3)
    # samples {A, A}, annotations {A, B}: 2 * (0 + 1/3) / 2 - 0 - (0 + 1/3 + 1/3 + 0) / 4 = 1/3 - 1/6
    assert generalized_energy_distance(np.stack([a[0], a[0]]), np.stack([a[0], b[0]])) == pytest.approx(1 / 6)
    empty = np.zeros((2, 1, 4), dtype=np.int64)  # both empty: distance 0
    assert generalized_energy_distance(empty, empty) == 0.0


def test_ged_multiclass_3d():
    a = np.zeros((1, 2, 2, 2), dtype=np.int64)
    b = a.copy()
    a[0, 0, 0, :] = 1
    b[0, 0, 0, :] = 1
    a[0, 1, 1, 1] = 2  # class 2 only in a: d = (0 + 1) / 2
    assert generalized_energy_distance(a, b, num_classes=3) == pytest.approx(2 * 0.5)


def test_ece_calibrated_and_miscalibrated():
    # 4 voxels at 0.75 of which 3 are foreground; 4 at 0.25 of which 1 is: calibrated
    p = torch.tensor([0.75] * 4 + [0.25] * 4).reshape(1, 1, 2, 4)
    y = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0]).reshape(1, 1, 2, 4)
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-6)
    # 10 voxels at 0.9 half foreground (gap 0.4) and 10 at 0.2 all background (gap 0.2): 0.5*0.4 + 0.5*0.2
    p = torch.tensor([0.9] * 10 + [0.2] * 10).reshape(1, 1, 4, 5)
    y = torch.tensor([1, 0] * 5 + [0] * 10).reshape(1, 1, 4, 5)
    assert expected_calibration_error(p, y) == pytest.approx(0.3, abs=1e-6)
    # a mask keeping only the 0.9 voxels: 0.4
    keep = torch.zeros_like(y, dtype=torch.bool)
    keep.view(-1)[:10] = True
    assert expected_calibration_error(p, y, mask=keep) == pytest.approx(0.4, abs=1e-6)


def test_ece_multiclass_3d():
    # 3 classes, 2 voxels in 3D; voxel 0 is class 1 with p = (0, 1, 0), voxel 1 is class 2 with p = (0, .5, .5)
    p = torch.tensor([[0.0, 0.0], [1.0, 0.5], [0.0, 0.5]]).reshape(1, 3, 1, 1, 2)
    y = torch.tensor([1, 2]).reshape(1, 1, 1, 1, 2)
    # class 1: bin of 1.0 acc 1 (gap 0), bin of 0.5 acc 0 (gap .5) -> .25; class 2: bin of 0 (gap 0), .5 acc 1 -> .25
    assert expected_calibration_error(p, y) == pytest.approx(0.25, abs=1e-6)
    # with the background: class 0 is perfectly calibrated (p 0, never class 0) -> mean (0, .25, .25)
    assert expected_calibration_error(p, y, include_background=True) == pytest.approx(0.5 / 3, abs=1e-6)


@pytest.mark.parametrize("spatial", [(2, 3), (1, 2, 3)])
def test_uncertainty_error_auroc(spatial):
    target = torch.zeros((1, 1, *spatial), dtype=torch.long)
    pred = target.clone()
    pred.view(-1)[:2] = 1  # two wrong voxels
    u = torch.zeros((1, 1, *spatial))
    u.view(-1)[:2] = 0.9  # flagged exactly
    assert uncertainty_error_auroc(u, pred, target) == 1.0
    u.view(-1)[:] = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.0, 0.0])  # error/right pairs ranked right: 4 + 2 of 8
    assert uncertainty_error_auroc(u, pred, target) == pytest.approx(6 / 8)
    assert math.isnan(uncertainty_error_auroc(u, target, target))  # no errors


def test_bad_arguments():
    with pytest.raises(ValueError):
        hd95(_case((3, 3)), _case((3, 3)), spacing=(1.0, -1.0))
    with pytest.raises(ValueError):
        segmentation_dice(_case((3, 3)), _case((3, 4)))
    with pytest.raises(ValueError):
        expected_calibration_error(torch.full((1, 1, 2, 2), 1.5), _case((2, 2)))
    with pytest.raises(ValueError):
        generalized_energy_distance(np.zeros((2, 4)), np.zeros((2, 5)))
