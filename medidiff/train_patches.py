"""Training data for priors learned on patches: ``data.source: sample:mni152`` and ``sample:ct``.

A prior learned on small patches applies to images of any size (Hu et al. 2024); these sources cut
random ``data.size`` patches (mostly on the foreground) from images that installed packages ship
(``medidiff.data.packaged``), scaled to ``[-1, 1]``:

- ``sample:mni152``: nilearn's MNI152 2009 T1 at 1 mm, scaled by its brain's 0.5/99.5 percentiles. Axial
  slices in ``data.holdout`` (default ``[[80, 100]]``) are held out, and so is their slab in every coronal
  and sagittal slice, so an evaluation on those axial slices uses anatomy the prior never saw.
- ``sample:ct``: the real CT slices among pydicom's test files (``packaged.CT_TRAINING_FILES``) and
  random-ellipse phantoms in HU, scaled by the HU window ``data.hu_window``. With ``data.holdout``
  ``[[k, k + 1]]`` the ``k``-th real slice is held out for evaluation. Reserved files are never read.

The validation set is a fixed, seeded set of patches of the held-in images.
"""

from __future__ import annotations

import torch

from .data import packaged, sample
from .data.datasets import RandomPatches
from .data.transforms import MATCH_LEVELS, foreground_quantiles, foreground_range, scale_to_unit, unit_range
from .errors import RecipeError
from .train_data import MRI_PERCENTILES, DataBundle, DataConfig

__all__ = ["mni152", "ct", "MNI152_HOLDOUT", "N_PHANTOMS"]

#: Axial 1 mm slices of the MNI152 template held out by default (through the ventricles).
MNI152_HOLDOUT = (80, 100)
#: Random-ellipse phantoms added to the real CT slices.
N_PHANTOMS = 48


def _check(cfg: DataConfig) -> None:
    if cfg.spatial_dims != 2:
        raise RecipeError("patch priors are 2D", where="data.spatial_dims", fix="set data.spatial_dims: 2.")


def _bundle(images: list[torch.Tensor], val_images: list[torch.Tensor], cfg: DataConfig, seed: int,
            prep: dict) -> DataBundle:
    from .data.augment import Augmented

    n_val = max(16, round(cfg.num_samples * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    train = RandomPatches(images, cfg.size, cfg.num_samples, min_foreground=cfg.min_foreground)
    val = RandomPatches(val_images or images, cfg.size, n_val, min_foreground=cfg.min_foreground,
                        seed=seed) if n_val else None
    if cfg.augment is not None:
        train = Augmented(train, **cfg.augment.model_dump())
    return DataBundle(train, val, 1, data_prep=prep)


def mni152(cfg: DataConfig, seed: int) -> DataBundle:
    """Patches of the 1 mm MNI152 T1 along all three axes, a held-out axial slab excluded everywhere."""
    _check(cfg)
    t1, brain = packaged.mni152_1mm()
    scaling = foreground_range(t1, brain, MRI_PERCENTILES)
    volume = scale_to_unit(t1, scaling)  # background at -1
    lo, hi = cfg.holdout[0] if cfg.holdout else MNI152_HOLDOUT
    images = []
    for axis in range(3):
        for k in range(volume.shape[axis]):
            if float(brain.select(axis, k).float().mean()) < 0.05:
                continue
            if axis == 2:
                if not lo <= k < hi:
                    images.append(volume.select(2, k)[None])
                continue
            plane = volume.select(axis, k)  # (., Z): cut the held-out slab out of the slice
            images += [part[None] for part in (plane[:, :lo], plane[:, hi:]) if part.shape[-1] >= 8]
    val = [volume.select(2, k)[None] for k in range(0, volume.shape[2], 10)
           if not lo <= k < hi and float(brain.select(2, k).float().mean()) > 0.1]
    kept = torch.ones_like(brain)
    kept[..., lo:hi] = False
    reference = foreground_quantiles([volume[kept]], [brain[kept]])
    prep = {"source": "sample:mni152", "modality": "MR T1", "orientation": "RAS", "spacing_mm": [1.0, 1.0],
            "slicing_axis": 2, "size": list(cfg.size), "patch": True,
            "intensity": {"method": "percentile", "percentiles": list(MRI_PERCENTILES), "low": scaling["a_min"],
                          "high": scaling["a_max"], "reference": reference, "reference_levels": list(MATCH_LEVELS)},
            "holdout": [[lo, hi]]}
    return _bundle(images, val, cfg, seed, prep)


def ct(cfg: DataConfig, seed: int) -> DataBundle:
    """Patches of the real CT slices pydicom ships and of random-ellipse phantoms, by a HU window."""
    _check(cfg)
    scaling = unit_range(*cfg.hu_window)
    real = packaged.ct_slices()
    held = {k for start, stop in cfg.holdout for k in range(start, stop)}
    phantoms = sample.random_ellipses(N_PHANTOMS, (128, 128), seed=seed)

    def scaled(hu: torch.Tensor) -> torch.Tensor:
        x = hu if hu.ndim == 3 else hu[None]
        return scale_to_unit(x.float(), scaling)

    images = [scaled(s) for k, s in enumerate(real) if k not in held] + [scaled(p) for p in phantoms]
    val = [scaled(p) for p in sample.random_ellipses(8, (128, 128), seed=seed + 1)]
    prep = {"source": "sample:ct", "modality": "CT", "orientation": None, "spacing_mm": None, "slicing_axis": 2,
            "size": list(cfg.size), "patch": True, "intensity": {"method": "hu_window", "window": list(cfg.hu_window)},
            "holdout": [list(r) for r in cfg.holdout] or None, "cases": len(real) - len(held & set(range(len(real))))}
    return _bundle(images, val, cfg, seed, prep)
