"""Reading DICOM headers: files and DICOMDIRs, telling images from other objects, grouping files into
series, and each series' summary and file-safe name.

Only headers are read here (pixel data stays on disk); ``medidiff.data.dicom_geometry`` turns the headers
of a series into a volume's geometry and ``medidiff.data.dicom`` reads the pixels.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.fileset import FileSet

from medidiff.errors import DataError

__all__ = [
    "DICOMDIR_SOP_CLASS",
    "PIXEL_KEYWORDS",
    "REEXPORT_FIX",
    "SeriesInfo",
    "dicomdir_files",
    "frame_count",
    "group_series",
    "image_problem",
    "identifiers",
    "int_or",
    "is_dicomdir",
    "other_format",
    "read_dataset",
    "read_header",
    "screen_text",
    "series_name",
    "sop_class_name",
    "summarize",
]

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
REEXPORT_FIX = "export the series again from the scanner or PACS, or remove this file from the input."
# Values larger than this are not read when scanning headers (pixel data is read later, by load).
_DEFER_BYTES = 4096


@dataclass(frozen=True)
class SeriesInfo:
    """A summary of one DICOM series, free of anything that identifies a patient.

    Attributes:
        uid: SeriesInstanceUID ("" when absent).
        number: SeriesNumber (0 when absent).
        modality: Modality, e.g. "CT" or "MR" ("OT" when absent).
        description: SeriesDescription ("" when absent), screened by :func:`screen_text` (the patient's name,
            IDs and birth date and anything written like a DICOM person name are replaced by ``[removed]``);
            shown to the user, never used in file names.
        sop_class: the SOP class name, e.g. "Enhanced CT Image Storage".
        files: number of files.
        images: number of 2D images (slices or frames).
        rows: Rows of the first image.
        columns: Columns of the first image.
    """

    uid: str
    number: int
    modality: str
    description: str
    sop_class: str
    files: int
    images: int
    rows: int
    columns: int


def read_header(path: str | Path) -> Dataset:
    """Reads a DICOM file's header (large values, such as pixel data, are left on disk).

    Args:
        path: the file.

    Returns:
        The pydicom dataset.

    Raises:
        DataError: the path is missing, unreadable, not DICOM, or damaged.
    """
    return read_dataset(Path(path), header_only=True)


def read_dataset(path: str | Path, *, header_only: bool = False) -> Dataset:
    """Reads a DICOM file, turning every way it can fail into a ``DataError`` that names the file.

    Args:
        path: the file.
        header_only: leave large values (such as pixel data) on disk.

    Returns:
        The pydicom dataset.

    Raises:
        DataError: the path is missing, unreadable, not DICOM, or damaged.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise DataError("is a broken symbolic link.", where=path, fix="point the link at an existing file.")
    if path.is_dir():
        raise DataError("is a folder where a DICOM file was expected.", where=path,
                        fix="pass the folder itself as the input, or point at one file.")
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES) if header_only else pydicom.dcmread(path)
        _check_values(ds, path)
        return ds
    except DataError:
        raise
    except InvalidDicomError as err:
        other = other_format(path)
        if other:
            raise DataError(f"is {other}, not a DICOM file; medidiff reads {SUPPORTED_FORMATS}.",
                            where=path, fix="convert it to NIfTI or DICOM, or remove it from the input.") from err
        raise DataError("is not a DICOM file (no 'DICM' marker).", where=path,
                        fix="remove it from the input, or point at the DICOM files only.") from err
    except FileNotFoundError as err:
        raise DataError("does not exist.", where=path, fix="check the path.") from err
    except OSError as err:
        raise DataError(f"cannot be read ({err.strerror or err}).", where=path,
                        fix="check that it is a readable file.") from err
    except Exception as err:  # pydicom raises many types on damaged files
        raise DataError(f"is a damaged DICOM file ({type(err).__name__}: {err}).", where=path,
                        fix=REEXPORT_FIX) from err


#: What medidiff reads, in words (for messages about files it does not read).
SUPPORTED_FORMATS = ("NIfTI (.nii, .nii.gz), DICOM (files, folders, DICOMDIR), JSON datalists, CSV lists and "
                     "nnU-Net folders")
#: Leading bytes of image and data formats that are not DICOM: (signature, offset, name).
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", 0, "a PNG image"), (b"\xff\xd8\xff", 0, "a JPEG image"),
               (b"II*\x00", 0, "a TIFF image"), (b"MM\x00*", 0, "a TIFF image"), (b"GIF8", 0, "a GIF image"),
               (b"BM", 0, "a BMP image"), (b"NRRD", 0, "an NRRD volume"), (b"ObjectType", 0, "a MetaImage (.mha/.mhd)"),
               (b"\x93NUMPY", 0, "a NumPy array (.npy)"), (b"\x89HDF\r\n\x1a\n", 0, "an HDF5 file"),
               (b"%PDF", 0, "a PDF document"), (b"PK\x03\x04", 0, "a ZIP archive"),
               (b"\x1f\x8b", 0, "a gzip-compressed file (not a .nii.gz name)"),
               (b"n+1\x00", 344, "a NIfTI file without a .nii/.nii.gz name"))


def other_format(path: str | Path) -> str | None:
    """Names the format of a file that is not DICOM, from its first bytes (e.g. ``"a PNG image"``), or None.

    Args:
        path: the file.

    Returns:
        The format in words, or None when it is not one medidiff recognises.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(352)
    except OSError:
        return None
    for signature, offset, name in _SIGNATURES:
        if head[offset:offset + len(signature)] == signature:
            return name
    return None


#: Tags medidiff reads as numbers: each must parse, and be a whole number where marked ``int``.
_NUMERIC = {"Rows": int, "Columns": int, "BitsAllocated": int, "BitsStored": int, "HighBit": int,
            "PixelRepresentation": int, "SamplesPerPixel": int, "NumberOfFrames": int, "PlanarConfiguration": int,
            "SeriesNumber": int, "InstanceNumber": int, "PixelSpacing": float, "ImageOrientationPatient": float,
            "ImagePositionPatient": float, "RescaleSlope": float, "RescaleIntercept": float,
            "SliceThickness": float, "SpacingBetweenSlices": float, "SliceLocation": float}
_MULTI = ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")
_TEXT = ("PhotometricInterpretation", "Modality", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID",
         "SeriesDescription")


def _check_values(ds: Dataset, path: Path) -> None:
    """Parse the tags medidiff uses now, so that a malformed value is a ``DataError`` naming it.

    pydicom converts values lazily; a wrong VR, an unparsable number or a value of the wrong kind would
    otherwise surface later as an unrelated exception.
    """
    def bad(keyword: str, why: str) -> DataError:
        return DataError(f"has an invalid {keyword} ({why}).", where=path, fix=REEXPORT_FIX)

    for keyword, kind in _NUMERIC.items():
        try:
            value = ds.get(keyword)
        except Exception as err:  # pydicom raises many types on malformed values
            raise bad(keyword, f"{type(err).__name__}: {err}") from err
        if value is None or value == "":
            continue
        values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
        if len(values) != 1 and keyword not in _MULTI:
            raise bad(keyword, f"{len(values)} values where one is expected")
        for v in values:
            if isinstance(v, (bytes, bytearray, str)) or not isinstance(v, (int, float)):
                raise bad(keyword, f"{v!r} is not a number")
            if not math.isfinite(float(v)) or (kind is int and float(v) != int(v)):
                raise bad(keyword, f"{v!r} is not a finite {'whole ' if kind is int else ''}number")
    for keyword in _TEXT:
        try:
            value = ds.get(keyword)
        except Exception as err:  # noqa: BLE001
            raise bad(keyword, f"{type(err).__name__}: {err}") from err
        if value is not None and not isinstance(value, str):
            raise bad(keyword, f"{value!r} is not text")


def image_problem(ds: Dataset) -> str | None:
    """Says why a DICOM dataset is not an image medidiff can read, or None if it is one.

    Args:
        ds: a dataset (header only is enough).

    Returns:
        A short reason ("a DICOMDIR index, not an image", "no pixel data (Basic Text SR Storage)"), or None.
    """
    if is_dicomdir(ds):
        return "is a DICOMDIR index, not an image"
    if not any(k in ds for k in PIXEL_KEYWORDS) or "Rows" not in ds or "Columns" not in ds:
        return f"has no pixel data ({sop_class_name(ds)}); it is not an image"
    if int_or(ds.get("Rows"), 0) <= 0 or int_or(ds.get("Columns"), 0) <= 0:
        return "has pixel data but no image size (Rows and Columns must be positive)"
    return None


def is_dicomdir(ds: Dataset) -> bool:
    """Whether a dataset is a DICOMDIR (a media index that references other files)."""
    meta = getattr(ds, "file_meta", None)
    return meta is not None and meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS


def sop_class_name(ds: Dataset) -> str:
    """The name of a dataset's SOP class (e.g. "CT Image Storage")."""
    uid = ds.get("SOPClassUID")
    return uid.name if uid is not None else "unknown SOP class"


def group_series(paths: Iterable[Path]) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[tuple[Path, str]]]:
    """Reads headers and groups image files by SeriesInstanceUID.

    Args:
        paths: candidate files.

    Returns:
        ``(series, skipped)``: ``series`` maps a SeriesInstanceUID to its ``(path, header)`` pairs
        (sorted by path); ``skipped`` lists ``(path, reason)`` for files that are not DICOM images.
    """
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        try:
            ds = read_header(path)
        except DataError as err:
            skipped.append((Path(path), err.message))
            continue
        reason = image_problem(ds)
        if reason:
            skipped.append((Path(path), reason))
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((Path(path), ds))
    for members in series.values():
        members.sort(key=lambda item: str(item[0]))
    return series, skipped


def dicomdir_files(path: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Lists the files a DICOMDIR references, using pydicom's FileSet.

    Args:
        path: the DICOMDIR file.

    Returns:
        ``(files, skipped)``: existing referenced files, and ``(path, reason)`` for missing ones.

    Raises:
        DataError: the DICOMDIR cannot be read.
    """
    path = Path(path)
    ds = read_dataset(path, header_only=False)
    try:
        fileset = FileSet(ds)
        refs = [Path(instance.path) for instance in fileset]
    except Exception as err:
        raise DataError(f"is a DICOMDIR that cannot be read ({err}).", where=path,
                        fix="pass the folder of DICOM files instead of the DICOMDIR.") from err
    files = [p for p in refs if p.is_file()]
    skipped = [(p, "is listed in the DICOMDIR but missing") for p in refs if not p.is_file()]
    return files, skipped


def summarize(members: Sequence[tuple[Path, Dataset]]) -> SeriesInfo:
    """Builds the :class:`SeriesInfo` of one series from its headers.

    Args:
        members: ``(path, header)`` pairs of one series.

    Returns:
        The series summary.
    """
    ds = members[0][1]
    images = sum(frame_count(d) for _, d in members)
    return SeriesInfo(
        uid=str(ds.get("SeriesInstanceUID", "")),
        number=int_or(ds.get("SeriesNumber"), 0),
        modality=str(ds.get("Modality", "") or "OT"),
        description=screen_text(str(ds.get("SeriesDescription", "") or ""), identifiers(ds)),
        sop_class=sop_class_name(ds),
        files=len(members),
        images=images,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )


#: Tags whose values identify the patient; their text is removed from descriptions shown or written.
IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
                        "PatientBirthName", "PatientMotherBirthName", "AccessionNumber", "ReferringPhysicianName",
                        "PerformingPhysicianName", "OperatorsName")
#: A value written like a DICOM person name (``FAMILY^GIVEN``), whatever tag it sits in.
_PERSON_NAME = re.compile(r"[^\s^]+\^\S*|\^[^\s^]\S*")
REMOVED = "[removed]"


def identifiers(ds: Dataset) -> list[str]:
    """The identifying values of a dataset (patient name and IDs, birth date, physicians), as text.

    Args:
        ds: a dataset (header only is enough).

    Returns:
        The non-empty values of :data:`IDENTIFYING_KEYWORDS`.
    """
    values = []
    for keyword in IDENTIFYING_KEYWORDS:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - a malformed value is left out, not read
            continue
        items = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
        values += [str(v) for v in items if v not in (None, "") and str(v).strip()]
    return values


def screen_text(text: str, idents: Iterable[str] = ()) -> str:
    """Screens free text from a DICOM tag (SeriesDescription, ProtocolName) before it is shown or written.

    Anything written like a DICOM person name (``DOE^JOHN``) is removed whatever tag it came from; then, as
    :func:`medidiff.outputs.safe_case_name` does for file names, each identifier is split into its name
    components (on ``^``, spaces and commas) and every component of two characters or more is removed
    (case-insensitively, as a whole word, so that "ANN" leaves "ANNULAR" alone). Each removal leaves
    ``[removed]``; control characters become spaces.

    Args:
        text: the tag's text.
        idents: the dataset's identifying values (see :func:`identifiers`).

    Returns:
        The screened text.
    """
    text = re.sub(r"[\x00-\x1f\x7f]", " ", str(text))
    text = _PERSON_NAME.sub(REMOVED, text)
    parts = {part for ident in idents for part in re.split(r"[\^\s,]+", str(ident)) if len(part) >= 2}
    for part in sorted(parts, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(part)}(?![A-Za-z0-9])", REMOVED, text, flags=re.IGNORECASE)
    return re.sub(rf"(?:{re.escape(REMOVED)}[\s^,]*)+(?={re.escape(REMOVED)})", "", text).strip()


def series_name(info: SeriesInfo) -> str:
    """A file-safe case name for a series: ``s<number>_<modality>_<hash of the series UID>``.

    It carries no patient name, date or free text from the tags, so it is safe in file names.

    Args:
        info: the series summary.

    Returns:
        e.g. ``"s003_CT_1f2e3d4c"``.
    """
    modality = re.sub(r"[^A-Za-z0-9]", "", info.modality) or "OT"
    digest = hashlib.sha1(info.uid.encode()).hexdigest()[:8]
    return f"s{info.number:03d}_{modality}_{digest}"


def int_or(value, default: int) -> int:
    """``int(value)``, or ``default`` when it has none."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def frame_count(ds: Dataset) -> int:
    """Number of 2D images in a file (``NumberOfFrames``, at least 1)."""
    return max(int_or(ds.get("NumberOfFrames"), 1), 1)
