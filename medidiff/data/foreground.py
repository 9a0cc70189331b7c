"""The foreground of a scan: the one rule every task and the training data use.

A skull-stripped or zero-filled scan has a flat background at its minimum: every voxel above the
minimum is foreground. Otherwise the foreground is the voxels above Otsu's threshold of the
channel-mean, with holes filled (Otsu 1979; ``skimage.filters.threshold_otsu``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["foreground", "FLAT_BACKGROUND"]

#: Share of voxels at the minimum above which the background is taken as exactly the minimum.
FLAT_BACKGROUND = 0.05


def foreground(volume: Any) -> torch.Tensor:
    """The foreground mask of a scan.

    Args:
        volume: ``(C, *spatial)`` tensor, MetaTensor or array (channels are averaged).

    Returns:
        A float32 mask ``(1, *spatial)`` (1 inside).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    v = torch.as_tensor(np.asarray(volume.as_tensor() if hasattr(volume, "as_tensor") else volume)).float().mean(0)
    at_min = v <= v.min()
    if float(at_min.float().mean()) > FLAT_BACKGROUND:
        fg = ~at_min
    else:
        a = v.numpy()
        level = threshold_otsu(a) if float(a.max()) > float(a.min()) else float(a.min())
        fg = torch.from_numpy(ndimage.binary_fill_holes(a > level))
    return fg[None].float()
