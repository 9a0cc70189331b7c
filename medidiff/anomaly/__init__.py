"""medidiff.anomaly."""
