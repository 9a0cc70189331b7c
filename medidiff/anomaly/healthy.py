"""Healthy reconstruction: a model of healthy anatomy "heals" an image by partial diffusion.

Method: AnoDDPM (Wyatt et al. 2022, sec. 3): noise the input to ``t_L`` and run the reverse process
from there; pDDPM (Behrendt et al. 2023): the same with one patch noised at a time.

Everything runs on the shared core: the forward noising is ``process.noised`` with Gaussian or simplex
noise (``medidiff.core.noise.noise_like``), the reverse pass is any sampler of
``medidiff.core.samplers`` started at ``t_start = t_L``; a stochastic sampler's reverse steps draw the same kind of
noise (AnoDDPM samples its simplex-trained model with simplex noise). Five methods:

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
- ``guided``: Wolleb et al. 2022 (sec. 3): the same DDIM inversion to ``t_L``, then a DDIM decoding whose
  every step is steered toward ``target_class`` (healthy) by a noise-aware classifier's gradient
  (``medidiff.core.guidance.ClassifierGuidance``: ``eps - s sigma_t grad log p(healthy | x_t)``, Dhariwal &
  Nichol 2021, eq. 14; the classifier from ``medidiff.anomaly.guided``). Deterministic, as ``invert``; with
  ``guidance_scale: 0`` it is ``invert``. What differs from the paper: ``t_L`` and ``steps`` set the grid (the
  paper steps through every one of the first ``L = 500`` of 1000 DDPM times), the classifier is trained on
  generated lesions, and 3D volumes work alike (the paper is 2D).
- ``counterfactual``: Sanchez et al. 2022 (sec. 2-3): a class-conditional model trained with classifier-free
  guidance; DDIM inversion to ``t_L`` with the null class, then DDIM decoding toward ``healthy_class`` with
  ``eps_null + w (eps_healthy - eps_null)`` (``medidiff.core.cfg``; the denoisers from
  ``medidiff.anomaly.counterfactual``, which says what differs from the paper). Deterministic, as ``invert``;
  with ``guidance_weight: 0`` it is ``invert`` of the null-class (unconditional) model.
- ``latent``: Pinaya et al. 2022: a denoiser of a VQ-VAE's latents; its predictions from the encoded image noised
  to ``t_L`` mark the anomalous latents (against a threshold map calibrated on healthy scans), which alone are
  re-denoised from ``t_L`` while the others are kept (``medidiff.core.samplers.masked_ddim``), and the result is
  decoded; ``medidiff.anomaly.latent`` has the steps and what differs from the paper. Needs the VQ-VAE
  (``codec``).

Network evaluations (:func:`healthy_evaluations`): ``invert`` and ``guided`` cost ``2 k`` denoiser evaluations for
``k`` steps per level, ``guided`` adds ``k`` classifier gradients (a forward and a backward pass of the classifier,
counted apart), ``counterfactual`` costs ``3 k`` (``k`` with the null class, then ``k`` steps of two: the healthy
and the null estimate, in one call on the batch doubled), ``latent`` costs ``2 k`` per sample (the scoring pass and
the masked re-denoising).

Every reconstruction of one image depends only on ``seed`` and the image's index (one generator per
image, level and sample: ``medidiff.core.ensemble.run_members``), not on the batch size. Options come as
one ``HealthyOptions`` (the recipe's ``anomaly.reconstruction``), with its defaults.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from pydantic import ValidationError

from medidiff.core import ensemble, samplers
from medidiff.core.guidance import Projection
from medidiff.core.noise import noise_like
from medidiff.core.operators import MaskOperator
from medidiff.core.precision import Autocast
from medidiff.core.processes import Process

from .config import INVERTING_METHODS, HealthyOptions
from .counterfactual import counterfactual_denoisers
from .guided import classifier_guidance
from .latent import latent_healthy

__all__ = ["reconstruct_healthy", "healthy_nfe", "healthy_evaluations", "Evaluations", "patch_tiles",
           "sampler_steps", "options"]


def options(opts: HealthyOptions | None = None, **overrides: Any) -> HealthyOptions:
    """``opts`` (default: the defaults) with ``overrides`` applied, validated.

    Raises:
        ValueError: an unknown option or an invalid value (naming the option).
    """
    base = (opts or HealthyOptions()).model_dump()
    try:
        return HealthyOptions(**{**base, **overrides})
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


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
        ValueError: ``steps`` is None for a continuous-time process.
    """
    if steps is not None:
        return int(steps)
    n = getattr(process, "n_steps", None)
    if n is None:
        raise ValueError(f"steps: sampler {sampler!r} needs a step count for a continuous-time process (e.g. 10)")
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


class Evaluations(NamedTuple):
    """Network evaluations per image of a healthy reconstruction.

    Attributes:
        denoiser: evaluations of the diffusion model (per image; a classifier-free guided step counts two).
        classifier: gradients of ``guided``'s classifier (each a forward and a backward pass of the classifier).
    """

    denoiser: int
    classifier: int = 0


def healthy_evaluations(opts: HealthyOptions | None = None, *, n_patches: int = 1, process: Process | None = None,
                        **overrides: Any) -> Evaluations:
    """Network evaluations per image of :func:`reconstruct_healthy` with these options, denoiser and classifier.

    Args:
        opts: the options (default: the defaults), with ``overrides`` applied.
        n_patches: tiles per image (``patch`` only).
        process: the model's process (for ``steps=None``).

    Returns:
        The counts (see the module docstring).
    """
    o = options(opts, **overrides)
    denoiser = classifier = 0
    for t in o.t_levels:
        k = sampler_steps(process, o.sampler, o.steps, t) if process is not None else int(o.steps)
        if o.method == "counterfactual":  # k with the null class, then k of two (healthy and null)
            denoiser += 3 * k
        elif o.method == "latent":  # the scoring pass, then the masked re-denoising, per sample
            denoiser += 2 * k * o.n_samples
        elif o.method in INVERTING_METHODS:
            denoiser += 2 * k
            classifier += k if o.method == "guided" and o.guidance_scale > 0 else 0
        else:
            denoiser += samplers.nfe(o.sampler, k) * o.n_samples * (n_patches if o.method == "patch" else 1)
    return Evaluations(denoiser, classifier)


def healthy_nfe(opts: HealthyOptions | None = None, *, n_patches: int = 1, process: Process | None = None,
                **overrides: Any) -> int:
    """Denoiser evaluations per image of :func:`reconstruct_healthy` with these options.

    ``guided``'s classifier gradients are not in this count: :func:`healthy_evaluations` gives them.

    Args:
        opts: the options (default: the defaults), with ``overrides`` applied.
        n_patches: tiles per image (``patch`` only).
        process: the model's process (for ``steps=None``).

    Returns:
        The count of denoiser evaluations.
    """
    return healthy_evaluations(opts, n_patches=n_patches, process=process, **overrides).denoiser


def _reverse_noise(x: torch.Tensor, generator, *, kind: str, options: dict) -> torch.Tensor:
    """A sampler's fresh noise of ``kind`` (``samplers``' ``noise(x, generator)``)."""
    return noise_like(x, kind, generator, **options)


def reconstruct_healthy(denoiser, x: torch.Tensor, opts: HealthyOptions | None = None, *, seed: int = 0,
                        process: Process | None = None, progress: bool = False, codec=None, **overrides: Any
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Healthy reconstructions of a batch of images (partial diffusion, DDIM inversion, guided, counterfactual or
    patch-wise).

    Args:
        denoiser: ``denoiser(x_t, t) -> x0_hat`` (a ``medidiff.core.denoiser.Denoiser``) on the images' scale; for
            ``counterfactual``, of a class-conditional network (``denoiser.net.null_class``).
        x: images ``(B, C, *spatial)`` (2 or 3 spatial dims) on the model's scale (``[-1, 1]``; values
            beyond it are clipped before noising).
        opts: the options (``HealthyOptions``; default: the defaults), with ``overrides`` applied.
        seed: base seed; image ``i``, level ``j``, sample ``k`` use ``member_seed(seed, j, k, i)``
            (for ``patch``, ``i`` counts image-tile pairs).
        process: the forward process (default: ``denoiser.process``).
        progress: show a progress bar over the batches.
        codec: ``latent``: the model's VQ-VAE (``medidiff.anomaly.latent.open_codec``); ``denoiser`` then models its
            latents, and the images of one call are one scan's for the per-scan threshold rule.

    Returns:
        ``(healthy, spread)``, both shaped like ``x``: the reconstruction (mean over levels of the
        per-level median or mean) and the per-voxel spread between samples (mean over levels; zeros
        for a single sample).

    Raises:
        ValueError: an unknown option, method, sampler or noise, levels outside ``(0, 1]``, a ``guided``
            classifier that does not fit the model, a ``counterfactual`` model that is not class-conditional, or a
            ``latent`` call without the VQ-VAE, with another sampler than ``ddim``/``ddpm`` or a threshold map of
            another latent grid.
        ModelError: the ``guided`` classifier's file is missing, unsafe or corrupt.
    """
    o = options(opts, **overrides)
    if o.method == "latent":
        return latent_healthy(denoiser, x, o, codec=codec, seed=seed, process=process, progress=progress)
    if x.ndim not in (4, 5):
        raise ValueError(f"expected images (B, C, *spatial) with 2 or 3 spatial dims, got {x.ndim} dims")
    x = x.clamp(-1.0, 1.0)  # the model's range; the residual is taken against the unclipped scan
    process = process if process is not None else denoiser.process
    inverted = o.method in INVERTING_METHODS
    guide = classifier_guidance(o, process, x) if o.method == "guided" else None
    # counterfactual: inverted with the null class, decoded toward the healthy one; else one denoiser for both
    encoder, decoder = counterfactual_denoisers(denoiser, o) if o.method == "counterfactual" else (denoiser,) * 2
    denoiser, encoder, decoder = (Autocast(d, o.bf16) for d in (denoiser, encoder, decoder))
    try:
        sample_fn = samplers.get_sampler("ddim" if inverted else o.sampler)
    except ValueError as e:
        raise ValueError(f"sampler: {e}") from None
    # the reverse steps of a stochastic sampler draw the forward noise's kind (AnoDDPM: simplex throughout)
    reverse_noise = {}
    if o.noise != "gaussian" and "noise" in inspect.signature(sample_fn).parameters:
        reverse_noise["noise"] = partial(_reverse_noise, kind=o.noise, options=o.noise_options)
    spatial = tuple(x.shape[2:])
    if o.method == "patch":
        size = o.patch_size if o.patch_size is not None else [math.ceil(s / 2) for s in spatial]
        tiles = patch_tiles(spatial, size, o.patch_margin)
    else:
        tiles = [(tuple(slice(None) for _ in spatial),) * 2]
    n_tiles = len(tiles)
    centres, spreads = [], []
    for level, t_level in enumerate(o.t_levels):
        n_steps = sampler_steps(process, o.sampler, o.steps, float(t_level))
        t_start = float(process.snap(torch.tensor([float(t_level)], dtype=torch.float64))[0])

        def members(items, _members, gens, n_steps=n_steps, t_start=t_start):
            images = torch.div(items, n_tiles, rounding_mode="floor").to(x.device)
            clean = x.index_select(0, images)
            if inverted:
                latent = samplers.ddim_invert(encoder, clean, process, n_steps, t_end=t_start)
                return sample_fn(decoder, latent, process, n_steps, t_start=t_start, hook=guide)
            hook = None
            if o.method == "patch":  # outside its region, each tile's estimate is pinned to the clean image
                kept = torch.ones((len(items), 1, *spatial), dtype=x.dtype, device=x.device)
                for b, j in enumerate((items % n_tiles).tolist()):
                    kept[(b, slice(None), *tiles[j][1])] = 0
                hook = Projection(MaskOperator(kept), clean * kept)  # replacement by a masking operator
            eps = noise_like(clean, o.noise, gens, **o.noise_options)
            x_t = process.noised(clean, torch.full((len(items),), t_start, dtype=x.dtype, device=x.device), eps)
            return sample_fn(denoiser, x_t, process, n_steps, t_start=t_start, hook=hook, generator=gens,
                             **reverse_noise)

        out = ensemble.run_members(members, x.shape[0] * n_tiles, o.samples, seed=seed, stream=level,
                                   batch_size=o.batch_size, device=x.device, progress=progress, desc="healthy")
        if n_tiles > 1:  # assemble each tile's interior
            tiled = out.reshape(o.samples, x.shape[0], n_tiles, *x.shape[1:])
            out = torch.empty((o.samples, *x.shape), dtype=out.dtype, device=out.device)
            for j, (tile, _) in enumerate(tiles):
                out[(slice(None), slice(None), slice(None), *tile)] = tiled[(slice(None), slice(None), j,
                                                                             slice(None), *tile)]
        else:
            out = out.reshape(o.samples, *x.shape)
        centres.append(ensemble.reduce(out, o.reduce))
        spreads.append(ensemble.spread(out, o.spread))
    return torch.stack(centres).mean(dim=0), torch.stack(spreads).mean(dim=0)
