"""medidiff.data."""
