"""Patch priors' training data: random patches on the foreground, held-out anatomy, reserved files never read."""

from __future__ import annotations

import pytest
import torch

from medidiff.data import packaged
from medidiff.data.datasets import RandomPatches
from medidiff.train_data import DataConfig, build_data


def test_random_patches_are_mostly_foreground_and_seeded():
    image = torch.full((1, 40, 50), -1.0)
    image[:, 10:30, 20:45] = 0.5  # a 20 x 25 foreground block
    small = torch.zeros(1, 10, 12)  # smaller than a patch: padded with the background
    patches = RandomPatches([image, small], (16, 16), 50, min_foreground=0.5)
    for i in range(50):
        p = patches[i]["image"]
        assert p.shape == (1, 16, 16) and float((p > -0.999).float().mean()) >= 0.46  # the padded one: 120/256
    fixed = RandomPatches([image], (16, 16), 8, min_foreground=0.5, seed=3)
    assert all(torch.equal(fixed[i]["image"], fixed[i]["image"]) for i in range(8))
    assert not torch.equal(fixed[0]["image"], fixed[1]["image"]) or not torch.equal(fixed[1]["image"],
                                                                                    fixed[2]["image"])
    with pytest.raises(ValueError):
        RandomPatches([], (8, 8), 4)


def test_reserved_files_are_named_and_never_used_for_training():
    assert packaged.is_reserved("693_J2KI.dcm") and packaged.is_reserved("/x/eCT_Supplemental.dcm")
    assert packaged.is_reserved("ch2better.nii.gz") and not packaged.is_reserved("CT_small.dcm")
    assert not any(packaged.is_reserved(n) for n in packaged.CT_TRAINING_FILES)
    slices = packaged.ct_slices()
    assert len(slices) >= 2 and all(float(s.min()) <= -800 for s in slices)  # air in HU: real CT


def test_ct_source_holds_out_a_real_slice_and_records_its_window():
    cfg = DataConfig(source="sample:ct", size=[32, 32], num_samples=20, hu_window=(-1000.0, 1000.0),
                     holdout=[(0, 1)], min_foreground=0.2)
    bundle = build_data(cfg, seed=0)
    x = torch.stack([bundle.train[i]["image"] for i in range(20)])
    assert x.shape == (20, 1, 32, 32) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert bundle.data_prep["patch"] and bundle.data_prep["intensity"] == {"method": "hu_window",
                                                                           "window": [-1000.0, 1000.0]}
    assert bundle.data_prep["cases"] == len(packaged.ct_slices()) - 1 and len(bundle.val) >= 16


def test_mni152_source_keeps_the_held_out_slab_out_of_every_slice():
    pytest.importorskip("nilearn")
    cfg = DataConfig(source="sample:mni152", size=[32, 32], num_samples=10, holdout=[(80, 100)])
    bundle = build_data(cfg, seed=0)
    t1, _ = packaged.mni152_1mm()
    assert tuple(t1.shape) == (197, 233, 189)
    patches = bundle.train
    slab = {tuple(im.shape) for im in patches.images}
    # axial slices are whole (197 x 233); coronal/sagittal ones are cut at the slab: z < 80 or z >= 100
    assert (1, 197, 233) in slab and all(s[-1] in (233, 80, 189 - 100) or s[-2:] == (197, 233) for s in slab)
    assert bundle.data_prep["holdout"] == [[80, 100]] and bundle.data_prep["spacing_mm"] == [1.0, 1.0]
    assert len(bundle.data_prep["intensity"]["reference"]) == 18
