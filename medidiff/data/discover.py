"""Finding the inputs at a path and opening them: ``discover`` -> ``Source`` -> ``load``.

An input may be a NIfTI file or a folder of them, a DICOM file, a folder (searched recursively) of
DICOM files, a DICOMDIR, a MONAI-style JSON datalist, a CSV with ``image[,label]`` columns, or an
nnU-Net-style folder (``imagesTr/``, ``labelsTr/``, ``imagesTs/``, channel files ``case_0000``,
``case_0001``...). Each case found is a :class:`Source`; :func:`load` turns it into a MONAI
``MetaTensor`` laid out channel-first ``(C, X, Y, Z)`` with a voxel-to-RAS affine (see
:mod:`medidiff.data.dicom` for the DICOM axis convention). A 2D image is a single slice, ``Z == 1``,
so that its full 3D position is kept; a 2D pipeline takes ``image[..., 0]``.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, load_decathlon_datalist

from medidiff.data import dicom
from medidiff.data.dicom import SeriesInfo
from medidiff.data.nifti import (
    NO_WORLD_GEOMETRY,
    is_nifti,
    nifti_geometry,
    nifti_stem,
    nifti_world_geometry,
    read_nifti,
)
from medidiff.errors import DataError

__all__ = ["SELECT_RULES", "Source", "discover", "geometry", "load", "load_companion", "load_label", "select_series"]

SELECT_RULES = "None, 'all', 'largest', 'modality:<MR|CT|...>' or 'description:<text>'"
SPLITS = ("training", "validation", "test")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Source:
    """One case found by :func:`discover`.

    Attributes:
        name: a file-safe case name: a NIfTI file's stem, or for DICOM ``s<number>_<modality>_<uid hash>``
            (never a patient name or other tag text; no path separators).
        kind: ``"nifti"`` or ``"dicom"``.
        paths: the files: one NIfTI file per channel, or all the files of a DICOM series.
        label: the label file or folder, if any.
        mask: a foreground (e.g. brain) mask file, if any (datalist/CSV ``mask``).
        annotations: further label files of the same case (several raters; datalist ``annotations``).
        split: ``"training"``, ``"validation"``, ``"test"`` or None.
        series: for DICOM, the series summary.
        problems: warnings that did not stop it being used (e.g. no patient geometry, gantry tilt);
            :func:`load` adds those it finds while reading.
    """

    name: str
    kind: str
    paths: list[Path]
    label: Path | None = None
    mask: Path | None = None
    annotations: list[Path] = field(default_factory=list)
    split: str | None = None
    series: SeriesInfo | None = None
    problems: list[str] = field(default_factory=list)


def discover(path: str | Path, select: str | None = None,
             skipped: list[tuple[Path, str]] | None = None) -> list[Source]:
    """Finds the cases at a path.

    Args:
        path: a file or folder (see the module docstring for what is understood).
        select: which DICOM series to keep when a folder holds several: None (there must be
            exactly one), ``"all"``, ``"largest"`` (most images), ``"modality:MR"`` or
            ``"description:<text>"`` (case-insensitive substring of SeriesDescription).
        skipped: if given, receives ``(file, reason)`` for each file that was passed over because it
            is not an image (non-DICOM files, reports, a DICOMDIR index, missing references...).

    Returns:
        The cases, each with a unique name.

    Raises:
        DataError: the path is missing or holds no images, a datalist is invalid or points at missing
            files, or several DICOM series are found and ``select`` does not pick them.
    """
    path = Path(path)
    passed_over: list[tuple[Path, str]] = []
    sources = _discover(path, select, passed_over)
    if skipped is not None:
        skipped.extend(passed_over)
    return _unique_names(sources)


def _discover(path: Path, select: str | None, skipped: list[tuple[Path, str]]) -> list[Source]:
    if path.is_symlink() and not path.exists():
        raise DataError("is a broken symbolic link.", where=path, fix="point the link at an existing file.")
    if not path.exists():
        raise DataError("does not exist.", where=path, fix="check the path.")
    if path.is_dir():
        if (path / "imagesTr").is_dir() or (path / "imagesTs").is_dir():
            return _nnunet(path, skipped)
        if (path / "DICOMDIR").is_file():
            return _dicomdir(path / "DICOMDIR", select, skipped)
        return _folder(path, select, skipped)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _datalist(path, select)
    if suffix == ".csv":
        return _csv(path, select)
    if is_nifti(path):
        return [_nifti_source([path])]
    header = dicom.read_header(path)
    if dicom.is_dicomdir(header):
        return _dicomdir(path, select, skipped)
    reason = dicom.image_problem(header)
    if reason:
        raise DataError(f"{reason}.", where=path, fix="point at an image file or a folder of images.")
    return _dicom_sources({str(header.get("SeriesInstanceUID", "")): [(path, header)]}, None, path)


def _folder(path: Path, select: str | None, skipped: list[tuple[Path, str]]) -> list[Source]:
    try:
        files = sorted(p for p in path.rglob("*") if not p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise DataError(f"cannot be searched ({type(err).__name__}: {err}).", where=path,
                        fix="point at a folder you can read that holds the scans.") from err
    niftis = [p for p in files if is_nifti(p)]
    candidates = [p for p in files if not is_nifti(p) and p.suffix.lower() not in (".json", ".csv", ".txt")]
    skipped.extend((p, "is not an image (datalist or text file)") for p in files
                   if not is_nifti(p) and p not in candidates)
    series, not_dicom = dicom.group_series(candidates)
    skipped.extend(not_dicom)
    sources = [_nifti_source([p]) for p in niftis]
    if series:
        sources += _dicom_sources(series, select, path)
    if not sources:
        if not files:
            raise DataError("is an empty folder (no files found, also in sub-folders).", where=path,
                            fix="point at the folder that holds the NIfTI or DICOM files.")
        reasons = "; ".join(f"{p.name} {why}" for p, why in not_dicom[:3])
        raise DataError(f"holds no NIfTI or DICOM images ({len(files)} file(s) passed over: {reasons}).",
                        where=path, fix="point at the folder that holds the NIfTI or DICOM files.")
    return sources


def _dicomdir(path: Path, select: str | None, skipped: list[tuple[Path, str]]) -> list[Source]:
    files, missing = dicom.dicomdir_files(path)
    skipped.extend(missing)
    series, not_images = dicom.group_series(files)
    skipped.extend(not_images)
    if not series:
        raise DataError("is a DICOMDIR that references no readable images.", where=path,
                        fix="check that the referenced files were copied along with the DICOMDIR.")
    return _dicom_sources(series, select, path)


def _dicom_sources(series: dict[str, list], select: str | None, where: Path) -> list[Source]:
    found = []
    for members in series.values():
        info = dicom.summarize(members)
        found.append(Source(name=dicom.series_name(info), kind="dicom", paths=[p for p, _ in members],
                            series=info))
    found.sort(key=lambda s: (s.series.number, s.name))
    return select_series(found, select, where)


def select_series(sources: list[Source], select: str | None, where: str | Path) -> list[Source]:
    """Applies a series selection rule (see :func:`discover`) to DICOM sources.

    Args:
        sources: DICOM sources of one input.
        select: the rule.
        where: the input, named in errors.

    Returns:
        The chosen sources.

    Raises:
        DataError: the rule is unknown, matches nothing, or is None while there are several series.
    """
    listing = "; ".join(
        f"{s.name}: {s.series.modality} '{s.series.description}' ({s.series.images} images)" for s in sources)
    if select is None:
        if len(sources) == 1:
            return sources
        raise DataError(f"holds {len(sources)} DICOM series: {listing}.", where=where,
                        fix="choose with a selection rule: select='all', 'largest', 'modality:MR' or "
                            "'description:<text>' (command line: --select).")
    rule, _, value = select.partition(":")
    rule, value = rule.strip().lower(), value.strip().lower()
    if rule == "all":
        chosen = sources
    elif rule == "largest":
        chosen = [max(sources, key=lambda s: s.series.images)]
    elif rule == "modality":
        chosen = [s for s in sources if s.series.modality.lower() == value]
    elif rule == "description":
        chosen = [s for s in sources if value in s.series.description.lower()]
    else:
        raise DataError(f"unknown series selection rule {select!r}.", where=where,
                        fix=f"use one of {SELECT_RULES}.")
    if not chosen:
        raise DataError(f"no DICOM series matches {select!r}; found: {listing}.", where=where,
                        fix=f"change the rule ({SELECT_RULES}).")
    return chosen


def _nifti_source(paths: list[Path], name: str | None = None, label: Path | None = None,
                  split: str | None = None) -> Source:
    return Source(name=_safe(name or nifti_stem(paths[0])), kind="nifti", paths=list(paths), label=label,
                  split=split)


def _nnunet(root: Path, skipped: list[tuple[Path, str]]) -> list[Source]:
    sources = []
    for folder, labels, split in (("imagesTr", "labelsTr", "training"), ("imagesTs", "labelsTs", "test")):
        if not (root / folder).is_dir():
            continue
        cases: dict[str, dict[int, Path]] = {}
        for path in sorted((root / folder).iterdir()):
            match = _CHANNEL.match(nifti_stem(path)) if is_nifti(path) else None
            if not match:
                skipped.append((path, "is not a NIfTI file named <case>_<4-digit channel>"))
                continue
            cases.setdefault(match["case"], {})[int(match["channel"])] = path
        for case, channels in sorted(cases.items()):
            if sorted(channels) != list(range(len(channels))):
                raise DataError(f"case '{case}' has channels {sorted(channels)}; expected 0000 to "
                                f"{len(channels) - 1:04d} without gaps.", where=root / folder,
                                fix="name the channel files <case>_0000, <case>_0001, ... consecutively.")
            label = root / labels / f"{case}.nii.gz"
            sources.append(_nifti_source([channels[c] for c in sorted(channels)], name=case,
                                         label=label if label.is_file() else None, split=split))
    counts = {len(s.paths) for s in sources}
    if len(counts) > 1:
        raise DataError(f"cases have different numbers of channels ({sorted(counts)}).", where=root,
                        fix="give every case the same channel files (<case>_0000, <case>_0001, ...).")
    if not sources:
        raise DataError("is an nnU-Net-style folder without images.", where=root,
                        fix="put <case>_0000.nii.gz files in imagesTr/ or imagesTs/.")
    return sources


def _datalist(path: Path, select: str | None) -> list[Source]:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"is not a readable JSON datalist ({err}).", where=path,
                        fix='write it as {"training": [{"image": "...", "label": "..."}], ...}.') from err
    keys = [k for k in SPLITS if isinstance(content, dict) and k in content]
    if not keys:
        raise DataError(f"has none of the keys {list(SPLITS)}.", where=path,
                        fix='use the MONAI datalist layout {"training": [{"image": "...", "label": "..."}]}.')
    sources = []
    for key in keys:
        try:
            entries = load_decathlon_datalist(path, is_segmentation=False, data_list_key=key,
                                              base_dir=path.parent)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:  # MONAI's reader
            raise DataError(f"has an invalid '{key}' list ({type(err).__name__}: {err}).", where=path,
                            fix="give each entry an 'image' (and optionally a 'label').") from err
        for entry in entries:
            if not isinstance(entry, dict) or "image" not in entry:
                raise DataError(f"has a '{key}' entry without 'image': {entry!r}.", where=path,
                                fix="give each entry an 'image' path.")
            sources.append(_entry(entry["image"], entry.get("label"), key, select, path, mask=entry.get("mask"),
                                  annotations=entry.get("annotations")))
    return sources


def _csv(path: Path, select: str | None) -> list[Source]:
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"is not a readable CSV file ({err}).", where=path,
                        fix="write a CSV with an 'image' column and an optional 'label' column.") from err
    sources = []
    for number, row in enumerate(rows, start=2):
        # cells beyond the header (key None) and missing cells (value None) are ignored
        row = {k.strip().lower(): v.strip() for k, v in row.items() if isinstance(k, str) and isinstance(v, str)}
        if not row.get("image"):
            raise DataError(f"line {number} has no 'image' value.", where=path,
                            fix="write a CSV with an 'image' column and an optional 'label' column.")
        label = path.parent / row["label"] if row.get("label") else None
        mask = path.parent / row["mask"] if row.get("mask") else None
        split = row.get("split") or None
        sources.append(_entry(path.parent / row["image"], label, split, select, path, mask=mask))
    if not sources:
        raise DataError("lists no images.", where=path, fix="add rows with an 'image' column.")
    return sources


def _entry(image, label, split: str | None, select: str | None, listing: Path, *, mask=None,
           annotations=None) -> Source:
    """One datalist entry: an image path (or one per channel), optional label and mask paths, annotations."""
    _check_paths(listing, image=image, label=label, mask=mask, annotations=annotations)
    images = [Path(p) for p in (image if isinstance(image, (list, tuple)) else [image])]
    found = []
    for image_path in images:
        if not image_path.exists():
            raise DataError(f"lists an image that does not exist: {image_path}.", where=listing,
                            fix="correct the path (relative paths are read from the list's folder).")
        sources = _discover(image_path, select, [])
        if len(sources) != 1:
            raise DataError(f"entry {image_path} holds {len(sources)} images, not one.", where=listing,
                            fix="point each entry at one image (or give a stricter select rule).")
        found.append(sources[0])
    extra = [label, mask, *(annotations if isinstance(annotations, (list, tuple)) else [annotations])]
    # MONAI's datalist reader already joined the paths that exist to the list's folder
    extra = [None if p is None else (Path(p) if Path(p).exists() else listing.parent / p) for p in extra]
    for what, item in zip(("label", "mask", *["annotation"] * (len(extra) - 2)), extra):
        if item is not None and not item.exists():
            raise DataError(f"lists a {what} that does not exist: {item}.", where=listing,
                            fix="correct the path (relative paths are read from the list's folder).")
    label, mask, *annotations = extra
    if len(found) > 1 and any(s.kind != "nifti" for s in found):
        raise DataError("has a multi-channel entry that is not made of NIfTI files.", where=listing,
                        fix="give one NIfTI file per channel.")
    first = found[0]
    return Source(name=first.name, kind=first.kind, paths=[p for s in found for p in s.paths], label=label,
                  mask=mask, annotations=[p for p in annotations if p is not None], split=split,
                  series=first.series)


def _check_paths(listing: Path, **entries) -> None:
    """Every path of an entry is text (``image`` and ``annotations`` may be lists of them), or a DataError."""
    for key, value in entries.items():
        if value is None and key != "image":
            continue
        values = value if isinstance(value, (list, tuple)) and key in ("image", "annotations") else [value]
        if not values or not all(isinstance(v, (str, Path)) and str(v).strip() and "\0" not in str(v)
                                 for v in values):
            raise DataError(f"has an entry whose '{key}' is not a path (or a list of paths): {value!r}.",
                            where=listing, fix=f"give '{key}' as a path relative to the list's folder.")


def _safe(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return safe or "case"


def _unique_names(sources: list[Source]) -> list[Source]:
    seen: dict[str, int] = {}
    for source in sources:
        count = seen.get(source.name, 0)
        seen[source.name] = count + 1
        if count:
            source.name = f"{source.name}_{count + 1}"
    return sources


def _meta_tensor(array: np.ndarray, affine: np.ndarray, filename: Path, modality: str, case: str,
                 geometry: dict) -> MetaTensor:
    affine_t = torch.as_tensor(affine, dtype=torch.float64)
    meta = {
        "filename_or_obj": str(filename),
        "case": case,
        "modality": modality,
        "spacing": np.linalg.norm(affine[:3, :3], axis=0),
        "original_affine": affine_t.clone(),
        "spatial_shape": np.asarray(array.shape[1:]),
        "original_channel_dim": 0,
        "space": "RAS",
        "geometry_known": bool(geometry["known"]),
        "geometry_source": str(geometry["source"]),
    }
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=affine_t, meta=meta)


def load(source: Source, multichannel: bool = False) -> MetaTensor:
    """Reads a case's image.

    Args:
        source: a case from :func:`discover`.
        multichannel: let a single 4D NIfTI file stand for several channels.

    Returns:
        A float32 ``MetaTensor`` ``(C, X, Y, Z)`` with its voxel-to-RAS affine and meta
        ``filename_or_obj``, ``case``, ``modality`` ("" when unknown, as for NIfTI), ``spacing``
        (mm per axis), ``space`` ("RAS"), ``geometry_known`` (False when the files do not place the voxels
        in the patient: DICOM without ImagePositionPatient/ImageOrientationPatient, NIfTI with qform and
        sform codes 0) and ``geometry_source`` (in words). DICOM CT values are in HU.

    Raises:
        DataError: the files cannot be read or are inconsistent (see :mod:`medidiff.data.nifti` and
            :mod:`medidiff.data.dicom`).
    """
    if source.kind == "dicom":
        array, affine, info = dicom.read_series(source.paths, where=_where(source))
        source.problems.extend(p for p in info["problems"] if p not in source.problems)
        return _meta_tensor(array, affine, _where(source), info["modality"], source.name, info["geometry"])
    arrays = []
    affine = None
    for path in source.paths:
        array, this_affine = read_nifti(path, multichannel=multichannel)
        if affine is not None and (array.shape[1:] != arrays[0].shape[1:]
                                   or not np.allclose(this_affine, affine, atol=1e-3)):
            raise DataError(f"has a different grid from the case's first channel {source.paths[0].name} "
                            f"(shape {array.shape[1:]} vs {arrays[0].shape[1:]}).", where=path,
                            fix="resample all channels of a case onto one grid.")
        affine = this_affine if affine is None else affine
        arrays.append(array)
    known = nifti_world_geometry(source.paths[0])
    if not known and NO_WORLD_GEOMETRY not in source.problems:
        source.problems.append(NO_WORLD_GEOMETRY)
    where = "NIfTI sform/qform" if known else "none: NIfTI qform and sform codes 0 (voxel sizes only)"
    return _meta_tensor(np.concatenate(arrays), affine, source.paths[0], "", source.name,
                        {"known": known, "source": where})


def _where(source: Source) -> Path:
    if source.kind == "dicom" and len(source.paths) > 1:
        return Path(source.paths[0]).parent
    return Path(source.paths[0])


def geometry(source: Source) -> tuple[tuple[int, int, int], np.ndarray]:
    """A case's spatial shape ``(X, Y, Z)`` and RAS affine, from headers only (no pixel data).

    Args:
        source: a case from :func:`discover`.

    Returns:
        ``(shape, affine)``.
    """
    if source.kind == "dicom":
        members = [(Path(p), dicom.read_header(p)) for p in source.paths]
        geo = dicom.series_geometry(members, _where(source))
        return geo.shape, geo.affine
    return nifti_geometry(source.paths[0], multichannel=True)


def load_label(source: Source) -> MetaTensor:
    """Reads a case's label and checks that it lies on the image's grid (see :func:`load_companion`).

    Raises:
        DataError: there is no label, it cannot be read, or its shape or position differs from the image.
    """
    if source.label is None:
        raise DataError(f"case '{source.name}' has no label.", where=_where(source),
                        fix="pair the image with a label (datalist 'label', CSV 'label' column or labelsTr/).")
    return load_companion(source, source.label, "label")


def load_companion(source: Source, path: str | Path, what: str = "label") -> MetaTensor:
    """Reads a file that belongs to a case's image (label, mask, annotation) and checks it lies on its grid.

    Args:
        source: the case.
        path: the companion file (or a folder holding one series).
        what: what it is, for messages.

    Returns:
        A float32 ``MetaTensor`` ``(1, X, Y, Z)`` with the file's affine.

    Raises:
        DataError: it cannot be read, or its shape or position differs from the image's (by more than 1 %
            of a voxel).
    """
    path = Path(path)
    found = _discover(path, "largest", [])
    label = load(found[0])[:1]
    label.meta["case"] = source.name
    shape, affine = geometry(source)
    label_shape = tuple(label.shape[1:])
    fix = f"resample the {what} onto the image grid, or pair the right {what} with the image."
    if label_shape != tuple(shape):
        raise DataError(f"the {what} has shape {label_shape} but its image has shape {tuple(shape)}.", where=path,
                        fix=fix)
    corners = np.array([[x, y, z, 1.0] for x in (0, shape[0] - 1) for y in (0, shape[1] - 1)
                        for z in (0, shape[2] - 1)]).T
    offset = np.abs((label.affine.numpy() @ corners) - (affine @ corners)).max()
    tolerance = 0.01 * float(np.linalg.norm(affine[:3, :3], axis=0).min())
    if offset > tolerance:
        raise DataError(f"the {what} lies {offset:.3f} mm away from its image (same shape, different affine).",
                        where=path, fix=fix)
    return label
