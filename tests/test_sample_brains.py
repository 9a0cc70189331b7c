"""Bundled IXI brains (``data/brains/``): geometry, masks, splits, the datalist and file sizes."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medidiff.data import sample
from medidiff.data.discover import discover
from medidiff.errors import DataError

SPLITS = {
    "training": {"IXI015-HH-1258", "IXI162-HH-1548", "IXI206-HH-1650", "IXI527-HH-2376", "IXI396-HH-2115",
                 "IXI217-HH-1638", "IXI132-HH-1415", "IXI239-HH-2296", "IXI335-HH-1906", "IXI383-HH-2099"},
    "validation": {"IXI211-HH-1568", "IXI577-HH-2661", "IXI274-HH-2294"},
    "test": {"IXI012-HH-1211", "IXI437-HH-2152", "IXI443-HH-2215"},
}
UNSEEN = "IXI012-HH-1211"


def test_each_split_has_its_subjects_and_the_unseen_one_is_only_in_test():
    subjects = sample.brain_subjects()
    assert len(subjects) == 16 == len({s["subject"] for s in subjects})
    for split, names in SPLITS.items():
        listed = sample.brain_subjects(split)
        assert {s["subject"] for s in listed} == names
        assert all(s["split"] == split for s in listed)
    assert [s["split"] for s in subjects if s["subject"] == UNSEEN] == ["test"]
    assert {s["sex"] for s in subjects} == {"M", "F"}
    assert all(18 < s["age"] < 80 for s in subjects)
    with pytest.raises(DataError):
        sample.brain_subjects("train")


@pytest.mark.parametrize("subject", sorted(set().union(*SPLITS.values())))
def test_files_load_ras_2mm_with_binary_masks_matching_the_image(subject):
    entry = next(s for s in sample.brain_subjects() if s["subject"] == subject)
    image, mask = nib.load(entry["image"]), nib.load(entry["mask"])
    assert image.shape == mask.shape and np.allclose(image.affine, mask.affine)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    np.testing.assert_allclose(image.header.get_zooms(), (2.0, 2.0, 2.0))
    np.testing.assert_allclose(image.affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    for img in (image, mask):
        assert img.get_data_dtype() == np.uint8
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1  # scanner, not MNI
    data, brain = np.asarray(image.dataobj), np.asarray(mask.dataobj)
    assert set(np.unique(brain)) == {0, 1}
    np.testing.assert_array_equal(data > 0, brain == 1)  # skull-stripped: nonzero exactly inside the mask
    assert data.max() == 255
    ml = brain.sum() * 8 / 1000
    assert 900 < ml < 2000  # adult brain
    # cropped to the mask plus a 4-voxel margin
    box = np.argwhere(brain)
    assert (box.min(axis=0) <= 4).all() and (np.array(brain.shape) - 1 - box.max(axis=0) <= 4).all()


def test_datalist_is_read_by_discover_with_splits_and_masks():
    folder = sample.brains_dir()
    sources = discover(folder / "datalist.json")
    assert len(sources) == 16
    for split, names in SPLITS.items():
        found = {s.name: s for s in sources if s.split == split}
        assert set(found) == {f"{name}_t1" for name in names}
        for name, source in found.items():
            assert source.kind == "nifti" and source.label is None
            assert source.paths[0].resolve() == (folder / f"{name}.nii.gz").resolve()
            assert source.mask.resolve() == (folder / f"{name[:-3]}_brainmask.nii.gz").resolve()


def test_subjects_csv_records_source_and_quality_check():
    with (sample.brains_dir() / "subjects.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        assert row["source_path"].endswith(f"/t1/{row['subject']}_T1.nii.gz")
        assert len(row["source_commit"]) == 40 and len(row["source_sha256"]) == 64
        if row["mask_dice_dlmuse"]:  # IXI015 has no DLMUSE labels to check against
            assert float(row["mask_dice_dlmuse"]) >= 0.93
    assert sum(not row["mask_dice_dlmuse"] for row in rows) <= 1


def test_files_are_small_and_attributed():
    folder = sample.brains_dir()
    files = [p for p in folder.iterdir() if p.is_file()]
    assert all(p.stat().st_size < 400_000 for p in files)
    assert sum(p.stat().st_size for p in files) < 6_000_000
    licence = (folder / "LICENSE").read_text()
    assert "CC BY-SA 3.0" in licence and "https://brain-development.org/ixi-dataset/" in licence
    assert "acknowledge the source of the IXI data" in licence
    assert json.loads((folder / "datalist.json").read_text())["licence"] == "CC BY-SA 3.0"
