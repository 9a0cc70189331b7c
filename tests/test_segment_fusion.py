"""Fusion of segmentation ensembles and the members' conversions, 2D and 3D."""

import numpy as np
import pytest
import torch

from medidiff.segment.fusion import (
    channels_for,
    fuse,
    labels_to_unit,
    mean_probability,
    probabilities_to_labels,
    staple,
    staple_probability,
    unit_to_labels,
    unit_to_probabilities,
)

try:
    import SimpleITK  # noqa: F401

    HAVE_SITK = True
except ImportError:  # the 'staple' extra is not installed
    HAVE_SITK = False
needs_sitk = pytest.mark.skipif(not HAVE_SITK, reason="SimpleITK (the 'staple' extra) is not installed")


def _labels(spatial, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (2, 1, *spatial), generator=g)


@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 5)])
@pytest.mark.parametrize("num_classes", [2, 4])
def test_unit_round_trip(spatial, num_classes):
    y = _labels(spatial, num_classes)
    x = labels_to_unit(y, num_classes)
    assert x.shape == (2, channels_for(num_classes), *spatial)
    assert set(x.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(unit_to_labels(x), y)
    p = unit_to_probabilities(x)
    assert torch.equal(probabilities_to_labels(p), y)
    if num_classes > 2:
        assert torch.allclose(p.sum(dim=1), torch.ones(2, *spatial))


def test_unit_to_probabilities_by_hand():
    x = torch.tensor([[[[-1.0, 0.0, 0.5, 2.0]]]])  # binary: (x + 1) / 2, clipped
    assert unit_to_probabilities(x).flatten().tolist() == pytest.approx([0.0, 0.5, 0.75, 1.0])
    x3 = torch.tensor([0.0, 0.5, -1.0]).reshape(1, 3, 1, 1)  # (0.5, 0.75, 0) / 1.25
    assert unit_to_probabilities(x3).flatten().tolist() == pytest.approx([0.4, 0.6, 0.0])
    dead = torch.full((1, 3, 1, 1), -1.0)  # every channel off: uniform
    assert unit_to_probabilities(dead).flatten().tolist() == pytest.approx([1 / 3] * 3)
    members = torch.stack([x3, x3])
    assert unit_to_probabilities(members, members=True).shape == (2, 1, 3, 1, 1)


@pytest.mark.parametrize("spatial", [(3, 3), (2, 3, 3)])
def test_mean_fusion_binary_and_multiclass(spatial):
    ones = [1] * len(spatial)
    p = torch.tensor([0.2, 0.6, 0.7]).reshape(3, 1, 1, *ones).expand(3, 1, 1, *spatial)
    labels, prob = fuse(p)  # mean 0.5: foreground at the threshold
    assert torch.allclose(prob, torch.full((1, 1, *spatial), 0.5))
    assert labels.dtype == torch.int64 and bool((labels == 1).all())
    labels, _ = fuse(p, threshold=0.6)
    assert bool((labels == 0).all())
    onehot = torch.nn.functional.one_hot(torch.tensor([2, 2, 1]), 3).double()  # three members' votes
    pm = onehot.reshape(3, 1, 3, *ones).expand(3, 1, 3, *spatial)
    labels, prob = fuse(pm)
    assert bool((labels == 2).all())
    assert prob.flatten(2)[0, :, 0].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert torch.equal(mean_probability(pm), prob)


@needs_sitk
@pytest.mark.parametrize("spatial", [(5, 6), (3, 5, 6)])
def test_staple_of_unanimous_raters_returns_their_mask(spatial):
    mask = torch.zeros(1, 1, *spatial, dtype=torch.long)
    mask[..., 1:4, 2:5] = 1
    raters = mask.expand(3, *mask.shape)
    assert torch.equal(staple(raters), mask)
    assert torch.equal(staple_probability(raters), mask.double())
    empty = torch.zeros_like(raters)  # SimpleITK alone would give NaN here
    assert torch.equal(staple(empty), torch.zeros_like(mask))
    multi = mask.clone()
    multi[..., 0, :] = 2
    assert torch.equal(staple(multi.expand(3, *multi.shape), num_classes=3), multi)


@needs_sitk
def test_staple_outvotes_a_poor_rater_by_hand():
    # raters 1 and 2 agree on a 2x4 block; rater 3 adds a stray voxel: STAPLE keeps the block
    block = np.zeros((6, 7), dtype=np.int64)
    block[2:4, 1:5] = 1
    stray = block.copy()
    stray[2, 5] = 1
    raters = torch.from_numpy(np.stack([block, block, stray]))[:, None, None]
    assert torch.equal(staple(raters)[0, 0], torch.from_numpy(block))
    prob = staple_probability(raters)[0, 0]
    assert prob[2, 5] < 0.5 and bool((prob[torch.from_numpy(block) == 1] > 0.99).all())
    labels, post = fuse(raters.double(), method="staple")
    assert torch.equal(labels[0, 0], torch.from_numpy(block)) and torch.equal(post, prob[None, None])


@needs_sitk
def test_multilabel_staple_ties_fall_back_to_the_majority():
    a = torch.tensor([[1, 2], [0, 0]])
    b = torch.tensor([[1, 0], [0, 0]])  # two raters tie at (0, 1): the lowest label of the tie, 0
    raters = torch.stack([a, b])[:, None, None]
    assert staple(raters, num_classes=3)[0, 0].tolist() == [[1, 0], [0, 0]]


def test_bad_arguments():
    with pytest.raises(ValueError):
        channels_for(1)
    with pytest.raises(ValueError):
        labels_to_unit(torch.tensor([[[[0, 3]]]]), 3)
    with pytest.raises(ValueError):
        fuse(torch.zeros(2, 1, 1, 2, 2), method="vote")
    with pytest.raises(ValueError):
        probabilities_to_labels(torch.zeros(1, 1, 2, 2), threshold=0.0)
    with pytest.raises(ValueError):
        staple(torch.full((2, 1, 1, 2, 2), 2), num_classes=2)
