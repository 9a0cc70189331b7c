"""A derived DICOM series written beside a DICOM input, slice for slice at the input's positions.

``write_dicom_series`` writes a derived CT/MR-like image series, which every viewer reads; segmentations are
written as DICOM SEG by ``medidiff.outputs.dicom_seg`` (highdicom). Parametric Maps are not written yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.arrays import to_numpy
from medidiff.errors import DataError

from .files import ArrayLike, PathLike, atomic_write
from .volumes import affine_of


def _lps_positions(ds: Any) -> np.ndarray:
    """World (LPS, mm) position of every pixel of a single-frame DICOM slice, shape ``(rows, cols, 3)``."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    dr, dc = (float(v) for v in ds.PixelSpacing)  # row spacing (between rows), column spacing
    r, c = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
    return ipp + c[..., None] * dc * iop[:3] + r[..., None] * dr * iop[3:]


def values_on_slice(array: np.ndarray, inverse: np.ndarray, ds: Any, where: Any) -> np.ndarray:
    """The values of a 3D ``array`` at every pixel of a single-frame DICOM slice, ``(rows, cols)``.

    Args:
        array: ``(X, Y, Z)`` on a grid whose voxel-to-RAS affine has the inverse ``inverse``.
        inverse: that inverse (RAS to voxel).
        ds: the slice's dataset (geometry tags).
        where: the slice, for messages.

    Raises:
        DataError: the slice is multi-frame, lacks geometry, or does not lie on the grid.
    """
    if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "ImagePositionPatient" not in ds:
        raise DataError("only single-frame slices with ImagePositionPatient can be referenced", where=where,
                        fix="write NIfTI output for multi-frame or non-image sources.")
    ras = _lps_positions(ds) * np.array([-1.0, -1.0, 1.0])
    ijk = ras @ inverse[:3, :3].T + inverse[:3, 3]
    idx = np.rint(ijk).astype(np.int64)
    if np.abs(ijk - idx).max() > 0.05 or (idx < 0).any() or (idx >= np.array(array.shape)).any():
        raise DataError("a source slice does not lie on the result's grid", where=where,
                        fix="map the result onto the input grid (to_input_grid) before writing DICOM.")
    return array[idx[..., 0], idx[..., 1], idx[..., 2]]


_COPIED_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator", "Modality", "BodyPartExamined",
    "PatientPosition", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "SliceLocation", "InstanceNumber", "Rows", "Columns",
)
#: Tags left out of a de-identified series (names, IDs, dates of birth, accession, physicians).
IDENTIFYING_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientAge", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName", "StudyDate", "StudyTime", "StudyDescription")


def write_dicom_series(
    data: ArrayLike,
    reference: Any,
    sources: Sequence[PathLike | Any],
    folder: PathLike,
    *,
    description: str = "medidiff result",
    units: str | None = None,
    series_number: int = 9900,
    protected: Iterable[PathLike] = (),
    deidentify: bool = False,
) -> list[Path]:
    """Write a float map on the input grid as a derived DICOM series beside its DICOM source series.

    Every source slice gets one output slice at the same position: its pixels are looked up in ``data``
    through the world (LPS -> RAS) coordinates of the slice and ``reference``'s affine, so this works
    whatever order the reader stacked the slices in. Geometry, patient, study and frame-of-reference tags
    are copied; the series and instances get new UIDs, ``ImageType`` DERIVED\\SECONDARY and a reference
    to each source instance. Values are stored as unsigned 16-bit with ``RescaleSlope`` and
    ``RescaleIntercept`` spanning the map's range.

    Args:
        data: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` map on the input's grid.
        reference: the input ``MetaTensor`` (gives the voxel-to-RAS affine of ``data``).
        sources: the source series' single-frame DICOM files (paths or pydicom datasets).
        folder: output folder (one ``.dcm`` per slice, ``IM0001.dcm``...).
        description: ``SeriesDescription`` of the new series.
        units: value units, written to ``RescaleType`` (e.g. ``"HU"``, ``"US"`` for unspecified).
        series_number: ``SeriesNumber`` of the new series.
        protected: input paths that must not be overwritten.
        deidentify: leave out the patient's name, ID, birth date and the other ``IDENTIFYING_TAGS``
            (the patient becomes ``ANONYMOUS``, ``PatientIdentityRemoved`` is ``YES``); geometry, study and
            frame-of-reference UIDs are kept so the series still overlays its source.

    Returns:
        The written files, in source order.

    Raises:
        DataError: a source is multi-frame or lacks geometry tags, or a slice falls outside ``data``.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    array = to_numpy(data).astype(np.float64)
    if array.ndim == 4:
        array = array[0]
    if array.ndim != 3:
        raise DataError(f"expected a 3D map, got shape {array.shape}", fix="pass (X, Y, Z) or (1, X, Y, Z).")
    inverse = np.linalg.inv(affine_of(reference))
    finite = array[np.isfinite(array)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    series_uid = generate_uid()
    now = datetime.now()
    written = []
    for k, src in enumerate(sources):
        ds_src = src if isinstance(src, Dataset) else pydicom.dcmread(src, stop_before_pixels=True)
        where = getattr(ds_src, "filename", None) or f"source slice {k}"
        values = values_on_slice(array, inverse, ds_src, where)
        stored = np.clip(np.rint((np.nan_to_num(values, nan=lo) - lo) / slope), 0, 65535).astype(np.uint16)

        ds = Dataset()
        for tag in _COPIED_TAGS:
            if tag in ds_src and not (deidentify and tag in IDENTIFYING_TAGS):
                setattr(ds, tag, ds_src.data_element(tag).value)
        sop_class = ds_src.SOPClassUID
        if sop_class.name not in ("CT Image Storage", "MR Image Storage"):
            sop_class = pydicom.uid.SecondaryCaptureImageStorage
        ds.SOPClassUID = sop_class
        if deidentify:
            ds.PatientName, ds.PatientID, ds.PatientIdentityRemoved = "ANONYMOUS", "ANONYMOUS", "YES"
            ds.DeidentificationMethod = "medidiff: patient name, ID, birth date, dates, accession removed"
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description[:64]
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.DerivationDescription = description[:1024]
        ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.SeriesDate, ds.SeriesTime = ds.ContentDate, ds.ContentTime
        ds.InstanceNumber = int(ds_src.get("InstanceNumber", k + 1) or k + 1)
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds_src.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds_src.SOPInstanceUID
        ds.SourceImageSequence = [ref]
        ref_series = Dataset()
        ref_series.SeriesInstanceUID = ds_src.SeriesInstanceUID
        ref_series.ReferencedInstanceSequence = [ref]
        ds.ReferencedSeriesSequence = [ref_series]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = f"{lo:.6g}", f"{slope:.6g}"
        ds.RescaleType = (units or "US")[:16]
        ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:.6g}", f"{max(hi - lo, 1e-6):.6g}"
        ds.PixelData = stored.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = Path(folder) / f"IM{k + 1:04d}.dcm"
        with atomic_write(path, protected) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        written.append(path)
    return written
