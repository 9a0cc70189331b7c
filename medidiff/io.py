"""Writing results with the geometry of the input they came from.

Owns every file medidiff writes for a case: NIfTI volumes with the input's affine (``write_nifti``,
``write_like``), results moved from the model's grid back onto the input's grid (``to_input_grid``), a
derived DICOM series beside a DICOM input (``write_dicom_series``), PNG overlays for a quick look
(``overlay_png``), and tables and JSON (``write_table``, ``write_json``).

Every write is atomic (a temporary file in the target folder, then ``os.replace``) and refuses to
overwrite a path named as an input. File names are ``<case>_<kind>.<ext>`` with a safe case name
(``safe_case_name``, ``result_path``).

Not implemented: DICOM SEG and Parametric Map objects (highdicom). ``write_dicom_series`` writes a
derived CT/MR-like image series instead, which every viewer reads.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medidiff.errors import DataError

from .arrays import to_numpy

PathLike = str | os.PathLike
ArrayLike = np.ndarray | torch.Tensor

#: File name endings stripped from case names (longest first).
_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mha", ".mhd", ".nrrd", ".dcm", ".dicom", ".ima", ".npy", ".npz")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_KIND = re.compile(r"^[a-z0-9][a-z0-9_]*$")


# --------------------------------------------------------------------------------------------- names


def safe_case_name(text: str | os.PathLike, identifiers: Iterable[str] = (), max_length: int = 64) -> str:
    """Turn a file or series stem into a safe case name for output files.

    Drops any path pieces and a known image extension, replaces every character outside
    ``[A-Za-z0-9._-]`` by ``_``, and never returns a hidden name, ``.`` or ``..``. Callers pass file or
    series stems, never DICOM tag text; ``identifiers`` (e.g. the patient's name and ID) are removed
    from the name as a second guard.

    Args:
        text: a file name, stem or path.
        identifiers: strings that must not appear in the name (matched case-insensitively; name
            components split on ``^``, spaces and commas are removed one by one).
        max_length: longest name returned.

    Returns:
        The safe name; ``"case"`` if nothing usable is left.
    """
    name = re.split(r"[/\\]", str(text).strip())[-1]
    lower = name.lower()
    for ext in _EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
            break
    for ident in identifiers:
        for part in re.split(r"[\^\s,]+", str(ident)):
            if len(part) >= 2:
                name = re.sub(re.escape(part), "", name, flags=re.IGNORECASE)
    name = _UNSAFE.sub("_", name)
    name = re.sub(r"_{2,}", "_", name).strip("._-")[:max_length].strip("._-")
    return name or "case"


def result_path(out_dir: PathLike, case: str, kind: str, ext: str) -> Path:
    """Path of a per-case result: ``<out_dir>/<case>_<kind>.<ext>``.

    Args:
        out_dir: the run's output folder.
        case: the case's stem (made safe with :func:`safe_case_name`).
        kind: what the file holds (``heatmap``, ``healthy``, ``anomaly_mask``, ``overlay``...); lower
            case letters, digits and ``_``.
        ext: extension without or with the leading dot (``nii.gz``, ``png``, ``csv``).

    Returns:
        The path (nothing is created).
    """
    if not _KIND.match(kind):
        raise ValueError(f"result kind {kind!r} must be lower case letters, digits and '_'")
    ext = ext.lstrip(".")
    if not ext or _UNSAFE.search(ext):
        raise ValueError(f"bad file extension {ext!r}")
    return Path(out_dir) / f"{safe_case_name(case)}_{kind}.{ext}"


# -------------------------------------------------------------------------------------- atomic writes


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(path: PathLike, protected: Iterable[PathLike] = ()) -> Path:
    """Raise a ``DataError`` if ``path`` is (or is inside) one of the ``protected`` input paths.

    Args:
        path: the path about to be written.
        protected: input files or folders that must never be overwritten.

    Returns:
        ``path`` as an absolute ``Path``.
    """
    target = Path(path).expanduser().resolve()
    for item in protected:
        src = Path(item).expanduser().resolve()
        if target == src or src in target.parents or _same_file(target, src):
            raise DataError(
                "refusing to write over an input",
                where=target,
                fix="choose an output folder (--out) that is not an input file or inside an input folder.",
            )
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: PathLike, protected: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path in the same folder, then move it onto ``path``.

    The temporary file keeps ``path``'s extensions (so writers that pick a format by name, such as
    nibabel, behave the same). If the block raises, the temporary file is removed and ``path`` is left
    as it was.

    Args:
        path: final file path; its folder is created if needed.
        protected: input files or folders that must not be overwritten (see :func:`check_not_input`).

    Yields:
        The temporary path to write to.

    Raises:
        DataError: ``path`` is a protected input or an existing folder.
    """
    target = check_not_input(path, protected)
    if target.is_dir():
        raise DataError("cannot write a file over a folder", where=target, fix="choose another output name.")
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes owner-only files; results get the usual permissions
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(text: str, path: PathLike, protected: Iterable[PathLike] = ()) -> Path:
    """Write ``text`` (UTF-8) atomically.

    Args:
        text: the content.
        path: the file to write.
        protected: input paths that must not be overwritten.

    Returns:
        ``path`` as a ``Path``.
    """
    with atomic_write(path, protected) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def write_json(obj: Any, path: PathLike, protected: Iterable[PathLike] = ()) -> Path:
    """Write ``obj`` as indented JSON, atomically (NumPy/torch values, paths and dates are converted).

    Args:
        obj: a JSON-able object.
        path: the file to write.
        protected: input paths that must not be overwritten.

    Returns:
        ``path`` as a ``Path``.
    """
    text = json.dumps(obj, indent=2, default=_jsonable, allow_nan=True) + "\n"
    return write_text(text, path, protected)


def write_table(rows: Sequence[Mapping[str, Any]], path: PathLike, protected: Iterable[PathLike] = ()) -> Path:
    """Write rows (dicts) as a CSV table, atomically; columns are the keys in first-seen order.

    Args:
        rows: the table's rows; a missing key leaves an empty cell.
        path: the file to write.
        protected: input paths that must not be overwritten.

    Returns:
        ``path`` as a ``Path``.
    """
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with atomic_write(path, protected) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _jsonable(v) if isinstance(v, (np.generic, torch.Tensor)) else v
                             for k, v in row.items()})
    return Path(path)


# ------------------------------------------------------------------------------------------- volumes


def _affine_of(obj: Any) -> np.ndarray:
    affine = getattr(obj, "affine", obj)
    affine = to_numpy(affine).astype(np.float64)
    if affine.shape != (4, 4):
        raise DataError(f"expected a 4 x 4 affine, got shape {affine.shape}")
    return affine


def _output_dtype(array: np.ndarray, dtype: Any) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype)
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for cand in (np.uint8, np.int16, np.int32):
            if np.iinfo(cand).min <= lo and hi <= np.iinfo(cand).max:
                return np.dtype(cand)
        return np.dtype(np.int64)
    return np.dtype(np.float32)


def write_nifti(
    data: ArrayLike,
    path: PathLike,
    affine: Any = None,
    *,
    dtype: Any = None,
    protected: Iterable[PathLike] = (),
) -> Path:
    """Write a volume as NIfTI with the given affine, atomically.

    Args:
        data: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` array or tensor (or a 2D ``(X, Y)`` slice). One
            channel is squeezed; several channels are stored as the 4th NIfTI dimension.
        path: the ``.nii`` or ``.nii.gz`` file to write.
        affine: voxel-to-RAS affine (4 x 4 array/tensor, or an object with ``.affine`` such as a
            MetaTensor); ``None`` takes ``data.affine``.
        dtype: stored type; by default float32 for maps, uint8 for masks (bool) and small labels.
        protected: input paths that must not be overwritten.

    Returns:
        ``path`` as a ``Path``.
    """
    import nibabel as nib

    if affine is None:
        if not hasattr(data, "affine"):
            raise DataError("no affine given for a plain array", where=path,
                            fix="pass affine=... or a MetaTensor, or use write_like(data, reference, path).")
        affine = data.affine
    affine = _affine_of(affine)
    array = to_numpy(data)
    if array.ndim == 4:  # (C, X, Y, Z)
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    elif array.ndim not in (2, 3):
        raise DataError(f"cannot write an array of shape {array.shape} as a volume", where=path,
                        fix="pass (X, Y, Z) or (C, X, Y, Z).")
    array = np.ascontiguousarray(array.astype(_output_dtype(array, dtype), copy=False))
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_write(path, protected) as tmp:
        nib.save(image, tmp)
    return Path(path)


def _spatial_shape(obj: Any, ndim: int = 3) -> tuple[int, ...]:
    return tuple(int(s) for s in obj.shape[-ndim:])


def write_like(
    data: ArrayLike,
    reference: Any,
    path: PathLike,
    *,
    dtype: Any = None,
    protected: Iterable[PathLike] = (),
) -> Path:
    """Write ``data`` as NIfTI with the geometry (affine) of ``reference``, so it overlays the input.

    Args:
        data: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` on the reference's grid.
        reference: the input's ``MetaTensor`` ``(C, X, Y, Z)`` (or any object with ``.affine`` and
            ``.shape``, e.g. a nibabel image).
        path: the file to write.
        dtype: stored type (default: float32 for maps, uint8 for masks).
        protected: input paths that must not be overwritten.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        DataError: the data's spatial shape differs from the reference's.
    """
    if _spatial_shape(data) != _spatial_shape(reference):
        raise DataError(
            f"result shape {tuple(data.shape)} does not match the input grid {_spatial_shape(reference)}",
            where=path,
            fix="map the result back with medidiff.io.to_input_grid(result, reference, prepared) first.",
        )
    return write_nifti(data, path, reference, dtype=dtype, protected=protected)


def to_input_grid(
    result: ArrayLike,
    reference_meta: Any,
    prepared_meta: Any,
    *,
    mode: str = "bilinear",
    fill: float = 0.0,
) -> Any:
    """Move a result computed on the model's grid back onto the input's grid.

    Whatever the preparation did to the geometry (orientation, spacing, crop, pad, resize) is recorded
    in the prepared image's affine, so the result is resampled from the prepared grid to the input grid
    by their two affines with MONAI's ``SpatialResample``. Intensity transforms play no part here (see
    ``medidiff.data.transforms.to_input_units``).

    Args:
        result: ``(C, *spatial)`` on the prepared grid (same spatial shape as ``prepared_meta``).
        reference_meta: the input as read (``MetaTensor`` ``(C, X, Y, Z)``): gives the target affine and
            shape.
        prepared_meta: the prepared image the model saw (``MetaTensor``): gives the source affine.
        mode: ``"bilinear"`` for maps, ``"nearest"`` for masks and labels.
        fill: value outside the prepared field of view.

    Returns:
        A float32 ``MetaTensor`` ``(C, X, Y, Z)`` on the input grid with the input's affine.
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src_affine = torch.as_tensor(_affine_of(prepared_meta))
    dst_affine = torch.as_tensor(_affine_of(reference_meta))
    ndim = src_affine.shape[0] - 1
    values = torch.as_tensor(to_numpy(result), dtype=torch.float32)
    if values.ndim == ndim:
        values = values[None]
    if tuple(values.shape[-ndim:]) != _spatial_shape(prepared_meta, ndim):
        raise DataError(
            f"result shape {tuple(values.shape)} does not match the prepared grid "
            f"{_spatial_shape(prepared_meta, ndim)}",
            fix="pass the prepared image the model saw as prepared_meta.",
        )
    values = values - fill  # SpatialResample pads with zeros
    image = MetaTensor(values, affine=src_affine)
    resample = SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float64)
    out = resample(image, dst_affine=dst_affine, spatial_size=_spatial_shape(reference_meta, ndim))
    out = out.float() + fill
    return MetaTensor(out.as_tensor(), affine=dst_affine, meta={"space": "RAS"})


# --------------------------------------------------------------------------------------------- DICOM


def _lps_positions(ds: Any) -> np.ndarray:
    """World (LPS, mm) position of every pixel of a single-frame DICOM slice, shape ``(rows, cols, 3)``."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    dr, dc = (float(v) for v in ds.PixelSpacing)  # row spacing (between rows), column spacing
    r, c = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
    return ipp + c[..., None] * dc * iop[:3] + r[..., None] * dr * iop[3:]


_COPIED_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator", "Modality", "BodyPartExamined",
    "PatientPosition", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "SliceLocation", "InstanceNumber", "Rows", "Columns",
)


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
    inverse = np.linalg.inv(_affine_of(reference))
    finite = array[np.isfinite(array)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    series_uid = generate_uid()
    now = datetime.now()
    written = []
    for k, src in enumerate(sources):
        ds_src = src if isinstance(src, Dataset) else pydicom.dcmread(src, stop_before_pixels=True)
        where = getattr(ds_src, "filename", None) or f"source slice {k}"
        if int(ds_src.get("NumberOfFrames", 1) or 1) > 1 or "ImagePositionPatient" not in ds_src:
            raise DataError("only single-frame slices with ImagePositionPatient can be referenced", where=where,
                            fix="write NIfTI output for multi-frame or non-image sources.")
        ras = _lps_positions(ds_src) * np.array([-1.0, -1.0, 1.0])
        ijk = ras @ inverse[:3, :3].T + inverse[:3, 3]
        idx = np.rint(ijk).astype(np.int64)
        if np.abs(ijk - idx).max() > 0.05 or (idx < 0).any() or (idx >= np.array(array.shape)).any():
            raise DataError("a source slice does not lie on the result's grid", where=where,
                            fix="map the result onto the input grid (to_input_grid) before writing DICOM.")
        values = array[idx[..., 0], idx[..., 1], idx[..., 2]]
        stored = np.clip(np.rint((np.nan_to_num(values, nan=lo) - lo) / slope), 0, 65535).astype(np.uint16)

        ds = Dataset()
        for tag in _COPIED_TAGS:
            if tag in ds_src:
                setattr(ds, tag, ds_src.data_element(tag).value)
        sop_class = ds_src.SOPClassUID
        if sop_class.name not in ("CT Image Storage", "MR Image Storage"):
            sop_class = pydicom.uid.SecondaryCaptureImageStorage
        ds.SOPClassUID = sop_class
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


# ----------------------------------------------------------------------------------------------- PNG


def _drop_channel(x: ArrayLike) -> np.ndarray:
    """As float64 NumPy, without a leading channel axis of length 1 (``(1, H, W)``, ``(1, X, Y, Z)``)."""
    a = to_numpy(x).astype(np.float64)
    return a[0] if a.ndim in (3, 4) and a.shape[0] == 1 else a


def relevant_slices(volume: ArrayLike, n: int, axis: int = -1) -> list[int]:
    """The ``n`` slices along ``axis`` holding the most mass of ``volume`` (e.g. a heatmap), in order.

    Args:
        volume: a 3D array (negative values and NaNs count as 0).
        n: number of slices wanted (fewer if the volume has fewer).
        axis: slicing axis.

    Returns:
        Sorted slice indices. If the volume is all zero, ``n`` evenly spaced slices.
    """
    v = np.nan_to_num(to_numpy(volume).astype(np.float64), nan=0.0)
    axis = axis % v.ndim
    mass = np.clip(v, 0, None).sum(axis=tuple(d for d in range(v.ndim) if d != axis))
    n = min(n, mass.size)
    if not mass.any():
        return sorted({int(round(i)) for i in np.linspace(0, mass.size - 1, n + 2)[1:-1]})
    order = np.argsort(-mass, kind="stable")[:n]
    return sorted(int(i) for i in order if mass[i] > 0) or [int(order[0])]


def overlay_png(
    image: ArrayLike,
    heatmap: ArrayLike | None = None,
    contours: ArrayLike | Mapping[str, ArrayLike] | None = None,
    path: PathLike = "overlay.png",
    title: str = "",
    units: str = "",
    n_slices: int = 6,
    *,
    axis: int = -1,
    ncols: int = 3,
    cmap: str = "inferno",
    alpha: float = 0.5,
    threshold: float | None = None,
    vmax: float | None = None,
    panel_inches: float = 2.5,
    dpi: int = 100,
    protected: Iterable[PathLike] = (),
) -> Path:
    """Write a PNG montage of an image with an optional heatmap overlay and mask contours.

    For a 3D volume, the ``n_slices`` slices along ``axis`` holding the most heatmap mass (else contour
    mass, else evenly spaced ones) are shown. Slices are drawn in array order, first axis to the right
    and second axis up (for a RAS axial slice: patient's right on the right, anterior up). The heatmap
    is drawn where it exceeds ``threshold``, with a colour bar labelled with ``units``.

    Args:
        image: ``(H, W)`` / ``(X, Y, Z)``, optionally with a leading channel of 1.
        heatmap: a map of the same shape (optional).
        contours: a mask, or a dict ``{name: mask}``, drawn as outlines (optional).
        path: the PNG file to write.
        title: figure title.
        units: the heatmap's units, shown on the colour bar.
        n_slices: number of slices for a 3D volume.
        axis: slicing axis of a 3D volume.
        ncols: most panels per row.
        cmap: heatmap colour map.
        alpha: heatmap opacity.
        threshold: heatmap values at or below it are not drawn (default: 0).
        vmax: top of the heatmap colour scale (default: the heatmap's 99.5th percentile over the shown
            slices).
        panel_inches: size of one panel; the figure is ``ncols * panel + 0.9`` by
            ``nrows * panel + 0.5`` inches at ``dpi``.
        dpi: resolution.
        protected: input paths that must not be overwritten.

    Returns:
        ``path`` as a ``Path``.
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    img = _drop_channel(image)
    if img.ndim not in (2, 3):
        raise DataError(f"cannot draw an image of shape {tuple(image.shape)}", where=path)
    heat = None if heatmap is None else _drop_channel(heatmap)
    masks = {} if contours is None else (
        dict(contours) if isinstance(contours, Mapping) else {"": contours})
    masks = {k: _drop_channel(v) > 0.5 for k, v in masks.items()}
    for name, arr in (("heatmap", heat), *masks.items()):
        if arr is not None and arr.shape != img.shape:
            raise DataError(f"{name or 'contour'} shape {arr.shape} differs from the image's {img.shape}",
                            where=path)

    if img.ndim == 2:
        take, labels = [lambda a: a], [""]
    else:
        ax_ = axis % 3
        key = heat if heat is not None else (sum(m.astype(float) for m in masks.values()) if masks else None)
        if key is None:  # evenly spaced over the slices that hold anything
            nz = np.nonzero(np.abs(img).sum(axis=tuple(d for d in range(3) if d != ax_)))[0]
            lo, hi = (int(nz[0]), int(nz[-1])) if nz.size else (0, img.shape[ax_] - 1)
            idx = [lo + i for i in relevant_slices(np.zeros(hi - lo + 1), n_slices, 0)]
        else:
            idx = relevant_slices(key, n_slices, ax_)
        take = [(lambda a, i=i: np.take(a, i, axis=ax_)) for i in idx]
        labels = [f"slice {i}" for i in idx]

    n = len(take)
    cols = min(ncols, n)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(cols * panel_inches + 0.9, rows * panel_inches + 0.5), dpi=dpi)
    grid = fig.add_gridspec(rows, cols, left=0.02, right=1 - 0.9 / (cols * panel_inches + 0.9),
                            bottom=0.02, top=1 - 0.45 / (rows * panel_inches + 0.5), wspace=0.04, hspace=0.12)
    finite = img[np.isfinite(img)]
    gray = np.percentile(finite, [0.5, 99.5]) if finite.size else (0, 1)
    norm = None
    if heat is not None:
        low = threshold if threshold is not None else 0.0
        shown = np.concatenate([f(heat).ravel() for f in take])
        shown = shown[np.isfinite(shown) & (shown > low)]
        top = vmax if vmax is not None else (np.percentile(shown, 99.5) if shown.size else low + 1.0)
        norm = matplotlib.colors.Normalize(vmin=low, vmax=max(float(top), low + 1e-6))
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (f, label) in enumerate(zip(take, labels)):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        ax.imshow(f(img).T, cmap="gray", origin="lower", vmin=gray[0], vmax=gray[1], interpolation="nearest")
        if heat is not None:
            h = f(heat)
            h = np.ma.masked_where(~np.isfinite(h) | (h <= norm.vmin), h)
            ax.imshow(h.T, cmap=cmap, norm=norm, origin="lower", alpha=alpha, interpolation="nearest")
        for j, m in enumerate(masks.values()):
            sl = f(m)
            if sl.any() and not sl.all():
                ax.contour(sl.T.astype(float), levels=[0.5], colors=[colors[(j + 2) % len(colors)]],
                           linewidths=0.8, origin="lower")
        ax.set_xticks([])
        ax.set_yticks([])
        if label:
            ax.set_title(label, fontsize=8)
    if any(masks) and any(name for name in masks):
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colors[(j + 2) % len(colors)], label=name)
                   for j, name in enumerate(masks) if name]
        fig.legend(handles=handles, loc="lower right", fontsize=7, frameon=False)
    if norm is not None:
        width = cols * panel_inches + 0.9
        cax = fig.add_axes([1 - 0.75 / width, 0.1, 0.12 / width, 0.75])
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
        bar.set_label(units, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_write(path, protected) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)

