"""How large an image may be: headers that claim more voxels than memory allows are refused up front.

A damaged or hostile header can claim a NIfTI of 30000³ voxels in a few bytes, or a DICOM with absurd
Rows, Columns or NumberOfFrames. Readers call :func:`check_image_size` with the size the header claims
before they allocate or decode anything, so such a file is refused at once, naming the file and the
estimate, instead of ending in an out-of-memory crash or a long hang.

The limit is the ``MEDIDIFF_MAX_IMAGE_BYTES`` environment variable (bytes, or with a ``K``/``M``/``G``/``T``
suffix, e.g. ``64G``), else half the machine's physical memory (8 GiB where that cannot be found).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from medidiff.errors import DataError

__all__ = ["LIMIT_ENV", "max_image_bytes", "check_image_size", "format_bytes"]

LIMIT_ENV = "MEDIDIFF_MAX_IMAGE_BYTES"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*$", re.IGNORECASE)


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, e.g. ``"96.0 TiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def max_image_bytes() -> int:
    """The largest image, in bytes as read (float32), that a reader accepts.

    Raises:
        DataError: ``MEDIDIFF_MAX_IMAGE_BYTES`` is set but not a size.
    """
    text = os.environ.get(LIMIT_ENV, "").strip()
    if text:
        match = _SPEC.match(text)
        if not match:
            raise DataError(f"{LIMIT_ENV}={text!r} is not a size", where=LIMIT_ENV,
                            fix="give bytes or a number with K, M, G or T (e.g. 64G).")
        return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    memory = _physical_memory()
    return memory // 2 if memory else 8 << 30


def check_image_size(shape: Sequence[int], bytes_per_voxel: float, where: str | Path, what: str = "an image") -> int:
    """Refuse an image whose claimed size exceeds :func:`max_image_bytes`, before anything is allocated.

    Args:
        shape: the dimensions the header claims (any number of axes, channels and frames included).
        bytes_per_voxel: bytes each voxel takes once read (4 for float32).
        where: the file, named in the error.
        what: what the header claims, for the message.

    Returns:
        The estimated size in bytes.

    Raises:
        DataError: a dimension is negative, or the estimate exceeds the limit.
    """
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise DataError(f"claims {what} with a negative dimension {tuple(dims)}.", where=where,
                        fix="the header is damaged: export the file again.")
    estimate = math.prod(dims) * bytes_per_voxel
    limit = max_image_bytes()
    if estimate > limit:
        size = " x ".join(str(d) for d in dims)
        raise DataError(f"claims {what} of {size} = {math.prod(dims):.3g} values (~{format_bytes(estimate)} once "
                        f"read), more than the limit of {format_bytes(limit)}; it was not read.", where=where,
                        fix=f"check the file (a damaged header claims sizes like this); if the image really is "
                            f"this large, raise the limit with {LIMIT_ENV} (e.g. 64G) or crop it first.")
    return int(estimate)
