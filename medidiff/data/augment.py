"""Training augmentation for in-memory image tensors: small random affine warps, left-right flips, intensity gamma.

Draws come from torch's global generator, whose state the training engine checkpoints, so augmented
runs resume exactly. Works on ``(C, *spatial)`` items in ``[-1, 1]`` with 2 or 3 spatial dims; the
background value ``-1`` fills what a warp brings in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["random_affine", "random_flip", "random_gamma", "Augmented"]


def _rotation(angles: torch.Tensor, dims: int) -> torch.Tensor:
    """Rotation matrix from one angle (2D) or three Euler angles (3D), in radians."""
    c, s = torch.cos(angles), torch.sin(angles)
    if dims == 2:
        return torch.stack([torch.stack([c[0], -s[0]]), torch.stack([s[0], c[0]])])
    rx = torch.tensor([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = torch.tensor([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = torch.tensor([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_affine(x: torch.Tensor, *, rotate_deg: float = 8.0, scale: float = 0.08, translate: float = 0.04,
                  fill: float = -1.0) -> torch.Tensor:
    """Warp one item by a random rotation, isotropic scaling and translation (fractions of the image).

    Args:
        x: ``(C, *spatial)`` image.
        rotate_deg: largest rotation angle in degrees (about each axis in 3D).
        scale: largest relative zoom in or out.
        translate: largest shift as a fraction of the image size.
        fill: value for voxels brought in from outside.
    """
    dims = x.ndim - 1
    n_angles = 1 if dims == 2 else 3
    angles = (torch.rand(n_angles) * 2 - 1) * math.radians(rotate_deg)
    zoom = 1 + (torch.rand(()) * 2 - 1) * scale
    shift = (torch.rand(dims) * 2 - 1) * translate * 2  # grid coordinates span [-1, 1]
    theta = torch.cat([_rotation(angles, dims) / zoom, shift[:, None]], dim=1)[None].to(x.dtype)
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    warped = F.grid_sample((x - fill)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[0] + fill


def random_flip(x: torch.Tensor, *, p: float = 0.5) -> torch.Tensor:
    """Mirror ``(C, *spatial)`` along its first spatial axis (left-right in RAS) with probability ``p``.

    One draw is taken whatever ``p`` is, so runs with and without flips draw the same warps afterwards.
    """
    return x.flip(1) if float(torch.rand(())) < p else x


def random_gamma(x: torch.Tensor, *, gamma: float = 0.15) -> torch.Tensor:
    """Random intensity gamma ``exp(U(-gamma, gamma))`` applied to ``[-1, 1]`` intensities (kept in range)."""
    g = torch.exp((torch.rand(()) * 2 - 1) * gamma)
    return ((x.clamp(-1, 1) + 1) / 2) ** g * 2 - 1


class Augmented(Dataset):
    """A dataset whose ``image`` items are randomly warped and gamma-adjusted on each access.

    Args:
        dataset: items ``{"image": (C, *spatial), ...}`` in ``[-1, 1]``.
        rotate_deg, scale, translate: see :func:`random_affine` (``rotate_deg=0`` and ``scale=0`` and
            ``translate=0`` switch warping off).
        gamma: see :func:`random_gamma` (0 switches it off).
        flip: probability of a left-right mirror (:func:`random_flip`; 0 switches it off).
    """

    def __init__(self, dataset: Dataset, *, rotate_deg: float = 8.0, scale: float = 0.08, translate: float = 0.04,
                 gamma: float = 0.15, flip: float = 0.0):
        self.dataset = dataset
        self.rotate_deg, self.scale, self.translate, self.gamma = rotate_deg, scale, translate, gamma
        self.flip = flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        x = item["image"]
        if self.flip:
            x = random_flip(x, p=self.flip)
        if self.rotate_deg or self.scale or self.translate:
            x = random_affine(x, rotate_deg=self.rotate_deg, scale=self.scale, translate=self.translate)
        if self.gamma:
            x = random_gamma(x, gamma=self.gamma)
        item["image"] = x
        return item
