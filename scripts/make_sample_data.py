"""Regenerate medidiff's bundled brain sample (``data/mni152_2mm_*.nii.gz``) from the copy shipped in nilearn.

The MNI ICBM152 2009a (nonlinear symmetric) T1 template, its grey/white matter probability maps and brain
mask, all at 2 mm as nilearn resamples them, are cropped to a fixed 80 x 96 x 80 box around the brain and
written with their true (shifted) affine:

- ``mni152_2mm_t1.nii.gz``: T1 intensity, uint8 0..255 (nilearn's 0..1 values times 255, rounded);
- ``mni152_2mm_brainmask.nii.gz``: brain mask, uint8 0/1;
- ``mni152_2mm_tissue.nii.gz``: tissue labels inside the mask, uint8 (0 background, 1 CSF, 2 grey
  matter, 3 white matter), the most probable class per voxel (CSF = 1 - GM - WM).

Needs the optional ``data`` extra (``pip install nilearn``); nothing is downloaded.

Usage: ``python scripts/make_sample_data.py [--out data]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

# Fixed crop of nilearn's 99 x 117 x 95 grid at 2 mm (voxel start, size); holds the whole brain mask,
# whose bounding box is x 13..85, y 14..103, z 0..77.
CROP_START = (9, 11, 0)
CROP_SIZE = (80, 96, 80)


def crop(img: nib.Nifti1Image, dtype: type, scale: float = 1.0) -> nib.Nifti1Image:
    """Crop ``img`` to the fixed box, cast to ``dtype`` and give it the cropped grid's affine."""
    box = tuple(slice(s, s + n) for s, n in zip(CROP_START, CROP_SIZE))
    data = np.asarray(img.get_fdata(dtype=np.float32))[box] * scale
    if np.issubdtype(dtype, np.integer):
        data = np.clip(np.rint(data), np.iinfo(dtype).min, np.iinfo(dtype).max)
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.asarray(CROP_START, dtype=float) + img.affine[:3, 3]
    out = nib.Nifti1Image(data.astype(dtype), affine)
    out.header.set_xyzt_units("mm")
    out.set_qform(affine, code=4)  # 4 = MNI152
    out.set_sform(affine, code=4)
    return out


def main(argv: list[str] | None = None) -> None:
    """Write the sample files into ``--out``."""
    from nilearn import datasets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    t1 = datasets.load_mni152_template(resolution=2)
    mask = datasets.load_mni152_brain_mask(resolution=2)
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32)
    probs = np.stack([np.clip(1.0 - gm - wm, 0.0, 1.0), gm, wm])
    tissue = (np.argmax(probs, axis=0) + 1) * (mask.get_fdata() > 0)

    nib.save(crop(t1, np.uint8, scale=255.0), args.out / "mni152_2mm_t1.nii.gz")
    nib.save(crop(mask, np.uint8), args.out / "mni152_2mm_brainmask.nii.gz")
    nib.save(crop(nib.Nifti1Image(tissue.astype(np.float32), t1.affine), np.uint8),
             args.out / "mni152_2mm_tissue.nii.gz")
    for f in sorted(args.out.glob("mni152_2mm_*.nii.gz")):
        print(f"{f}: {f.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
