"""Segmentation training pairs (labelled paths, generated lesions with several raters) and both objectives."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from train_helpers import single_thread, tiny_recipe  # noqa: F401

from medidiff.errors import RecipeError
from medidiff.modelinfo import DataPrep
from medidiff.recipes import parse_recipe
from medidiff.segment.fusion import labels_to_unit
from medidiff.train_data import DataConfig, build_data
from medidiff.train_segment import brain_volumes, lesion_slices, mask_channels


def _nnunet(root, n=3, shape=(20, 16, 3)):
    """An nnU-Net raw dataset: a bright disc (class 1) and a dark square (class 2) in each image."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for k in range(n):
        label = np.zeros(shape, np.uint8)
        yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        label[((yy - 6 - k) ** 2 + (xx - 6) ** 2 < 9)] = 1
        label[12:16, 9:13] = 2
        image = (50 + 5 * rng.random(shape) + 40 * (label == 1) - 30 * (label == 2)).astype(np.float32)
        image[0], image[-1], image[:, 0], image[:, -1] = 0, 0, 0, 0  # a body on a flat background
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case_{k:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{k:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"},
                                                   "labels": {"background": 0, "disc": 1, "square": 2},
                                                   "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def test_mask_channels_match_the_fusion_scale():
    y = torch.tensor([[[[0, 1], [2, 1]]]])
    assert torch.equal(mask_channels(y, 3), labels_to_unit(y, 3))
    assert torch.equal(mask_channels(y.clamp(max=1), 2), labels_to_unit(y.clamp(max=1), 2))
    with pytest.raises(Exception, match="classes"):
        mask_channels(y, 2)


def test_a_labelled_nnunet_folder_gives_one_hot_pairs_and_its_record(tmp_path):
    root = _nnunet(tmp_path / "Dataset001")
    cfg = DataConfig(source=str(root), size=[16, 16], labels={"classes": ["background", "disc", "square"]},
                     val_fraction=0.34, min_foreground=0.05)
    bundle = build_data(cfg, 0)
    item = bundle.train[0]
    assert bundle.channels == 3 and bundle.cond_channels == 1
    assert item["image"].shape == (3, 16, 16) and item["cond"].shape == (1, 16, 16)
    onehot = item["image"] > 0
    assert set(item["image"].unique().tolist()) == {-1.0, 1.0} and torch.equal(onehot.sum(0), torch.ones(16, 16).long())
    # the classes lie where the image says: the disc is bright, the square dark
    cond = item["cond"][0]
    assert cond[onehot[1]].mean() > cond[onehot[0]].mean() > cond[onehot[2]].mean()
    prep = DataPrep.model_validate(bundle.data_prep)
    assert prep.labels.classes == ["background", "disc", "square"] and prep.labels.one_hot
    assert prep.cases == 3 and prep.intensity.reference is not None and bundle.val is not None


def test_generated_lesions_give_every_raters_mask_and_healthy_slices():
    brains = brain_volumes(with_1mm=False)
    cfg = DataConfig(source="sample:lesions", size=[80, 96], holdout=[[30, 50]],
                     labels={"raters": 3, "boundary_mm": 0.0, "healthy_fraction": 0.3, "variants": 1})
    images, masks, brain, record = lesion_slices(cfg, seed=0, brains=brains)
    n = images.shape[0]
    assert images.shape == (n, 1, 80, 96) and masks.shape == (n, 3, 1, 80, 96) and n > 20
    assert float(images.min()) >= -1.0  # the background clamped at the conditioning floor
    lesioned = masks.flatten(1).any(1)
    assert 0.15 < 1 - float(lesioned.float().mean()) < 0.5  # healthy slices have empty masks
    # raters at rising contrast levels draw nested outlines (no wobble): lenient >= middle >= strict
    assert bool((masks[:, 0] >= masks[:, 1]).all() and (masks[:, 1] >= masks[:, 2]).all())
    assert bool((masks[:, 0] & ~masks[:, 2]).any())  # and they disagree somewhere
    assert not bool((masks.any(1) & ~brain).any())  # inside the brain
    assert len(record["reference"]) == len(record["reference_levels"]) and record["brains"] == ["mni152_2mm"]


@pytest.mark.usefixtures("single_thread")
def test_sample_lesions_bundle_and_the_engine_trains_both_objectives(tmp_path):
    from medidiff.runs import train

    lesions = {"source": "sample:lesions", "size": [80, 96], "holdout": [[0, 36], [40, 80]], "val_fraction": 0.5,
               "labels": {"variants": 1}, "augment": {}}
    three_levels = {"channels": [8, 8, 8], "attention_levels": [False, False, False]}  # cheap middle attention
    diffusion = parse_recipe(tiny_recipe(data=lesions, model=three_levels,
                                         training={"steps": 2, "checkpoint_every": 0, "val_every": 0}))
    result = train(diffusion, tmp_path / "diffusion")
    info = json.loads((tmp_path / "diffusion" / "model.json").read_text())
    assert result.step == 2 and info["net"]["cond_channels"] == 1 and info["data_prep"]["labels"]["classes"] == [
        "background", "lesion"]
    assert info["data_prep"]["source"] == "sample:lesions" and info["data_prep"]["intensity"]["reference"]
    unet = parse_recipe(tiny_recipe(
        data=lesions, model={"arch": "unet", "prediction": "x0", "channels": [4, 8]},
        training={"steps": 2, "checkpoint_every": 0, "val_every": 0, "objective": "segmentation"}))
    result = train(unet, tmp_path / "unet")
    info = json.loads((tmp_path / "unet" / "model.json").read_text())
    assert info["net"]["arch"] == "unet" and info["prediction"] == "x0" and np.isfinite(result.history["loss"]).all()


def test_objective_network_and_data_must_go_together():
    with pytest.raises(RecipeError, match="model.arch"):
        from medidiff.train import run_recipe

        run_recipe(parse_recipe(tiny_recipe(training={"objective": "segmentation"})), "/nonexistent")
    with pytest.raises(RecipeError, match="prediction"):
        parse_recipe(tiny_recipe(model={"arch": "unet"}))
    with pytest.raises(RecipeError, match="no labels"):
        build_data(DataConfig(source="sample:brain", size=[80, 96], labels={}), 0)


def test_lesions_drawn_on_the_brains_of_a_datalist(tmp_path):
    """``data.labels.brains``: a datalist's training brains give the training slices, its validation brains the
    validation slices (RAS, masked, ``data.holdout`` not applied); a brain that is not at 2 mm or an entry
    without a mask is refused with the fix."""
    from medidiff.data.sample import data_dir
    from medidiff.train_segment import datalist_brains, labelled_brains

    t1, mask = data_dir() / "mni152_2mm_t1.nii.gz", data_dir() / "mni152_2mm_brainmask.nii.gz"
    for source, name in ((t1, "las.nii.gz"), (mask, "las_mask.nii.gz")):  # the same brain stored LAS: read as RAS
        flipped = nib.load(source)
        affine = flipped.affine @ np.diag([-1, 1, 1, 1])
        affine[0, 3] = flipped.affine[0, 3] + flipped.affine[0, 0] * (flipped.shape[0] - 1)
        nib.save(nib.Nifti1Image(np.asarray(flipped.dataobj)[::-1].copy(), affine), tmp_path / name)
    listing = tmp_path / "brains.json"
    listing.write_text(json.dumps({"training": [{"image": str(t1), "mask": str(mask)}],
                                   "validation": [{"image": "las.nii.gz", "mask": "las_mask.nii.gz"}]}))
    cfg = DataConfig(source="sample:lesion_classes", size=[80, 96], holdout=[[0, 91]],
                     labels={"brains": str(listing), "variants": 1, "raters": 1})
    train, val, files = labelled_brains(cfg)
    template = brain_volumes(with_1mm=False)[0]
    assert [b["name"] for b in train] == ["mni152_2mm_t1"] and files[0] == listing and len(files) == 5
    assert torch.equal(train[0]["t1"], template["t1"] * template["brain"]) and torch.equal(val[0]["t1"], train[0]["t1"])
    images, _, _, record = lesion_slices(cfg, seed=0, brains=train)  # the holdout of every slice does not apply
    assert images.shape[0] > 20 and record["brains"] == ["mni152_2mm_t1"]
    coarse = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    nib.save(coarse, tmp_path / "one_mm.nii.gz")
    listing.write_text(json.dumps({"training": [{"image": "one_mm.nii.gz", "mask": "one_mm.nii.gz"}]}))
    with pytest.raises(RecipeError, match="2 mm"):
        datalist_brains(listing, "training")
    listing.write_text(json.dumps({"training": [{"image": "one_mm.nii.gz"}]}))
    with pytest.raises(RecipeError, match="lacks 'image' or 'mask'"):
        datalist_brains(listing, "training")
    with pytest.raises(RecipeError, match="cannot read the datalist"):
        datalist_brains(tmp_path / "missing.json", "training")
