"""Ensembles in the core: members seeded per (seed, stream, member, item), batched; centre and spread."""

from __future__ import annotations

import pytest
import torch

from medidiff.core import ensemble


def _draw(items, members, gens):
    return torch.stack([torch.randn(3, generator=g) for g in gens]) + items[:, None].float() * 10


def test_members_depend_on_their_seed_not_on_the_batch():
    a = ensemble.run_members(_draw, n_items=4, n_members=5, seed=7, batch_size=3)
    b = ensemble.run_members(_draw, n_items=4, n_members=5, seed=7, batch_size=20)
    assert a.shape == (5, 4, 3) and torch.equal(a, b)
    # member k of item i is the draw of its own generator, seeded with member_seed(seed, stream, k, i)
    g = torch.Generator().manual_seed(ensemble.member_seed(7, 0, 2, 3))
    torch.testing.assert_close(a[2, 3], torch.randn(3, generator=g) + 30)
    assert not torch.equal(a[0, 0], a[1, 0])  # members differ
    other = ensemble.run_members(_draw, n_items=4, n_members=5, seed=7, stream=1, batch_size=3)
    assert not torch.equal(a, other)  # another stream (a noise level) draws other noise


def test_each_batch_gets_its_jobs_in_order():
    seen = []

    def fn(items, members, gens):
        seen.append((items.tolist(), members.tolist()))
        return (items * 100 + members).float()[:, None]

    out = ensemble.run_members(fn, n_items=2, n_members=3, batch_size=4)
    assert seen == [([0, 0, 0, 1], [0, 1, 2, 0]), ([1, 1], [1, 2])]
    assert out[:, :, 0].tolist() == [[0, 100], [1, 101], [2, 102]]
    with pytest.raises(ValueError):
        ensemble.run_members(fn, n_items=0, n_members=3)


def test_centre_and_spread_against_hand_computed_values():
    stack = torch.tensor([[1.0], [2.0], [4.0], [10.0]])
    assert float(ensemble.reduce(stack, "median")[0]) == pytest.approx(3.0)
    assert float(ensemble.reduce(stack, "mean")[0]) == pytest.approx(4.25)
    # population std: sqrt(mean((x - 4.25)^2)) = sqrt((10.5625 + 5.0625 + 0.0625 + 33.0625) / 4)
    assert float(ensemble.spread(stack, "std")[0]) == pytest.approx((48.75 / 4) ** 0.5)
    # MAD: median(|x - 3|) = median(2, 1, 1, 7) = 1.5
    assert float(ensemble.spread(stack, "mad")[0]) == pytest.approx(1.5)
    assert float(ensemble.spread(stack[:1], "std")[0]) == 0.0  # one member: no spread
    agree = torch.ones(5, 2, 2)
    assert float(ensemble.spread(agree, "std").abs().max()) == 0.0 and float(ensemble.spread(agree, "mad").max()) == 0
    with pytest.raises(ValueError):
        ensemble.reduce(stack, "mode")
    with pytest.raises(ValueError):
        ensemble.spread(stack, "iqr")
