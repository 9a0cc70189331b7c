"""Shared pieces of the anomaly tests: a tiny 2D model, synthetic brain-like volumes, fast settings."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medidiff.core.processes import make_process
from medidiff.nets import build_unet
from medidiff.weights import save_model

#: Detection settings that run in a fraction of a second per tiny case.
FAST = {"t_levels": [0.3], "steps": 2, "n_samples": 1, "progress": False, "median_size": 3, "erode": 0}


def save_tiny_model(folder: Path) -> Path:
    """A randomly initialised 2D denoiser for 16 x 16 slices at 2 mm, saved into ``folder``."""
    torch.manual_seed(0)
    net = build_unet(spatial_dims=2, in_channels=1, channels=(8, 16), attention_levels=(False, False),
                     norm_num_groups=8, num_head_channels=8)
    prep = {"source": "test", "orientation": "RAS", "spacing_mm": [2.0, 2.0], "slicing_axis": 2, "size": [16, 16],
            "intensity": {"method": "percentile", "percentiles": [0.5, 99.5], "low": 0.0, "high": 100.0}}
    save_model(folder, net, make_process("ddpm", n_steps=50), "eps", {"data_prep": prep, "noise": {"kind": "gaussian"}})
    return folder


def volume(shape, spacing=(2.0, 2.0, 2.0), flip=False, seed=0):
    """``(image, brain mask, affine)``: a noisy disc-shaped "brain" in a flat background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid[:2] ** 2).sum(0) < 0.7
    image = np.where(brain, 60 + 20 * rng.random(shape), 0).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 7.0]
    if flip:  # stored left-to-right: the pipeline must reorient and come back
        affine[0, 0] *= -1
    return image, brain.astype(np.uint8), affine


def write_nifti(path, array, affine):
    """Save ``array`` as NIfTI at ``path``; returns the path."""
    nib.save(nib.Nifti1Image(array, affine), path)
    return path
