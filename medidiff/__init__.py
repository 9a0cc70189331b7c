"""medidiff: one diffusion core for reconstruction, segmentation with uncertainty and anomaly detection."""

__version__ = "0.1.0"
