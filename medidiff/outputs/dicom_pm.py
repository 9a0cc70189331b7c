"""A float map written as a DICOM Parametric Map beside its DICOM source series (highdicom).

The Parametric Map (``highdicom.pm.ParametricMap``, DICOM PS3.3 A.75) is the object a PACS and the
viewers (3D Slicer, OHIF) expect for a derived quantitative map: one multi-frame file with one frame per
source slice at the slice's own position, in the source's study and frame of reference, holding the values
themselves as 32-bit floats (Float Pixel Data) with a Real World Value Mapping that names their unit.
See ``medidiff.outputs.dicom`` for how the frames are looked up and what is filled in for a source.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.arrays import to_numpy
from medidiff.errors import DataError, MedidiffError

from .dicom import finish, source_datasets, values_on_slice
from .files import ArrayLike, PathLike, atomic_write
from .volumes import affine_of

__all__ = ["UNITS", "write_parametric_map"]

#: UCUM codes medidiff names, with their meanings (any other UCUM code is written with itself as meaning).
UNITS = {"1": "no units", "[hnsf'U]": "Hounsfield unit", "[hnsf'U]2": "Hounsfield unit squared",
         "[arb'U]": "arbitrary unit"}


def write_parametric_map(
    data: ArrayLike,
    reference: Any,
    sources: Sequence[PathLike | Any],
    path: PathLike,
    *,
    description: str = "medidiff map",
    label: str = "map",
    unit: str = "1",
    contrast: str = "SUBTRACTION",
    series_number: int = 9900,
    software_version: str = "",
    protected: Iterable[PathLike] = (),
    deidentify: bool = False,
) -> Path:
    """Write a float map on the input grid as one DICOM Parametric Map referencing its source series.

    Args:
        data: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` map on the input's grid.
        reference: the input ``MetaTensor`` (gives the voxel-to-RAS affine of ``data``).
        sources: the source series' single-frame DICOM files (paths or pydicom datasets).
        path: the ``.dcm`` file to write.
        description: ``SeriesDescription`` and ``ContentDescription`` of the new series.
        label: the Real World Value Mapping's ``LUTLabel`` (16 characters at most are kept).
        unit: the values' UCUM unit code (``"1"`` no units, ``"[hnsf'U]"`` Hounsfield, ``"[arb'U]"`` arbitrary).
        contrast: how the values derive from the source (``DerivedPixelContrast``, value 4 of ``ImageType``;
            one of ``highdicom.pm.DerivedPixelContrastValues``): an anomaly map is a residual, ``SUBTRACTION``.
        series_number: ``SeriesNumber`` of the new series.
        software_version: ``SoftwareVersions``.
        protected: input paths that must not be overwritten.
        deidentify: leave the patient's identity out (see ``medidiff.outputs.dicom``); the UIDs are kept.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        MedidiffError: highdicom is not installed.
        DataError: a source is multi-frame or lacks geometry, a slice is off the map's grid, or highdicom
            rejects the sources.
    """
    try:
        import highdicom as hd
        from highdicom.sr.coding import CodedConcept
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise MedidiffError("DICOM Parametric Map output needs highdicom, which is not installed.",
                            fix="pip install highdicom, or set dicom: false.") from e

    array = to_numpy(data).astype(np.float64)
    array = array[0] if array.ndim == 4 else array
    if array.ndim != 3:
        raise DataError(f"expected a 3D map, got shape {array.shape}", where=path,
                        fix="pass (X, Y, Z) or (1, X, Y, Z).")
    inverse = np.linalg.inv(affine_of(reference))
    datasets = source_datasets(sources, deidentify=deidentify)
    frames = np.stack([values_on_slice(array, inverse, ds, ds.filename) for ds in datasets]).astype(np.float32)
    frames = np.nan_to_num(frames, nan=0.0, posinf=np.finfo(np.float32).max, neginf=np.finfo(np.float32).min)
    lo, hi = (float(frames.min()), float(frames.max())) if frames.size else (0.0, 0.0)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label[:16], lut_explanation=description[:64],
        unit=CodedConcept(unit, "UCUM", UNITS.get(unit, unit)), value_range=(lo, hi), slope=1.0, intercept=0.0)
    window = hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=max(hi - lo, 1e-6))
    try:
        pm = hd.pm.ParametricMap(
            source_images=datasets, pixel_array=frames, series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medidiff",
            manufacturer_model_name="medidiff", software_versions=software_version or "unknown",
            device_serial_number="none", contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping], voi_lut_transformations=[window],
            content_description=description[:64], content_label=_content_label(label),
            derived_pixel_contrast=contrast,
            series_description=description[:64])
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise DataError(f"the source series cannot carry a DICOM Parametric Map ({e})", where=path,
                        fix="use the NIfTI output, or set dicom: false.") from None
    finish(pm, datasets[0], deidentify=deidentify)
    with atomic_write(path, protected) as tmp:
        pm.save_as(tmp)
    return Path(path)


def _content_label(label: str) -> str:
    """A ``ContentLabel`` (CS: upper case letters, digits, space and ``_``; 16 characters) from ``label``."""
    text = "".join(c if c.isalnum() or c in " _" else "_" for c in label.upper())[:16].strip()
    return text or "MAP"
