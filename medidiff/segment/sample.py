"""Sampling an ensemble of masks from a conditional diffusion model: N members per image, batched, seeded.

Method: diffusion models for implicit segmentation ensembles (Wolleb et al. 2022, MIDL, sec. 3, Algorithm
1): the image is concatenated to the noisy mask, the reverse process runs from pure noise at ``t = 1``
to a mask, and each member starts from other noise. Any sampler of ``medidiff.core.samplers`` runs it:
a few-step DDIM (Song et al. 2021, eq. 12) does in 10-20 evaluations what the paper's 1,000-step DDPM does.

Every member of every image depends only on ``(seed, member, image)`` (``medidiff.core.ensemble``), not on
the batch size; the members of one image are batched together (``batch_size`` member-images per network
call). A deterministic segmentation network saved as an ``x0``-denoiser (``medidiff.nets.SegmentationUNet``)
runs through the same path: one member of one step is its prediction.
"""

from __future__ import annotations

import torch

from medidiff.core import ensemble, samplers
from medidiff.core.precision import autocast_for
from medidiff.train_segment import conditioning

from .config import EnsembleOptions

__all__ = ["sample_members", "members_nfe"]


def members_nfe(options: EnsembleOptions) -> int:
    """Network evaluations per image: members times the sampler's evaluations for ``steps``."""
    return options.members * samplers.nfe(options.sampler, options.steps)


def sample_members(denoiser, images: torch.Tensor, options: EnsembleOptions | None = None, *, channels: int,
                   seed: int = 0, bf16: bool = False, progress: bool = False) -> torch.Tensor:
    """Sample ``options.members`` masks of each image.

    Args:
        denoiser: a conditional ``Denoiser`` of masks (its network takes the mask channels, then the image).
        images: ``(B, Cc, *spatial)`` images on the network scale (2 or 3 spatial dims).
        options: the ensemble options (default: the defaults).
        channels: mask channels the model generates (1 for a binary segmentation, else the classes).
        seed: base seed; member ``k`` of image ``i`` uses ``member_seed(seed, 0, k, i)``.
        bf16: evaluate the network under bf16 autocast where the device supports it.
        progress: show a progress bar over the batches.

    Returns:
        ``(members, B, channels, *spatial)`` on the ``[-1, 1]`` scale (clipped).

    Raises:
        ValueError: an unknown sampler, or images that are not ``(B, Cc, *spatial)``.
    """
    o = options or EnsembleOptions()
    if images.ndim not in (4, 5):
        raise ValueError(f"expected images (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(images.shape)}")
    try:
        sample_fn = samplers.get_sampler(o.sampler)
    except ValueError as e:
        raise ValueError(f"sampler: {e}") from None
    kw = {"eta": o.eta} if o.sampler == "ddim" else {}
    process = denoiser.process
    cond = conditioning(images)
    spatial = tuple(images.shape[2:])

    def run(items: torch.Tensor, _members: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        c = cond.index_select(0, items.to(cond.device))
        x = process.prior_sample((len(items), channels, *spatial), generator=gens, device=cond.device)
        with autocast_for(cond.device, bf16):
            out = sample_fn(denoiser.with_cond(c), x, process, o.steps, generator=gens, **kw)
        return out.float().clamp(-1.0, 1.0)

    return ensemble.run_members(run, images.shape[0], o.members, seed=seed, batch_size=o.batch_size,
                                device=cond.device, progress=progress, desc="members")
