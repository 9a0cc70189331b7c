"""Segmentation with uncertainty: a conditional diffusion model samples an ensemble of masks; their spread is the map.

Modules: ``config`` (the recipe's ``segment`` section), ``sample`` (N members per image, batched, seeded),
``fusion`` (mean soft map, threshold/argmax, STAPLE), ``uncertainty`` (variance, entropies, mutual
information, case score), ``predict`` (one case on its own grid, its metrics), ``run`` (scans in, files
out), ``report`` (``report.md``), ``task`` (the ``segment`` recipe task).
"""

from .config import EnsembleOptions, SegmentSection
from .run import segment
from .sample import sample_members

__all__ = ["EnsembleOptions", "SegmentSection", "segment", "sample_members"]
