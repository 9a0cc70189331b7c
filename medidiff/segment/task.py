"""The ``segment`` task: a recipe's ``segment`` section run by ``segment``, its errors named by recipe key.

Algorithm code raises ``ValueError``; here, at the task's boundary, such an error becomes a
``RecipeError`` that names the ``segment.`` key it came from.
"""

from __future__ import annotations

from pathlib import Path

from medidiff.data.paths import resolve_path
from medidiff.errors import MedidiffError, RecipeError
from medidiff.results import TaskResult
from medidiff.sections import boundary

from .config import DEFAULT_MODEL, SegmentSection
from .run import segment

__all__ = ["run"]


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
    return boundary("segment", SegmentSection,
                    lambda: segment(model, inputs, out_dir, section, seed=seed, device=device, resolve=resolve_path))
