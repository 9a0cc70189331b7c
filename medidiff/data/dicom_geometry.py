"""The geometry of a DICOM series: ordering its images along the slice normal, checking that they form
one regular volume, and the volume's RAS affine, from headers alone.

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from medidiff.errors import DataError

from .dicom_headers import REEXPORT_FIX, frame_count, int_or

__all__ = ["GEOMETRY_FROM_TAGS", "LPS_TO_RAS", "NO_POSITION", "StackGeometry", "series_geometry"]

#: The geometry source of a series placed in the patient by its own tags.
GEOMETRY_FROM_TAGS = "DICOM ImagePositionPatient, ImageOrientationPatient and PixelSpacing"
#: The problem reported for a series whose images have no position in the patient.
NO_POSITION = ("no ImagePositionPatient/ImageOrientationPatient: voxel order and spacing only, "
               "the position in the patient is unknown")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ORIENTATION_TOL = 1e-3  # direction cosines
_SPACING_TOL = 1e-3  # mm
_GAP_REL_TOL = 0.02  # slice gaps may differ by 2 % of the nominal gap (DS strings are rounded)


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
        known: whether the affine places the voxels in the patient (ImagePositionPatient,
            ImageOrientationPatient and PixelSpacing present); when False the affine only keeps the voxel
            order and whatever spacing the headers give, and must not be written as world geometry.
        source: where the geometry came from, in words (recorded in conversion sidecars).
    """

    order: list[tuple[Path, int | None]]
    rescale: list[tuple[float, float]]
    shape: tuple[int, int, int]
    affine: np.ndarray
    problems: list[str] = field(default_factory=list)
    known: bool = True
    source: str = GEOMETRY_FROM_TAGS

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
    instance = int_or(ds.get("InstanceNumber"), 0)
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
        frames = frame_count(ds)
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
    for f in range(frame_count(ds)):
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
    """Images without a position in the patient: voxel order (instance number) and the spacing the tags give.

    The affine is a placeholder (no rotation, origin 0, 1 mm where a spacing is missing); ``known`` is False
    so that it is never written as world geometry.
    """
    planes = sorted(planes, key=lambda p: (p.instance, str(p.path)))
    spacing = planes[0].spacing
    thickness = planes[0].thickness
    assumed = [name for name, value in (("PixelSpacing", spacing), ("SliceThickness/SpacingBetweenSlices",
                                                                     thickness)) if value is None]
    spacing = spacing if spacing is not None else np.ones(2)
    lps = np.diag([spacing[1], spacing[0], thickness or 1.0, 1.0])
    problems = [NO_POSITION]
    source = "none: no ImagePositionPatient/ImageOrientationPatient (voxel order only"
    if assumed:
        problems.append(f"no {' or '.join(assumed)}: 1 mm assumed")
        source += f"; 1 mm assumed for the missing {', '.join(assumed)})"
    else:
        source += "; spacing from PixelSpacing and the slice thickness)"
    return StackGeometry(
        order=[(p.path, p.frame) for p in planes],
        rescale=[(p.slope, p.intercept) for p in planes],
        shape=(columns, rows, len(planes)),
        affine=LPS_TO_RAS @ lps,
        problems=problems,
        known=False,
        source=source,
    )


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _fmt(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:.3f}" for x in np.asarray(v).ravel()) + ")"
