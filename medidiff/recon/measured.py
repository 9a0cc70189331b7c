"""Measured inputs of the recon task: fastMRI HDF5 k-space and CT sinograms (``.npz``), read into problems.

Owns :func:`read_kspace`, :func:`kspace_problem`, :func:`read_sinogram` and :func:`sinogram_problem`.

- fastMRI HDF5 (Zbontar et al. 2018, the dataset's layout): a ``kspace`` dataset, complex, slices x
  [coils x] rows x columns; an optional ``mask`` dataset over the columns when the k-space is already
  undersampled (fastMRI's test files); otherwise the fully sampled k-space is masked retrospectively
  (``--acceleration``) and its root-sum-of-squares image is the reference. The image's first two array
  axes are the k-space's rows and columns; slices are the third.
- Sinograms: an ``.npz`` with ``sinogram`` (views x detectors, or slices x views x detectors) of line
  integrals ``-log(I / I0)``, ``angles_deg`` (scikit-image's ``radon`` convention) and optionally
  ``pixel_size_mm`` (default 1; detector bins as wide as pixels). The image is ``detectors x detectors``
  pixels of that size, reconstructed inside the inscribed circle, in HU (``mu_water = MU_WATER``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medidiff.errors import DataError

from . import masks
from .ct import ParallelBeamCT
from .mri import ifft2c, rss
from .problems import MU_WATER, Problem, ct_problem, mri_problem

__all__ = ["read_kspace", "kspace_problem", "read_sinogram", "sinogram_problem", "is_kspace", "is_sinogram"]


def is_kspace(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file (fastMRI k-space)."""
    return Path(path).suffix.lower() in (".h5", ".hdf5")


def is_sinogram(path: str | Path) -> bool:
    """Whether ``path`` is an ``.npz`` sinogram."""
    return Path(path).suffix.lower() == ".npz"


def read_kspace(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fastMRI k-space: ``(slices, coils, rows, columns)`` complex64 and the column mask ``(columns,)`` if stored.

    Raises:
        DataError: not HDF5, no ``kspace`` dataset, not complex, or a mask of the wrong length.
    """
    try:
        import h5py
    except ImportError:  # pragma: no cover - a dependency
        raise DataError("reading fastMRI k-space needs h5py", fix="pip install h5py.") from None
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "kspace" not in f:
                raise DataError("no 'kspace' dataset in the HDF5 file", where=path,
                                fix="give a fastMRI file (kspace: slices x [coils x] rows x columns, complex).")
            k = np.asarray(f["kspace"])
            mask = np.asarray(f["mask"]) if "mask" in f else None
    except OSError as e:
        raise DataError(f"cannot read the HDF5 file ({e})", where=path) from None
    if not np.iscomplexobj(k) or k.ndim not in (3, 4):
        raise DataError(f"kspace must be complex, slices x [coils x] rows x columns; got {k.dtype} {k.shape}",
                        where=path)
    kspace = torch.from_numpy(k.astype(np.complex64))
    if kspace.ndim == 3:
        kspace = kspace[:, None]
    if mask is not None:
        mask = torch.from_numpy(np.asarray(mask).astype(np.float32).reshape(-1))
        if mask.numel() != kspace.shape[-1]:
            raise DataError(f"mask has {mask.numel()} entries for {kspace.shape[-1]} k-space columns", where=path)
    return kspace, mask


def kspace_problem(path: str | Path, *, acceleration: float = 4, center_fraction: float | None = None,
                   mask: str = "random", seed: int = 0) -> tuple[Problem, dict[str, Any]]:
    """The problem of a fastMRI file: its own mask when stored, else retrospective undersampling.

    Args:
        path: the ``.h5`` file.
        acceleration, center_fraction, mask, seed: the retrospective mask (``masks.make_mask``).

    Returns:
        ``(problem, info)``: the slices as one stack (reference: the fully sampled RSS image when the file is
        fully sampled) and what was read.
    """
    kspace, columns = read_kspace(path)
    shape = tuple(kspace.shape[-2:])
    if columns is not None:
        m = masks.column_mask(shape, columns)
        reference = None
        settings = {"mask": "stored"}
    else:
        m = masks.make_mask(shape, mask, acceleration, center_fraction, seed)
        reference = rss(ifft2c(kspace))
        settings = {"mask": mask, "acceleration": acceleration, "center_fraction": center_fraction, "seed": seed}
    problem = mri_problem(kspace * m, m, reference=reference, settings=settings)
    return problem, {"slices": int(kspace.shape[0]), "coils": int(kspace.shape[1]), "shape": list(shape)}


def read_sinogram(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(sinogram (slices, 1, views, detectors) float64, angles_deg, pixel_size_mm)`` from an ``.npz``.

    Raises:
        DataError: missing entries or shapes that do not fit.
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the sinogram file ({e})", where=path) from None
    missing = [k for k in ("sinogram", "angles_deg") if k not in data]
    if missing:
        raise DataError(f"the .npz lacks {', '.join(missing)}", where=path,
                        fix="save sinogram (views x detectors) and angles_deg (one per view) with numpy.savez.")
    sino = np.asarray(data["sinogram"], dtype=np.float64)
    angles = np.asarray(data["angles_deg"], dtype=np.float64).reshape(-1)
    pixel = float(data["pixel_size_mm"]) if "pixel_size_mm" in data else 1.0
    if sino.ndim == 2:
        sino = sino[None]
    if sino.ndim != 3 or sino.shape[1] != angles.size:
        raise DataError(f"sinogram of shape {sino.shape} does not have one row per angle ({angles.size} angles)",
                        where=path, fix="store sinogram as views x detectors (or slices x views x detectors).")
    if not pixel > 0:
        raise DataError(f"pixel_size_mm must be positive, got {pixel}", where=path)
    return torch.from_numpy(sino)[:, None], torch.from_numpy(angles), pixel


def sinogram_problem(path: str | Path, *, window: tuple[float, float] = (-1000.0, 1000.0)
                     ) -> tuple[Problem, dict[str, Any]]:
    """The problem of a measured sinogram: a ``detectors x detectors`` image inside the inscribed circle.

    Returns:
        ``(problem, info)``: the problem (no reference) and what was read (``pixel_size_mm``, shape).
    """
    sino, angles, pixel = read_sinogram(path)
    n = sino.shape[-1]
    try:
        op = ParallelBeamCT((n, n), angles, circle=True)
    except ValueError as e:
        raise DataError(f"the sinogram's geometry cannot be used: {e}", where=Path(path)) from None
    y = sino / (MU_WATER * pixel)  # line integrals of mu / mu_water in pixel units
    problem = ct_problem(y, op, window=window, settings={"pixel_size_mm": pixel, "measured": True})
    return problem, {"slices": int(sino.shape[0]), "pixel_size_mm": pixel, "shape": [n, n]}
