"""The segmentation benchmark's cases: lesion cases carry lesions (not silently healthy slabs)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from script_helpers import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_segment.py"


def _bench(path: Path = BENCH):
    return load_script(path, "bench_segment_under_test")


def test_lesion_cases_have_lesions_in_thin_slabs(tmp_path):
    listings = _bench().make_cases(tmp_path, draws=1, quick=True)  # a 2-slice slab: far thinner than a lesion
    for listing in listings.values():
        (entry,) = json.loads(listing.read_text())["test"]
        image = nib.load(tmp_path / entry["image"])
        label = np.asarray(nib.load(tmp_path / entry["label"]).dataobj)
        region = np.asarray(nib.load(tmp_path / entry["region"]).dataobj) > 0
        assert label.shape == image.shape == region.shape
        assert label.sum() > 0, f"{entry['label']}: a lesion case without a lesion"
        assert not label[~region].any(), "labels outside the slab that is segmented and scored"
        assert region.any(axis=(0, 1)).sum() == 2  # the quick slab: two whole axial slices
        assert region[..., region.any(axis=(0, 1))].all()
