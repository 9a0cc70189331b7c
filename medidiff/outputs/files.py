"""Files a run writes: safe case names, atomic writes, text, JSON and CSV tables.

Every write is atomic (a temporary file in the target folder, then ``os.replace``) and refuses to
overwrite a path named as an input. File names are ``<case>_<kind>.<ext>`` with a safe case name
(``safe_case_name``, ``result_path``).
"""

from __future__ import annotations

import csv
import json
import math
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


def strict_json(obj: Any) -> Any:
    """``obj`` with NumPy/torch values, paths, dates and sets converted, and every NaN or infinity ``None``.

    Strict JSON (RFC 8259) has no NaN or Infinity, which Python's ``json`` writes by default and strict
    parsers (JavaScript's ``JSON.parse``, ``jq``, most other languages) refuse; a value that is not a
    number (a metric undefined for a case, a missing threshold) is written as ``null``.

    Raises:
        TypeError: a value that JSON cannot hold.
    """
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {key if isinstance(key, (str, int, float)) or key is None else strict_json(key): strict_json(value)
                for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(value) for value in obj]
    return strict_json(_jsonable(obj))


def write_json(obj: Any, path: PathLike, protected: Iterable[PathLike] = ()) -> Path:
    """Write ``obj`` as indented strict JSON, atomically (see ``strict_json``: NaN and infinities become
    ``null``; NumPy/torch values, paths and dates are converted).

    Args:
        obj: a JSON-able object.
        path: the file to write.
        protected: input paths that must not be overwritten.

    Returns:
        ``path`` as a ``Path``.
    """
    text = json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n"
    return write_text(text, path, protected)


def write_table(rows: Sequence[Mapping[str, Any]], path: PathLike, protected: Iterable[PathLike] = (),
                columns: Sequence[str] = ()) -> Path:
    """Write rows (dicts) as a CSV table, atomically; columns are the keys in first-seen order.

    Args:
        rows: the table's rows; a missing key leaves an empty cell.
        path: the file to write.
        protected: input paths that must not be overwritten.
        columns: columns that come first, in this order (the header of a table without rows).

    Returns:
        ``path`` as a ``Path``.
    """
    columns: dict[str, None] = dict.fromkeys(columns)
    for row in rows:
        columns.update(dict.fromkeys(row))
    with atomic_write(path, protected) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _jsonable(v) if isinstance(v, (np.generic, torch.Tensor)) else v
                             for k, v in row.items()})
    return Path(path)


def cell(value: Any, digits: int = 3, fmt: str | None = None) -> str:
    """A report table's cell: the number with ``digits`` decimals (or in the format ``fmt``, e.g. ``".4g"``), or
    a dash where there is none (NaN, None, an empty CSV cell)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    if not np.isfinite(value):
        return "—"
    return format(value, fmt) if fmt else f"{value:.{digits}f}"
