"""Prepare medidiff's bundled healthy T1 brains (``data/brains/``) from 16 IXI subjects.

The source is the 2 mm copy of IXI (Hammersmith Hospital, Philips 3T; healthy volunteers) that the
CBICA/NiChart_Project repository keeps as test data: whole-head T1 volumes, 120 x 120 x 90 voxels of
2 mm in scanner space (P-S-R axis order), uint8 with a per-file scale. For each chosen subject:

1. Brain mask, by registration only: nilearn's 1 mm MNI ICBM152 2009a T1 template is registered to the
   subject with SimpleITK (Mattes mutual information). nilearn ships only the brain-extracted template
   (zero outside the brain), so the metric is restricted to the template's brain mask dilated by 2 mm
   (brain plus the dark rim of CSF and skull around it; a wider rim lets the bright scalp pull the fit
   outwards). Start: a coarse exhaustive search over scale, pitch and translation at 6 mm, started from
   the head's top and centre; then a similarity fit of the 3 best starts (4 and 2 mm), then an affine fit
   (2 mm and 1 mm). nilearn's MNI152 brain mask is resampled into the subject's grid through the inverse
   affine (linear interpolation, threshold 0.5); holes are filled and the largest component kept.
   A B-spline refinement after the affine fit was tried on 15 subjects and left out: it changed their
   Dice values below by -0.007 to +0.009 (mean +0.001), not a clear gain.
2. QC (optional, never shipped): where the NiChart DLMUSE label map of the subject is present, the Dice
   coefficient of the mask against its labels > 0 is printed and written to ``subjects.csv``.
3. Output, reoriented to RAS (``nibabel.as_closest_canonical``), cropped to the mask's bounding box plus
   4 voxels: ``<subject>_t1.nii.gz``, uint8, zero outside the mask, ``255 * T1 / p99.9`` (p99.9: the
   subject's 99.9th percentile inside the mask, in source units; clipped to 1..255 inside the mask, so the
   image's nonzero support is the mask), scl_slope 1, scl_inter 0; and
   ``<subject>_brainmask.nii.gz``, uint8 0/1. sform and qform code 1 (scanner space: not MNI).
   The per-subject scale also removes the different scaling of the two IXI_Small subjects.
4. ``datalist.json`` (MONAI decathlon layout: training / validation / test, ``image`` and ``mask``),
   ``subjects.csv`` (split, age, sex, source, scale, mask volume, QC Dice) and ``LICENSE``.

The source may be a clone of CBICA/NiChart_Project (bare or not; the files are read at the commits
recorded below with ``git show``) or a folder holding ``t1/<subject>_T1.nii.gz``, optionally
``dlmuse/<subject>_T1_DLMUSE.nii.gz``, and the participants CSVs (``MRID,Age,Sex``) anywhere below it.
Every T1 file is checked against its recorded SHA-256.

Deterministic: fixed sampling seeds, and ITK runs single-threaded by default (``--threads``; another
thread count may move a few boundary voxels). Needs nilearn, SimpleITK, nibabel, scipy, scikit-image;
nothing is downloaded. About 40 s per subject on one core.

Usage::

    python scripts/prepare_brains.py SOURCE [--out data/brains] [--qc-png DIR]
    python scripts/prepare_brains.py SOURCE --qc-only IXI443-HH-2215 ...   # QC of other subjects, no files
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPO = "CBICA/NiChart_Project"
#: The 40 demo subjects were removed from the repository after this commit ("Add test data").
DEMO_COMMIT = "70aca937a3b4e9682ae8e490f772d82813fcf8e8"
DEMO_DIR = "sample_datasets/demo_dataset_IXI"
#: IXI012 and IXI015 are in the repository's current HEAD, in IXI_Small.
SMALL_COMMIT = "1a04acb4ce41cc69472c79647ddeb85e73946544"
SMALL_DIR = "test_data/nifti/IXI_Small"
#: DLMUSE labels of IXI012 (QC only): the repository's reference sample1, whose T1 is IXI012's byte for byte.
SAMPLE1_DLMUSE = "resources/reference_data/sample1/dlmuse/sample1_T1_DLMUSE.nii.gz"

#: The subjects and their splits: across age (24-74) and sex, 8 men and 8 women. IXI012-HH-1211 and the
#: other test subjects are for evaluation only.
SPLITS = {
    "training": ["IXI015-HH-1258", "IXI162-HH-1548", "IXI206-HH-1650", "IXI527-HH-2376", "IXI396-HH-2115",
                 "IXI217-HH-1638", "IXI132-HH-1415", "IXI239-HH-2296", "IXI335-HH-1906", "IXI383-HH-2099"],
    "validation": ["IXI211-HH-1568", "IXI577-HH-2661", "IXI274-HH-2294"],
    "test": ["IXI012-HH-1211", "IXI437-HH-2152", "IXI443-HH-2215"],
}
#: SHA-256 of each source T1 file.
T1_SHA256 = {
    "IXI012-HH-1211": "d4d595a3d2ea2a0b597be64054193bf52cbea37dfdea8424459154991fc8eba3",
    "IXI015-HH-1258": "0ef3b676a5fd76583d76edf9176cdac89732e5663b44680764ad3908644d223a",
    "IXI132-HH-1415": "865905822e3a88c3f002dacf22f10b0f59c3f05d78374c9ee737b6336de1877d",
    "IXI162-HH-1548": "d2c4e748bf9b1a674ea63dc3fc724ebd5f089ff07459b87865a00ae0710db856",
    "IXI206-HH-1650": "431195ae3a9dc5bd7ab7a85871c3caec6d5adb84ba0656bc99b8fdc81af5b674",
    "IXI211-HH-1568": "48f4bdaa07cee97035ab0a83e8be1784cfebdf440cdcf4b84c896e868e6cfcf7",
    "IXI217-HH-1638": "4f5722281d9c88f64c76394585624f08cc73daa6da11d585486704a39b4fb4db",
    "IXI239-HH-2296": "545e88302035864776a0f6bfc4881ca3f782918711e5b1694b349d43036cddfa",
    "IXI274-HH-2294": "82dfde0390e77d3cfab09547359d6642981dd6c486ed896a6bb113837f219cd5",
    "IXI335-HH-1906": "51275e02539c429f6874b6385a98334401490947397d7dab97ac80b88c623223",
    "IXI383-HH-2099": "eb4ee23cc67d34149d849e4cc826a2c02a45c9629b4b0dfc4a2fe9a0f62cb4ee",
    "IXI396-HH-2115": "c99731726a8e4295ca7d8bb569b31c18c15efbeb65fa10bea8a133d9bb33cd32",
    "IXI437-HH-2152": "b939b6690d68955986db71546bf30bb7be86265d1c769a2497bdeb1875b97040",
    "IXI443-HH-2215": "ceb63e02f3e231de63d4459de6e0b8e6ad195e9fa4748bcf6afd7262cbf68427",
    "IXI527-HH-2376": "91c43dbaf6fa8f2c7af6485a330fcd0756e93bafd8c874173534cfb2db54762e",
    "IXI577-HH-2661": "f6fd5d722812c522fddb9017d6322a8cf6995dd77c19b79704645e0da435c17e",
}

MARGIN = 4  # voxels around the mask's bounding box
PERCENTILE = 99.9  # of the brain's intensities, mapped to 255
METRIC_RIM_MM = 2  # the metric's mask: the template's brain dilated by this many 1 mm voxels
SEED = 1234
LPS = np.diag([-1.0, -1.0, 1.0])  # RAS (nibabel) <-> LPS (ITK)


# ---------------------------------------------------------------------------------------------- inputs

def small(subject: str) -> bool:
    return subject in ("IXI012-HH-1211", "IXI015-HH-1258")


def source_of(subject: str, kind: str = "t1") -> tuple[str, str]:
    """(commit, path) of a subject's T1 or DLMUSE file in the NiChart repository."""
    if small(subject):
        if kind == "t1":
            return SMALL_COMMIT, f"{SMALL_DIR}/t1/{subject}_T1.nii.gz"
        return SMALL_COMMIT, SAMPLE1_DLMUSE if subject == "IXI012-HH-1211" else ""
    folder = "t1" if kind == "t1" else "dlmuse"
    suffix = "_T1.nii.gz" if kind == "t1" else "_T1_DLMUSE.nii.gz"
    return DEMO_COMMIT, f"{DEMO_DIR}/{folder}/{subject}{suffix}"


class Source:
    """Reads the input files from a NiChart clone (at the recorded commits) or from a plain folder."""

    def __init__(self, root: Path):
        self.root = root
        self.git = None
        for candidate in (root, root / ".git"):
            if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
                self.git = candidate

    def read(self, subject: str, kind: str) -> bytes | None:
        if self.git is not None:
            commit, path = source_of(subject, kind)
            if not path:
                return None
            done = subprocess.run(["git", f"--git-dir={self.git}", "show", f"{commit}:{path}"],
                                  capture_output=True, check=False)
            return done.stdout if done.returncode == 0 else None
        name = f"t1/{subject}_T1.nii.gz" if kind == "t1" else f"dlmuse/{subject}_T1_DLMUSE.nii.gz"
        file = self.root / name
        return file.read_bytes() if file.is_file() else None

    def participants(self) -> dict[str, dict[str, str]]:
        texts = []
        if self.git is not None:
            for commit, folder in ((DEMO_COMMIT, DEMO_DIR), (SMALL_COMMIT, SMALL_DIR)):
                texts.append(subprocess.run(["git", f"--git-dir={self.git}", "show",
                                             f"{commit}:{folder}/participants/participants.csv"],
                                            capture_output=True, check=True, text=True).stdout)
        else:
            texts = [p.read_text() for p in sorted(self.root.rglob("*.csv"))]
        rows = {}
        for text in texts:
            for row in csv.DictReader(io.StringIO(text)):
                if row.get("MRID"):
                    rows[row["MRID"]] = {"age": f"{float(row['Age']):.1f}", "sex": row["Sex"]}
        return rows


def nifti(data: bytes) -> nib.Nifti1Image:
    """A NIfTI image from the bytes of a (gzipped) file."""
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


# ------------------------------------------------------------------------------------------ registration

def to_sitk(data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> sitk.Image:
    """A SimpleITK image of a nibabel-ordered array (i, j, k) with its voxel-to-RAS affine."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype).transpose(2, 1, 0)))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((LPS @ affine[:3, :3] / spacing).flatten().tolist())
    img.SetOrigin((LPS @ affine[:3, 3]).tolist())
    return img


def from_sitk(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS mm of the voxels of a mask, one row each."""
    return np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]


def regrid(img: sitk.Image, spacing: float) -> sitk.Image:
    """Smoothed (sigma = spacing / 2) and resampled to isotropic ``spacing`` mm over the same extent."""
    size = [int(round(n * s / spacing)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    smooth = sitk.SmoothingRecursiveGaussian(img, spacing / 2)
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [spacing] * 3,
                         img.GetDirection())


@lru_cache(maxsize=1)
def template():
    """nilearn's 1 mm MNI152 2009a T1 (brain-extracted) and brain mask, as SimpleITK images."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    brain = np.asarray(mask.dataobj) > 0
    rim = ndimage.binary_dilation(brain, iterations=METRIC_RIM_MM)
    return {
        "t1": to_sitk(t1.get_fdata(dtype=np.float32), t1.affine),
        "mask": to_sitk(brain, mask.affine),
        "metric_mask": to_sitk(rim, mask.affine, np.uint8),
        "points": world(brain, mask.affine),
    }


def method(fixed_mask: sitk.Image, sampling: float | None = None) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    if sampling:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling, SEED)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def fit(tx: sitk.Transform, moving: sitk.Image, iterations: int, shrink: list[int], sigma: list[float],
        step: float) -> float:
    """Optimises ``tx`` (template -> subject) in place; returns the final metric value."""
    tpl = template()
    reg = method(tpl["metric_mask"], 0.1)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=step, minStep=1e-3, numberOfIterations=iterations,
                                                 relaxationFactor=0.7, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(tx, inPlace=True)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigma)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.Execute(tpl["t1"], moving)
    return reg.GetMetricValue()


def register(data: np.ndarray, affine: np.ndarray) -> tuple[sitk.AffineTransform, float]:
    """Affine transform mapping template (MNI) points to the subject's, and its metric value."""
    from skimage.filters import threshold_otsu

    tpl = template()
    moving = to_sitk(data, affine)
    # start: the template brain's upper 80 mm on the head's upper part (below an assumed 12 mm of scalp)
    head = ndimage.binary_opening(data > threshold_otsu(data))
    labels, _ = ndimage.label(head)
    head = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    head_pts = world(head, affine)
    top = np.percentile(head_pts[:, 2], 99.9) - 12.0
    brain = tpl["points"]
    slab = brain[brain[:, 2] > brain[:, 2].max() - 80]
    centre = slab.mean(axis=0)
    shift = head_pts[(head_pts[:, 2] > top - 80) & (head_pts[:, 2] < top)].mean(axis=0) - centre
    shift[2] = top - brain[:, 2].max()

    # coarse exhaustive search (template at 6 mm, subject at 4 mm, all voxels of the metric mask)
    fixed = regrid(tpl["t1"], 6.0)
    reg = method(sitk.Resample(tpl["metric_mask"], fixed, sitk.Transform(), sitk.sitkNearestNeighbor))
    coarse = regrid(moving, 4.0)
    starts = []
    for scale in (0.85, 0.95):
        for pitch in (-30, -20, -10, 0, 10, 20):
            for dz in range(-40, 41, 8):
                for dy in (-20, -10, 0, 10, 20):
                    tx = sitk.Similarity3DTransform()
                    tx.SetCenter((LPS @ centre).tolist())
                    tx.SetScale(scale)
                    tx.SetRotation((1, 0, 0), np.deg2rad(pitch))
                    tx.SetTranslation((LPS @ (shift + [0, dy, dz])).tolist())
                    reg.SetInitialTransform(tx)
                    starts.append((reg.MetricEvaluate(fixed, coarse), len(starts), tx))
    starts.sort(key=lambda s: (s[0], s[1]))
    fits = []
    for _, order, tx in starts[:3]:
        fits.append((fit(tx, moving, 100, [4, 2], [2.0, 1.0], 1.0), order, tx))
    sim = min(fits, key=lambda f: (f[0], f[1]))[2]
    aff = sitk.AffineTransform(3)
    aff.SetCenter(sim.GetCenter())
    aff.SetMatrix(sim.GetMatrix())
    aff.SetTranslation(sim.GetTranslation())
    value = fit(aff, moving, 200, [2, 1], [1.0, 0.0], 0.5)
    return aff, value


def warp_mask(tx: sitk.AffineTransform, shape, affine: np.ndarray) -> np.ndarray:
    """nilearn's MNI152 brain mask in the subject's grid: linear, >= 0.5, holes filled, largest component."""
    reference = to_sitk(np.zeros(shape, np.float32), affine)
    warped = from_sitk(sitk.Resample(template()["mask"], reference, tx.GetInverse(), sitk.sitkLinear, 0.0))
    mask = ndimage.binary_fill_holes(warped >= 0.5)
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


# ---------------------------------------------------------------------------------------------- output

def header_image(data: np.ndarray, affine: np.ndarray, description: str) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = description.encode()[:79]
    img.set_qform(affine, code=1)  # 1 = scanner: these are not in MNI space
    img.set_sform(affine, code=1)
    return img


def prepare(subject: str, source: Source, out: Path | None, qc_png: Path | None) -> dict:
    """Registers, checks and (if ``out``) writes one subject; returns its row of ``subjects.csv``."""
    start = time.time()
    raw = source.read(subject, "t1")
    if raw is None:
        raise SystemExit(f"{subject}: T1 not found in {source.root}")
    digest = hashlib.sha256(raw).hexdigest()
    if subject in T1_SHA256 and digest != T1_SHA256[subject]:
        raise SystemExit(f"{subject}: T1 SHA-256 {digest} differs from the recorded {T1_SHA256[subject]}")
    img = nib.as_closest_canonical(nifti(raw))
    data = img.get_fdata(dtype=np.float32)
    tx, value = register(data, img.affine)
    mask = warp_mask(tx, data.shape, img.affine)

    qc = ""
    labels_raw = source.read(subject, "dlmuse")
    labels = None
    if labels_raw is not None:
        labels = np.asarray(nib.as_closest_canonical(nifti(labels_raw)).dataobj) > 0
        qc = f"{dice(mask, labels):.4f}"
    print(f"{subject}: mask {mask.sum() * 8 / 1000:.0f} ml, MI {value:.4f}, Dice vs DLMUSE "
          f"{qc or 'n/a (no labels)'}, {time.time() - start:.0f} s", flush=True)
    if qc_png is not None:
        quicklook(data, mask, labels, qc_png / f"{subject}.png", f"{subject} Dice {qc or 'n/a'}")

    scale = float(np.percentile(data[mask], PERCENTILE))
    commit, path = source_of(subject)
    row = {"subject": subject, "source_sha256": digest, "source_commit": commit, "source_path": path,
           "source_p999": f"{scale:.2f}", "mask_ml": f"{mask.sum() * 8 / 1000:.0f}", "mask_dice_dlmuse": qc}
    if out is None:
        return row

    box = np.argwhere(mask)
    lo = np.maximum(box.min(axis=0) - MARGIN, 0)
    hi = np.minimum(box.max(axis=0) + MARGIN + 1, data.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
    inside = mask[crop]
    t1 = np.clip(np.rint(data[crop] / scale * 255.0), 1, 255) * inside
    nib.save(header_image(t1.astype(np.uint8), affine, f"IXI {subject} T1, 255 = brain p99.9"),
             out / f"{subject}_t1.nii.gz")
    nib.save(header_image(inside.astype(np.uint8), affine, f"IXI {subject} brain mask (MNI152, registered)"),
             out / f"{subject}_brainmask.nii.gz")
    row["shape"] = "x".join(str(n) for n in t1.shape)
    return row


def quicklook(data, mask, labels, file: Path, title: str) -> None:
    """Three central slices with the mask's outline (red) and, if given, the DLMUSE labels' (cyan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for axis, ax in enumerate(axes):
        cut = [slice(None)] * 3
        cut[axis] = centre[axis]
        cut = tuple(cut)
        ax.imshow(data[cut].T, cmap="gray", origin="lower")
        ax.contour(mask[cut].T.astype(float), [0.5], colors="r", linewidths=0.8)
        if labels is not None:
            ax.contour(labels[cut].T.astype(float), [0.5], colors="c", linewidths=0.8)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=60)
    plt.close(fig)


LICENSE = """\
Healthy T1 brains from the IXI dataset
======================================

The files in this folder (*_t1.nii.gz, *_brainmask.nii.gz, datalist.json, subjects.csv) are derived
from the IXI dataset (IXI: Information eXtraction from Images), https://brain-development.org/ixi-dataset/
(the scans of these 16 subjects were acquired at Hammersmith Hospital), made available under the Creative
Commons Attribution-ShareAlike 3.0 licence (CC BY-SA 3.0,
https://creativecommons.org/licenses/by-sa/3.0/). Users of the IXI data are asked to acknowledge
the source of the IXI data.

They were taken from the 2 mm, uint8 copies of IXI in the CBICA/NiChart_Project repository
(https://github.com/CBICA/NiChart_Project; see subjects.csv for the commit and path of each file) and
changed as follows: reoriented to RAS, cropped around the brain, skull-stripped with the MNI ICBM152
2009a brain mask registered to each subject (affine registration of nilearn's MNI152 T1 template;
the template and mask are not included), and rescaled to 0..255 by each subject's 99.9th brain
percentile. scripts/prepare_brains.py in medidiff regenerates them.

These derived files are distributed under the same licence, CC BY-SA 3.0. If you use them,
acknowledge the source of the IXI data (https://brain-development.org/ixi-dataset/).
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a CBICA/NiChart_Project clone, or a folder with t1/ (and dlmuse/)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "brains")
    parser.add_argument("--threads", type=int, default=1, help="ITK threads (1: reproducible)")
    parser.add_argument("--qc-png", type=Path, help="write a quick-look PNG of each mask into this folder")
    parser.add_argument("--qc-only", nargs="+", metavar="SUBJECT",
                        help="register and check these subjects only; write nothing")
    args = parser.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    source = Source(args.source)
    if args.qc_only:
        for subject in args.qc_only:
            prepare(subject, source, None, args.qc_png)
        return

    participants = source.participants()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, subjects in SPLITS.items():
        for subject in subjects:
            row = prepare(subject, source, args.out, args.qc_png)
            rows.append({"subject": subject, "split": split, **participants[subject],
                         "image": f"{subject}_t1.nii.gz", "mask": f"{subject}_brainmask.nii.gz", **row})
    columns = ["subject", "split", "age", "sex", "image", "mask", "shape", "mask_ml", "mask_dice_dlmuse",
               "source_p999", "source_commit", "source_path", "source_sha256"]
    with (args.out / "subjects.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r[k] for k in columns} for r in rows)
    datalist = {"description": "medidiff healthy T1 brains: 16 IXI subjects, 2 mm, RAS, skull-stripped "
                               "(CC BY-SA 3.0, see LICENSE); the test subjects are for evaluation only",
                "licence": "CC BY-SA 3.0",
                **{split: [{"image": f"{s}_t1.nii.gz", "mask": f"{s}_brainmask.nii.gz"} for s in subjects]
                   for split, subjects in SPLITS.items()}}
    (args.out / "datalist.json").write_text(json.dumps(datalist, indent=2) + "\n")
    (args.out / "LICENSE").write_text(LICENSE)
    total = 0
    for file in sorted(args.out.iterdir()):
        total += file.stat().st_size
        print(f"{file.name}: {file.stat().st_size / 1024:.0f} KiB")
    print(f"total {total / 1024 / 1024:.2f} MiB")


if __name__ == "__main__":
    sys.exit(main())
