"""Uncertainty maps of segmentation ensembles against hand-computed values, 2D and 3D."""

import math

import pytest
import torch

from medidiff.segment.uncertainty import (
    case_uncertainty,
    expected_entropy,
    mutual_information,
    predictive_entropy,
    uncertainty_maps,
    variance,
)

LOG2 = math.log(2.0)


@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 4)])
def test_agreeing_members_have_no_uncertainty(spatial):
    g = torch.Generator().manual_seed(0)
    member = (torch.rand((2, 1, *spatial), generator=g) > 0.5).double()
    p = member.expand(5, *member.shape)  # five identical hard members
    maps = uncertainty_maps(p)
    for name, m in maps.items():
        assert torch.equal(m, torch.zeros_like(m)), name
    assert maps["variance"].shape == (2, 1, *spatial)
    assert maps["predictive_entropy"].shape == (2, 1, *spatial)


@pytest.mark.parametrize("spatial", [(2, 2), (2, 2, 2)])
def test_identical_soft_members_have_no_mutual_information(spatial):
    soft = torch.full((1, 1, *spatial), 0.3, dtype=torch.float64)
    p = soft.expand(4, *soft.shape)
    h = -(0.3 * math.log(0.3) + 0.7 * math.log(0.7))
    assert torch.allclose(predictive_entropy(p), torch.full_like(soft, h))
    assert torch.allclose(expected_entropy(p), torch.full_like(soft, h))
    assert torch.allclose(mutual_information(p), torch.zeros_like(soft), atol=1e-15)
    assert torch.equal(variance(p), torch.zeros_like(soft))


def test_fifty_fifty_voxel():
    # two hard members disagree on voxel (0, 0) and agree elsewhere
    a = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    b = a.clone()
    b[0, 0, 0, 0] = 1.0
    p = torch.stack([a, b])
    expected = torch.zeros_like(a)
    expected[0, 0, 0, 0] = LOG2
    assert torch.allclose(predictive_entropy(p), expected)
    assert torch.allclose(mutual_information(p), expected)  # hard members: all entropy is disagreement
    assert torch.equal(expected_entropy(p), torch.zeros_like(a))
    v = torch.zeros_like(a)
    v[0, 0, 0, 0] = 0.25
    assert torch.allclose(variance(p), v)
    # one soft member at 0.5 everywhere: all entropy is the member's own, none is disagreement
    half = torch.full((1, 1, 1, 1, 1), 0.5, dtype=torch.float64)
    assert predictive_entropy(half).item() == pytest.approx(LOG2)
    assert expected_entropy(half).item() == pytest.approx(LOG2)
    assert mutual_information(half).item() == pytest.approx(0.0, abs=1e-15)


def test_mutual_information_by_hand():
    # members p = 0.1 and 0.9 on one voxel: H[0.5] - (H[0.1] + H[0.9]) / 2
    p = torch.tensor([0.1, 0.9], dtype=torch.float64).reshape(2, 1, 1, 1, 1)
    h01 = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    assert mutual_information(p).item() == pytest.approx(LOG2 - h01)
    assert variance(p).item() == pytest.approx(0.16)


@pytest.mark.parametrize("spatial", [(1, 2), (1, 1, 2)])
def test_multiclass_total_and_per_class(spatial):
    # 3 classes, two one-hot members: voxel 0 split between classes 1 and 2, voxel 1 unanimous class 0
    m1 = torch.zeros(1, 3, *spatial, dtype=torch.float64)
    m2 = m1.clone()
    flat1, flat2 = m1.view(1, 3, -1), m2.view(1, 3, -1)
    flat1[0, 1, 0] = 1.0
    flat2[0, 2, 0] = 1.0
    flat1[0, 0, 1] = flat2[0, 0, 1] = 1.0
    p = torch.stack([m1, m2])
    total = mutual_information(p).reshape(-1)
    assert total.tolist() == pytest.approx([LOG2, 0.0])
    per_class = mutual_information(p, per_class=True).reshape(3, -1)
    # class 0 is 0 in both members at voxel 0; classes 1 and 2 are each 50/50 there
    assert per_class[:, 0].tolist() == pytest.approx([0.0, LOG2, LOG2])
    assert per_class[:, 1].tolist() == pytest.approx([0.0, 0.0, 0.0])
    assert variance(p).reshape(3, -1)[:, 0].tolist() == pytest.approx([0.0, 0.25, 0.25])
    # a member spread over three classes: entropy log 3
    third = torch.full((1, 1, 3, *spatial), 1.0 / 3.0, dtype=torch.float64)
    assert predictive_entropy(third).reshape(-1).tolist() == pytest.approx([math.log(3.0)] * 2)


def test_case_uncertainty_over_a_region():
    u = torch.tensor([[[[1.0, 3.0], [0.0, 0.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])  # (2, 1, 2, 2)
    region = torch.zeros_like(u, dtype=torch.bool)
    region[0, 0, 0] = True  # first case: the top row
    assert case_uncertainty(u).tolist() == pytest.approx([1.0, 2.0])
    assert case_uncertainty(u, region).tolist() == pytest.approx([2.0, 0.0])  # an empty region scores 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        variance(torch.zeros(2, 1, 4, 4))  # no member axis
    with pytest.raises(ValueError):
        predictive_entropy(torch.full((2, 1, 1, 2, 2), 1.5))
    with pytest.raises(ValueError):
        case_uncertainty(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 3, 3))
