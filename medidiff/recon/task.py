"""The ``recon`` task: a recipe's ``recon`` section run by ``reconstruct``, its errors named by recipe key.

Algorithm code raises ``ValueError``; here, at the task's boundary, such an error becomes a
``RecipeError`` that names the ``recon.`` key it came from.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from medidiff.data.paths import resolve_path
from medidiff.errors import RecipeError
from medidiff.results import TaskResult

from .config import ReconSection, route
from .reconstruct import reconstruct

__all__ = ["run"]

_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*):")


def run(section: ReconSection | None, out_dir: str | Path, *, seed: int = 0, device: str = "cpu") -> TaskResult:
    """Run reconstruction as a recipe's ``recon`` section describes.

    Raises:
        RecipeError: the section has no ``inputs``, or an option is invalid (naming its key).
    """
    if section is None or section.inputs is None:
        raise RecipeError("a recon recipe needs recon.inputs (and recon.modality)", where="recon.inputs",
                          fix="set recon.inputs to images, a fastMRI .h5 file or a sinogram .npz.")
    model = resolve_path(section.model_path, "model weights")
    inputs = resolve_path(section.inputs, "inputs")
    try:
        return reconstruct(model, inputs, out_dir, section, seed=seed, device=device)
    except ValidationError as e:
        err = e.errors()[0]
        raise RecipeError(err["msg"], where="recon." + ".".join(str(p) for p in err["loc"])) from None
    except ValueError as e:
        match = _KEY.match(str(e))
        key = route(match.group(1)) if match else ""
        raise RecipeError(str(e), where=f"recon.{key}".rstrip("."),
                          fix="see the recon section's options (medidiff.recon.config).") from None
