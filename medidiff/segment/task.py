"""The ``segment`` task: a recipe's ``segment`` section run by ``segment``, its errors named by recipe key.

Algorithm code raises ``ValueError``; here, at the task's boundary, such an error becomes a
``RecipeError`` that names the ``segment.`` key it came from.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from medidiff.data.paths import resolve_path
from medidiff.errors import MedidiffError, RecipeError
from medidiff.results import TaskResult

from .config import DEFAULT_MODEL, SegmentSection, route
from .run import segment

__all__ = ["run"]

_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*):")


def run(section: SegmentSection | None, out_dir: str | Path, *, seed: int = 0, device: str = "cpu") -> TaskResult:
    """Run segmentation as a recipe's ``segment`` section describes.

    Raises:
        RecipeError: the section has no ``inputs``, or an option is invalid (naming its key).
    """
    if section is None or section.inputs is None:
        raise RecipeError("a segment recipe needs segment.inputs", where="segment.inputs",
                          fix="set segment.inputs to a scan, a folder or a JSON datalist.")
    try:
        model = resolve_path(section.model, "model weights")
    except MedidiffError as e:
        if section.model != DEFAULT_MODEL:
            raise
        raise RecipeError(f"the bundled segmentation model is not there ({e.message})", where="segment.model",
                          fix="train it: OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m medidiff.cli train "
                              "recipes/seg_lesion_2d.yaml --out runs/seg_lesion_2d, then pass --model "
                              "runs/seg_lesion_2d (or export it to data/weights/seg_lesion_2d.safetensors).") from None
    inputs = resolve_path(section.inputs, "inputs")
    try:
        return segment(model, inputs, out_dir, section, seed=seed, device=device, resolve=resolve_path)
    except ValidationError as e:
        err = e.errors()[0]
        raise RecipeError(err["msg"], where="segment." + ".".join(str(p) for p in err["loc"])) from None
    except ValueError as e:
        match = _KEY.match(str(e))
        key = route(match.group(1)) if match else ""
        raise RecipeError(str(e), where=f"segment.{key}".rstrip("."),
                          fix="see the segment section's options (medidiff.segment.config).") from None
