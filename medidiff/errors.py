"""The one exception family of medidiff.

Every error a user can cause (bad data, a bad recipe, a bad model file) is a ``MedidiffError``: its
message says what went wrong, where (the file or the recipe key), and what to do about it. The command
line prints it without a traceback and exits non-zero.
"""

from __future__ import annotations

from pathlib import Path


class MedidiffError(Exception):
    """Base class: a user-facing error naming where it happened and how to fix it.

    Args:
        message: what went wrong.
        where: the file, series or recipe key concerned (optional).
        fix: what the user should do (optional).
    """

    def __init__(self, message: str, *, where: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.where = None if where is None else str(where)
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        return text


class DataError(MedidiffError):
    """An input file or folder cannot be used (missing, corrupt, inconsistent geometry, NaNs...)."""


class RecipeError(MedidiffError):
    """A recipe or a ``--set`` override is invalid (unknown key, wrong type or value)."""


class ModelError(MedidiffError):
    """A weights file or model config is missing, corrupt or incompatible."""


class TrainingError(MedidiffError):
    """Training cannot go on (for example a NaN or Inf loss)."""
