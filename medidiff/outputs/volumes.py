"""NIfTI volumes written with the geometry of the input they came from (``write_nifti``, ``write_like``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.arrays import to_numpy
from medidiff.errors import DataError

from .files import ArrayLike, PathLike, atomic_write


def affine_of(obj: Any) -> np.ndarray:
    affine = getattr(obj, "affine", obj)
    affine = to_numpy(affine).astype(np.float64)
    if affine.shape != (4, 4):
        raise DataError(f"expected a 4 x 4 affine, got shape {affine.shape}")
    return affine


def _output_dtype(array: np.ndarray, dtype: Any) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype)
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for cand in (np.uint8, np.int16, np.int32):
            if np.iinfo(cand).min <= lo and hi <= np.iinfo(cand).max:
                return np.dtype(cand)
        return np.dtype(np.int64)
    return np.dtype(np.float32)


def write_nifti(
    data: ArrayLike,
    path: PathLike,
    affine: Any = None,
    *,
    dtype: Any = None,
    protected: Iterable[PathLike] = (),
    xform_code: int = 1,
    display: tuple[float, float] | None = None,
    description: str | None = None,
) -> Path:
    """Write a volume as NIfTI with the given affine, atomically.

    Args:
        data: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` array or tensor (or a 2D ``(X, Y)`` slice). One
            channel is squeezed; several channels are stored as the 4th NIfTI dimension.
        path: the ``.nii`` or ``.nii.gz`` file to write.
        affine: voxel-to-RAS affine (4 x 4 array/tensor, or an object with ``.affine`` such as a
            MetaTensor); ``None`` takes ``data.affine``.
        dtype: stored type; by default float32 for maps, uint8 for masks (bool) and small labels.
        protected: input paths that must not be overwritten.
        xform_code: the NIfTI qform and sform code: 1 (scanner anatomical) by default; 0 marks a volume
            whose position in the patient is unknown (only the affine's voxel sizes, kept in pixdim, count).
        display: ``(cal_min, cal_max)``, the display range viewers open the volume with (e.g. a heatmap
            from its threshold up, so only flagged values show).
        description: the header's ``descrip`` text (80 characters at most are kept).

    Returns:
        ``path`` as a ``Path``.
    """
    import nibabel as nib

    if affine is None:
        if not hasattr(data, "affine"):
            raise DataError("no affine given for a plain array", where=path,
                            fix="pass affine=... or a MetaTensor, or use write_like(data, reference, path).")
        affine = data.affine
    affine = affine_of(affine)
    array = to_numpy(data)
    if array.ndim == 4:  # (C, X, Y, Z)
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    elif array.ndim not in (2, 3):
        raise DataError(f"cannot write an array of shape {array.shape} as a volume", where=path,
                        fix="pass (X, Y, Z) or (C, X, Y, Z).")
    array = np.ascontiguousarray(array.astype(_output_dtype(array, dtype), copy=False))
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=int(xform_code))
    image.set_sform(affine, code=int(xform_code))
    image.header.set_xyzt_units("mm")
    if display is not None:
        image.header["cal_min"], image.header["cal_max"] = float(display[0]), float(display[1])
    if description is not None:
        image.header["descrip"] = description.encode("ascii", "replace")[:79]
    with atomic_write(path, protected) as tmp:
        nib.save(image, tmp)
    return Path(path)


def spatial_shape(obj: Any, ndim: int = 3) -> tuple[int, ...]:
    return tuple(int(s) for s in obj.shape[-ndim:])


def write_like(
    data: ArrayLike,
    reference: Any,
    path: PathLike,
    *,
    dtype: Any = None,
    protected: Iterable[PathLike] = (),
    display: tuple[float, float] | None = None,
    description: str | None = None,
) -> Path:
    """Write ``data`` as NIfTI with the geometry (affine) of ``reference``, so it overlays the input.

    A reference whose position in the patient is unknown (``geometry_known`` False in its metadata: a DICOM
    without a patient position, a NIfTI with qform and sform codes 0) gives a result marked the same way
    (codes 0), so no viewer places it in the patient.

    Args:
        data: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` on the reference's grid.
        reference: the input's ``MetaTensor`` ``(C, X, Y, Z)`` (or any object with ``.affine`` and
            ``.shape``, e.g. a nibabel image).
        path: the file to write.
        dtype: stored type (default: float32 for maps, uint8 for masks).
        protected: input paths that must not be overwritten.
        display, description: see :func:`write_nifti`.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        DataError: the data's spatial shape differs from the reference's.
    """
    if spatial_shape(data) != spatial_shape(reference):
        raise DataError(
            f"result shape {tuple(data.shape)} does not match the input grid {spatial_shape(reference)}",
            where=path,
            fix="map the result back with medidiff.cases.restore(...) first.",
        )
    return write_nifti(data, path, reference, dtype=dtype, protected=protected,
                       xform_code=1 if geometry_known(reference) else 0, display=display, description=description)


def geometry_known(reference: Any) -> bool:
    """Whether a volume's affine places it in the patient: False for a MetaTensor whose metadata says so
    (``geometry_known``) and for a nibabel image with qform and sform codes 0."""
    meta = getattr(reference, "meta", None)
    if isinstance(meta, dict) and "geometry_known" in meta:
        return bool(meta["geometry_known"])
    header = getattr(reference, "header", None)
    if header is not None and hasattr(header, "get_sform"):
        return bool(int(header["sform_code"]) or int(header["qform_code"]))
    return True
