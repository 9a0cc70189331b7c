"""What stands behind ``medidiff inspect`` and ``medidiff convert``.

``inspect_path`` lists each series or volume found at a path with its modality, shape, spacing,
orientation code and any problems; ``format_inspection`` prints that as a table. ``convert`` writes each
series as ``<name>.nii.gz`` with its true geometry and a dcm2niix-style JSON sidecar ``<name>.json``
(series number and description, UIDs, modality, acquisition parameters, where the geometry came from; no
patient identifiers unless asked), lists every file written in ``converted.csv`` and skips (recording in
``failures.csv``) the series that cannot be read.

Geometry is never invented: a series whose files do not place it in the patient (DICOM without
ImagePositionPatient/ImageOrientationPatient, such as pydicom's ``emri_small.dcm``) is refused, and
recorded as a failure, unless ``allow_unknown_geometry`` is set; it is then written with NIfTI qform and
sform codes 0 (no world geometry: voxel sizes only), with a warning on the log and in its sidecar.
A folder that holds the results of an earlier conversion is refused unless ``overwrite`` is set.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset

import medidiff
from medidiff.data.batch import FAILURES_FILE, FailureLog
from medidiff.data.dicom_headers import identifiers, read_header, screen_text
from medidiff.data.discover import Source, discover, load
from medidiff.errors import DataError, MedidiffError
from medidiff.outputs import write_json, write_nifti, write_table

__all__ = ["COLUMNS", "CONVERTED_FILE", "Conversion", "EarlierResults", "convert", "convert_path",
           "format_inspection", "inspect_path", "sidecar"]

log = logging.getLogger("medidiff.convert")

COLUMNS = ("name", "modality", "description", "shape", "spacing", "orientation", "files", "problems")


def inspect_path(path: str | Path, select: str | None = "all") -> list[dict]:
    """Describes every series or volume at a path, reading it fully to find its problems.

    Args:
        path: anything :func:`medidiff.data.discover.discover` understands.
        select: DICOM series selection rule (default: all series).

    Returns:
        One dict per series/volume with ``name``, ``kind``, ``modality``, ``description`` (screened: see
        :class:`medidiff.data.dicom_headers.SeriesInfo`), ``shape`` (``(C, X, Y, Z)``, None if unreadable),
        ``spacing`` (mm, X/Y/Z), ``orientation`` (axis code such as ``"LPS"``, from nibabel's
        ``aff2axcodes``; ``"unknown"`` without a position in the patient), ``files`` and ``problems`` (list
        of str); then one row per passed-over file (name ``"-"``), its reason as the problem.

    Raises:
        DataError: nothing usable at the path (missing, empty, invalid datalist...).
    """
    skipped: list[tuple[Path, str]] = []
    rows = []
    for source in discover(path, select=select, skipped=skipped):
        series = source.series
        row = {
            "name": source.name,
            "kind": source.kind,
            "modality": series.modality if series else "",
            "description": series.description if series else "",  # screened (SeriesInfo)
            "shape": None,
            "spacing": None,
            "orientation": "",
            "files": len(source.paths),
            "problems": [],
        }
        try:
            image = load(source)
        except MedidiffError as err:
            row["problems"].append(str(err))
        else:
            row["problems"] = list(source.problems)
            affine = image.affine.numpy()
            row["shape"] = tuple(int(n) for n in image.shape)
            row["spacing"] = tuple(round(float(v), 4) for v in image.meta["spacing"])
            known = bool(image.meta.get("geometry_known", True))
            row["orientation"] = "".join(nib.aff2axcodes(affine)) if known else "unknown"
            row["modality"] = row["modality"] or image.meta["modality"]
        rows.append(row)
    for file, reason in skipped:
        rows.append({"name": "-", "kind": "", "modality": "", "description": "", "shape": None,
                     "spacing": None, "orientation": "", "files": 1, "problems": [f"{file}: skipped, {reason}"]})
    return rows


def format_inspection(rows: list[dict]) -> str:
    """Formats :func:`inspect_path` rows as a plain-text table, problems listed under each row.

    Args:
        rows: rows from :func:`inspect_path`.

    Returns:
        The table.
    """
    def cell(key: str, value) -> str:
        if value is None:
            return "-"
        if key == "shape":
            return "x".join(str(v) for v in value)
        if key == "spacing":
            return "x".join(f"{v:.3g}" for v in value)
        return str(value)

    keys = COLUMNS[:-1]
    table = [list(keys)] + [[cell(k, row.get(k)) for k in keys] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    lines = []
    for number, line in enumerate(table):
        lines.append("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip())
        if number:
            lines.extend(f"    ! {problem}" for problem in rows[number - 1]["problems"])
    return "\n".join(lines)


#: The table of every file a conversion wrote (one row per file).
CONVERTED_FILE = "converted.csv"
#: Files of a conversion's own record in its folder (besides the images and sidecars it lists).
RECORD_FILES = (CONVERTED_FILE, FAILURES_FILE, "manifest.json")
#: The flag that lets a series without a position in the patient be written (codes 0).
ALLOW_FLAG = "--allow-unknown-geometry"

#: Sidecar fields read from the DICOM header, as dcm2niix writes them (BIDS names): (key, keyword, scale).
#: Times are converted from DICOM's milliseconds to BIDS's seconds.
ACQUISITION = (
    ("Modality", "Modality", None), ("SOPClassUID", "SOPClassUID", None), ("ImageType", "ImageType", None),
    ("Manufacturer", "Manufacturer", None), ("ManufacturersModelName", "ManufacturerModelName", None),
    ("SoftwareVersions", "SoftwareVersions", None), ("BodyPartExamined", "BodyPartExamined", None),
    ("PatientPosition", "PatientPosition", None), ("MagneticFieldStrength", "MagneticFieldStrength", None),
    ("ImagingFrequency", "ImagingFrequency", None), ("MRAcquisitionType", "MRAcquisitionType", None),
    ("ScanningSequence", "ScanningSequence", None), ("SequenceVariant", "SequenceVariant", None),
    ("SequenceName", "SequenceName", None), ("PulseSequenceName", "PulseSequenceName", None),
    ("RepetitionTime", "RepetitionTime", 1e-3), ("EchoTime", "EchoTime", 1e-3),
    ("EchoTime", "EffectiveEchoTime", 1e-3), ("InversionTime", "InversionTime", 1e-3),
    ("FlipAngle", "FlipAngle", None), ("EchoTrainLength", "EchoTrainLength", None),
    ("PixelBandwidth", "PixelBandwidth", None), ("SliceThickness", "SliceThickness", None),
    ("SpacingBetweenSlices", "SpacingBetweenSlices", None), ("PixelSpacing", "PixelSpacing", None),
    ("KVP", "KVP", None), ("XRayTubeCurrent", "XRayTubeCurrent", None), ("ExposureTime", "ExposureTime", 1e-3),
    ("ConvolutionKernel", "ConvolutionKernel", None), ("ReconstructionDiameter", "ReconstructionDiameter", None),
    ("ContrastBolusAgent", "ContrastBolusAgent", None), ("AcquisitionNumber", "AcquisitionNumber", None),
)
#: UIDs that link the converted series back to its study (not patient identifiers).
UIDS = ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
#: Free-text tags, written only after screening (:func:`medidiff.data.dicom_headers.screen_text`).
FREE_TEXT = ("SeriesDescription", "ProtocolName", "StudyDescription")
#: What identifies a patient, a visit or a place: written only with ``keep_identifiers``.
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
               "OtherPatientIDs", "AccessionNumber", "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate",
               "AcquisitionDateTime", "StudyTime", "SeriesTime", "AcquisitionTime", "InstitutionName",
               "InstitutionAddress", "StationName", "DeviceSerialNumber", "ReferringPhysicianName",
               "PerformingPhysicianName", "OperatorsName")


class EarlierResults(DataError):
    """The output folder holds the results of an earlier conversion (nothing was written)."""


@dataclass
class Conversion:
    """What :func:`convert` wrote.

    Attributes:
        images: the NIfTI files, one per series.
        sidecars: the JSON sidecars, in the same order.
        table: ``converted.csv``, listing every file written.
        inputs: every input file read.
        failures: series skipped (listed in ``failures.csv``).
        failures_file: ``failures.csv`` when some series failed, else None.
        warnings: ``(case, text)`` warnings of the series written (also in their sidecars).
    """

    images: list[Path] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    table: Path | None = None
    inputs: list[Path] = field(default_factory=list)
    failures: int = 0
    failures_file: Path | None = None
    warnings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def outputs(self) -> list[Path]:
        """Every file written: images, sidecars, the table and ``failures.csv`` when there is one."""
        extra = [p for p in (self.table, self.failures_file) if p is not None]
        return [*self.images, *self.sidecars, *extra]


def _plain(value):
    """A DICOM value as JSON: numbers as numbers (non-finite ones dropped), lists, text; None when empty."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        items = [_plain(v) for v in value]
        return [v for v in items if v is not None] or None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    text = str(value).strip()
    return text or None


def _lookup(ds: Dataset, keyword: str, depth: int = 0):
    """A tag's value: at the top level, else in the first item of the (functional group) sequences."""
    try:
        if keyword in ds:
            return ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed value is left out
        return None
    if depth >= 3:
        return None
    for element in ds:
        if element.VR == "SQ" and element.value and element.keyword != "PixelData":
            found = _lookup(element.value[0], keyword, depth + 1)
            if found not in (None, ""):
                return found
    return None


def sidecar(source: Source, image, *, keep_identifiers: bool = False) -> dict:
    """The JSON sidecar of one converted series, as dcm2niix writes it (BIDS names).

    Args:
        source: the series (or NIfTI volume) converted.
        image: its loaded ``MetaTensor`` (geometry meta from :func:`medidiff.data.discover.load`).
        keep_identifiers: also write the patient's name, IDs, dates, institution and the like.

    Returns:
        The sidecar: acquisition parameters present in the header (times in seconds), ``SeriesNumber``,
        the screened ``SeriesDescription``/``ProtocolName``, UIDs, ``GeometryKnown``, ``GeometrySource``,
        ``Warnings``, the image's shape, voxel size and orientation, and the converter's name and version.
    """
    data: dict = {}
    if source.kind == "dicom":
        ds = read_header(source.paths[0])
        idents = identifiers(ds)
        data["SourceFormat"] = "DICOM"
        for key, keyword, scale in ACQUISITION:
            if key in data:
                continue
            value = _plain(_lookup(ds, keyword))
            if value is not None:
                data[key] = round(value * scale, 9) if scale and isinstance(value, (int, float)) else value
        if source.series is not None:
            data["SeriesNumber"] = source.series.number
        for keyword in FREE_TEXT:
            value = _plain(_lookup(ds, keyword))
            if isinstance(value, str):
                data[keyword] = screen_text(value, idents)
        for keyword in UIDS:
            value = _plain(ds.get(keyword))
            if value is not None:
                data[keyword] = value
        if keep_identifiers:
            for keyword in IDENTIFYING:
                value = _plain(_lookup(ds, keyword))
                if value is not None:
                    data[keyword] = value
        else:
            data["PatientIdentifiers"] = "left out (medidiff convert --keep-identifiers writes them)"
    else:
        data["SourceFormat"] = "NIfTI"
    affine = image.affine.numpy()
    data.update({
        "SourceFiles": len(source.paths),
        "ImageShape": [int(n) for n in image.shape[1:]],
        "Channels": int(image.shape[0]),
        "VoxelSize": [round(float(v), 6) for v in image.meta["spacing"]],
        "GeometryKnown": bool(image.meta["geometry_known"]),
        "GeometrySource": image.meta["geometry_source"],
        "Orientation": "".join(nib.aff2axcodes(affine)) if image.meta["geometry_known"] else None,
        "NiftiXformCode": 1 if image.meta["geometry_known"] else 0,
        "Warnings": list(source.problems),
        "ConversionSoftware": "medidiff",
        "ConversionSoftwareVersion": medidiff.__version__,
    })
    return data


def _earlier(out_dir: Path, targets: list[Path], inputs: list[Path]) -> list[Path]:
    """The files in ``out_dir`` that an earlier run wrote and this conversion would replace or remove.

    An earlier conversion that wrote no series (its manifest and ``failures.csv`` only) does not count: its
    records are replaced. Another command's records (a manifest of another task, a ``failures.csv`` of
    unknown origin) do.
    """
    protected = {p.resolve() for p in inputs}
    manifest = out_dir / "manifest.json"
    task = None
    if manifest.is_file():
        try:
            task = json.loads(manifest.read_text(encoding="utf-8")).get("task")
        except (OSError, ValueError, AttributeError):
            task = "unknown"
    found = [out_dir / CONVERTED_FILE] if (out_dir / CONVERTED_FILE).is_file() else []
    if task not in (None, "convert"):
        found.append(manifest)
    if (out_dir / FAILURES_FILE).is_file() and task != "convert":
        found.append(out_dir / FAILURES_FILE)
    found += [p for p in targets if p.exists() and p.resolve() not in protected]
    return list(dict.fromkeys(found))


def _clear_earlier(out_dir: Path, inputs: list[Path]) -> None:
    """Removes an earlier conversion's files (those its table lists, inside ``out_dir``) and its records."""
    table = out_dir / CONVERTED_FILE
    root = out_dir.resolve()
    protected = {p.resolve() for p in inputs}
    listed = []
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as handle:
            listed = [out_dir / row["file"] for row in csv.DictReader(handle) if row.get("file")]
    for path in [*listed, *(out_dir / name for name in RECORD_FILES)]:
        resolved = path.resolve()
        if resolved.parent == root and resolved not in protected and path.is_file():
            path.unlink()


def convert(path: str | Path, out_dir: str | Path, select: str | None = "all", *,
            allow_unknown_geometry: bool = False, keep_identifiers: bool = False,
            overwrite: bool = False) -> Conversion:
    """Writes each series or volume at a path as ``<out_dir>/<name>.nii.gz`` with its sidecar ``<name>.json``.

    Series that cannot be read, or that have no position in the patient (unless
    ``allow_unknown_geometry``), are skipped and recorded in ``<out_dir>/failures.csv``. Every file
    written is listed in ``<out_dir>/converted.csv``. Inputs are never overwritten; each file is written
    atomically.

    Args:
        path: anything :func:`medidiff.data.discover.discover` understands.
        out_dir: the output folder.
        select: DICOM series selection rule (default: all series).
        allow_unknown_geometry: write series without a position in the patient, with NIfTI qform and sform
            codes 0 (voxel sizes only) and a warning, instead of refusing them.
        keep_identifiers: write the patient's name, IDs, dates and institution into the sidecars.
        overwrite: replace the results of an earlier conversion in ``out_dir`` (the files its
            ``converted.csv`` lists and its records) instead of refusing.

    Returns:
        The :class:`Conversion`.

    Raises:
        EarlierResults: ``out_dir`` holds an earlier conversion's results and ``overwrite`` is not set.
        DataError: nothing usable at the path, or no series could be converted.
    """
    out_dir = Path(out_dir)
    sources = discover(path, select=select)
    inputs = [Path(p) for source in sources for p in source.paths]
    targets = [out_dir / f"{source.name}{ext}" for source in sources for ext in (".nii.gz", ".json")]
    earlier = _earlier(out_dir, targets, inputs)
    if earlier and not overwrite:
        shown = ", ".join(p.name for p in earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        raise EarlierResults(f"the output folder already holds results of an earlier conversion ({shown}); "
                             "nothing was written.", where=out_dir,
                             fix="choose another output folder, or pass --overwrite to replace them.")
    _clear_earlier(out_dir, inputs)
    failures = FailureLog(out_dir)
    result = Conversion(inputs=inputs)
    rows = []
    for source in sources:
        try:
            image = load(source)
            known = bool(image.meta["geometry_known"])
            if not known and not allow_unknown_geometry:
                raise DataError(f"has no position in the patient ({image.meta['geometry_source']}); it was not "
                                "written, so that no geometry is invented.", where=source.paths[0],
                                fix=f"pass {ALLOW_FLAG} to write it without world geometry (NIfTI qform and sform "
                                    "codes 0, voxel sizes only), or export the series again with its geometry.")
            values = image.array
            whole = bool(np.all(np.mod(values, 1) == 0) and values.min() >= -32768 and values.max() <= 32767)
            # whole numbers (CT in HU, most MR) are stored as int16, anything else as float32
            nifti = write_nifti(image, out_dir / f"{source.name}.nii.gz", dtype=np.int16 if whole else None,
                                protected=inputs, xform_code=1 if known else 0)
            meta = sidecar(source, image, keep_identifiers=keep_identifiers)
            json_path = write_json(meta, out_dir / f"{source.name}.json", protected=inputs)
        except MedidiffError as err:
            failures.record(source.name, err)
            continue
        if not known:
            text = (f"written without world geometry (NIfTI qform/sform codes 0): {meta['GeometrySource']}; "
                    "do not overlay it on other scans by position")
            meta["Warnings"].insert(0, text)
            write_json(meta, json_path, protected=inputs)
            log.warning("%s: %s", source.name, text)
        log.info("%s: %s series %s, %s voxels -> %s", source.name, meta.get("Modality", "NIfTI"),
                 meta.get("SeriesNumber", "-"), "x".join(str(n) for n in meta["ImageShape"]), nifti.name)
        result.warnings += [(source.name, w) for w in meta["Warnings"]]
        result.images.append(nifti)
        result.sidecars.append(json_path)
        common = {"case": source.name, "modality": meta.get("Modality", ""),
                  "series_number": meta.get("SeriesNumber", ""), "description": meta.get("SeriesDescription", ""),
                  "shape": "x".join(str(n) for n in meta["ImageShape"]),
                  "voxel_size_mm": "x".join(f"{v:g}" for v in meta["VoxelSize"]),
                  "geometry_known": "yes" if known else "no"}
        rows += [{"file": nifti.name, "kind": "image", **common}, {"file": json_path.name, "kind": "sidecar", **common}]
    result.failures = len(failures)
    result.failures_file = failures.path if len(failures) else None
    if not result.images:
        first = failures.rows[0] if failures.rows else None
        reason = f"; {first['case']} {first['error'].rstrip('.')}" if first else ""
        raise DataError(f"no series could be converted ({len(failures)} failed{reason}).", where=path,
                        fix=f"see {failures.path} for each failure and its fix"
                            + (f" ({first['fix'].rstrip('.')})" if first and first["fix"] else "") + ".")
    for row in failures.rows:  # once each, after the series written (an error above says it all otherwise)
        log.warning("skipped %s: %s: %s Fix: %s", row["case"], row["file"], row["error"], row["fix"])
    result.table = write_table(rows, out_dir / CONVERTED_FILE, protected=inputs)
    return result


def convert_path(path: str | Path, out_dir: str | Path, select: str | None = "all", **options) -> list[Path]:
    """Writes each series or volume at a path as NIfTI with its sidecar; see :func:`convert`.

    Args:
        path: anything :func:`medidiff.data.discover.discover` understands.
        out_dir: the output folder.
        select: DICOM series selection rule (default: all series).
        **options: ``allow_unknown_geometry``, ``keep_identifiers``, ``overwrite`` (see :func:`convert`).

    Returns:
        The NIfTI files written.

    Raises:
        DataError: see :func:`convert`.
    """
    return convert(path, out_dir, select, **options).images
