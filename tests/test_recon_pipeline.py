"""The recon task end to end on tiny untrained priors: images (CLI), sinograms, fastMRI k-space, recipe errors."""

from __future__ import annotations

import csv
import json

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff.cli import main
from medidiff.core.processes import make_process
from medidiff.errors import RecipeError
from medidiff.nets import build_unet
from medidiff.recon.ct import ParallelBeamCT, view_angles
from medidiff.recon.mri import fft2c
from medidiff.recon.problems import MU_WATER, hu_to_mu
from medidiff.recon.reconstruct import reconstruct
from medidiff.recon.task import run
from medidiff.weights import save_model

FAST = {"steps": 2, "tv_iters": 5, "progress": False}


def _prior(folder, intensity):
    torch.manual_seed(0)
    net = build_unet(spatial_dims=2, in_channels=1, channels=(8, 16), attention_levels=(False, False),
                     norm_num_groups=8, num_head_channels=8)
    prep = {"source": "test", "orientation": "RAS", "slicing_axis": 2, "size": [16, 16], "patch": True,
            "intensity": intensity}
    save_model(folder, net, make_process("ddpm", n_steps=20), "eps", {"data_prep": prep})
    return folder


@pytest.fixture(scope="module")
def priors(tmp_path_factory):
    root = tmp_path_factory.mktemp("priors")
    return {"mri": _prior(root / "mri", {"method": "percentile"}),
            "ct": _prior(root / "ct", {"method": "hu_window", "window": [-1000, 1000]})}


def _disc(shape):
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    return ((g[0] / 0.8) ** 2 + (g[1] / 0.7) ** 2 < 1), g


def test_images_through_the_command(tmp_path, priors):
    disc, g = _disc((24, 21, 3))
    image = np.where(disc, 60 + 30 * (g[0] > 0), 0).astype(np.float32)
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])  # stored left to right: reoriented for the prior and back
    affine[:3, 3] = [5.0, -3.0, 2.0]
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "head.nii.gz")
    out = tmp_path / "out"
    code = main(["reconstruct", "--input", str(tmp_path / "head.nii.gz"), "--modality", "mri", "--out", str(out),
                 "--model", str(priors["mri"]), "--steps", "2", "--coils", "2", "--mask", "equispaced",
                 "--center-fraction", "0.2", "--set", "tv_iters=5", "--set", "progress=false",
                 "--set", "slices=[0,2]", "--seed", "3"])
    assert code == 0
    for kind in ("recon", "zerofilled", "tv"):
        img = nib.load(out / f"head_{kind}.nii.gz")
        assert img.shape == (24, 21, 3)
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        data = img.get_fdata()
        assert np.abs(data[..., 1]).max() < 1e-6 and np.abs(data[..., 0]).max() > 10  # slice 1 not asked for
    assert (out / "head_panel.png").stat().st_size > 2000
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["method"] for r in rows] == ["recon", "zerofilled", "tv"]
    assert int(rows[0]["nfe"]) == 2 and min(float(r["psnr"]) for r in rows[1:]) > 10
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"recon", "zerofilled", "tv"}
    assert metrics["settings"]["simulation"]["coils"] == 2
    recipe = (out / "recipe.yaml").read_text()
    assert "task: recon" in recipe and "mask: equispaced" in recipe
    assert "| diffusion |" in (out / "report.md").read_text()


def test_measured_sinogram(tmp_path, priors):
    n, pixel = 24, 0.8
    disc, g = _disc((n, n))
    hu = np.where((g[0] ** 2 + g[1] ** 2) < 0.8, np.where(disc, 40.0, -100.0), -1000.0)
    op = ParallelBeamCT((n, n), view_angles(18), circle=True)
    sino = op(hu_to_mu(torch.from_numpy(hu))[None, None])[0, 0].numpy() * MU_WATER * pixel
    np.savez(tmp_path / "scan.npz", sinogram=sino, angles_deg=view_angles(18).numpy(), pixel_size_mm=pixel)
    out = tmp_path / "out"
    result = reconstruct(priors["ct"], tmp_path / "scan.npz", out, modality="ct", solver="dps", **FAST)
    assert result.failures == 0 and not (out / "metrics.json").exists()  # no reference
    fbp = nib.load(out / "scan_fbp.nii.gz")
    assert fbp.shape == (n, n, 1)
    np.testing.assert_allclose(np.diag(fbp.affine)[:2], [pixel, pixel])
    inside = (g[0] ** 2 + g[1] ** 2) < 0.3
    assert abs(np.median(fbp.get_fdata()[..., 0][inside & disc]) - 40) < 60  # HU, from the measured line integrals
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["method"] for r in rows] == ["recon", "fbp", "tv"] and "psnr" not in rows[0]
    assert nib.load(out / "scan_recon.nii.gz").shape == (n, n, 1)


def _kspace_file(path, coils, mask=None):
    disc, g = _disc((20, 16))
    image = torch.from_numpy(np.where(disc, 1.0 + (g[1] > 0), 0.0)) * torch.exp(1j * torch.from_numpy(g[0]))
    maps = torch.stack([torch.exp(-((torch.from_numpy(g[0]) - c) ** 2)) for c in np.linspace(-1, 1, coils)])
    k = fft2c(maps * image).numpy().astype(np.complex64)[None].repeat(2, axis=0)  # 2 slices
    if coils == 1:
        k = k[:, 0]
    with h5py.File(path, "w") as f:
        f["kspace"] = k if mask is None else k * mask
        if mask is not None:
            f["mask"] = mask.astype(np.float32)
    return path


@pytest.mark.parametrize("coils", [1, 3])
def test_fastmri_kspace_fully_sampled_gives_metrics(tmp_path, priors, coils):
    path = _kspace_file(tmp_path / "knee.h5", coils)
    out = tmp_path / "out"
    result = reconstruct(priors["mri"], path, out, modality="mri", acceleration=2, center_fraction=0.25, **FAST)
    assert result.failures == 0
    img = nib.load(out / "knee_recon.nii.gz")
    assert img.shape == (20, 16, 2)  # rows, columns, slices
    metrics = json.loads((out / "metrics.json").read_text())  # the fully sampled RSS image is the reference
    assert metrics["methods"]["zerofilled"]["psnr"] > 12 and set(metrics["methods"]) == {"recon", "zerofilled", "tv"}
    assert metrics["settings"]["simulation"]["coils"] == coils


def test_fastmri_kspace_with_its_own_mask(tmp_path, priors):
    mask = np.zeros(16, dtype=bool)
    mask[[0, 3, 6, 7, 8, 9, 12]] = True
    path = _kspace_file(tmp_path / "test.h5", 2, mask=mask)
    out = tmp_path / "out"
    result = reconstruct(priors["mri"], path, out, modality="mri", **FAST)
    assert result.failures == 0 and result.metrics is None and not (out / "metrics.json").exists()
    zf = nib.load(out / "test_zerofilled.nii.gz").get_fdata()
    assert zf.shape == (20, 16, 2) and zf.max() > 0


def test_errors_name_the_recipe_key(tmp_path, priors):
    from medidiff.recon.config import ReconSection

    section = ReconSection(modality="ct", model=str(priors["mri"]), inputs=str(tmp_path))
    with pytest.raises(RecipeError, match="inputs"):
        run(ReconSection(), tmp_path / "o")
    path = _kspace_file(tmp_path / "k.h5", 1)
    with pytest.raises(RecipeError) as err:
        run(section.updated(inputs=str(path)), tmp_path / "o")
    assert err.value.where == "recon.modality"
    np.savez(tmp_path / "s.npz", sinogram=np.zeros((4, 8)), angles_deg=[0.0, 45.0, 90.0, 135.0])
    with pytest.raises(RecipeError) as err:  # no full grid of views for Song et al.'s merge
        run(section.updated(inputs=str(tmp_path / "s.npz"), model=str(priors["ct"]), solver="pc"), tmp_path / "o")
    assert err.value.where == "recon.solver.name"
    with pytest.raises(ValueError):
        ReconSection().updated(acceleraton=4)
