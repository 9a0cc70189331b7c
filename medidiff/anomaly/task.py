"""The ``anomaly`` task: a recipe's ``anomaly`` section run by ``detect``, its errors named by recipe key.

Algorithm code raises ``ValueError``; here, at the task's boundary, such an error becomes a
``RecipeError`` that names the ``anomaly.`` key it came from.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from medidiff.data.paths import resolve_path
from medidiff.errors import RecipeError
from medidiff.results import TaskResult

from .config import AnomalySection, route
from .detect import detect

__all__ = ["run"]

_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*):")


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
    try:
        return detect(model, inputs, out_dir, section, seed=seed, device=device, resolve=resolve_path)
    except ValidationError as e:
        err = e.errors()[0]
        raise RecipeError(err["msg"], where="anomaly." + ".".join(str(p) for p in err["loc"])) from None
    except ValueError as e:
        match = _KEY.match(str(e))
        key = route(match.group(1)) if match else ""
        raise RecipeError(str(e), where=f"anomaly.{key}".rstrip("."),
                          fix="see the anomaly section's options (medidiff.anomaly.config).") from None
