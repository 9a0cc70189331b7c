"""Images that installed packages ship, for training priors without downloads.

- ``mni152_1mm()``: the MNI ICBM152 2009 T1 template at 1 mm that nilearn ships (``pip install
  medidiff[data]``), skull-stripped by its brain mask.
- ``ct_slices()``: the real CT slices among pydicom's and pydicom-data's test files, in HU.

Files reserved for independent evaluation (``RESERVED``: pydicom-data's ``693_*`` and
``eCT_Supplemental`` CT slices; Debian's mricron-data Colin27 templates are not read here at all) are
never returned for training; ``is_reserved`` tells a file name.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from medidiff.errors import DataError

__all__ = ["RESERVED", "CT_TRAINING_FILES", "is_reserved", "mni152_1mm", "ct_slices"]

#: Name prefixes of files kept for independent evaluation: never trained or tuned on.
RESERVED = ("693_", "eCT_Supplemental", "ch2", "colin27")
#: pydicom test files holding real CT slices (a spine, an abdomen, a head), used for CT priors.
CT_TRAINING_FILES = ("CT_small.dcm", "explicit_VR-UN.dcm", "J2K_pixelrep_mismatch.dcm")


def is_reserved(path: str | Path) -> bool:
    """Whether a file is reserved for independent evaluation (see ``RESERVED``)."""
    name = Path(path).name.lower()
    return any(name.startswith(prefix.lower()) for prefix in RESERVED)


@lru_cache(maxsize=1)
def mni152_1mm() -> tuple[torch.Tensor, torch.Tensor]:
    """The MNI152 2009 T1 template at 1 mm (nilearn's copy), brain only.

    Returns:
        ``(t1, brain)``: float32 ``(X, Y, Z)`` intensities in ``[0, 1]`` (zero outside the brain) and the
        bool brain mask, RAS, 197 x 233 x 189 voxels of 1 mm.

    Raises:
        DataError: nilearn is not installed.
    """
    try:
        from nilearn import datasets
    except ImportError:
        raise DataError("the 1 mm MNI152 template comes with nilearn, which is not installed",
                        fix="pip install 'medidiff[data]' (or pip install nilearn).") from None
    t1 = np.asarray(datasets.load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata()) > 0.5
    t1 = np.where(brain, t1 / max(float(t1.max()), 1e-6), 0.0).astype(np.float32)
    return torch.from_numpy(t1), torch.from_numpy(brain)


def ct_slices() -> list[torch.Tensor]:
    """The real CT slices of ``CT_TRAINING_FILES`` that can be decoded here, in HU.

    Returns:
        float32 ``(rows, columns)`` slices (at least the uncompressed ones).

    Raises:
        DataError: none can be read.
    """
    import pydicom
    from pydicom.data import get_testdata_file

    out = []
    for name in CT_TRAINING_FILES:
        if is_reserved(name):  # pragma: no cover - the list is checked by the tests
            continue
        path = get_testdata_file(name)
        if path is None:
            continue
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array.astype(np.float32)
        except Exception:  # noqa: BLE001 - a compressed file without its decoder is skipped
            continue
        hu = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
        out.append(torch.from_numpy(hu.astype(np.float32)))
    if not out:
        raise DataError("none of pydicom's CT test slices could be read", fix="pip install pydicom pydicom-data.")
    return out
