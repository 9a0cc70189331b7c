"""Training augmentation: flips, warps and gamma, alone and on image-mask pairs."""

from __future__ import annotations

import torch

from medidiff.data.augment import Augmented, random_affine, random_flip, random_gamma
from medidiff.train_data import TensorDataset
from medidiff.train_segment import PairedAugmented


def _ramp(c: int = 1, h: int = 6, w: int = 5) -> torch.Tensor:
    return torch.arange(c * h * w, dtype=torch.float32).reshape(c, h, w) / (c * h * w) * 2 - 1


def test_flip_mirrors_the_first_spatial_axis_with_its_probability():
    x = _ramp(2)
    assert torch.equal(random_flip(x, p=1.0), x.flip(1))
    assert torch.equal(random_flip(x, p=0.0), x)
    torch.manual_seed(0)
    flips = sum(not torch.equal(random_flip(x, p=0.3), x) for _ in range(2000))
    assert abs(flips / 2000 - 0.3) < 0.04


def test_an_identity_warp_and_gamma_keep_the_image():
    x = _ramp()
    assert torch.allclose(random_affine(x, rotate_deg=0.0, scale=0.0, translate=0.0), x, atol=1e-5)
    g = random_gamma(x, gamma=0.5)
    assert float(g.min()) >= -1.0 and float(g.max()) <= 1.0
    assert torch.equal(torch.argsort(g.flatten()), torch.argsort(x.flatten()))  # monotone


def test_flips_only_and_paired_flips_move_image_and_mask_together():
    image = _ramp()
    mask = torch.where(torch.rand(1, 6, 5, generator=torch.Generator().manual_seed(1)) > 0.5, 1.0, -1.0)
    off = dict(rotate_deg=0.0, scale=0.0, translate=0.0, gamma=0.0)
    (item,) = [Augmented(TensorDataset(image[None]), **off, flip=1.0)[0]]
    assert torch.equal(item["image"], image.flip(1))
    pair = PairedAugmented(TensorDataset(mask[None], image[None]), **off, flip=1.0)[0]
    assert torch.equal(pair["image"], mask.flip(1)) and torch.equal(pair["cond"], image.flip(1))
    same = PairedAugmented(TensorDataset(mask[None], image[None]), **off, flip=0.0)[0]
    assert torch.equal(same["image"], mask) and torch.equal(same["cond"], image)
