"""Applying a diffusion prior to images of any size: padding to the U-Net's multiple, or patches.

Owns :class:`AnySize`, a denoiser ``D(x_t, t) -> x0_hat`` that wraps a trained one so that it accepts any
image size, and :func:`pad_multiple`. Two modes:

- ``whole``: the image is padded (by reflection, which keeps the noise of ``x_t`` white) to a multiple of
  ``2 ** (levels - 1)`` of the U-Net, denoised in one piece and cropped back. A convolutional U-Net
  without attention (the bundled priors) sees the whole image, so a prior trained on 64 x 64 patches
  denoises a 181 x 217 slice in one call; group normalisation then normalises over the whole image instead
  of a patch, which ``benchmarks/bench_recon.py`` measures against the next mode.
- ``patches``: the image is cut into ``patch``-sized tiles (those the prior was trained on), each
  denoised with only its own context and the overlaps averaged; with ``shift`` the tiling is moved by a
  random offset at every call, so that no tile border stays in one place over the sampling steps
  (Hu et al. 2024, "Learning image priors through patch-based diffusion models for solving inverse
  problems", sec. 3.2, with random partitions).

Measured (MNI152 1 mm axial slice 90, 197 x 233, held out of the MRI prior's training; 4x single coil, DDS 50
NFE): with the prior at 1,000 training steps, ``whole`` 27.69 dB / SSIM 0.783 (27.60 / 0.780 without
shifts), ``patches`` of 64 overlapping by 16 with shifts 25.26 / 0.569; at 250 steps, ``whole`` 25.85 / 0.720,
non-overlapping shifted ``patches`` 20.66 / 0.303. Whole-image application is the default.

In both modes one call is one network evaluation of the image (for reports of NFE), however many tiles it
takes. The wrapper is differentiable (DPS differentiates through it) and works for 2D and 3D images.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from medidiff.core.precision import Autocast

__all__ = ["AnySize", "pad_multiple", "unet_multiple", "PRIOR_MODES"]

PRIOR_MODES = ("whole", "patches")


def unet_multiple(net_config: dict) -> int:
    """The size multiple a MONAI diffusion U-Net needs: ``2 ** (levels - 1)``."""
    return 2 ** (len(net_config.get("channels", (0,))) - 1)


def _reflect(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """Pad one axis by reflection, repeatedly when the pad exceeds the axis (tiny images)."""
    while before > 0 or after > 0:
        n = x.shape[dim]
        if n < 2:
            reps = [1] * x.ndim
            reps[dim] = 1 + before + after
            return x.repeat(*reps)
        b, a = min(before, n - 1), min(after, n - 1)
        parts = [x.narrow(dim, 1, b).flip(dim)] if b else []
        parts.append(x)
        if a:
            parts.append(x.narrow(dim, n - 1 - a, a).flip(dim))
        x = torch.cat(parts, dim=dim)
        before, after = before - b, after - a
    return x


def pad_multiple(x: torch.Tensor, multiple: int, offsets: Sequence[int] | None = None
                 ) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial axes of ``(B, C, *spatial)`` by reflection to multiples of ``multiple``.

    Args:
        x: images.
        multiple: the size multiple.
        offsets: extra padding before each spatial axis (a random shift of the grid); default: the padding
            is split evenly.

    Returns:
        ``(padded, crop)``: ``padded[(..., *crop)]`` is ``x`` again.
    """
    spatial = x.shape[2:]
    crop = [slice(None), slice(None)]
    for i, n in enumerate(spatial):
        if offsets is None:
            total = (-n) % multiple
            before = total // 2
        else:
            before = int(offsets[i])
            total = before + (-(n + before)) % multiple
        x = _reflect(x, 2 + i, before, total - before)
        crop.append(slice(before, before + n))
    return x, tuple(crop)


class AnySize(torch.nn.Module):
    """A denoiser for any image size, from one trained on fixed-size images or patches.

    Args:
        denoiser: ``denoiser(x_t, t) -> x0_hat`` (a ``medidiff.core.denoiser.Denoiser``).
        multiple: the size multiple the network needs (``unet_multiple(info.net)``).
        mode: ``whole`` or ``patches`` (see the module docstring).
        patch: tile size per spatial axis (``patches``; the prior's training size).
        overlap: pixels by which neighbouring tiles overlap (``patches``; averaged there).
        shift: move the padding (``whole``) or the tiling (``patches``) by a random offset at every call.
        generator: for the shifts (reproducible runs).
        batch_size: tiles per network call.
        bf16: evaluate the network under bf16 autocast where the device computes bf16 natively
            (:func:`medidiff.core.precision.autocast_for`); the output keeps the input's dtype.
    """

    def __init__(self, denoiser, *, multiple: int = 1, mode: str = "whole", patch: Sequence[int] | int | None = None,
                 overlap: int = 0, shift: bool = False, generator: torch.Generator | None = None,
                 batch_size: int = 64, bf16: bool = False):
        super().__init__()
        if mode not in PRIOR_MODES:
            raise ValueError(f"prior mode {mode!r} is unknown; choose one of {PRIOR_MODES}")
        if mode == "patches" and patch is None:
            raise ValueError("the patches mode needs the patch size (the prior's training size)")
        if multiple < 1 or overlap < 0 or batch_size < 1:
            raise ValueError("need multiple >= 1, overlap >= 0 and batch_size >= 1")
        self.denoiser, self.multiple, self.mode = Autocast(denoiser, bf16), int(multiple), mode
        self.patch, self.overlap, self.shift = patch, int(overlap), shift
        self.generator, self.batch_size = generator, int(batch_size)

    @property
    def process(self):
        return self.denoiser.process

    def _offsets(self, n: int, period: Sequence[int]) -> list[int] | None:
        if not self.shift:
            return None
        return [int(torch.randint(0, max(p, 1), (1,), generator=self.generator)) for p in period[:n]]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0_hat`` for images ``(B, C, *spatial)`` of any size at times ``t`` (shape ``(B,)``)."""
        ndim = x.ndim - 2
        if self.mode == "whole":
            padded, crop = pad_multiple(x, self.multiple, self._offsets(ndim, [self.multiple] * ndim))
            return self.denoiser(padded, t)[crop]
        return self._patches(x, t)

    def _patches(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ndim = x.ndim - 2
        size = [int(self.patch)] * ndim if isinstance(self.patch, int) else [int(p) for p in self.patch]
        if len(size) != ndim or min(size) <= self.overlap:
            raise ValueError(f"patch {self.patch} with overlap {self.overlap} does not fit {ndim}D images")
        stride = [p - self.overlap for p in size]
        offsets = self._offsets(ndim, stride) or [0] * ndim
        # pad so that tiles starting at 0, stride, ... cover the (shifted) image exactly
        before, after = [], []
        for n, p, s, o in zip(x.shape[2:], size, stride, offsets):
            covered = p + s * max(0, math.ceil((n + o - p) / s))
            before.append(o)
            after.append(covered - n - o)
        padded = x
        for i in range(ndim):
            padded = _reflect(padded, 2 + i, before[i], after[i])
        starts = [range(0, padded.shape[2 + i] - size[i] + 1, stride[i]) for i in range(ndim)]
        corners = list(itertools.product(*starts))
        b = x.shape[0]

        def region(corner):
            return (slice(None), slice(None), *(slice(c, c + p) for c, p in zip(corner, size)))

        out = torch.zeros_like(padded)
        weight = torch.zeros((1, 1, *padded.shape[2:]), dtype=x.dtype, device=x.device)
        for k in range(0, len(corners), max(1, self.batch_size // b)):
            chunk = corners[k:k + max(1, self.batch_size // b)]
            tiles = torch.cat([padded[region(c)] for c in chunk])  # (len(chunk) * B, C, *size)
            den = self.denoiser(tiles, t.repeat(len(chunk)))
            for j, c in enumerate(chunk):
                out[region(c)] = out[region(c)] + den[j * b:(j + 1) * b]
                weight[region(c)] += 1
        crop = (slice(None), slice(None), *(slice(o, o + n) for o, n in zip(before, x.shape[2:])))
        return (out / weight)[crop]
