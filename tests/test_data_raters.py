"""Simulated raters: several plausible outlines of synthetic lesions, 2D and 3D, seeded."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medidiff.data.raters import annotated_lesion_case, lesion_profile, perturb_boundary, rater_levels

CASES = [((1, 32, 36), (1.0, 1.5)), ((1, 20, 22, 12), (1.0, 1.2, 2.0))]


def _distance_mm(shape, centre, spacing):
    grid = np.meshgrid(*[np.arange(s) * h for s, h in zip(shape, spacing)], indexing="ij")
    return np.sqrt(sum((g - c * h) ** 2 for g, c, h in zip(grid, centre, spacing)))


@pytest.mark.parametrize("shape,spacing", CASES)
def test_rater_borders_follow_the_sigmoid_profile(shape, spacing):
    # a round, untextured lesion: rater at level l draws |x - c| <= r + edge * ln((1 - l) / l)
    image = np.full(shape, 50.0)
    edge, radius = 1.2, 4.0
    case = annotated_lesion_case(image, n_raters=3, levels=(0.2, 0.8), spacing=spacing, seed=3, n=1,
                                 radius_mm=radius, edge_mm=edge, irregularity=0.0, texture=0.0)
    assert case.levels.tolist() == pytest.approx([0.2, 0.5, 0.8])
    d = _distance_mm(shape[1:], case.info[0]["centre"], spacing)
    for k, level in enumerate(case.levels):
        border = radius + edge * math.log((1 - level) / level)
        assert np.array_equal(case.annotations[k, 0], d <= border), level
    expected = 1.0 / (1.0 + np.exp(-(radius - d) / edge))
    near = d <= radius + 4 * edge  # inside the lesion's box
    assert np.allclose(case.profile[near], expected[near])
    assert np.array_equal(case.reference[0], case.profile >= 0.5)  # the generator's mask is the level-1/2 rater
    assert np.array_equal(case.annotations[1, 0], case.reference[0])
    assert case.image.shape == shape and not np.array_equal(case.image, image)


@pytest.mark.parametrize("shape,spacing", CASES)
def test_raters_disagree_nested_and_reproducibly(shape, spacing):
    image = torch.full(shape, 80.0)
    kw = dict(n_raters=4, spacing=spacing, n=2 if len(shape) == 3 else 1, radius_mm=(3.0, 4.0))
    a = annotated_lesion_case(image, seed=11, **kw)
    b = annotated_lesion_case(image, seed=11, **kw)
    c = annotated_lesion_case(image, seed=12, **kw)
    assert isinstance(a.annotations, torch.Tensor) and a.annotations.shape == (4, 1, *shape[1:])
    assert torch.equal(a.annotations, b.annotations) and torch.equal(a.image, b.image)
    assert not torch.equal(a.annotations, c.annotations)
    sizes = a.annotations.flatten(1).sum(1).tolist()
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] > 0 and sizes[0] > sizes[-1]  # a real spread
    for k in range(3):  # stricter raters draw inside lenient ones
        assert bool((a.annotations[k + 1] <= a.annotations[k]).all())
    wobbly = annotated_lesion_case(image, seed=11, boundary_mm=0.7, **kw)
    assert not torch.equal(wobbly.annotations, a.annotations)
    assert torch.equal(wobbly.image, a.image)  # the same lesions, outlined differently


@pytest.mark.parametrize("spacing", [(1.0, 2.0), (1.0, 1.0, 2.0)])
def test_perturb_boundary_moves_the_border_at_most_twice_the_amplitude(spacing):
    shape = (24, 20) if len(spacing) == 2 else (16, 14, 10)
    d = _distance_mm(shape, [s // 2 for s in shape], spacing)
    mask = d <= 5.0
    assert np.array_equal(perturb_boundary(mask, amplitude_mm=0.0, spacing=spacing, seed=0), mask)
    moved = perturb_boundary(mask, amplitude_mm=1.0, correlation_mm=3.0, spacing=spacing, seed=0)
    changed = moved ^ mask
    assert changed.any()
    signed = ndimage.distance_transform_edt(~mask, sampling=spacing) - ndimage.distance_transform_edt(
        mask, sampling=spacing)
    assert np.abs(signed[changed]).max() <= 2.0 + 1e-9
    assert np.array_equal(moved, perturb_boundary(mask, amplitude_mm=1.0, correlation_mm=3.0, spacing=spacing,
                                                  seed=0))
    assert perturb_boundary(mask[None], amplitude_mm=1.0, spacing=spacing, seed=0).shape == (1, *shape)


def test_profile_of_textured_lesions_and_bad_arguments():
    image = np.full((1, 30, 30), 10.0)
    out, mask, profile, info = lesion_profile(image, seed=5, n=1, radius_mm=5.0, contrast=0.5, polarity="hypo")
    assert len(info) == 1 and info[0]["contrast"] == pytest.approx(-0.5)
    # the change the generator made is the profile times contrast times the local intensity
    assert np.allclose(image[0] - out[0], profile * 0.5 * 10.0)
    assert rater_levels(1).tolist() == [0.5]
    with pytest.raises(ValueError):
        rater_levels(3, (0.0, 0.5))
    with pytest.raises(ValueError):
        rater_levels(0)
    with pytest.raises(ValueError):
        annotated_lesion_case(image, boundary_mm=-1.0)
    with pytest.raises(ValueError):
        lesion_profile(image, seed=1, spacing=1.0, return_info=False)
    with pytest.raises(ValueError):
        perturb_boundary(np.ones((3, 3), bool), amplitude_mm=1.0, correlation_mm=0.0)
