"""medidiff.segment."""
