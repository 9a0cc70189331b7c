"""The ``anomaly`` task: a recipe's ``anomaly`` section run by ``detect``, its errors named by recipe key.

Algorithm code raises ``ValueError``; here, at the task's boundary, such an error becomes a
``RecipeError`` that names the ``anomaly.`` key it came from.
"""

from __future__ import annotations

from pathlib import Path

from medidiff.data.paths import resolve_path
from medidiff.errors import RecipeError
from medidiff.results import TaskResult
from medidiff.sections import boundary

from .config import AnomalySection
from .detect import detect

__all__ = ["run"]


def run(section: AnomalySection | None, out_dir: str | Path, *, seed: int = 0, device: str = "cpu") -> TaskResult:
    """Run anomaly detection as a recipe's ``anomaly`` section describes.

    Raises:
        RecipeError: the section has no ``inputs``, or an option is invalid (naming its key).
    """
    if section is None or section.inputs is None:
        raise RecipeError("an anomaly recipe needs anomaly.inputs (and anomaly.model)", where="anomaly.inputs",
                          fix="set anomaly.inputs to a scan, a folder or a JSON datalist.")
    model = resolve_path(section.model, "model weights")
    inputs = resolve_path(section.inputs, "inputs")
    return boundary("anomaly", AnomalySection,
                    lambda: detect(model, inputs, out_dir, section, seed=seed, device=device, resolve=resolve_path))
