"""Noise for the forward process and the samplers: Gaussian (with per-sample seeds) and simplex.

A ``generator`` argument is ``None``, one ``torch.Generator`` for the whole batch, or a list of
generators, one per sample: then sample ``i`` depends only on its own generator, whatever the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


def make_generators(seeds: int | Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per sample.

    Args:
        seeds: a list of seeds, or one base seed ``s`` (then a single generator seeded ``s``).
        device: device the generators draw on.
    """
    if isinstance(seeds, int):
        seeds = [seeds]
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def gaussian(
    shape: Sequence[int],
    generator: Generator = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (``(B, C, *spatial)``), drawn per sample if given a list of generators."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.cat(
        [torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator], dim=0
    )


def gaussian_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, on its device and dtype."""
    return gaussian(x.shape, generator, device=x.device, dtype=x.dtype)
