"""A label map written as a DICOM Segmentation (SEG) object beside its DICOM source series (highdicom).

The SEG references every source slice, lies in the source's study and frame of reference, and holds one
binary segment per foreground class (``highdicom.seg.Segmentation``, DICOM PS3.3 A.51), with one frame per
segment and source slice (empty frames included). See ``medidiff.outputs.dicom`` for how the frames are
looked up and what is filled in for a source (a missing frame of reference, de-identification).
A class whose name speaks of a lesion or an anomaly is coded as a lesion (SNOMED CT), any other as tissue.
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

__all__ = ["write_dicom_seg"]


def write_dicom_seg(
    labels: ArrayLike,
    reference: Any,
    sources: Sequence[PathLike | Any],
    path: PathLike,
    *,
    classes: Sequence[str] = ("background", "lesion"),
    description: str = "medidiff segmentation",
    series_number: int = 9901,
    software_version: str = "",
    protected: Iterable[PathLike] = (),
    deidentify: bool = False,
) -> Path:
    """Write a label map on the input grid as one DICOM SEG file referencing its source series.

    Args:
        labels: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` integer labels on the input's grid (0 = background).
        reference: the input ``MetaTensor`` (gives the voxel-to-RAS affine of ``labels``).
        sources: the source series' single-frame DICOM files (paths or pydicom datasets).
        path: the ``.dcm`` file to write.
        classes: class names, background first (segment ``k`` is class ``k``).
        description: ``SeriesDescription`` of the new series.
        series_number: its ``SeriesNumber``.
        software_version: ``SoftwareVersions``.
        protected: input paths that must not be overwritten.
        deidentify: leave the patient's identity out (see ``medidiff.outputs.dicom``); the UIDs are kept.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        MedidiffError: highdicom is not installed.
        DataError: a source slice is multi-frame or off the label map's grid, or highdicom rejects the sources.
    """
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise MedidiffError("DICOM SEG output needs highdicom, which is not installed.",
                            fix="pip install highdicom, or set dicom: false.") from e

    array = to_numpy(labels)
    array = array[0] if array.ndim == 4 else array
    if array.ndim != 3:
        raise DataError(f"expected a 3D label map, got shape {array.shape}", where=path)
    array = np.rint(array).astype(np.int64)
    inverse = np.linalg.inv(affine_of(reference))
    datasets = source_datasets(sources, deidentify=deidentify)
    frames = np.stack([values_on_slice(array, inverse, ds, ds.filename) for ds in datasets])
    if frames.size and (frames.min() < 0 or frames.max() >= len(classes)):
        raise DataError(f"labels range over [{frames.min()}, {frames.max()}] for {len(classes)} classes", where=path)
    algorithm = hd.AlgorithmIdentificationSequence(name="medidiff", version=software_version or "unknown",
                                                   family=codes.cid7162.ArtificialIntelligence)

    def segment(k: int, name: str):
        lesion = any(word in name.lower() for word in ("lesion", "anomal", "tumo"))  # else a generic tissue class
        return hd.seg.SegmentDescription(
            segment_number=k, segment_label=name[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure if lesion else codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Lesion if lesion else codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)

    segments = [segment(k, str(name)) for k, name in enumerate(classes) if k > 0]
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=frames.astype(np.uint8 if len(classes) < 256 else np.uint16),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
            series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="medidiff", manufacturer_model_name="medidiff",
            software_versions=software_version or "unknown", device_serial_number="none",
            series_description=description[:64], omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise DataError(f"the source series cannot carry a DICOM SEG ({e})", where=path,
                        fix="use the NIfTI output, or set dicom: false.") from None
    finish(seg, datasets[0], deidentify=deidentify, laterality=False)
    with atomic_write(path, protected) as tmp:
        seg.save_as(tmp)
    return Path(path)
