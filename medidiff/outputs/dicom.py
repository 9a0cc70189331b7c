"""What every DICOM output of medidiff shares: the source series it derives from, and its geometry.

medidiff writes two DICOM objects beside a DICOM input, both with highdicom and both in the source's study
and frame of reference, so that a PACS files them with the scan and a viewer overlays them on it:

- a float map (the anomaly heatmap) as a **Parametric Map** (``medidiff.outputs.dicom_pm``, PS3.3 A.75);
- a label map (a segmentation, the anomaly mask) as a **Segmentation** (``medidiff.outputs.dicom_seg``,
  PS3.3 A.51).

Both hold one frame per source slice; a frame's pixels are the result looked up at the source slice's
pixels through their world (LPS -> RAS) coordinates (``values_on_slice``), so it does not matter in which
order the reader stacked the slices. ``source_datasets`` reads the source headers and fills in what a
derived object needs and some exported series lack:

- a source without ``FrameOfReferenceUID`` gets one derived from its ``SeriesInstanceUID`` (the same for
  every output of that series, so the heatmap, the mask and a segmentation share it); the source files
  themselves are never changed;
- type 2 patient and study attributes the source lacks (birth date, sex, accession number, study ID,
  date and time, referring physician) are written empty, as type 2 asks for unknown values; a source
  without ``StudyInstanceUID`` is refused;
- with ``deidentify``, the patient becomes ``ANONYMOUS`` and the other ``IDENTIFYING_TAGS``
  (birth date, dates, accession...) are left empty, while the study, series and frame-of-reference UIDs
  are kept so the output still files with and overlays its source.

``finish`` adds to a highdicom object what highdicom does not copy: a Parametric Map's ``Laterality``
(the source's; empty, meaning unknown, when the source has none) and the de-identification record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medidiff.errors import DataError

from .files import PathLike

__all__ = ["IDENTIFYING_TAGS", "finish", "source_datasets", "values_on_slice"]


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
    if int(ds.get("NumberOfFrames", 1) or 1) > 1 or not all(
            t in ds for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")):
        raise DataError("only single-frame slices with ImagePositionPatient, ImageOrientationPatient and "
                        "PixelSpacing can be referenced", where=where,
                        fix="use the NIfTI output for multi-frame sources or sources without geometry.")
    ras = _lps_positions(ds) * np.array([-1.0, -1.0, 1.0])
    ijk = ras @ inverse[:3, :3].T + inverse[:3, 3]
    idx = np.rint(ijk).astype(np.int64)
    if np.abs(ijk - idx).max() > 0.05 or (idx < 0).any() or (idx >= np.array(array.shape)).any():
        raise DataError("a source slice does not lie on the result's grid", where=where,
                        fix="map the result onto the input grid (to_input_grid) before writing DICOM.")
    return array[idx[..., 0], idx[..., 1], idx[..., 2]]


#: Tags made anonymous (name, ID) or left empty in a de-identified output.
IDENTIFYING_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientAge", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName", "StudyDate", "StudyTime", "StudyDescription", "OtherPatientIDs",
                    "OtherPatientNames", "PatientAddress", "InstitutionName", "NameOfPhysiciansReadingStudy")
#: Type 2 patient and study attributes every derived object copies from its source (empty when unknown).
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
DEIDENTIFICATION_METHOD = "medidiff: name and ID replaced; dates, other IDs removed"  # LO: 64 at most


def frame_of_reference_for(series_uid: str) -> str:
    """The ``FrameOfReferenceUID`` medidiff gives the outputs of a source series that has none (deterministic)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["medidiff frame of reference", str(series_uid)])


def source_datasets(sources: Sequence[PathLike | Any], *, deidentify: bool = False) -> list[Any]:
    """The source slices' headers (no pixels), ready to be referenced by a derived highdicom object.

    Args:
        sources: the source series' single-frame DICOM files (paths or pydicom datasets; datasets are copied).
        deidentify: make the patient anonymous in the copies (see the module's notes).

    Returns:
        One dataset per source, in the given order.

    Raises:
        DataError: a source cannot be read, or the sources are not all of one series.
    """
    import pydicom
    from pydicom.dataset import Dataset

    datasets = []
    for k, src in enumerate(sources):
        try:
            ds = src.copy() if isinstance(src, Dataset) else pydicom.dcmread(src, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as e:
            raise DataError(f"cannot read the source slice ({e})", where=src) from None
        if not getattr(ds, "filename", None):
            ds.filename = f"source slice {k + 1}"
        datasets.append(ds)
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) != 1 or "" in series:
        raise DataError(f"the sources are {len(series)} series, not one", where=datasets[0].filename if datasets
                        else None, fix="write one DICOM output per source series.")
    frames = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in datasets} - {""}
    if len(frames) > 1:
        raise DataError("the source slices lie in several frames of reference", where=datasets[0].filename)
    frame = frames.pop() if frames else frame_of_reference_for(series.pop())
    for ds in datasets:
        if "StudyInstanceUID" not in ds:
            raise DataError("the source slice has no StudyInstanceUID", where=ds.filename,
                            fix="use the NIfTI output for files that are not part of a DICOM study.")
        ds.FrameOfReferenceUID = frame
        if deidentify:
            for tag in IDENTIFYING_TAGS:
                if tag in ds:
                    delattr(ds, tag)
            ds.PatientName, ds.PatientID = "ANONYMOUS^", "ANONYMOUS"
        for tag in _TYPE2_COPIED:
            if tag not in ds:
                setattr(ds, tag, "")  # type 2: present, empty when unknown
    return datasets


def finish(obj: Any, source: Any, *, deidentify: bool, laterality: bool = True) -> Any:
    """Add to a highdicom object what it does not take from its source; returns ``obj``.

    With ``laterality`` (a Parametric Map), ``Laterality`` (General Series, type 2C) is the source's, or
    empty (unknown) when the source has none; a Segmentation leaves it out (its segments carry the anatomy,
    and dciodvfy rejects it there). A de-identified object says so (``PatientIdentityRemoved``,
    ``DeidentificationMethod``).
    """
    if laterality:
        obj.Laterality = source.get("Laterality", "") or ""
    if deidentify:
        obj.PatientIdentityRemoved = "YES"
        obj.DeidentificationMethod = DEIDENTIFICATION_METHOD
    return obj
