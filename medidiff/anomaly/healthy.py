"""Healthy reconstruction: a model of healthy anatomy "heals" an image by partial diffusion.

Method: AnoDDPM (Wyatt et al. 2022, sec. 3): noise the input to ``t_L`` and run the reverse process
from there; pDDPM (Behrendt et al. 2023): the same with one patch noised at a time.

Everything runs on the shared core: the forward noising is ``process.noised`` with Gaussian or simplex
noise (``medidiff.core.noise.noise_like``), the reverse pass is any sampler of
``medidiff.core.samplers`` started at ``t_start = t_L``. Three methods:

- ``partial``: noise the whole image to ``t_L`` and sample back (AnoDDPM; ``ddpm`` from ``t_L = 0.25``
  is its 250-evaluation setting, a few-step ``ddim`` or ``dpm_solver_2m`` does the same job in ~10).
  Several levels ``t_L`` are averaged; ``n_samples`` noise seeds per level are reduced by the median
  (or mean), and their spread (standard deviation or median absolute deviation) is returned.
- ``invert``: deterministic DDIM inversion of the image to ``t_L`` (``ddim_invert``), then DDIM back.
  An exact inversion would return the input itself; what heals the image is the model's prior, i.e.
  the inversion's error at ``t_L`` (a few steps, a model that cannot represent the lesion). The result is
  deterministic, so ``n_samples`` is 1 and the spread is zero.
- ``patch``: the image is cut into tiles; each tile (grown by ``patch_margin`` pixels of context) is
  noised and rebuilt while a hook pins the denoised estimate outside it to the clean input, so the
  rest of the image is re-noised consistently at every step and serves as context; the tile interiors
  are assembled. A model trained on whole-image noise sees the usual noise statistics everywhere.

Every reconstruction of one image depends only on ``seed`` and the image's index (one generator per
image, level and sample), not on the batch size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from medidiff.core import samplers
from medidiff.core.processes import Process
from medidiff.errors import RecipeError
from medidiff.runtime import derived_seed

__all__ = ["METHODS", "REDUCTIONS", "SPREADS", "reconstruct_healthy", "healthy_nfe", "patch_tiles", "sampler_steps"]

METHODS = ("partial", "invert", "patch")
REDUCTIONS = ("median", "mean")
SPREADS = ("std", "mad")


def _noise_like(x: torch.Tensor, kind: str, generators: list[torch.Generator], options: dict) -> torch.Tensor:
    """Noise of ``kind`` shaped like ``x`` (``medidiff.core.noise.noise_like`` when the core has it)."""
    from medidiff.core import noise as core_noise

    if hasattr(core_noise, "noise_like"):
        return core_noise.noise_like(x, kind, generators, **options)
    if kind != "gaussian":
        raise RecipeError(f"noise {kind!r} is not available in this installation of medidiff",
                          where="anomaly.noise", fix="use noise: gaussian.")
    return core_noise.gaussian_like(x, generators)


def sampler_steps(process: Process, sampler: str, steps: int | None, t_level: float) -> int:
    """The number of sampler steps from ``t_level``: ``steps``, or the whole DDPM chain when ``steps`` is None.

    Args:
        process: the model's forward process.
        sampler: the sampler's name.
        steps: steps asked for; ``None`` means every grid step of a discrete process below ``t_level``
            (AnoDDPM: ``t_L = 0.25`` of a 1000-step DDPM is 250 steps).
        t_level: the start time.

    Returns:
        The step count.

    Raises:
        RecipeError: ``steps`` is None for a continuous-time process.
    """
    if steps is not None:
        return int(steps)
    n = getattr(process, "n_steps", None)
    if n is None:
        raise RecipeError(f"sampler {sampler!r} needs a step count for a continuous-time process",
                          where="anomaly.steps", fix="set anomaly.steps (e.g. 10).")
    return max(1, round(t_level * n))


def patch_tiles(shape: Sequence[int], patch_size: Sequence[int] | int, margin: int = 0
                ) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """Tiles covering a grid exactly once, each with the region noised around it.

    Args:
        shape: the spatial shape.
        patch_size: tile size per axis (a number for all axes); edge tiles may be smaller.
        margin: pixels of context added around each tile on every side for the noised region.

    Returns:
        ``(tile, region)`` pairs of slice tuples: ``tile`` is what the tile contributes, ``region``
        (``tile`` grown by ``margin``, clipped to the grid) is what is noised.
    """
    shape = [int(s) for s in shape]
    size = [int(patch_size)] * len(shape) if isinstance(patch_size, int) else [int(p) for p in patch_size]
    if len(size) != len(shape) or min(size) < 1:
        raise ValueError(f"patch_size {patch_size} does not fit a {len(shape)}D grid")
    starts = [range(0, s, p) for s, p in zip(shape, size)]
    tiles = []
    for corner in itertools.product(*starts):
        tile = tuple(slice(c, min(c + p, s)) for c, p, s in zip(corner, size, shape))
        region = tuple(slice(max(t.start - margin, 0), min(t.stop + margin, s)) for t, s in zip(tile, shape))
        tiles.append((tile, region))
    return tiles


def healthy_nfe(*, method: str = "partial", t_levels: Sequence[float] = (0.25,), sampler: str = "ddim",
                steps: int | None = 10, n_samples: int = 1, n_patches: int = 1,
                process: Process | None = None) -> int:
    """Network evaluations per image of :func:`reconstruct_healthy` with these settings.

    Args:
        method: ``partial``, ``invert`` or ``patch``.
        t_levels: start times.
        sampler: sampler name.
        steps: sampler steps (``None``: the whole chain below each level, needs ``process``).
        n_samples: noise seeds per level.
        n_patches: tiles per image (``patch`` only).
        process: the model's process (for ``steps=None``).

    Returns:
        The count.
    """
    total = 0
    for t in t_levels:
        k = sampler_steps(process, sampler, steps, t) if process is not None else int(steps)
        if method == "invert":
            total += 2 * k
        else:
            total += samplers.nfe(sampler, k) * n_samples * (n_patches if method == "patch" else 1)
    return total


def _reduce(stack: torch.Tensor, reduce: str, spread: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and spread over the first axis (the samples)."""
    centre = stack.quantile(0.5, dim=0) if reduce == "median" else stack.mean(dim=0)
    if stack.shape[0] == 1:
        return centre, torch.zeros_like(centre)
    if spread == "mad":
        return centre, (stack - stack.quantile(0.5, dim=0)).abs().quantile(0.5, dim=0)
    return centre, stack.std(dim=0, correction=0)


def _check(method: str, reduce: str, spread: str, t_levels: Sequence[float], n_samples: int, batch_size: int,
           ndim: int) -> None:
    for name, value, allowed in (("method", method, METHODS), ("reduce", reduce, REDUCTIONS),
                                 ("spread", spread, SPREADS)):
        if value not in allowed:
            raise RecipeError(f"unknown {name} {value!r}", where=f"anomaly.{name}", fix=f"use one of {allowed}.")
    if not t_levels or any(not 0 < float(t) <= 1 for t in t_levels):
        raise RecipeError(f"noise levels must lie in (0, 1], got {list(t_levels)}", where="anomaly.t_levels",
                          fix="give times such as [0.25, 0.5].")
    if n_samples < 1 or batch_size < 1:
        raise RecipeError("n_samples and batch_size must be at least 1", where="anomaly")
    if ndim not in (4, 5):
        raise ValueError(f"expected images (B, C, *spatial) with 2 or 3 spatial dims, got {ndim} dims")


def reconstruct_healthy(
    denoiser,
    x: torch.Tensor,
    *,
    method: str = "partial",
    t_levels: Sequence[float] = (0.25,),
    sampler: str = "ddim",
    steps: int | None = 10,
    noise: str = "gaussian",
    noise_options: dict | None = None,
    n_samples: int = 1,
    reduce: str = "median",
    spread: str = "std",
    seed: int = 0,
    batch_size: int = 16,
    patch_size: Sequence[int] | int | None = None,
    patch_margin: int = 8,
    process: Process | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Healthy reconstructions of a batch of images (partial diffusion, DDIM inversion or patch-wise).

    Args:
        denoiser: ``denoiser(x_t, t) -> x0_hat`` (a ``medidiff.core.denoiser.Denoiser``) on the images' scale.
        x: images ``(B, C, *spatial)`` (2 or 3 spatial dims) on the model's scale (``[-1, 1]``; values
            beyond it are clipped before noising).
        method: ``partial``, ``invert`` or ``patch`` (see the module docstring).
        t_levels: start times ``t_L`` in ``(0, 1]``; reconstructions from each are averaged.
        sampler: a name of ``medidiff.core.samplers.SAMPLERS`` (``ddpm``, ``ddim``, ``dpm_solver_2m``...);
            ``invert`` always uses DDIM.
        steps: sampler steps from each level; ``None`` runs the whole discrete chain below ``t_L``.
        noise: forward noise, ``gaussian`` or ``simplex``.
        noise_options: options of the noise (simplex ``octaves``, ``frequency``...).
        n_samples: reconstructions per level, each from other noise (``partial`` and ``patch``).
        reduce: ``median`` or ``mean`` over the samples of a level.
        spread: ``std`` or ``mad`` (median absolute deviation) over the samples of a level.
        seed: base seed; image ``i``, level ``j``, sample ``k`` use ``derived_seed(seed, j, k, i)``.
        batch_size: images (times samples and tiles) per network call.
        patch_size: tile size for ``patch`` (default: half of each spatial side, rounded up).
        patch_margin: pixels of context noised around each tile (``patch``).
        process: the forward process (default: ``denoiser.process``).
        progress: show a progress bar over the batches.

    Returns:
        ``(healthy, spread)``, both shaped like ``x``: the reconstruction (mean over levels of the
        per-level median or mean) and the per-voxel spread between samples (mean over levels; zeros
        for a single sample).

    Raises:
        RecipeError: an unknown method, reduction, sampler or noise, or levels outside ``(0, 1]``.
    """
    _check(method, reduce, spread, t_levels, n_samples, batch_size, x.ndim)
    x = x.clamp(-1.0, 1.0)  # the model's range; the residual is taken against the unclipped scan
    process = process if process is not None else denoiser.process
    try:
        sample_fn = samplers.get_sampler("ddim" if method == "invert" else sampler)
    except ValueError as e:
        raise RecipeError(str(e), where="anomaly.sampler") from None
    options = dict(noise_options or {})
    n_samples = 1 if method == "invert" else int(n_samples)
    spatial = tuple(x.shape[2:])
    if method == "patch":
        size = patch_size if patch_size is not None else [math.ceil(s / 2) for s in spatial]
        tiles = patch_tiles(spatial, size, patch_margin)
    else:
        tiles = [(tuple(slice(None) for _ in spatial),) * 2]
    jobs = [(i, k, j) for i in range(x.shape[0]) for k in range(n_samples) for j in range(len(tiles))]
    centres, spreads = [], []
    bar = tqdm(total=len(t_levels) * math.ceil(len(jobs) / batch_size), desc="healthy", disable=not progress,
               leave=False)
    for level, t_level in enumerate(t_levels):
        n_steps = sampler_steps(process, sampler, steps, float(t_level))
        t_start = float(process.snap(torch.tensor([float(t_level)], dtype=torch.float64))[0])
        out = torch.empty((n_samples, *x.shape), dtype=x.dtype, device=x.device)
        for first in range(0, len(jobs), batch_size):
            batch = jobs[first:first + batch_size]
            items = torch.tensor([i for i, _, _ in batch], device=x.device)
            clean = x.index_select(0, items)
            gens = [torch.Generator(device=x.device).manual_seed(derived_seed(seed, level, k, i)) for i, k, _ in batch]
            if method == "invert":
                latent = samplers.ddim_invert(denoiser, clean, process, n_steps, t_end=t_start)
                result = sample_fn(denoiser, latent, process, n_steps, t_start=t_start)
            else:
                hook = None
                if method == "patch":
                    region = torch.zeros((len(batch), 1, *spatial), dtype=torch.bool, device=x.device)
                    for b, (_, _, j) in enumerate(batch):
                        region[(b, slice(None), *tiles[j][1])] = True

                    def hook(x0_hat, x_t, t, region=region, clean=clean):
                        return torch.where(region, x0_hat, clean)

                eps = _noise_like(clean, noise, gens, options)
                x_t = process.noised(clean, torch.full((len(batch),), t_start, dtype=x.dtype, device=x.device), eps)
                result = sample_fn(denoiser, x_t, process, n_steps, t_start=t_start, hook=hook, generator=gens)
            for b, (i, k, j) in enumerate(batch):
                tile = tiles[j][0]
                out[(k, i, slice(None), *tile)] = result[(b, slice(None), *tile)]
            bar.update()
        centre, sp = _reduce(out, reduce, spread)
        centres.append(centre)
        spreads.append(sp)
    bar.close()
    return torch.stack(centres).mean(dim=0), torch.stack(spreads).mean(dim=0)
