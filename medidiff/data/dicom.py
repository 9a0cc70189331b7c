"""Reading DICOM: headers, grouping files into series, ordering slices and building the RAS affine.

Axis convention (shared with :mod:`medidiff.data.nifti`): a volume is returned channel-first as
``(C, X, Y, Z)`` where

* ``X`` is the DICOM column index ``i`` (runs along a row, i.e. along the first triplet of
  ImageOrientationPatient), with step ``PixelSpacing[1]`` (the spacing between columns);
* ``Y`` is the DICOM row index ``j`` (runs down a column, along the second triplet of
  ImageOrientationPatient), with step ``PixelSpacing[0]`` (the spacing between rows);
* ``Z`` is the slice (or frame) index, ordered along the slice normal ``row_dir x col_dir``.

pydicom gives a frame as ``array[j, i]``; it is transposed to ``[i, j]``. With this order the DICOM
standard's voxel-to-patient equation (PS3.3 C.7.6.2.1.1)::

    P(i, j, k) = IPP_k + row_dir * PixelSpacing[1] * i + col_dir * PixelSpacing[0] * j

is exactly ``LPS_affine @ (i, j, k, 1)``, with ``LPS_affine``'s third column the step between
consecutive slice positions. DICOM patient coordinates are LPS; medidiff (like NIfTI and MONAI) uses
RAS, so the returned affine is ``diag(-1, -1, 1, 1) @ LPS_affine``. A single image is a volume with
``Z == 1`` whose third column is the plane normal times the slice spacing (or thickness).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.fileset import FileSet
from pydicom.pixels import get_decoder

from medidiff.errors import DataError

__all__ = [
    "LPS_TO_RAS",
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

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
DECODER_FIX = (
    "install the optional image decoders: `pip install 'medidiff[decoders]'` "
    "(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg) or `pip install python-gdcm`, "
    "or export the series uncompressed."
)
REEXPORT_FIX = "export the series again from the scanner or PACS, or remove this file from the input."
# Values larger than this are not read when scanning headers (pixel data is read later, by load).
_DEFER_BYTES = 4096
_ORIENTATION_TOL = 1e-3  # direction cosines
_SPACING_TOL = 1e-3  # mm
_GAP_REL_TOL = 0.02  # slice gaps may differ by 2 % of the nominal gap (DS strings are rounded)


@dataclass(frozen=True)
class SeriesInfo:
    """A summary of one DICOM series, free of anything that identifies a patient.

    Attributes:
        uid: SeriesInstanceUID ("" when absent).
        number: SeriesNumber (0 when absent).
        modality: Modality, e.g. "CT" or "MR" ("OT" when absent).
        description: SeriesDescription ("" when absent); shown to the user, never used in file names.
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


@dataclass
class StackGeometry:
    """Where each 2D image of a series sits in the volume, and the volume's RAS affine.

    Attributes:
        order: ``(path, frame)`` per slice, in increasing slice index ``Z``; ``frame`` is ``None``
            for a single-frame file, else the frame's index in its multi-frame file.
        rescale: ``(slope, intercept)`` per slice, in the same order.
        shape: spatial shape ``(X, Y, Z)`` = ``(Columns, Rows, slices)``.
        affine: 4x4 voxel-to-RAS affine (mm).
        problems: warnings that do not stop reading (e.g. no patient geometry, gantry tilt).
    """

    order: list[tuple[Path, int | None]]
    rescale: list[tuple[float, float]]
    shape: tuple[int, int, int]
    affine: np.ndarray
    problems: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along X, Y, Z in mm."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


@dataclass
class _Plane:
    """One 2D image (a single-frame file or one frame of a multi-frame file)."""

    path: Path
    frame: int | None
    rows: int
    columns: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    spacing: np.ndarray | None  # PixelSpacing: (between rows, between columns)
    thickness: float | None
    slope: float
    intercept: float
    instance: int


def read_header(path: str | Path) -> Dataset:
    """Reads a DICOM file's header (large values, such as pixel data, are left on disk).

    Args:
        path: the file.

    Returns:
        The pydicom dataset.

    Raises:
        DataError: the path is missing, unreadable, not DICOM, or damaged.
    """
    return _dcmread(Path(path), header_only=True)


def _dcmread(path: Path, *, header_only: bool) -> Dataset:
    if path.is_symlink() and not path.exists():
        raise DataError("is a broken symbolic link.", where=path, fix="point the link at an existing file.")
    if path.is_dir():
        raise DataError("is a folder where a DICOM file was expected.", where=path,
                        fix="pass the folder itself as the input, or point at one file.")
    try:
        if header_only:
            return pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        return pydicom.dcmread(path)
    except InvalidDicomError as err:
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
        return f"has no pixel data ({_sop_class_name(ds)}); it is not an image"
    return None


def is_dicomdir(ds: Dataset) -> bool:
    """Whether a dataset is a DICOMDIR (a media index that references other files)."""
    meta = getattr(ds, "file_meta", None)
    return meta is not None and meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS


def _sop_class_name(ds: Dataset) -> str:
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
    ds = _dcmread(path, header_only=False)
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
    images = sum(_frame_count(d) for _, d in members)
    return SeriesInfo(
        uid=str(ds.get("SeriesInstanceUID", "")),
        number=_int(ds.get("SeriesNumber"), 0),
        modality=str(ds.get("Modality", "") or "OT"),
        description=str(ds.get("SeriesDescription", "") or ""),
        sop_class=_sop_class_name(ds),
        files=len(members),
        images=images,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )


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


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _frame_count(ds: Dataset) -> int:
    return max(_int(ds.get("NumberOfFrames"), 1), 1)


def _functional(ds: Dataset, frame: int, sequence: str, keyword: str):
    """A value from the per-frame, then the shared functional groups of an enhanced image."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is None or len(seq) <= index:
            continue
        item = seq[index].get(sequence)
        if item is not None and len(item) and keyword in item[0]:
            return item[0][keyword].value
    return None


def _floats(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def _planes(path: Path, ds: Dataset) -> list[_Plane]:
    """The 2D images of one file, with their geometry and rescale."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    instance = _int(ds.get("InstanceNumber"), 0)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if not enhanced:
        thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
        plane = _Plane(
            path, None, rows, columns,
            position=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            spacing=_floats(ds.get("PixelSpacing"), 2),
            thickness=float(thickness) if thickness else None,
            slope=float(ds.get("RescaleSlope", 1) or 1),
            intercept=float(ds.get("RescaleIntercept", 0) or 0),
            instance=instance,
        )
        frames = _frame_count(ds)
        if frames == 1:
            return [plane]
        # A multi-frame image without functional groups: frames share one plane's geometry.
        return [
            _Plane(path, f, rows, columns, None, plane.orientation, plane.spacing, plane.thickness,
                   plane.slope, plane.intercept, f)
            for f in range(frames)
        ]
    planes = []
    top_thickness = ds.get("SpacingBetweenSlices")
    for f in range(_frame_count(ds)):
        slope = _functional(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
        thickness = (_functional(ds, f, "PixelMeasuresSequence", "SpacingBetweenSlices")
                     or _functional(ds, f, "PixelMeasuresSequence", "SliceThickness") or top_thickness)
        planes.append(_Plane(
            path, f, rows, columns,
            position=_floats(_functional(ds, f, "PlanePositionSequence", "ImagePositionPatient"), 3),
            orientation=_floats(_functional(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            spacing=_floats(_functional(ds, f, "PixelMeasuresSequence", "PixelSpacing"), 2),
            thickness=float(thickness) if thickness else None,
            slope=float(slope) if slope not in (None, "") else 1.0,
            intercept=float(intercept) if intercept not in (None, "") else 0.0,
            instance=f,
        ))
    return planes


def series_geometry(members: Sequence[tuple[Path, Dataset]], where: str | Path) -> StackGeometry:
    """Orders the images of one series along the slice normal and builds the volume's RAS affine.

    Checks that all images have the same size, orientation and pixel spacing, that no two share a
    position, and that slices are evenly spaced on one line (a missing slice is reported with its
    expected position). Headers are enough; pixel data is not read.

    Args:
        members: ``(path, dataset)`` pairs of one series.
        where: what to name in errors (the input folder or file).

    Returns:
        The stack geometry (see the module docstring for the axis convention).

    Raises:
        DataError: the images do not form one regular volume.
    """
    planes = [p for path, ds in members for p in _planes(path, ds)]
    sizes = sorted({(p.rows, p.columns) for p in planes})
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sizes)
        raise DataError(f"mixes images of different sizes ({listed} rows x columns).", where=where,
                        fix="these images are not one volume; select one series or remove the odd files.")
    rows, columns = sizes[0]
    with_geometry = [p.position is not None and p.orientation is not None for p in planes]
    if not all(with_geometry):
        if any(with_geometry):
            missing = next(p.path for p, ok in zip(planes, with_geometry) if not ok)
            raise DataError(f"has images without ImagePositionPatient/ImageOrientationPatient (e.g. {missing}).",
                            where=where, fix=REEXPORT_FIX)
        return _without_geometry(planes, rows, columns)

    orientations = np.stack([p.orientation for p in planes])
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOL:
        distinct = np.unique(np.round(orientations, 3), axis=0)
        raise DataError(
            f"mixes {len(distinct)} image orientations in one series "
            f"(e.g. {_fmt(distinct[0])} and {_fmt(distinct[1])}).",
            where=where,
            fix="this series is not one volume (often a localizer); choose another series "
                "(select='description:...') or split it by orientation.")
    spacings = [p.spacing for p in planes]
    if any(s is None for s in spacings):
        raise DataError("has images without PixelSpacing.", where=where, fix=REEXPORT_FIX)
    spacings = np.stack(spacings)
    if np.abs(spacings - spacings[0]).max() > _SPACING_TOL:
        raise DataError(f"mixes pixel spacings ({_fmt(np.unique(spacings, axis=0)[0])} and others).",
                        where=where, fix="select one series or resample the images to one spacing.")

    row_dir, col_dir = _unit(orientations[0, :3]), _unit(orientations[0, 3:])
    normal = _unit(np.cross(row_dir, col_dir))
    positions = np.stack([p.position for p in planes])
    depth = positions @ normal
    order = np.lexsort((np.array([p.instance for p in planes]), depth))
    planes = [planes[k] for k in order]
    positions, depth = positions[order], depth[order]
    problems: list[str] = []
    step = _slice_step(planes, positions, depth, normal, where, problems)

    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacings[0, 1]
    lps[:3, 1] = col_dir * spacings[0, 0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return StackGeometry(
        order=[(p.path, p.frame) for p in planes],
        rescale=[(p.slope, p.intercept) for p in planes],
        shape=(columns, rows, len(planes)),
        affine=LPS_TO_RAS @ lps,
        problems=problems,
    )


def _slice_step(planes: list[_Plane], positions: np.ndarray, depth: np.ndarray, normal: np.ndarray,
                where, problems: list[str]) -> np.ndarray:
    """The vector between consecutive slices; checks gaps (missing slices, uneven or shared positions)."""
    if len(planes) == 1:
        return normal * (planes[0].thickness or 1.0)
    gaps = np.diff(depth)
    nominal = float(np.median(gaps))
    tol = max(_GAP_REL_TOL * nominal, 1e-3)
    if gaps.min() <= tol:
        k = int(np.argmin(gaps))
        raise DataError(
            f"has several images at the same position ({_fmt(positions[k])} mm LPS), e.g. "
            f"{planes[k].path.name} and {planes[k + 1].path.name}: it holds more than one volume "
            "(echoes, phases or time points).",
            where=where, fix="split the series into single volumes before use, or select another series.")
    bad = np.abs(gaps - nominal) > tol
    if bad.any():
        k = int(np.argmax(bad))
        ratio = gaps[k] / nominal
        if abs(ratio - round(ratio)) * nominal <= tol:
            missing = int(round(ratio)) - 1
            expected = positions[k] + normal * nominal
            raise DataError(
                f"is missing {missing} slice(s): the gap after the slice at {_fmt(positions[k])} mm (LPS) is "
                f"{gaps[k]:.3f} mm where {nominal:.3f} mm is expected; the first missing slice would be at "
                f"{_fmt(expected)} mm.",
                where=where, fix="export the complete series again (a file was lost in transfer).")
        raise DataError(
            f"has uneven slice spacing: gaps between slices range from {gaps.min():.3f} to {gaps.max():.3f} mm "
            f"(first odd gap after the slice at {_fmt(positions[k])} mm, LPS).",
            where=where, fix="resample the series to even spacing, or select a series with regular slices.")
    step = (positions[-1] - positions[0]) / (len(planes) - 1)
    drift = np.linalg.norm(positions - (positions[0] + np.outer(np.arange(len(planes)), step)), axis=1)
    if drift.max() > tol:
        raise DataError(
            f"has slice positions that do not lie on one line (off by up to {drift.max():.3f} mm).",
            where=where, fix="the series is not one rigid volume; resample it or select another series.")
    tilt = np.degrees(np.arccos(np.clip(abs(step @ normal) / np.linalg.norm(step), -1.0, 1.0)))
    if tilt > 0.01:
        problems.append(f"slices are sheared by {tilt:.2f} degrees (gantry tilt); the affine keeps the shear")
    return step


def _without_geometry(planes: list[_Plane], rows: int, columns: int) -> StackGeometry:
    planes = sorted(planes, key=lambda p: (p.instance, str(p.path)))
    spacing = planes[0].spacing if planes[0].spacing is not None else np.ones(2)
    lps = np.diag([spacing[1], spacing[0], planes[0].thickness or 1.0, 1.0])
    return StackGeometry(
        order=[(p.path, p.frame) for p in planes],
        rescale=[(p.slope, p.intercept) for p in planes],
        shape=(columns, rows, len(planes)),
        affine=LPS_TO_RAS @ lps,
        problems=["no ImagePositionPatient/ImageOrientationPatient: voxel order and spacing only, "
                  "the position in the patient is unknown"],
    )


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _fmt(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:.3f}" for x in np.asarray(v).ravel()) + ")"


def _check_decodable(ds: Dataset, path: Path) -> None:
    """Raises a DataError naming the package to install when compressed pixel data cannot be decoded."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not syntax.is_compressed:
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
        raise DataError(f"has no pixel data ({_sop_class_name(ds)}).", where=path,
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
    frames = _frame_count(ds)
    if frames == 1:
        arr = arr[None]
    if samples == 1:
        arr = arr[..., None]
    return arr


def read_series(paths: Sequence[str | Path], where: str | Path | None = None
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reads one DICOM series (single- or multi-frame files) into a volume.

    Args:
        paths: the files of one series, in any order.
        where: what to name in errors (default: the first file's folder).

    Returns:
        ``(array, affine, info)``: ``array`` is float32 ``(C, X, Y, Z)`` in modality units (CT in HU:
        RescaleSlope/Intercept applied), ``affine`` the 4x4 voxel-to-RAS affine, and ``info`` a dict with
        ``modality``, ``series`` (:class:`SeriesInfo`) and ``problems``.

    Raises:
        DataError: a file is unreadable, truncated, compressed without a decoder, or the images do not
            form one regular volume.
    """
    paths = [Path(p) for p in paths]
    where = where if where is not None else paths[0].parent
    members = []
    for path in paths:
        ds = _dcmread(path, header_only=False)
        reason = image_problem(ds)
        if reason:
            raise DataError(f"{reason}.", where=path, fix="point at image files only.")
        members.append((path, ds))
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
    }
    return volume, geometry.affine, info
