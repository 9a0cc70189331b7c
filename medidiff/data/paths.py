"""Paths given in recipes and on the command line: as given, else inside the medidiff checkout.

The bundled data, weights and recipes live in the checkout (``data/``, ``recipes/``); a recipe that names
``data/weights/demo_brain_2d.safetensors`` works from any working folder.
"""

from __future__ import annotations

from pathlib import Path

import medidiff
from medidiff.errors import DataError

__all__ = ["CHECKOUT", "resolve_path"]

#: The folder holding the ``medidiff`` package (a source checkout's root).
CHECKOUT = Path(medidiff.__file__).resolve().parents[1]


def resolve_path(path: str | Path | None, what: str) -> Path | None:
    """A path from a recipe: as given (relative to the working folder), else relative to the medidiff checkout.

    Args:
        path: the path (``None`` passes through).
        what: what it is, for the message.

    Returns:
        The path, or ``None``.

    Raises:
        DataError: neither exists.
    """
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    inside = CHECKOUT / p
    if inside.exists():
        return inside
    raise DataError(f"{what} not found", where=p, fix="check the path (relative paths start at the working folder).")
