"""The ``recon`` task: a recipe's ``recon`` section run by ``reconstruct``, its errors named by recipe key.

Algorithm code raises ``ValueError``; here, at the task's boundary, such an error becomes a
``RecipeError`` that names the ``recon.`` key it came from.
"""

from __future__ import annotations

from pathlib import Path

from medidiff.data.paths import resolve_path
from medidiff.errors import RecipeError
from medidiff.results import TaskResult
from medidiff.sections import boundary

from .config import ReconSection
from .reconstruct import reconstruct

__all__ = ["run"]


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
    return boundary("recon", ReconSection,
                    lambda: reconstruct(model, inputs, out_dir, section, seed=seed, device=device))
