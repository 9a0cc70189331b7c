"""Cases: reading with companions, prepare -> restore as exact inverses, intensity scaling, slice-wise models."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medidiff.cases import Case, find_cases, intensity_scaling, load_case, prepare, restore, slicewise
from medidiff.data.discover import Source
from medidiff.errors import DataError
from medidiff.modelinfo import DataPrep

ROOT = Path(__file__).resolve().parents[1]


def _case(image: np.ndarray, affine: np.ndarray, mask: np.ndarray | None = None) -> Case:
    return Case(name="c", image=MetaTensor(torch.from_numpy(image.astype(np.float32))[None],
                                           affine=torch.from_numpy(affine)),
                source=Source(name="c", kind="nifti", paths=[]),
                mask=None if mask is None else torch.from_numpy(mask.astype(np.float32))[None])


def _prep(**kw) -> DataPrep:
    return DataPrep.model_validate({"source": "test", "intensity": {"method": "percentile"}, **kw})


def _smooth_volume(shape, seed=0):
    """A smooth positive image (interpolation error is small) inside an ellipsoid."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = ((grid / np.array([0.8, 0.7, 0.9])[:, None, None, None]) ** 2).sum(0) < 1
    image = 50 + 20 * np.sin(2 * grid[0]) + 15 * np.cos(1.5 * grid[1]) + 10 * grid[2]
    return np.where(inside, image, 0.0).astype(np.float32), inside


def _oblique(spacing, angle=0.35):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-20.0, 13.0, 5.0]
    return affine


def test_prepare_then_restore_returns_an_oblique_anisotropic_scan():
    image, inside = _smooth_volume((30, 26, 12))
    affine = _oblique((1.3, 1.7, 2.9))
    affine[0] *= -1  # stored right to left: reoriented to RAS and back
    case = _case(image, affine, inside)
    prep = _prep(spacing_mm=[1.3, 1.7, 2.9], size=[40, 36, 16])  # a 3D model on the scan's own spacing
    p = prepare(case, prep, spatial_dims=3, intensity="own")
    assert tuple(p.image.shape[1:]) == (40, 36, 16)
    back = restore(p.image, p, units="image")
    np.testing.assert_allclose(back[0].numpy()[inside], image[inside], rtol=0, atol=1e-3)
    # on another spacing the round trip is within interpolation error inside the object
    coarse = prepare(case, _prep(spacing_mm=[2.0, 2.0, 2.0], size=[32, 32, 24]), spatial_dims=3, intensity="own")
    again = restore(coarse.image, coarse, units="image")[0].numpy()
    from scipy import ndimage

    core = ndimage.binary_erosion(inside, iterations=2)
    error = np.abs(again[core] - image[core])
    assert np.median(error) < 0.5 and error.max() < 4.0  # image range ~0-95
    mask_back = restore(coarse.foreground, coarse, mode="nearest")[0].numpy() > 0.5
    assert (mask_back != inside).mean() < 0.02


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_2d_model_along_any_axis_prepares_scans_with_the_right_spacing(axis):
    shape = [24, 20, 16]
    image, inside = _smooth_volume(tuple(shape))
    spacing = [1.0, 1.5, 2.5]
    affine = np.diag([*spacing, 1.0])
    in_plane = [2.0, 3.0]  # the model's in-plane spacing; recorded as a 3-entry volume spacing
    full = list(in_plane)
    full.insert(axis, 7.0)  # the slicing axis' entry of a 3-entry spacing is not the target
    prep = _prep(spacing_mm=full, slicing_axis=axis, size=[16, 16])
    assert prep.spacing_mm == in_plane
    p = prepare(_case(image, affine, inside), prep, spatial_dims=2, intensity="own")
    got = np.linalg.norm(p.image.affine.numpy()[:3, :3], axis=0)
    want = list(in_plane)
    want.insert(axis, spacing[axis])  # the slicing axis keeps the scan's own spacing
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert p.image.shape[1 + axis] == shape[axis]  # every slice is kept
    assert [s for i, s in enumerate(p.image.shape[1:]) if i != axis] == [16, 16]


def test_intensity_scaling_modes():
    volume = torch.linspace(0.0, 100.0, 1001)
    fg = torch.ones_like(volume, dtype=torch.bool)
    recorded = {"method": "percentile", "percentiles": [0.5, 99.5], "low": 10.0, "high": 50.0}
    own = intensity_scaling(volume, fg, _prep(intensity=recorded), "match")  # no reference: falls back to own
    assert own["a_min"] == pytest.approx(0.5) and own["a_max"] == pytest.approx(99.5)
    assert intensity_scaling(volume, fg, _prep(intensity=recorded), "model")["a_max"] == 50.0
    levels = [0.25, 0.5, 0.75]
    matched = intensity_scaling(volume, fg, _prep(intensity=recorded | {"reference": [-0.5, 0.0, 0.5],
                                                                        "reference_levels": levels}))
    assert matched["a_min"] == pytest.approx(0.0) and matched["a_max"] == pytest.approx(100.0)
    ct = intensity_scaling(volume, fg, _prep(intensity={"method": "hu_window", "window": [-160, 240]}), "match")
    assert (ct["a_min"], ct["a_max"]) == (-160.0, 240.0)
    with pytest.raises(ValueError, match="intensity"):
        intensity_scaling(volume, fg, _prep(intensity=recorded), "zscore")


@pytest.mark.parametrize("method,beyond", [("percentile", True), ("hu_window", False)])
def test_values_beyond_the_range_reach_the_residual_only_for_mri(method, beyond):
    image, inside = _smooth_volume((16, 16, 4))
    image[7, 7, 1] = 300.0  # far brighter than anything healthy, too small to set the 99.5th percentile
    intensity = {"method": "percentile"} if method == "percentile" else {"method": "hu_window", "window": [0, 100]}
    prep = _prep(spacing_mm=[2.0, 2.0], slicing_axis=2, size=[16, 16], intensity=intensity)
    p = prepare(_case(image, np.diag([2.0, 2.0, 2.0, 1.0]), inside), prep, spatial_dims=2, intensity="own")
    x = p.image.as_tensor()
    assert (float(x.max()) > 1.5) == beyond
    assert (float(x.min()) < -1.0) == beyond  # the background lies below the brain's range too


def test_match_scales_a_lesioned_slab_of_the_training_brain_like_the_training_data():
    """The demo's situation: a slab where large bright lesions fill the top percentiles."""
    from medidiff.data import sample
    from medidiff.data.lesions import insert_lesions
    from medidiff.recipes import load_recipe
    from medidiff.train_data import build_data

    recipe = load_recipe(ROOT / "recipes" / "demo_train.yaml")
    prep = DataPrep.model_validate(build_data(recipe.data, recipe.seed).data_prep)
    brain = sample.brain_mask().as_tensor()[0] > 0
    near = brain.clone()
    near[..., :30], near[..., 46:] = False, False  # lesions of radius 6-7 mm (3 slices) that cross the slab
    lesioned, _ = insert_lesions(sample.brain_volume(), mask=near, n=4, radius_mm=(6.0, 7.0), contrast=0.6,
                                 polarity="hyper", seed=0)
    lesioned, mask = lesioned[..., 34:42], brain[None, ..., 34:42]
    truth = (prep.intensity.low, prep.intensity.high)  # the slab is cut from the training brain itself
    healthy = sample.brain_volume().as_tensor()[0][..., 34:42]

    def error(s, reference):
        return max(abs(s["a_min"] - reference[0]), abs(s["a_max"] - reference[1])) / (truth[1] - truth[0])

    def scaled(image, mode):
        return intensity_scaling(image, mask[0], prep, mode)

    match, own = scaled(lesioned.as_tensor()[0], "match"), scaled(lesioned.as_tensor()[0], "own")
    match_healthy = scaled(healthy, "match")
    # the lesions barely move the matched map; the slab's tissue mix (not the whole brain's) moves it < 5 %
    assert error(match, (match_healthy["a_min"], match_healthy["a_max"])) < 0.01
    assert error(match, truth) < 0.05
    assert error(own, truth) > 0.2  # the 99.5th percentile lies inside the lesions


def test_an_off_centre_brain_is_centred_on_the_grid_and_mapped_back():
    shape = (40, 40, 3)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape[:2]], indexing="ij"))
    disc = ((grid[0] - 9) ** 2 + (grid[1] - 29) ** 2 < 25)[..., None].repeat(3, axis=2)  # far from the centre
    disc[..., 0] = False  # an empty slice is kept, not cropped away
    image = np.where(disc, 80.0, 0.0).astype(np.float32)
    prep = _prep(spacing_mm=[2.0, 2.0], slicing_axis=2, size=[16, 16])
    p = prepare(_case(image, np.diag([2.0, 2.0, 2.0, 1.0]), disc), prep, spatial_dims=2, intensity="own")
    fg = p.foreground[0]
    assert fg.shape == (16, 16, 3) and int(fg.sum()) == int(disc.sum())  # nothing of the brain is lost
    centre = torch.nonzero(fg[..., 1]).float().mean(0)
    assert float((centre - 7.5).abs().max()) <= 0.5
    back = restore(p.foreground, p, mode="nearest")
    np.testing.assert_array_equal(back[0].numpy() > 0.5, disc)


def test_bad_scans_are_refused_with_the_file_named():
    image, inside = _smooth_volume((8, 8, 3))
    prep = _prep(spacing_mm=[2.0, 2.0], slicing_axis=2, size=[8, 8])
    image[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        prepare(_case(image, np.eye(4), inside), prep, spatial_dims=2)
    with pytest.raises(DataError, match="no foreground"):
        prepare(_case(np.ones((8, 8, 3)), np.eye(4), np.zeros((8, 8, 3))), prep, spatial_dims=2)


def test_slicewise_batches_kept_slices_and_fills_the_rest():
    x = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)
    fg = torch.zeros(1, 4, 5, 6)
    fg[..., 1:5] = 1  # slices 1-4 of axis 2 hold foreground
    fg[..., 3] = 0
    calls = []

    def fn(stack, fgs):
        calls.append(stack.shape)
        return stack * 2, fgs.sum(dim=(2, 3), keepdim=True).expand(-1, 1, *stack.shape[2:])

    (doubled, counts), n = slicewise(fn, x, fg, spatial_dims=2, axis=2, min_foreground=0.5, fills=(None, -1.0))
    assert n == 3 and calls == [torch.Size([3, 2, 4, 5])]  # one batch of the kept slices, (S, C, H, W)
    kept = [1, 2, 4]
    torch.testing.assert_close(doubled[..., kept], 2 * x[..., kept])
    torch.testing.assert_close(doubled[..., [0, 3, 5]], x[..., [0, 3, 5]])  # None: the input is copied
    assert counts.shape == (1, 4, 5, 6) and float(counts[..., 0].max()) == -1.0 and float(counts[..., 1].min()) == 20
    (whole,), n = slicewise(lambda s, f: (s + 1,), x, fg, spatial_dims=3)
    assert n == 1 and torch.equal(whole, x + 1)


def test_a_datalist_case_brings_its_mask_label_and_annotations(tmp_path):
    image, inside = _smooth_volume((8, 8, 3))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for name, arr in (("a.nii.gz", image), ("m.nii.gz", inside), ("l.nii.gz", inside),
                      ("r1.nii.gz", inside), ("r2.nii.gz", ~inside)):
        nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), tmp_path / name)
    (tmp_path / "list.json").write_text(json.dumps({"test": [
        {"image": "a.nii.gz", "mask": "m.nii.gz", "label": "l.nii.gz", "annotations": ["r1.nii.gz", "r2.nii.gz"]}]}))
    (source,) = find_cases(tmp_path / "list.json")
    case = load_case(source)
    assert case.mask.shape == (1, 8, 8, 3) and bool(case.mask.bool()[0].eq(torch.from_numpy(inside)).all())
    assert len(case.annotations) == 2 and float(case.annotations[1].sum()) == float((~inside).sum())
    assert {p.name for p in case.files} == {"a.nii.gz", "m.nii.gz", "l.nii.gz", "r1.nii.gz", "r2.nii.gz"}
    nib.save(nib.Nifti1Image(inside.astype(np.float32), np.diag([2.0, 2.0, 2.5, 1.0])), tmp_path / "m.nii.gz")
    with pytest.raises(DataError, match="mask lies"):
        load_case(find_cases(tmp_path / "list.json")[0])
    with pytest.raises(DataError, match="single mask"):
        find_cases(tmp_path, mask=tmp_path / "m.nii.gz")
