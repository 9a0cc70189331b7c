"""Bundled sample data: shapes, geometry, mask statistics, phantoms and pydicom's files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff.data import sample
from medidiff.errors import DataError

EXPECTED_AFFINE = np.array([[2.0, 0, 0, -80], [0, 2, 0, -112], [0, 0, 2, -72], [0, 0, 0, 1]])


def test_brain_volume_geometry_and_units():
    vol = sample.brain_volume()
    assert vol.shape == (1, 80, 96, 80)
    assert vol.dtype == torch.float32
    np.testing.assert_allclose(vol.affine.numpy(), EXPECTED_AFFINE)
    np.testing.assert_allclose(vol.pixdim.numpy(), [2.0, 2.0, 2.0])
    assert nib.aff2axcodes(vol.affine.numpy()) == ("R", "A", "S")
    assert 240 <= float(vol.max()) <= 255 and float(vol.min()) == 0.0
    # the voxel at world (0, 0, 0) mm (centre of MNI space) is inside the brain
    ijk = np.linalg.solve(EXPECTED_AFFINE, [0, 0, 0, 1])[:3].round().astype(int)
    assert sample.brain_mask()[(0, *ijk)] == 1


def test_brain_mask_and_tissue():
    mask = sample.brain_mask()
    assert mask.shape == (1, 80, 96, 80) and mask.dtype == torch.uint8
    np.testing.assert_allclose(mask.affine.numpy(), EXPECTED_AFFINE)
    frac = float(mask.float().mean())
    assert 0.3 < frac < 0.45  # 2 mm MNI brain: ~1.88 l of 4.9 l in the box
    brain_ml = float(mask.sum()) * 8 / 1000
    assert 1400 < brain_ml < 2100
    vol = sample.brain_volume()
    outside = vol[mask == 0]
    assert float((outside > 10).float().mean()) < 0.002  # skull-stripped: almost nothing outside the mask
    tissue = sample.tissue_labels()
    assert torch.equal(tissue > 0, mask > 0)
    # T1 contrast: white matter brighter than grey matter brighter than CSF
    means = [float(vol[tissue == k].mean()) for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]


def test_brain_slices_select_brain_and_resize():
    idx = sample.brain_slice_indices(axis=2)
    assert len(idx) == 58 and idx == list(range(idx[0], idx[-1] + 1))
    images, masks = sample.brain_slices(axis=2)
    assert images.shape == (58, 1, 80, 96) and masks.dtype == torch.bool
    assert type(images) is torch.Tensor
    assert (masks.float().mean(dim=(1, 2, 3)) >= sample.MIN_BRAIN_FRACTION).all()
    padded, pmasks = sample.brain_slices(axis=2, size=(96, 96))
    assert padded.shape == (58, 1, 96, 96) and type(padded) is torch.Tensor
    assert torch.equal(padded[:, :, 8:88], images)  # centred padding, no interpolation
    assert int(pmasks.sum()) == int(masks.sum())
    one, _ = sample.brain_slices(indices=[40])
    assert torch.equal(one[0, 0], sample.brain_volume()[0, :, :, 40])


def test_missing_data_dir_raises_with_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(sample, "CHECKOUT", tmp_path / "pkg")
    with pytest.raises(DataError, match="Fix: .*make_sample_data"):
        sample.data_dir()


def test_shepp_logan():
    img = sample.shepp_logan(64)
    assert img.shape == (1, 64, 64) and img.dtype == torch.float32
    assert float(img.min()) >= 0 and 0.9 < float(img.max()) <= 1.0


def test_random_ellipses_hu_and_seed():
    a = sample.random_ellipses(4, (64, 80), seed=3)
    b = sample.random_ellipses(4, (64, 80), seed=3)
    c = sample.random_ellipses(4, (64, 80), seed=4)
    assert a.shape == (4, 1, 64, 80)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) == -1000.0 and float(a[:, :, 0, 0].max()) == -1000.0  # air in the corners
    assert 400 <= float(a.max()) <= 1200  # bone
    centre = a[:, 0, 32, 40]
    assert ((centre > -200) & (centre < 200)).float().mean() >= 0.5  # soft tissue mostly at the centre
    noisy = sample.random_ellipses(4, (64, 80), seed=3, noise_hu=10.0)
    assert 8 < float((noisy - a).std()) < 12


def test_dicom_examples_are_local_dicom_files():
    import pydicom

    ex = sample.dicom_examples()
    assert {"ct_slice", "mr_slice"} <= ex.keys()
    ds = pydicom.dcmread(ex["ct_slice"])
    assert ds.Modality == "CT" and ds.pixel_array.shape == (128, 128)
    if "ct_series" in ex:
        files = sorted(p for p in ex["ct_series"].iterdir() if p.is_file())
        assert len(files) == 5
        assert {pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files} == {"CT"}
