"""Small offline sample data: the bundled MNI152 brain, CT-like and Shepp-Logan phantoms, pydicom's files.

The brain sample lives in the repository's ``data/`` folder (see ``data/README.md`` for provenance and
licence; ``scripts/make_sample_data.py`` regenerates it from nilearn). Volumes are MONAI ``MetaTensor``
s shaped ``(C, X, Y, Z)`` with their RAS affine, as medidiff's readers return them. Phantoms are plain
tensors ``(N, 1, H, W)``; CT-like phantoms are in Hounsfield units.

Nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, ResizeWithPadOrCrop
from monai.utils import convert_to_tensor

from medidiff.errors import DataError

from .paths import CHECKOUT

BRAIN_FILES = {
    "t1": "mni152_2mm_t1.nii.gz",
    "mask": "mni152_2mm_brainmask.nii.gz",
    "tissue": "mni152_2mm_tissue.nii.gz",
}
#: Tissue labels of :func:`tissue_labels`.
TISSUE_LABELS = {0: "background", 1: "csf", 2: "grey matter", 3: "white matter"}
#: Default share of a slice's area that must be brain for the slice to count as a brain slice.
MIN_BRAIN_FRACTION = 0.2


def data_dir() -> Path:
    """The repository's ``data/`` folder holding the bundled sample files.

    Returns:
        Its path.

    Raises:
        DataError: the folder or one of the brain sample files is missing.
    """
    folder = CHECKOUT / "data"
    missing = [name for name in BRAIN_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"bundled sample data not found ({', '.join(missing)})",
            where=folder,
            fix="use a source checkout of medidiff, or regenerate the files with "
            "`pip install nilearn && python scripts/make_sample_data.py`.",
        )
    return folder


@lru_cache(maxsize=8)
def _load(kind: str, dtype: type) -> MetaTensor:
    loader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=dtype)
    return loader(str(data_dir() / BRAIN_FILES[kind]))


def brain_volume() -> MetaTensor:
    """The bundled T1 brain: MNI ICBM152 2009a template, skull-stripped, 2 mm, cropped to 80 x 96 x 80.

    Returns:
        A float32 ``MetaTensor`` ``(1, 80, 96, 80)`` in template units (0..255), RAS, with its affine
        (2 mm voxels, world coordinates in MNI152 mm).
    """
    return _load("t1", np.float32).clone()


def brain_mask() -> MetaTensor:
    """The brain mask of :func:`brain_volume` on the same grid.

    Returns:
        A uint8 ``MetaTensor`` ``(1, 80, 96, 80)`` of 0/1 with the same affine.
    """
    return _load("mask", np.uint8).clone()


def tissue_labels() -> MetaTensor:
    """Tissue labels of :func:`brain_volume` (see ``TISSUE_LABELS``), most probable class per voxel.

    Returns:
        A uint8 ``MetaTensor`` ``(1, 80, 96, 80)``: 0 background, 1 CSF, 2 grey, 3 white matter.
    """
    return _load("tissue", np.uint8).clone()


def brain_slice_indices(axis: int = 2, min_fraction: float = MIN_BRAIN_FRACTION) -> list[int]:
    """Indices of the slices along ``axis`` whose brain-mask share of the slice area is at least ``min_fraction``.

    With the defaults (axial, 0.2) these are the 58 axial slices from the lower cerebellum to the high
    convexity; the thin caps at both ends, mostly edge, are left out.

    Args:
        axis: spatial axis of the volume (0 = x, sagittal; 1 = y, coronal; 2 = z, axial).
        min_fraction: least brain share of a slice.

    Returns:
        Sorted slice indices.
    """
    mask = brain_mask()[0].float()
    other = tuple(d for d in range(3) if d != axis)
    fraction = mask.mean(dim=other)
    return [int(i) for i in torch.nonzero(fraction >= min_fraction).flatten()]


def brain_slices(
    axis: int = 2,
    size: Sequence[int] | None = None,
    min_fraction: float = MIN_BRAIN_FRACTION,
    indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2D slices of the bundled brain and of its mask, for training and demos.

    Slices keep the array order of the volume (for axial slices: ``(X, Y)`` = right-left by
    posterior-anterior, 80 x 96 at 2 mm).

    Args:
        axis: spatial axis to slice along (2 = axial).
        size: in-plane size to pad or crop to (centred, no interpolation); ``None`` keeps the native size.
        min_fraction: least brain share for a slice to be kept (see :func:`brain_slice_indices`).
        indices: explicit slice indices instead of the brain slices.

    Returns:
        ``(images, masks)``: float32 images ``(N, 1, H, W)`` in template units and bool masks of the same
        shape, as plain tensors.
    """
    if indices is None:
        indices = brain_slice_indices(axis, min_fraction)
    index = torch.as_tensor(list(indices), dtype=torch.long)
    volume = brain_volume().as_tensor()[0]
    mask = brain_mask().as_tensor()[0]
    images = volume.index_select(axis, index).movedim(axis, 0).unsqueeze(1)
    masks = mask.index_select(axis, index).movedim(axis, 0).unsqueeze(1)
    if size is not None:
        resize = ResizeWithPadOrCrop(spatial_size=tuple(size), mode="constant")  # slices as channels
        images = convert_to_tensor(resize(images[:, 0]), track_meta=False)[:, None]
        masks = convert_to_tensor(resize(masks[:, 0]), track_meta=False)[:, None]
    return images.float().contiguous(), masks.bool().contiguous()


def shepp_logan(n: int = 128) -> torch.Tensor:
    """The modified Shepp-Logan phantom (scikit-image's), resized to ``n x n`` with anti-aliasing.

    Args:
        n: side length in pixels.

    Returns:
        A float32 tensor ``(1, n, n)`` with values in ``[0, 1]``.
    """
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    image = shepp_logan_phantom()
    if image.shape != (n, n):
        image = resize(image, (n, n), order=1, anti_aliasing=True, preserve_range=True)
    return torch.from_numpy(np.clip(image, 0.0, 1.0).astype(np.float32))[None]


# (low, high) ranges in HU of the phantom's tissues.
_HU = {"air": -1000.0, "fat": (-120.0, -80.0), "soft": (20.0, 60.0), "organ": (-10.0, 90.0),
       "lung": (-900.0, -800.0), "bone": (400.0, 1200.0)}


def _ellipse(grid_y, grid_x, cy, cx, ry, rx, angle) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u = ((grid_x - cx) * c + (grid_y - cy) * s) / rx
    v = (-(grid_x - cx) * s + (grid_y - cy) * c) / ry
    return u * u + v * v <= 1.0


def random_ellipses(
    n: int,
    size: Sequence[int] = (128, 128),
    seed: int | np.random.Generator | None = 0,
    noise_hu: float = 0.0,
) -> torch.Tensor:
    """Random CT-like body-section phantoms built from ellipses, in Hounsfield units.

    Each phantom is air (-1000 HU) around a body ellipse with a fat layer, soft tissue, two lungs in most
    of them, a few organs and lesion-like spots, and bones (a spine and some ribs/pelvis-like ellipses).

    Args:
        n: number of phantoms.
        size: ``(H, W)`` in pixels.
        seed: an int seed or a NumPy ``Generator``; the same seed gives the same phantoms.
        noise_hu: standard deviation of added Gaussian noise in HU (0 for none).

    Returns:
        A float32 tensor ``(n, 1, H, W)`` in HU.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    h, w = int(size[0]), int(size[1])
    gy, gx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")

    def uniform(key):
        return rng.uniform(*_HU[key])

    noise_rng = np.random.default_rng(rng.integers(2**63))  # own stream: noise leaves the shapes alone
    out = np.empty((n, 1, h, w), dtype=np.float32)
    for k in range(n):
        img = np.full((h, w), _HU["air"], dtype=np.float64)
        ry, rx = rng.uniform(0.55, 0.8), rng.uniform(0.75, 0.95)
        angle = rng.uniform(-0.1, 0.1)
        body = _ellipse(gy, gx, 0, 0, ry, rx, angle)
        img[body] = uniform("fat")
        t = rng.uniform(0.05, 0.12)
        img[_ellipse(gy, gx, 0, 0, ry - t, rx - t, angle)] = uniform("soft")
        if rng.random() < 0.7:  # thorax-like: two lungs
            for side in (-1, 1):
                lung = _ellipse(gy, gx, rng.uniform(-0.2, 0.0) * ry, side * rx * rng.uniform(0.4, 0.5),
                                ry * rng.uniform(0.45, 0.6), rx * rng.uniform(0.25, 0.33), rng.uniform(-0.3, 0.3))
                img[lung & body] = uniform("lung")
        for _ in range(rng.integers(2, 6)):  # organs and spots
            r = rng.uniform(0.04, 0.3)
            organ = _ellipse(gy, gx, rng.uniform(-0.5, 0.5) * ry, rng.uniform(-0.6, 0.6) * rx,
                             r * rng.uniform(0.6, 1.0), r, rng.uniform(0, np.pi))
            img[organ & body] = uniform("organ")
        spine_y = ry * rng.uniform(0.55, 0.7)
        img[_ellipse(gy, gx, spine_y, 0, 0.09 * ry, 0.1 * rx, 0) & body] = uniform("bone")
        for _ in range(rng.integers(0, 4)):
            r = rng.uniform(0.02, 0.06)
            side = rng.choice([-1, 1])
            bone = _ellipse(gy, gx, rng.uniform(-0.6, 0.6) * ry, side * rng.uniform(0.6, 0.8) * rx,
                            r, r * rng.uniform(1.0, 2.5), rng.uniform(0, np.pi))
            img[bone & body] = uniform("bone")
        if noise_hu > 0:
            img = img + noise_rng.normal(0.0, noise_hu, img.shape)
        out[k, 0] = img
    return torch.from_numpy(out)


def dicom_examples() -> dict[str, Path]:
    """Paths of DICOM files that ship with pydicom (and pydicom-data when installed); nothing is downloaded.

    Returns:
        A dict with the keys present among ``"ct_slice"`` (CT_small.dcm, one 128 x 128 CT slice),
        ``"mr_slice"`` (MR_small.dcm), ``"mr_multiframe"`` (emri_small.dcm, pydicom-data) and
        ``"ct_series"`` (a folder of five 16 x 16 CT slices 2.5 mm apart).

    Raises:
        DataError: pydicom's test files are missing.
    """
    from pydicom.data import get_testdata_file

    found: dict[str, Path] = {}
    for key, name in (("ct_slice", "CT_small.dcm"), ("mr_slice", "MR_small.dcm"),
                      ("mr_multiframe", "emri_small.dcm")):
        path = get_testdata_file(name, download=False)
        if path:
            found[key] = Path(path)
    if "ct_slice" not in found:
        raise DataError("pydicom's test files were not found", where="pydicom.data",
                        fix="reinstall pydicom (`pip install --force-reinstall pydicom`).")
    series = found["ct_slice"].parent / "dicomdirtests" / "98892001" / "CT5N"
    if series.is_dir():
        found["ct_series"] = series
    return found


#: Splits of the bundled IXI brains (``data/brains/subjects.csv``).
BRAIN_SPLITS = ("training", "validation", "test")


def brains_dir() -> Path:
    """The repository's ``data/brains/`` folder: 16 healthy IXI T1 brains (see ``data/README.md``).

    Each subject has ``<subject>_t1.nii.gz`` (2 mm, RAS, skull-stripped, uint8 scaled to the brain's
    99.9th percentile) and ``<subject>_brainmask.nii.gz``; ``datalist.json`` is a MONAI datalist of the
    splits that :func:`medidiff.data.discover.discover` reads. The files are CC BY-SA 3.0 (IXI; see the
    folder's ``LICENSE``). The test subjects, IXI012-HH-1211 among them, are for evaluation only.

    Returns:
        Its path.

    Raises:
        DataError: the folder or its ``subjects.csv`` is missing.
    """
    folder = CHECKOUT / "data" / "brains"
    if not (folder / "subjects.csv").is_file():
        raise DataError(
            "bundled IXI brains not found (data/brains/subjects.csv)",
            where=folder,
            fix="use a source checkout of medidiff, or regenerate them with "
            "`python scripts/prepare_brains.py <CBICA/NiChart_Project clone>`.",
        )
    return folder


def brain_subjects(split: str | None = None) -> list[dict]:
    """The bundled IXI brains listed in ``data/brains/subjects.csv``, in its order.

    Args:
        split: ``"training"``, ``"validation"`` or ``"test"``; ``None`` for all 16 subjects.

    Returns:
        One dict per subject: ``subject`` (IXI id), ``split``, ``image`` and ``mask`` (paths of the T1 and
        of its brain mask), ``age`` (years, float) and ``sex`` (``"M"``/``"F"``).

    Raises:
        DataError: the files are missing or ``split`` is not one of the splits.
    """
    import csv

    if split is not None and split not in BRAIN_SPLITS:
        raise DataError(f"unknown split {split!r}", where="brain_subjects",
                        fix=f"use one of {', '.join(BRAIN_SPLITS)} or None.")
    folder = brains_dir()
    with (folder / "subjects.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{"subject": row["subject"], "split": row["split"], "image": folder / row["image"],
             "mask": folder / row["mask"], "age": float(row["age"]), "sex": row["sex"]}
            for row in rows if split is None or row["split"] == split]
