"""Reading DICOM: one series' pixels into a ``(C, X, Y, Z)`` volume in modality units, with its RAS affine.

``read_series`` reads the files of one series (single- or multi-frame), checks that compressed pixel
data can be decoded (naming the package to install when it cannot), applies RescaleSlope/Intercept and
places each image by the series' geometry. Headers, series grouping and summaries live in
``medidiff.data.dicom_headers``; slice order, the axis convention (``X`` = column index, ``Y`` = row
index, ``Z`` along the slice normal) and the affine (LPS converted to RAS) in
``medidiff.data.dicom_geometry``. Their public names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

from medidiff.errors import DataError

from .dicom_geometry import LPS_TO_RAS, StackGeometry, series_geometry
from .dicom_headers import (
    DICOMDIR_SOP_CLASS,
    PIXEL_KEYWORDS,
    REEXPORT_FIX,
    SeriesInfo,
    dicomdir_files,
    frame_count,
    group_series,
    image_problem,
    int_or,
    is_dicomdir,
    read_dataset,
    read_header,
    series_name,
    sop_class_name,
    summarize,
)
from .limits import check_image_size

__all__ = [
    "DECODER_FIX",
    "DICOMDIR_SOP_CLASS",
    "LPS_TO_RAS",
    "PIXEL_KEYWORDS",
    "REEXPORT_FIX",
    "SeriesInfo",
    "StackGeometry",
    "dicomdir_files",
    "group_series",
    "image_problem",
    "is_dicomdir",
    "read_header",
    "read_series",
    "series_geometry",
    "series_name",
    "summarize",
]

DECODER_FIX = (
    "install the optional image decoders: `pip install 'medidiff[decoders]'` "
    "(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg) or `pip install python-gdcm`, "
    "or export the series uncompressed."
)


def _check_decodable(ds: Dataset, path: Path) -> None:
    """Raises a DataError naming the package to install when compressed pixel data cannot be decoded."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        return
    if not syntax.is_transfer_syntax:
        raise DataError(f"names an unknown transfer syntax {str(syntax)!r}.", where=path,
                        fix="export the file again (uncompressed or with a standard transfer syntax).")
    if not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as err:
        raise DataError(f"uses the transfer syntax '{syntax.name}', which no decoder supports.", where=path,
                        fix="convert it to uncompressed DICOM (e.g. `gdcmconv --raw`).") from err
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DataError(f"is compressed ('{syntax.name}') and no decoder for it is installed ({missing}).",
                        where=path, fix=DECODER_FIX)


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Decoded pixel data as ``(frames, rows, columns, samples)``."""
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise DataError(f"has no pixel data ({sop_class_name(ds)}).", where=path,
                        fix="point at image files only; this file is not an image.")
    _check_decodable(ds, path)
    try:
        arr = ds.pixel_array
    except Exception as err:
        text = str(err)
        if "missing dependencies" in text or "plugin" in text:
            raise DataError(f"cannot be decoded ({text.splitlines()[0]}).", where=path, fix=DECODER_FIX) from err
        raise DataError(f"has damaged or truncated pixel data ({text.splitlines()[0]}).", where=path,
                        fix=REEXPORT_FIX) from err
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = frame_count(ds)
    if frames == 1:
        arr = arr[None]
    if samples == 1:
        arr = arr[..., None]
    expected = (frames, int(ds.Rows), int(ds.Columns), samples)
    if arr.shape != expected:
        raise DataError(f"has pixel data of shape {arr.shape} where its header says (frames, rows, columns, "
                        f"samples) = {expected}.", where=path, fix=REEXPORT_FIX)
    return arr


def _check_claimed_size(members: Sequence[tuple[Path, Dataset]], where: str | Path) -> None:
    """Refuse a series whose headers claim more pixels than the size limit, before geometry or decoding.

    Each file's ``Rows x Columns x NumberOfFrames x SamplesPerPixel`` is checked (naming the file), then the
    volume's total as read (float32).
    """
    total = 0
    for path, ds in members:
        dims = [frame_count(ds), int_or(ds.get("Rows"), 0), int_or(ds.get("Columns"), 0),
                int_or(ds.get("SamplesPerPixel"), 1) or 1]
        check_image_size(dims, 4, path, "an image (frames x Rows x Columns x samples)")
        total += frame_count(ds) * dims[1] * dims[2] * dims[3]
    check_image_size([total], 4, where, "a series (all its pixels)")


def read_series(paths: Sequence[str | Path], where: str | Path | None = None
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reads one DICOM series (single- or multi-frame files) into a volume.

    Args:
        paths: the files of one series, in any order.
        where: what to name in errors (default: the first file's folder).

    Returns:
        ``(array, affine, info)``: ``array`` is float32 ``(C, X, Y, Z)`` in modality units (CT in HU:
        RescaleSlope/Intercept applied), ``affine`` the 4x4 voxel-to-RAS affine, and ``info`` a dict with
        ``modality``, ``series`` (:class:`SeriesInfo`), ``problems`` and ``geometry``: ``{"known": bool,
        "source": str}`` (``known`` is False when the images have no position in the patient; the affine
        then only keeps voxel order and spacing, see :class:`StackGeometry`).

    Raises:
        DataError: a file is unreadable, truncated, compressed without a decoder, or the images do not
            form one regular volume.
    """
    paths = [Path(p) for p in paths]
    where = where if where is not None else paths[0].parent
    members = []
    for path in paths:
        ds = read_dataset(path, header_only=False)
        reason = image_problem(ds)
        if reason:
            raise DataError(f"{reason}.", where=path, fix="point at image files only.")
        members.append((path, ds))
    _check_claimed_size(members, where)
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in members}
    if len(uids) > 1:
        raise DataError(f"mixes {len(uids)} series.", where=where,
                        fix="read one series at a time (discover() groups files by series).")
    geometry = series_geometry(members, where)
    datasets = dict(members)
    decoded: dict[Path, np.ndarray] = {}
    samples = int(members[0][1].get("SamplesPerPixel", 1) or 1)
    volume = np.empty((samples, *geometry.shape), dtype=np.float32)
    for z, ((path, frame), (slope, intercept)) in enumerate(zip(geometry.order, geometry.rescale)):
        if path not in decoded:
            decoded[path] = _pixels(datasets[path], path)
        image = decoded[path][frame or 0].astype(np.float32)
        if slope != 1.0 or intercept != 0.0:
            image = image * np.float32(slope) + np.float32(intercept)
        volume[:, :, :, z] = image.transpose(2, 1, 0)
    info = {
        "modality": str(members[0][1].get("Modality", "") or ""),
        "series": summarize(members),
        "problems": geometry.problems,
        "geometry": {"known": geometry.known, "source": geometry.source},
    }
    return volume, geometry.affine, info
