"""Transform presets (MRI percentiles and CT window to [-1, 1], inverse to input units) and datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor, list_data_collate

from medidiff.cases import to_input_grid
from medidiff.data import sample
from medidiff.data.datasets import SliceDataset, cached_dataset, grid_patch_dataset, patch_dataset
from medidiff.data.transforms import (
    MATCH_LEVELS,
    ScaleToUnitd,
    foreground_quantiles,
    foreground_range,
    matched_range,
    preset,
    scale_to_unit,
    to_input_units,
)
from medidiff.errors import DataError


def gamma_volume(seed=0, shape=(40, 48, 32), scale=300.0):
    rng = np.random.default_rng(seed)
    data = rng.gamma(2.0, scale, size=(1, *shape)).astype(np.float32)
    return MetaTensor(torch.from_numpy(data), affine=torch.diag(torch.tensor([1.5, 1.5, 3.0, 1.0])))


# ------------------------------------------------------------------------------------------ intensity


def test_mri_preset_maps_robust_percentiles_to_unit_range_and_back():
    vol = gamma_volume()
    out = preset("mri", spatial_size=vol.shape[1:], load=False)({"image": vol})
    x = out["image"]
    p_lo, p_hi = np.percentile(vol.numpy(), [0.5, 99.5])
    params = out["image_scaling"]
    np.testing.assert_allclose([params["a_min"], params["a_max"]], [p_lo, p_hi], rtol=1e-4)
    assert abs(float((x < -1).float().mean()) - 0.005) < 0.001  # unclipped: the tails stay outside
    assert abs(float((x > 1).float().mean()) - 0.005) < 0.001
    i = int(np.argmin(np.abs(vol.numpy() - np.median(vol.numpy()))))
    expected = -1 + 2 * (vol.flatten()[i] - p_lo) / (p_hi - p_lo)
    assert abs(float(x.flatten()[i]) - float(expected)) < 1e-4
    back = to_input_units(x, params)
    assert float((back - vol).abs().max()) < 1e-3 * float(vol.max())
    diff = to_input_units(x[..., 1:] - x[..., :-1], params, difference=True)
    assert torch.allclose(diff, vol[..., 1:] - vol[..., :-1], atol=1e-3 * float(vol.max()))


@pytest.mark.parametrize("window", [(-1000.0, 1000.0), (-160.0, 240.0)])
def test_ct_preset_maps_hu_window(window):
    hu = torch.tensor([-2000.0, -1000.0, -160.0, 0.0, 40.0, 240.0, 1000.0, 3000.0]).reshape(1, 2, 4)
    out = preset("ct", spatial_size=(2, 4), hu_window=window, load=False, axcodes=None,
                 foreground=False)({"image": hu})
    lo, hi = window
    expected = np.clip(-1 + 2 * (hu.numpy() - lo) / (hi - lo), -1, 1)
    np.testing.assert_allclose(out["image"].numpy(), expected, atol=1e-6)
    back = to_input_units(out["image"], out["image_scaling"])
    inside = (hu >= lo) & (hu <= hi)
    np.testing.assert_allclose(back[inside].numpy(), hu[inside].numpy(), atol=1e-3)
    assert float(back.min()) == lo and float(back.max()) == hi  # clipped values do not come back


def test_batched_inverse_uses_each_images_range():
    items = [{"image": gamma_volume(s, (8, 8, 8), scale=100.0 * (s + 1))} for s in range(3)]
    tr = preset("mri", spatial_size=(8, 8, 8), load=False, foreground=False)
    batch = next(iter(DataLoader([tr(d) for d in items], batch_size=3)))
    assert batch["image_scaling"]["a_max"].shape == (3,)
    back = to_input_units(batch["image"], batch["image_scaling"])
    for k, d in enumerate(items):
        assert float((back[k] - d["image"]).abs().max()) < 1e-3 * float(d["image"].max())


def test_constant_image_does_not_divide_by_zero():
    out = ScaleToUnitd("image")({"image": torch.full((1, 4, 4), 7.0)})
    assert torch.isfinite(out["image"]).all() and float(out["image"].max()) == -1.0


def test_matched_range_recovers_a_linear_map_and_shrugs_off_lesions():
    g = torch.Generator().manual_seed(0)
    tissue = torch.cat([torch.full((3000,), -0.6), torch.full((5000,), 0.2), torch.full((6000,), 0.8)])
    train = (tissue + 0.05 * torch.randn(tissue.shape, generator=g)).clamp(-1, 1)  # network scale
    reference = foreground_quantiles([train])
    assert len(reference) == len(MATCH_LEVELS) and reference == sorted(reference)
    scan = 400.0 * train + 900.0  # the same anatomy in other units
    fit = matched_range(scan, None, reference)
    np.testing.assert_allclose(scale_to_unit(scan, fit, clip=False).numpy(), train.numpy(), atol=1e-3)
    # 3 % of the voxels become a lesion twice as bright as anything healthy: quantile matching moves the
    # healthy tissue by < 0.03, while the 99.5th percentile (now inside the lesion) dims it by > 0.1
    lesion = torch.randperm(scan.numel(), generator=g)[:420]
    healthy = torch.ones_like(scan, dtype=torch.bool)
    healthy[lesion] = False
    lesioned = scan.clone()
    lesioned[lesion] = 2.0 * float(scan.max())
    matched = scale_to_unit(lesioned, matched_range(lesioned, None, reference), clip=False)
    by_percentile = scale_to_unit(lesioned, foreground_range(lesioned, torch.ones_like(healthy)))
    assert float((matched - train)[healthy].abs().max()) < 0.03
    assert float((by_percentile - train)[healthy].abs().max()) > 0.1
    with pytest.raises(ValueError, match="flat"):
        matched_range(torch.full((50,), 3.0), torch.ones(50, dtype=torch.bool), reference)
    with pytest.raises(ValueError, match="levels"):
        matched_range(scan, None, reference[:-1])


def test_scale_to_unit_clips_only_when_asked():
    params = {"a_min": 0.0, "a_max": 10.0, "b_min": -1.0, "b_max": 1.0}
    x = torch.tensor([-5.0, 0.0, 5.0, 15.0])
    assert scale_to_unit(x, params).tolist() == [-1.0, -1.0, 0.0, 1.0]
    assert scale_to_unit(x, params, clip=False).tolist() == [-2.0, -1.0, 0.0, 2.0]


# ------------------------------------------------------------------------------------------- geometry


def test_mri_preset_from_file_resamples_and_round_trips():
    folder = sample.data_dir()
    tr = preset("mri", spatial_size=(64, 80, 64), pixdim=(2.5, 2.5, 2.5), label_key="mask")
    out = tr({"image": str(folder / "mni152_2mm_t1.nii.gz"), "mask": str(folder / "mni152_2mm_brainmask.nii.gz")})
    x = out["image"]
    assert x.shape == (1, 64, 80, 64) and out["foreground"].shape == x.shape
    np.testing.assert_allclose(x.pixdim.numpy(), [2.5, 2.5, 2.5])
    assert set(torch.unique(out["mask"]).tolist()) == {0.0, 1.0}
    fg, mask = out["foreground"] > 0, out["mask"] > 0
    dice = 2 * float((fg & mask).sum()) / float(fg.sum() + mask.sum())
    assert dice > 0.9
    # back to the input's units and grid: close to the input inside the brain
    reference, brain = sample.brain_volume(), sample.brain_mask()[0] > 0
    back = to_input_grid(to_input_units(x, out["image_scaling"]), reference, x)
    assert back.shape == reference.shape and torch.equal(back.affine, reference.affine)
    err = (back[0] - reference[0])[brain].abs()
    assert float(err.mean()) < 0.05 * float(reference.max())


def test_train_preset_augments_reproducibly():
    vol = sample.brain_volume()
    plain = preset("mri", spatial_size=(80, 96, 80), load=False)({"image": vol})["image"]
    tr = preset("mri", spatial_size=(80, 96, 80), load=False, train=True, flip=True)
    a = tr.set_random_state(seed=1)({"image": vol})["image"]
    b = tr.set_random_state(seed=1)({"image": vol})["image"]
    assert torch.equal(a, b) and a.shape == plain.shape
    assert float((a - plain).abs().mean()) > 0.01
    assert abs(float(a.mean()) - float(plain.mean())) < 0.1  # small changes only


def test_2d_preset_on_slices_pads_with_background():
    images, _ = sample.brain_slices(indices=[40])
    out = preset("mri", spatial_size=(96, 96), load=False, axcodes=None, train=True, elastic=True)(
        {"image": images[0]})
    assert out["image"].shape == (1, 96, 96) and out["foreground"].shape == (1, 96, 96)
    plain = preset("mri", spatial_size=(96, 96), load=False, axcodes=None)({"image": images[0]})["image"]
    assert float(plain[0, :8].max()) == -1.0  # padding is background (-1), not 0


# ------------------------------------------------------------------------------------------- datasets


def test_slice_dataset_skips_empty_slices():
    vol, mask = sample.brain_volume(), sample.brain_mask()
    ds = SliceDataset([vol], masks=[mask], min_foreground=0.2)
    assert [k for _, k in ds.index] == sample.brain_slice_indices(min_fraction=0.2)
    item = ds[5]
    assert item["image"].shape == (1, 80, 96) and type(item["image"]) is torch.Tensor
    assert torch.equal(item["image"], vol.as_tensor()[..., item["slice"]])
    auto = SliceDataset([vol, vol], labels=[mask, mask], min_foreground=0.2)
    assert len(auto) == 2 * len(ds)  # its own foreground (above 5 % of the range) finds the same slices
    assert auto[0]["label"].shape == (1, 80, 96)
    coronal = SliceDataset([vol], masks=[mask], axis=1, min_foreground=0.2,
                           transform=lambda d: {**d, "image": d["image"] * 2})
    assert coronal[0]["image"].shape == (1, 80, 80)
    assert torch.equal(coronal[0]["image"], 2 * vol.as_tensor()[:, :, coronal[0]["slice"], :])
    with pytest.raises(DataError):
        SliceDataset([vol[0]])


def test_patch_and_grid_datasets(tmp_path):
    vol, mask = sample.brain_volume(), sample.brain_mask()
    ds = patch_dataset([{"image": vol, "label": mask}], (32, 32, 16), num_samples=3, keys=("image", "label"))
    batch = next(iter(DataLoader(ds, batch_size=1, collate_fn=list_data_collate)))
    assert batch["image"].shape == (3, 1, 32, 32, 16) and batch["label"].shape == (3, 1, 32, 32, 16)
    grid = list(grid_patch_dataset([vol], (32, 48, 40)))
    assert len(grid) == 3 * 2 * 2 and grid[0][0].shape == (1, 32, 48, 40)
    with pytest.raises(DataError, match="cache_dir"):
        cached_dataset([{"image": vol}], cache="disk")
    disk = cached_dataset([{"image": str(sample.data_dir() / "mni152_2mm_brainmask.nii.gz")}],
                          preset("mri", spatial_size=(80, 96, 80), foreground=False), cache="disk",
                          cache_dir=tmp_path)
    assert disk[0]["image"].shape == (1, 80, 96, 80) and any(tmp_path.iterdir())
