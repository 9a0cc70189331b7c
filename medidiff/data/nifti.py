"""Reading NIfTI volumes, with the checks that turn bad files into clear errors.

Arrays follow the layout of :mod:`medidiff.data.dicom`: channel-first ``(C, X, Y, Z)`` with a 4x4
voxel-to-RAS affine (the NIfTI convention; voxels are kept in the order they are stored, the affine
says where they are). A 2D image ``(X, Y)`` becomes a single slice ``(1, X, Y, 1)``. Writing is
:func:`medidiff.outputs.write_nifti`'s job.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, HeaderTypeError

from medidiff.errors import DataError

from .limits import check_image_size, max_image_bytes

__all__ = ["NIFTI_SUFFIXES", "NO_WORLD_GEOMETRY", "is_nifti", "nifti_geometry", "nifti_stem", "nifti_world_geometry",
           "read_nifti"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_DAMAGED = (ImageFileError, HeaderDataError, HeaderTypeError, OSError, EOFError, zlib.error, ValueError,
            OverflowError)
#: The problem reported for a NIfTI file whose qform and sform codes are both 0.
NO_WORLD_GEOMETRY = ("no world geometry (qform and sform codes 0): voxel sizes only, the position in the patient "
                     "is unknown")
_REEXPORT = "export or download the file again (test a .gz file with `gzip -t FILE`)."


def is_nifti(path: str | Path) -> bool:
    """Whether a path's name ends in ``.nii`` or ``.nii.gz``."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """The file name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _open(path: Path) -> nib.Nifti1Image:
    if path.is_symlink() and not path.exists():
        raise DataError("is a broken symbolic link.", where=path, fix="point the link at an existing file.")
    if not path.exists():
        raise DataError("does not exist.", where=path, fix="check the path.")
    if path.is_dir():
        raise DataError("is a folder where a NIfTI file was expected.", where=path,
                        fix="point at a .nii or .nii.gz file.")
    if path.stat().st_size == 0:
        raise DataError("is an empty file (0 bytes).", where=path, fix=_REEXPORT)
    try:
        img = nib.load(path)
        shape = img.header.get_data_shape()
        dtype = img.header.get_data_dtype()
    except _DAMAGED as err:
        raise DataError(f"is not a readable NIfTI file ({type(err).__name__}: {err}).", where=path,
                        fix=_REEXPORT) from err
    if dtype.kind not in "biuf":
        raise DataError(f"stores its voxels as {dtype} (NIfTI datatype {int(img.header['datatype'])}), not as "
                        "numbers medidiff reads as intensities.", where=path,
                        fix="save it with a real-valued datatype (e.g. float32 or int16; RGB and complex images "
                            "are not read).")
    check_image_size(shape, 4, path, "an image")  # the header's claim, before any voxel is read
    return img


def _open_verified(path: Path) -> nib.Nifti1Image:
    """Opens a NIfTI file; a ``.gz`` file is decompressed whole first so that its CRC is checked.

    nibabel alone stops reading at the end of the voxel data, so damage inside a gzip stream can go
    unnoticed; reading to the end of the stream makes gzip verify the checksum. A stream that inflates to
    more than the image size limit (a "gzip bomb") is refused as it is read.
    """
    img = _open(path)
    if not str(path).lower().endswith(".gz"):
        return img
    header = img.header
    expected = max(int(header.get_data_offset()), 352) + int(np.prod(header.get_data_shape(), dtype=np.float64)
                                                    * header.get_data_dtype().itemsize)
    limit = min(max_image_bytes(), expected + (expected >> 4) + (64 << 20))  # room for extensions, trailing bytes
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read(limit + 1)
            if len(raw) > limit:
                raise DataError(f"inflates to more than {limit} bytes where its header claims {expected}; it "
                                "was not read further (a damaged file or a gzip bomb).", where=path, fix=_REEXPORT)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"is a corrupt gzip file ({type(err).__name__}: {err}).", where=path,
                        fix=_REEXPORT) from err
    try:
        return type(img).from_bytes(raw)
    except _DAMAGED as err:
        raise DataError(f"is not a readable NIfTI file ({type(err).__name__}: {err}).", where=path,
                        fix=_REEXPORT) from err


def _checked_affine(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    affine = np.asarray(img.affine, dtype=np.float64)
    linear = affine[:3, :3]
    singular = not np.isfinite(affine).all()
    if not singular:
        sv = np.linalg.svd(linear, compute_uv=False)
        singular = sv.min() <= 1e-6 * max(sv.max(), 1e-12)
    if singular:
        raise DataError(
            "has a singular or invalid affine (voxel sizes of zero, or a degenerate qform/sform); "
            "its voxels have no position in space.",
            where=path,
            fix="set a valid sform/qform (e.g. nibabel `img.set_sform(affine, code=1)`, or `fslorient`), "
                "or export the image again.")
    return affine


def _spatial_shape(shape: tuple[int, ...], path: Path, multichannel: bool) -> tuple[tuple[int, ...], int]:
    """``((X, Y, Z), channels)`` for a stored shape, or a DataError."""
    if len(shape) < 2 or 0 in shape:
        raise DataError(f"is an empty image (shape {tuple(shape)}).", where=path,
                        fix="export the image again; a volume needs at least one voxel along each axis.")
    dims = tuple(shape) + (1,) * max(0, 3 - len(shape))
    extra = dims[3:]
    channels = int(np.prod(extra)) if extra else 1
    if channels > 1 and not multichannel:
        raise DataError(
            f"is {len(dims)}D (shape {tuple(shape)}) where a 3D volume is expected.",
            where=path,
            fix="give one 3D file per channel (nnU-Net style `case_0000.nii.gz`, `case_0001.nii.gz`), "
                "load it with multichannel=True, or split it (e.g. `fslsplit`).")
    return dims[:3], channels


def nifti_geometry(path: str | Path, multichannel: bool = False) -> tuple[tuple[int, int, int], np.ndarray]:
    """The spatial shape and affine of a NIfTI file, from its header only.

    Args:
        path: the file.
        multichannel: accept 4D/5D files whose extra axes are channels.

    Returns:
        ``((X, Y, Z), affine)``.

    Raises:
        DataError: the file is missing, damaged, empty or has a singular affine.
    """
    path = Path(path)
    img = _open(path)
    spatial, _ = _spatial_shape(img.shape, path, multichannel)
    return spatial, _checked_affine(img, path)


def nifti_world_geometry(path: str | Path) -> bool:
    """Whether a NIfTI file places its voxels in the world: a qform or sform code above 0 (header only).

    A file written with both codes 0 (``medidiff convert`` does so for DICOM without a patient position)
    has only voxel sizes; its affine is nibabel's fallback and says nothing about the patient.

    Args:
        path: the file.

    Returns:
        True when the qform or the sform code is set.

    Raises:
        DataError: the file is missing or damaged.
    """
    header = _open(Path(path)).header
    codes = [int(header.get("qform_code", 0) or 0), int(header.get("sform_code", 0) or 0)]
    return max(codes) > 0


def read_nifti(path: str | Path, multichannel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reads a NIfTI file as a float32 ``(C, X, Y, Z)`` array with its RAS affine.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        multichannel: treat the axes after the third as channels (otherwise a 4D file is an error,
            except for a trailing axis of length 1).

    Returns:
        ``(array, affine)``; scl_slope/scl_inter are applied.

    Raises:
        DataError: missing, empty or damaged file (including a corrupt gzip stream), singular affine,
            zero-size image, 4D where 3D is expected, NaN or Inf voxels.
    """
    path = Path(path)
    img = _open_verified(path)
    spatial, channels = _spatial_shape(img.shape, path, multichannel)
    affine = _checked_affine(img, path)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except _DAMAGED as err:
        raise DataError(f"has damaged or truncated image data ({type(err).__name__}: {err}).", where=path,
                        fix=_REEXPORT) from err
    data = data.reshape(*spatial, channels)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(f"has {bad} NaN or infinite voxel(s).", where=path,
                        fix="replace them (e.g. numpy.nan_to_num) or mask them, then save the image again.")
    return np.ascontiguousarray(np.moveaxis(data, -1, 0)), affine
