"""Segmentation ensembles with oracle denoisers: agreement gives zero uncertainty, known disagreement its entropy."""

from __future__ import annotations

import math

import torch

from medidiff.core.ensemble import member_seed
from medidiff.core.processes import make_process
from medidiff.metrics import segmentation_dice
from medidiff.segment import EnsembleOptions, sample_members
from medidiff.segment.fusion import fuse, unit_to_probabilities
from medidiff.segment.sample import members_nfe
from medidiff.segment.uncertainty import mutual_information, predictive_entropy, variance


class Oracle:
    """A conditional denoiser whose estimate is ``fn(x_t, cond)``; ``calls`` counts the calls of it and its bindings."""

    def __init__(self, fn, process, cond=None, counter=None):
        self.fn, self.process, self.cond = fn, process, cond
        self.counter = counter if counter is not None else [0]

    @property
    def calls(self) -> int:
        return self.counter[0]

    def with_cond(self, cond):
        return Oracle(self.fn, self.process, cond, self.counter)

    def __call__(self, x_t, t):
        self.counter[0] += 1
        return self.fn(x_t, self.cond)


def _images(b=2, size=8):
    img = -torch.ones(b, 1, size, size)
    img[:, :, 2:5, 3:6] = 1.0  # the "lesion" is where the image is bright
    return img


def test_members_that_agree_have_zero_uncertainty_and_dice_one():
    process = make_process("ddpm", n_steps=100)
    oracle = Oracle(lambda x_t, cond: torch.where(cond > 0, 1.0, -1.0).to(x_t.dtype), process)
    images = _images()
    opts = EnsembleOptions(members=4, steps=5, batch_size=3)
    m = sample_members(oracle, images, opts, channels=1, seed=1)
    assert m.shape == (4, 2, 1, 8, 8)
    # every call returns the true mask; DDIM's last step lands on the estimate
    assert torch.equal(m, torch.where(images > 0, 1.0, -1.0).expand(4, -1, -1, -1, -1))
    assert oracle.calls == math.ceil(8 / 3) * 5 and members_nfe(opts) == 20
    p = unit_to_probabilities(m, members=True)
    labels, prob = fuse(p)
    assert float(variance(p).abs().max()) == 0.0 and float(predictive_entropy(p).max()) == 0.0
    assert float(mutual_information(p).max()) == 0.0
    assert segmentation_dice(labels, (images > 0).long()).tolist() == [[1.0], [1.0]]


def test_members_that_disagree_give_the_expected_variance_and_entropy():
    """Each member's mask is the lesion or the lesion grown by one row, by the sign of its starting noise at a
    pixel: with one DDIM step the member is that estimate, so the split is known from the members' seeds."""
    process = make_process("ddpm", n_steps=100)
    images = _images(b=1)
    small = torch.where(images > 0, 1.0, -1.0)
    big = small.clone()
    big[:, :, 5, 3:6] = 1.0

    def fn(x_t, cond):
        pick = x_t[:, :1, :1, :1] > 0
        return torch.where(pick, big, small).to(x_t.dtype)

    n, seed = 9, 7
    m = sample_members(Oracle(fn, process), images, EnsembleOptions(members=n, steps=1, batch_size=4),
                       channels=1, seed=seed)
    # the starting noise of member k of image 0, as run_members seeds it
    starts = [process.prior_sample((1, 1, 8, 8), generator=[torch.Generator().manual_seed(member_seed(seed, 0, k, 0))])
              for k in range(n)]
    f = sum(float(s[0, 0, 0, 0] > 0) for s in starts) / n
    assert 0 < f < 1, "the seeds should split the members"
    p = unit_to_probabilities(m, members=True)
    row = (slice(None), slice(None), slice(None), 5, slice(3, 6))
    assert torch.allclose(p[row].mean(0), torch.full((1, 1, 3), f, dtype=p.dtype))
    assert torch.allclose(variance(p)[0, 0, 5, 3:6], torch.full((3,), f * (1 - f), dtype=p.dtype), atol=1e-6)
    h = -(f * math.log(f) + (1 - f) * math.log(1 - f))
    assert torch.allclose(predictive_entropy(p)[0, 0, 5, 3:6].double(), torch.full((3,), h, dtype=torch.float64),
                          atol=1e-5)
    assert torch.allclose(mutual_information(p)[0, 0, 5, 3:6].double(), torch.full((3,), h, dtype=torch.float64),
                          atol=1e-5)  # hard members: all of it is disagreement
    rest = torch.ones(8, 8, dtype=torch.bool)
    rest[5, 3:6] = False
    assert float(predictive_entropy(p)[0, 0][rest].max()) == 0.0
