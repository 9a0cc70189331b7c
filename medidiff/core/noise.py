"""Noise for the forward process and the samplers: Gaussian (with per-sample seeds) and simplex.

A ``generator`` argument is ``None``, one ``torch.Generator`` for the whole batch, or a list of
generators, one per sample: then sample ``i`` depends only on its own generator, whatever the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import simplex as simplex_lattice

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


# --- simplex noise ------------------------------------------------------------------------------


def _draw(generator: Generator, shape: Sequence[int], device: torch.device | None) -> torch.Tensor:
    """Uniform ``[0, 1)`` float64 draws of ``shape`` (``(B, ...)``), per sample for a list of generators."""
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else device
        return torch.rand(tuple(shape), generator=generator, device=dev, dtype=torch.float64).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.cat(
        [torch.rand((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float64) for g in generator]
    ).to(device)


def simplex(
    shape: Sequence[int],
    *,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 4.0,
    generator: Generator = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    normalise: bool = True,
) -> torch.Tensor:
    """Multi-octave simplex noise of ``shape`` ``(B, C, *spatial)``, 2 or 3 spatial dims, made on ``device``.

    Octave ``k`` (``k = 0 .. octaves - 1``) is simplex noise with ``frequency * 2**k`` lattice cells
    along the longest spatial side (cells are square/cubic in pixels), weighted ``persistence**k``.
    Every sample, channel and octave has its own random permutation table and sub-cell offset, so
    fields are independent; with a list of generators, sample ``i`` depends only on ``generator[i]``.
    AnoDDPM's ``frequency=64`` (a period in pixels) on 256² images is ``frequency=4`` here.
    Method: Perlin 2001 / Gustavson 2005 simplex noise, summed over octaves as in AnoDDPM (Wyatt et al. 2022).

    Args:
        shape: ``(B, C, *spatial)`` with 2 or 3 spatial dimensions.
        octaves: number of octaves summed.
        persistence: amplitude ratio of each octave to the previous one.
        frequency: base spatial frequency, in lattice cells per longest image side; lower values give
            larger blobs (less high-frequency power).
        generator: ``None``, one generator for the batch, or one generator per sample.
        device: device to make the noise on (the generators may live elsewhere).
        dtype: output floating dtype (computed in float32, or float64 when asked for).
        normalise: rescale each sample and channel to zero mean and unit (population) variance;
            otherwise the octave sum is divided by the sum of its weights, so it stays in ``[-1, 1]``.

    Returns:
        A tensor of ``shape``, ``dtype``, on ``device``.
    """
    batch, channels, *spatial = (int(s) for s in shape)
    ndim = len(spatial)
    if ndim not in (2, 3):
        raise ValueError(f"simplex noise needs shape (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(shape)}")
    if octaves < 1 or frequency <= 0:
        raise ValueError(f"need octaves >= 1 and frequency > 0, got octaves={octaves}, frequency={frequency}")
    device = torch.device(device) if device is not None else torch.empty(0).device
    work = torch.float64 if dtype == torch.float64 else torch.float32
    fields = batch * channels

    # Per sample: sub-cell offsets (uniform over one lattice cell), then one permutation per field and octave.
    unskew = simplex_lattice.skew_factors(ndim)[1]
    u = _draw(generator, (batch, channels, octaves, ndim), device).reshape(fields, octaves, ndim)
    offset = (u - unskew * u.sum(-1, keepdim=True)).to(work)  # skewed unit cell -> unskewed space
    keys = _draw(generator, (batch, channels, octaves, simplex_lattice.PERIOD), device)
    perm = keys.reshape(fields, octaves, -1).argsort(dim=-1)

    axes = [torch.arange(n, device=device, dtype=work) for n in spatial]
    grid = [g.reshape(1, -1) for g in torch.meshgrid(*axes, indexing="ij")]
    out = torch.zeros(fields, grid[0].shape[1], device=device, dtype=work)
    amplitude, total = 1.0, 0.0
    for k in range(octaves):
        cells_per_px = frequency * 2**k / max(spatial)
        coords = [g * cells_per_px + offset[:, k, a : a + 1] for a, g in enumerate(grid)]
        out.add_(simplex_lattice.lattice_noise(coords, perm[:, k]), alpha=amplitude)
        total += amplitude
        amplitude *= persistence
    if normalise:
        std, mean = torch.std_mean(out, dim=1, correction=0, keepdim=True)
        out.sub_(mean).div_(std.clamp_min(torch.finfo(work).tiny))
    else:
        out.div_(total)
    return out.reshape(batch, channels, *spatial).to(dtype)


def simplex_like(x: torch.Tensor, generator: Generator = None, **kw) -> torch.Tensor:
    """Simplex noise shaped like ``x``, on its device and dtype; ``kw`` go to :func:`simplex`."""
    return simplex(x.shape, generator=generator, device=x.device, dtype=x.dtype, **kw)


NOISES = {"gaussian": gaussian_like, "simplex": simplex_like}


def make_noise(kind: str) -> Callable[..., torch.Tensor]:
    """The ``*_like(x, generator=None, **kw)`` noise function called ``kind`` (``gaussian`` or ``simplex``).

    Args:
        kind: a name in ``NOISES``.

    Returns:
        A function ``(x, generator=None, **kw) -> noise shaped like x``.
    """
    try:
        return NOISES[kind]
    except KeyError:
        raise ValueError(f"unknown noise {kind!r}; choose one of {sorted(NOISES)}") from None


def noise_like(x: torch.Tensor, kind: str = "gaussian", generator: Generator = None, **kw) -> torch.Tensor:
    """Noise of the named ``kind`` shaped like ``x``: the drop-in for ``torch.randn_like`` in training and noising.

    Args:
        x: tensor ``(B, C, *spatial)`` whose shape, device and dtype the noise takes.
        kind: ``"gaussian"`` or ``"simplex"``.
        generator: ``None``, one generator, or one per sample.
        **kw: options of the noise (for simplex: ``octaves``, ``persistence``, ``frequency``, ...).

    Returns:
        Noise shaped like ``x``.
    """
    return make_noise(kind)(x, generator=generator, **kw)
