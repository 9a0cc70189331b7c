"""What stands behind ``medidiff inspect`` and ``medidiff convert``.

``inspect_path`` lists each series or volume found at a path with its modality, shape, spacing,
orientation code and any problems; ``format_inspection`` prints that as a table; ``convert_path``
writes each series as ``<name>.nii.gz`` with its true geometry, skipping (and recording in
``failures.csv``) the ones that cannot be read.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medidiff.data.batch import FailureLog, iter_loaded
from medidiff.data.discover import discover, load
from medidiff.errors import DataError, MedidiffError
from medidiff.outputs import write_nifti

__all__ = ["COLUMNS", "convert_path", "format_inspection", "inspect_path"]

COLUMNS = ("name", "modality", "description", "shape", "spacing", "orientation", "files", "problems")


def inspect_path(path: str | Path, select: str | None = "all") -> list[dict]:
    """Describes every series or volume at a path, reading it fully to find its problems.

    Args:
        path: anything :func:`medidiff.data.discover.discover` understands.
        select: DICOM series selection rule (default: all series).

    Returns:
        One dict per series/volume with ``name``, ``kind``, ``modality``, ``description``, ``shape``
        (``(C, X, Y, Z)``, None if unreadable), ``spacing`` (mm, X/Y/Z), ``orientation`` (axis code
        such as ``"LPS"``, from nibabel's ``aff2axcodes``), ``files`` and ``problems`` (list of str);
        then one row per passed-over file (name ``"-"``), its reason as the problem.

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
            "description": series.description if series else "",
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
            row["orientation"] = "".join(nib.aff2axcodes(affine))
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


def convert_path(path: str | Path, out_dir: str | Path, select: str | None = "all") -> list[Path]:
    """Writes each series or volume found at a path as ``<out_dir>/<name>.nii.gz`` with its geometry.

    Series that cannot be read are skipped and recorded in ``<out_dir>/failures.csv``. Inputs are
    never overwritten; each file is written atomically by :func:`medidiff.outputs.write_nifti`.

    Args:
        path: anything :func:`medidiff.data.discover.discover` understands.
        out_dir: the output folder.
        select: DICOM series selection rule (default: all series).

    Returns:
        The written files.

    Raises:
        DataError: nothing usable at the path, or no series could be converted.
    """
    out_dir = Path(out_dir)
    sources = discover(path, select=select)
    inputs = [p for source in sources for p in source.paths]
    log = FailureLog(out_dir)
    written = []
    for source, image in iter_loaded(sources, log):
        values = image.array
        whole = bool(np.all(np.mod(values, 1) == 0) and values.min() >= -32768 and values.max() <= 32767)
        try:  # whole numbers (CT in HU, most MR) are stored as int16, anything else as float32
            written.append(write_nifti(image, out_dir / f"{source.name}.nii.gz", dtype=np.int16 if whole else None,
                                       protected=inputs))
        except MedidiffError as err:
            log.record(source.name, err)
    if not written:
        raise DataError(f"no series could be converted ({len(log)} failed).", where=path,
                        fix=f"see {log.path} for each failure and its fix.")
    return written
