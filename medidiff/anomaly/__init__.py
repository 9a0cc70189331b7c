"""Anomaly detection by healthy reconstruction: a model of healthy anatomy heals the scan, the residual is the map.

Modules: ``config`` (the recipe's ``anomaly`` section and its options), ``healthy`` (partial diffusion,
DDIM inversion, patch-wise, classifier-guided and counterfactual reconstruction), ``guided`` (the noise-aware
classifier of classifier guidance, Wolleb et al. 2022), ``counterfactual`` (a class-conditional model's null and
guided denoisers, Sanchez et al. 2022), ``maps`` (residual, mask, filters, case score),
``thresholds`` (calibration at a false-positive rate, the threshold saved with a model), ``detect``
(scans in, heatmaps out), ``report`` (``report.md``), ``task`` (the ``anomaly`` recipe task).
"""

from .config import AnomalySection, HealthyOptions, MapOptions
from .detect import detect
from .healthy import reconstruct_healthy

__all__ = ["AnomalySection", "HealthyOptions", "MapOptions", "detect", "reconstruct_healthy"]
