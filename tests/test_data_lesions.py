"""Synthetic lesions: reproducible, inside the mask, sized in mm, contrast sign, mass effect, 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medidiff.data import sample
from medidiff.data.lesions import insert_lesions
from medidiff.errors import DataError


def flat(shape, value=100.0):
    return np.full((1, *shape), value, dtype=np.float32)


def test_reproducible_with_seed_and_types_kept():
    images, masks = sample.brain_slices(indices=[40])
    a, ma = insert_lesions(images[0], mask=masks[0], spacing=2.0, n=3, seed=7)
    b, mb = insert_lesions(images[0], mask=masks[0], spacing=2.0, n=3, seed=7)
    c, _ = insert_lesions(images[0], mask=masks[0], spacing=2.0, n=3, seed=8)
    assert type(a) is torch.Tensor and a.dtype == images.dtype and a.shape == (1, 80, 96)
    assert ma.shape == (1, 80, 96) and ma.dtype == torch.bool
    assert torch.equal(a, b) and torch.equal(ma, mb) and not torch.equal(a, c)
    assert ndimage.label(ma[0].numpy())[1] == 3  # three separate lesions
    arr, marr = insert_lesions(images[0].numpy(), mask=masks[0].numpy(), spacing=2.0, n=3, seed=7)
    assert isinstance(arr, np.ndarray) and np.array_equal(arr, a.numpy()) and np.array_equal(marr, ma.numpy())
    ints, _ = insert_lesions(np.full((1, 32, 32), 100, np.int16), n=1, radius_mm=4, seed=0)
    assert ints.dtype == np.int16


def test_lesions_stay_inside_mask_3d_metatensor():
    vol, mask = sample.brain_volume(), sample.brain_mask()
    out, les = insert_lesions(vol, mask=mask, n=4, radius_mm=(4, 8), seed=3)
    assert type(out) is type(vol) and torch.equal(out.affine, vol.affine)
    assert les.sum() > 0
    assert not (les & (mask == 0)).any()
    assert ndimage.label(les[0].numpy())[1] == 4
    far = ndimage.distance_transform_edt(~les[0].numpy(), sampling=2.0) > 8 * 2.0
    assert torch.equal(out[0][torch.from_numpy(far)], vol[0][torch.from_numpy(far)])  # untouched elsewhere


@pytest.mark.parametrize(
    "shape, spacing, radius",
    [((64, 48), (0.8, 1.5), 9.0), ((48, 40, 24), (1.0, 1.25, 2.5), 8.0), ((40, 40, 40), 1.0, 6.0)],
)
def test_radius_in_mm_respected(shape, spacing, radius):
    image = flat(shape)
    _, les, info = insert_lesions(image, spacing=spacing, n=1, radius_mm=radius, irregularity=0.0,
                                  texture=0.0, seed=1, return_info=True)
    assert info[0]["radius_mm"] == radius
    sp = np.broadcast_to(np.asarray(spacing, float), (len(shape),))
    measured = les.sum() * np.prod(sp)
    expected = np.pi * radius**2 if len(shape) == 2 else 4 / 3 * np.pi * radius**3
    assert abs(measured / expected - 1) < 0.08
    extent = [np.ptp(idx) * h + h for idx, h in zip(np.nonzero(les[0]), sp)]  # round in mm, not in voxels
    np.testing.assert_allclose(extent, 2 * radius, atol=max(sp) + 0.01)


def test_irregular_lesions_keep_their_size_roughly():
    sizes = [insert_lesions(flat((48, 48, 48)), n=1, radius_mm=7, irregularity=0.15, seed=s)[1].sum()
             for s in range(4)]
    assert 0.6 < np.mean(sizes) / (4 / 3 * np.pi * 7**3) < 1.4


@pytest.mark.parametrize("polarity, sign", [("hyper", 1), ("hypo", -1)])
def test_contrast_sign_and_size(polarity, sign):
    image = flat((64, 64), 200.0)
    out, les, info = insert_lesions(image, n=2, radius_mm=6, contrast=0.4, polarity=polarity, texture=0.0,
                                    seed=0, return_info=True)
    assert [d["contrast"] for d in info] == [sign * 0.4] * 2
    change = (out - image)[les] / 200.0
    assert (np.sign(change) == sign).all()
    assert 0.2 < abs(change.mean()) <= 0.4 + 1e-6  # 0.4 at the centre, 0.2 at the edge
    both = insert_lesions(image, n=8, radius_mm=3, polarity="both", seed=0, return_info=True)[2]
    assert {np.sign(d["contrast"]) for d in both} == {-1.0, 1.0}


def test_texture_varies_inside_lesion():
    image = flat((64, 64, 32), 100.0)
    plain, les = insert_lesions(image, n=1, radius_mm=8, texture=0.0, edge_mm=0.1, seed=2)
    textured, les2 = insert_lesions(image, n=1, radius_mm=8, texture=0.3, edge_mm=0.1, seed=2)
    assert np.array_equal(les, les2)
    core = ndimage.binary_erosion(les[0], iterations=2)
    assert plain[0][core].std() < 0.5 and textured[0][core].std() > 3.0


def test_mass_effect_pushes_tissue_outward():
    x = np.arange(64, dtype=np.float32)
    ramp = np.broadcast_to(x[:, None], (64, 64))[None].copy()  # intensity = x (mm)
    out, les, info = insert_lesions(ramp, n=1, radius_mm=6, contrast=0.0, mass_effect=0.5, seed=4,
                                    return_info=True)
    same, les0 = insert_lesions(ramp, n=1, radius_mm=6, contrast=0.0, mass_effect=0.0, seed=4)
    assert np.array_equal(les, les0) and np.array_equal(same, ramp)
    cx, cy = info[0]["centre"]
    shift = out[0] - ramp[0]  # tissue from nearer the centre shows up farther out
    assert shift[cx + 4, cy] < -1.0 and shift[cx - 4, cy] > 1.0
    assert abs(shift[cx, cy]) < 1e-6  # the centre stays put
    assert np.abs(shift[np.hypot(*np.mgrid[:64, :64] - np.array([cx, cy])[:, None, None]) > 40]).max() < 0.05


def test_no_room_raises():
    mask = np.zeros((32, 32), bool)
    mask[10:14, 10:14] = True
    with pytest.raises(DataError, match="no room"):
        insert_lesions(flat((32, 32)), mask=mask, n=1, radius_mm=5, seed=0)
    with pytest.raises(ValueError):
        insert_lesions(flat((32, 32)), polarity="bright")
