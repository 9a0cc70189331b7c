"""What the notebooks share: where results go, example data to start from, scans paired with their masks, and a
slice viewer.

- ``results_beside(data, task)``: the output folder beside the data a notebook reads (``<name>_medidiff_<task>``
  next to the file or folder), never the current working folder.
- ``example_folder(name, files)``: bundled example files copied into a fresh folder of their own (in the system's
  temporary folder), laid out as a user's data would be, so a notebook runs as is and writes nothing into the
  medidiff checkout.
- ``pair_cases(scans, out, masks=..., labels=...)``: a JSON datalist pairing each scan found at ``scans`` with
  its mask and label files, found by name in other folders.
- ``slice_viewer(images, outlines=...)``: volumes side by side with a slider over their slices (an ipywidgets
  ``IntSlider``); without ipywidgets (``pip install 'medidiff[notebooks]'``) one slice is drawn, with a note.

The tasks themselves are run through their public functions (``medidiff.anomaly.detect``,
``medidiff.recon.reconstruct.reconstruct``, ``medidiff.segment.segment``), as the command line runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import DataError

__all__ = ["results_beside", "example_folder", "pair_cases", "slice_viewer", "volume", "NIFTI_SUFFIXES"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() else name


def results_beside(data: str | Path, task: str) -> Path:
    """The folder a notebook writes its results to: beside ``data``, named after it and the task.

    Args:
        data: the scans the notebook reads (a file, a folder or a datalist).
        task: what is written (``anomaly``, ``recon``...).

    Returns:
        ``<data's folder>/<data's name>_medidiff_<task>`` (created).
    """
    data = Path(data).expanduser().resolve()
    out = data.parent / f"{_stem(data)}_medidiff_{task}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def example_folder(name: str, files: Mapping[str, Sequence[str | Path] | Mapping[str, str | Path]]) -> Path:
    """Copy bundled example files into a fresh folder, laid out as a user's own data would be.

    Args:
        name: what the example is (part of the folder's name).
        files: sub-folder -> the files to copy into it (a list, or a mapping of new file names to files).

    Returns:
        The new folder (under the system's temporary folder, ``TMPDIR``), holding one sub-folder per entry.
    """
    root = Path(tempfile.mkdtemp(prefix=f"medidiff_{name}_"))
    for folder, items in files.items():
        target = root / folder
        target.mkdir(parents=True, exist_ok=True)
        pairs = items.items() if isinstance(items, Mapping) else ((Path(p).name, p) for p in items)
        for new_name, source in pairs:
            shutil.copyfile(source, target / new_name)
    return root


def _match(name: str, folder: Path | None, what: str) -> Path | None:
    """The file in ``folder`` named like the case: ``<name>.nii.gz`` or ``<name>_<anything>.nii.gz``."""
    if folder is None:
        return None
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES))
    exact = [p for p in candidates if _stem(p) == name]
    prefixed = [p for p in candidates if _stem(p).startswith(f"{name}_")]
    found = exact or prefixed
    if len(found) > 1:
        raise DataError(f"holds {len(found)} {what} files for case {name}: {', '.join(p.name for p in found)}.",
                        where=folder, fix=f"keep one {what} per case, named <case>.nii.gz or <case>_{what}.nii.gz.")
    return found[0] if found else None


def _image_entry(source) -> str:
    """A datalist ``image`` for a found case: its NIfTI file, or the folder that holds its DICOM series alone."""
    if source.kind == "nifti":
        return str(source.paths[0] if len(source.paths) == 1 else source.paths)
    parents = {p.parent for p in source.paths}
    if len(parents) != 1:
        raise DataError(f"the DICOM series of case {source.name} is spread over {len(parents)} folders.",
                        where=source.paths[0], fix="keep each series in a folder of its own, or convert the "
                        "scans to NIfTI first (medidiff convert).")
    return str(parents.pop())


def pair_cases(scans: str | Path, out: str | Path, *, masks: str | Path | None = None,
               labels: str | Path | None = None, select: str = "all") -> Path:
    """A JSON datalist pairing each scan with its mask and label files.

    A single scan file takes a single mask and label file as they are. For a folder of scans, the mask of case
    ``<case>`` (a NIfTI file's name without ``.nii.gz``, or a DICOM series' name) is the file in ``masks`` named
    ``<case>.nii.gz`` or ``<case>_<anything>.nii.gz``; the same for ``labels``. A datalist is returned unchanged
    when neither is given.

    Args:
        scans: a NIfTI file or folder, a DICOM folder (each series in its own folder), or a datalist.
        out: where the datalist is written (``cases.json`` in it).
        masks: a mask file for a single scan, or a folder of masks named like the scans.
        labels: a label (e.g. lesion) file for a single scan, or a folder of them named like the scans.
        select: DICOM series selection rule.

    Returns:
        The datalist's path.

    Raises:
        DataError: no scan is found, a case has several masks, or a mask folder names no scan at all.
    """
    from medidiff.data.discover import discover

    scans = Path(scans).expanduser()
    masks = None if masks is None else Path(masks).expanduser()
    labels = None if labels is None else Path(labels).expanduser()
    if scans.suffix.lower() == ".json" and masks is None and labels is None:
        return scans
    sources = discover(scans, select=select)
    entries = []
    for source in sources:
        entry: dict[str, Any] = {"image": _image_entry(source)}
        for key, given, own in (("mask", masks, source.mask), ("label", labels, source.label)):
            if given is not None and given.is_file():
                if len(sources) != 1:
                    raise DataError(f"one {key} file was given for {len(sources)} scans.", where=given,
                                    fix=f"give a folder of {key}s named like the scans.")
                found = given
            else:
                found = _match(source.name, given, key) if given is not None else own
            if found is not None:
                entry[key] = str(found)
        entries.append(entry)
    for key, given in (("mask", masks), ("label", labels)):
        if given is not None and given.is_dir() and not any(key in e for e in entries):
            raise DataError(f"holds no {key} named like the scans ({', '.join(s.name for s in sources[:3])}...).",
                            where=given, fix=f"name each {key} <case>.nii.gz or <case>_{key}.nii.gz.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cases.json"
    path.write_text(json.dumps({"test": entries}, indent=2))
    return path


def volume(item: Any) -> np.ndarray:
    """A 3D array ``(X, Y, Z)`` from a path, an array or a tensor (channel-first 4D: the first channel).

    A NIfTI file is read as stored (as medidiff writes its results); any other path (a DICOM file or folder, a
    datalist) is read as medidiff reads a scan (its first case), so results and scans line up voxel for voxel.
    """
    if isinstance(item, (str, os.PathLike)) and os.fspath(item).lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        array = np.asarray(nib.load(os.fspath(item)).dataobj, dtype=np.float32)
        if array.ndim == 4:
            array = array[..., 0]
    elif isinstance(item, (str, os.PathLike)):
        from medidiff.data.discover import discover, load

        array = np.asarray(load(discover(Path(item), select="largest")[0]), dtype=np.float32)[0]
    else:
        array = np.asarray(item.detach().cpu() if hasattr(item, "detach") else item, dtype=np.float32)
        if array.ndim == 4:
            array = array[0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"expected a volume (X, Y, Z), got shape {array.shape}")
    return array


def _widgets():
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


def slice_viewer(images: Mapping[str, Any], *, outlines: Mapping[str, Any] | None = None, axis: int = 2,
                 start: int | None = None, cmaps: Mapping[str, str] | None = None,
                 limits: Mapping[str, tuple[float, float]] | None = None, mirror: bool = False, size: float = 3.2):
    """Volumes side by side, one slice at a time, with a slider over the slices.

    Every image is shown with one colour scale over all its slices, so moving the slider does not rescale it.
    Slices are drawn as stored, the volume's first axis across and its second up: for a volume stored in RAS
    order (as the bundled scans are), the patient's right is on the image's right (the neurological view);
    ``mirror=True`` flips them left to right (then the radiological view).

    Args:
        images: title -> a volume (a path of a NIfTI file or DICOM series, an array or a tensor), all of one shape.
        outlines: colour -> a mask volume outlined on every panel (e.g. ``{"cyan": lesions}``); earlier ones are
            drawn wider, so that an outline lying under a later one still shows.
        axis: the axis the slider moves along (2: axial for RAS volumes).
        start: the first slice shown (default: the slice holding the last image's largest value, e.g. a
            heatmap's).
        cmaps: title -> a matplotlib colour map (default ``gray``).
        limits: title -> ``(low, high)`` of its colour scale (default: the volume's 1st and 99.9th percentiles).
        mirror: flip the slices left to right.
        size: inches per panel.

    Returns:
        The ipywidgets ``IntSlider`` (``None`` without ipywidgets: one slice is drawn).
    """
    import matplotlib.pyplot as plt

    vols = {title: np.moveaxis(volume(v), axis, 2) for title, v in images.items()}
    masks = {colour: np.moveaxis(volume(v), axis, 2) for colour, v in (outlines or {}).items()}
    shapes = {v.shape for v in [*vols.values(), *masks.values()]}
    if len(shapes) != 1:
        raise ValueError(f"the volumes differ in shape: {sorted(shapes)}")
    n = next(iter(shapes))[2]
    cmaps, limits = dict(cmaps or {}), dict(limits or {})
    for title, v in vols.items():
        if title not in limits:
            finite = v[np.isfinite(v)]
            low, high = (np.percentile(finite, [1, 99.9]) if finite.size else (0.0, 1.0))
            limits[title] = (float(low), float(high) if high > low else float(low) + 1.0)
    if start is None:
        last = list(vols.values())[-1]
        start = int(np.argmax(np.nan_to_num(last).reshape(-1, n).max(0)))

    widths = np.linspace(2.0, 0.8, len(masks)) if len(masks) > 1 else [1.0]  # an outline under another shows

    def plane(v: np.ndarray, index: int) -> np.ndarray:
        p = np.rot90(v[..., index])
        return p[:, ::-1] if mirror else p

    def draw(index: int) -> None:
        fig, axes = plt.subplots(1, len(vols), figsize=(size * len(vols), size), squeeze=False)
        for ax, (title, v) in zip(axes[0], vols.items()):
            ax.imshow(plane(v, index), cmap=cmaps.get(title, "gray"), vmin=limits[title][0],
                      vmax=limits[title][1], interpolation="nearest")
            for (colour, m), width in zip(masks.items(), widths):
                if m[..., index].max() > 0.5 and m[..., index].min() < 0.5:
                    ax.contour(plane(m, index), [0.5], colors=colour, linewidths=width)
            ax.set_title(f"{title}\nslice {index + 1} of {n}", fontsize=9)
            ax.axis("off")
        plt.tight_layout()
        plt.show()

    widgets = _widgets()
    if widgets is None:
        print("(no ipywidgets: one slice shown; pip install 'medidiff[notebooks]' for the slider)")
        draw(start)
        return None
    slider = widgets.IntSlider(value=start, min=0, max=n - 1, step=1, description="slice index",
                               continuous_update=False)
    widgets.interact(draw, index=slider)
    return slider
