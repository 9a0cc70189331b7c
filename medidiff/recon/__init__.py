"""medidiff.recon."""
