"""Anomaly detection by healthy reconstruction: a model of healthy anatomy heals the scan, the residual is the map.

Modules: ``healthy`` (partial diffusion, DDIM inversion, patch-wise reconstruction), ``maps`` (residual,
mask, filters, case score), ``thresholds`` (calibration at a false-positive rate), ``pipeline`` (``detect``
and the ``anomaly`` recipe task, registered on import).
"""

from medidiff.recipes import register_task

from .healthy import reconstruct_healthy
from .pipeline import detect, run_recipe

register_task("anomaly", run_recipe)

__all__ = ["detect", "reconstruct_healthy", "run_recipe"]
