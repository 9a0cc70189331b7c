"""Anomaly detection end to end on a tiny model: outputs on the input grid, failures recorded, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from anomaly_helpers import FAST, save_tiny_model, volume, write_nifti

from medidiff.anomaly import detect
from medidiff.anomaly.thresholds import save_threshold
from medidiff.cli import main
from medidiff.core.processes import make_process
from medidiff.nets import build_unet
from medidiff.weights import save_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def test_datalist_with_labels_masks_and_calibration(tmp_path, tiny_model):
    image, brain, affine = volume((16, 16, 4))
    label = np.zeros_like(brain)
    label[6:10, 6:10, 1:3] = 1
    lesioned = np.where(label > 0, image * 1.6, image)
    for name, arr in (("a.nii.gz", lesioned), ("a_label.nii.gz", label), ("a_mask.nii.gz", brain),
                      ("calib.nii.gz", image)):
        write_nifti(tmp_path / name, arr, affine)
    (tmp_path / "list.json").write_text(json.dumps(
        {"test": [{"image": "a.nii.gz", "label": "a_label.nii.gz", "mask": "a_mask.nii.gz"}]}))
    out = tmp_path / "out"
    result = detect(tiny_model, tmp_path / "list.json", out, calibration=tmp_path / "calib.nii.gz", fpr=0.1,
                    scan_quantile=None, **FAST)  # the map in the scan's units (the per-scan map: below)
    for kind in ("heatmap", "healthy", "anomaly_mask"):
        img = nib.load(out / f"a_{kind}.nii.gz")
        assert img.shape == (16, 16, 4)
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert nib.load(out / "a_anomaly_mask.nii.gz").get_data_dtype() == np.uint8
    assert (out / "a_overlay.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"auroc", "auprc", "dice", "dice_best", "per_case"} <= set(metrics)
    assert 0.0 <= metrics["auroc"] <= 1.0 and metrics["dice_best_label"] == "dice_best (oracle threshold)"
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert list(rows[0]) == ["case", "score", "max", "n_voxels_flagged", "n_findings", "largest_finding_mm3",
                             "threshold_scan_units", "mean_spread", "time_s", "nfe", "lesions", "lesions_found",
                             "false_positive_findings"]
    assert rows[0]["mean_spread"] == "" and not (out / "a_uncertainty.nii.gz").exists()  # one sample: no spread
    assert int(rows[0]["nfe"]) == 2 * 4  # 2 steps on each of the 4 slices
    record = json.loads((out / "thresholds.json").read_text())
    assert record["fpr"] == 0.1 and abs(record["measured_fpr"] - 0.1) < 0.02
    assert json.loads((out / "detection.json").read_text())["threshold"] == record["threshold"]
    assert "voxel AUROC" in result.summary and (out / "report.md").is_file()
    assert "(calibrated at voxel FPR 0.1)" in (out / "report.md").read_text()
    heat_img = nib.load(out / "a_heatmap.nii.gz")
    heat = heat_img.get_fdata()
    assert heat[brain == 0].max() == 0.0  # nothing outside the brain mask
    # one threshold scale: the heatmap thresholded in a viewer at the written value is the anomaly mask
    in_units = float(rows[0]["threshold_scan_units"])
    assert float(heat_img.header["cal_min"]) == pytest.approx(in_units, rel=1e-6)
    assert float(heat_img.header["cal_max"]) == pytest.approx(max(in_units, heat.max()), rel=1e-6)
    assert f"{in_units:.6g}" in heat_img.header["descrip"].item().decode()
    flagged = np.asarray(nib.load(out / "a_anomaly_mask.nii.gz").dataobj) > 0
    assert int(rows[0]["n_voxels_flagged"]) == int(flagged.sum()) > 0
    assert np.sum(flagged != ((heat > in_units) & (brain > 0))) <= 1  # float32 rounding at the boundary only
    scale = in_units / record["threshold"]  # the case's intensity scale: not 1, the units differ
    assert abs(scale - 1.0) > 0.5
    assert f"{in_units:.4g}" in (out / "report.md").read_text()
    # findings: the flagged voxels' regions, largest first, and lesion-level counts against the label
    found = list(csv.DictReader((out / "a_findings.csv").open()))
    assert len(found) == int(rows[0]["n_findings"]) > 0 and sum(int(f["voxels"]) for f in found) == flagged.sum()
    assert [int(f["rank"]) for f in found] == list(range(1, len(found) + 1))
    assert int(found[0]["voxels"]) == max(int(f["voxels"]) for f in found)
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))
    assert float(rows[0]["largest_finding_mm3"]) == pytest.approx(int(found[0]["voxels"]) * voxel_mm3, rel=1e-4)
    i, j, k = (int(v) for v in found[0]["peak_voxel"].split())
    assert flagged[i, j, k] and heat[i, j, k] == pytest.approx(float(found[0]["peak"]), rel=1e-5)
    assert (int(rows[0]["lesions"]), metrics["lesions"]) == (1, 1)  # the one square lesion
    touches = int(found[0]["voxels"]) > 0 and bool((flagged & (label > 0)).any())
    assert int(rows[0]["lesions_found"]) == int(touches) == metrics["lesions_found"]
    assert metrics["false_positive_findings_per_scan"] == metrics["false_positive_findings"] == int(
        rows[0]["false_positive_findings"])
    report = (out / "report.md").read_text()
    assert "| case | lesions | found | false-positive findings |" in report
    assert f"| a | 1 | {rows[0]['lesions_found']} |" in report
    assert f"| a | 1 | {found[0]['volume_mm3']} |" in report  # the largest finding listed first


def test_other_grid_and_a_corrupt_file(tmp_path, tiny_model):
    scans = tmp_path / "scans"
    scans.mkdir()
    image, _, affine = volume((21, 13, 5), spacing=(1.5, 2.5, 3.0), flip=True)
    write_nifti(scans / "odd.nii.gz", image, affine)
    (scans / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    out = tmp_path / "out"
    result = detect(tiny_model, scans, out, threshold=0.2, **FAST)
    heat = nib.load(out / "odd_heatmap.nii.gz")
    assert heat.shape == (21, 13, 5)
    np.testing.assert_allclose(heat.affine, affine, atol=1e-5)
    assert np.isfinite(heat.get_fdata()).all() and heat.get_fdata().max() > 0
    healthy = nib.load(out / "odd_healthy.nii.gz").get_fdata()
    assert healthy.shape == (21, 13, 5) and abs(np.median(healthy[image > 0]) - np.median(image[image > 0])) < 40
    failures = list(csv.DictReader((out / "failures.csv").open()))
    assert [row["case"] for row in failures] == ["broken"]
    assert result.failures == 1 and [r["case"] for r in result.rows] == ["odd"]
    assert not (out / "metrics.json").exists()  # no labels: no metrics


def test_cli_detect(tmp_path, tiny_model, capsys):
    image, brain, affine = volume((16, 16, 3))
    write_nifti(tmp_path / "scan.nii.gz", image, affine)
    write_nifti(tmp_path / "brain.nii.gz", brain, affine)
    out = tmp_path / "out"
    saved = save_threshold(tmp_path / "thresholds.json", 0.3, fpr=0.05)
    code = main(["detect", "--model", str(tiny_model), "--input", str(tmp_path / "scan.nii.gz"), "--out", str(out),
                 "--mask", str(tmp_path / "brain.nii.gz"), "--threshold", str(saved), "--device", "cpu",
                 "--set", "t_levels=[0.3]", "--set", "steps=2", "--set", "n_samples=1", "--set", "progress=false"])
    assert code == 0
    assert "1 case(s) analysed" in capsys.readouterr().out
    assert json.loads((out / "detection.json").read_text())["threshold"] == 0.3
    for name in ("scan_heatmap.nii.gz", "scan_anomaly_mask.nii.gz", "scores.csv", "manifest.json", "recipe.yaml",
                 "anomaly.log"):
        assert (out / name).is_file()
    assert main(["detect", "--model", str(tiny_model), "--input", str(tmp_path / "missing.nii.gz"),
                 "--out", str(out)]) == 4  # a data error


def test_demo_recipe_is_valid():
    from medidiff.anomaly.config import AnomalySection
    from medidiff.recipes import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    assert recipe.task == "anomaly" and recipe.anomaly.model == "data/weights/healthy_brain_2d.safetensors"
    assert (ROOT / recipe.anomaly.inputs).is_file() and recipe.anomaly.calibration is None
    # no calibration scans: the threshold saved beside the model applies, calibrated with the demo's settings
    from medidiff.anomaly.thresholds import saved_threshold

    threshold = saved_threshold(ROOT / recipe.anomaly.model, recipe.anomaly.map_settings(), recipe.anomaly.fpr)[0]
    assert recipe.anomaly.fpr == 0.01 and threshold == pytest.approx(1.403, abs=5e-4)  # per-scan units
    assert recipe.anomaly.map_settings() == AnomalySection().map_settings()  # the CLI's defaults are the demo's


def test_a_threshold_saved_with_the_model_is_used_only_for_its_settings(tmp_path, tiny_model):
    import shutil

    from medidiff.anomaly.thresholds import model_threshold_path

    image, brain, affine = volume((16, 16, 4))
    write_nifti(tmp_path / "a.nii.gz", image, affine)
    write_nifti(tmp_path / "a_mask.nii.gz", brain, affine)
    model = shutil.copytree(tiny_model, tmp_path / "model")
    calibrated = detect(model, tmp_path / "a.nii.gz", tmp_path / "c", calibration=tmp_path / "a.nii.gz",
                        mask=tmp_path / "a_mask.nii.gz", fpr=0.1, **FAST)
    shutil.copy(tmp_path / "c" / "thresholds.json", model_threshold_path(model))
    assert model_threshold_path(model.parent / "w.safetensors").name == "w.thresholds.json"
    same = detect(model, tmp_path / "a.nii.gz", tmp_path / "s", mask=tmp_path / "a_mask.nii.gz", fpr=0.1, **FAST)
    assert same.extra["threshold"] == calibrated.extra["threshold"] is not None
    strict = detect(model, tmp_path / "a.nii.gz", tmp_path / "t", mask=tmp_path / "a_mask.nii.gz", **FAST)
    record = json.loads(model_threshold_path(model).read_text())
    assert strict.extra["threshold"] == record["at_fpr"]["0.01"] > same.extra["threshold"]  # the default rate
    assert (tmp_path / "s" / "a_anomaly_mask.nii.gz").is_file()
    other = detect(model, tmp_path / "a.nii.gz", tmp_path / "o", mask=tmp_path / "a_mask.nii.gz",
                   **(FAST | {"median_size": 5}))
    assert other.extra["threshold"] is None and not (tmp_path / "o" / "a_anomaly_mask.nii.gz").exists()
    for change in ({"spread": "mad"}, {"min_foreground": 0.2}):  # the spread statistic and slice selection count
        again = detect(model, tmp_path / "a.nii.gz", tmp_path / "x", mask=tmp_path / "a_mask.nii.gz",
                       **(FAST | change))
        assert again.extra["threshold"] is None


def test_a_dicom_scan_gets_a_parametric_map_and_a_seg_too(tmp_path, tiny_model):
    import highdicom as hd
    import pydicom
    from dicom_helpers import dciodvfy_errors

    from medidiff.data import sample

    folder = sample.dicom_examples().get("ct_series")
    if folder is None:
        pytest.skip("pydicom's dicomdirtests series is missing")
    result = detect(tiny_model, folder, tmp_path / "out", threshold=0.0, scan_quantile=None, **FAST)
    sources = [p for p in folder.iterdir() if p.is_file()]
    assert result.failures == 0
    heat = next((tmp_path / "out").glob("*_heatmap.dcm"))
    pm = pydicom.dcmread(heat)
    assert pm.SOPClassUID.name == "Parametric Map Storage" and int(pm.NumberOfFrames) == len(sources)
    assert "DERIVED" in pm.ImageType and pm.SeriesDescription == "medidiff anomaly heatmap"
    unit = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence[0]
    assert unit.CodeValue == "[hnsf'U]"  # a CT map of absolute residuals is in Hounsfield units
    nifti = nib.load(next((tmp_path / "out").glob("*_heatmap.nii.gz"))).get_fdata()
    assert float(nifti.max()) > 0 and float(np.asarray(pm.pixel_array).max()) == pytest.approx(float(nifti.max()))
    seg = hd.seg.segread(next((tmp_path / "out").glob("*_anomaly_mask.dcm")))
    mask = nib.load(next((tmp_path / "out").glob("*_anomaly_mask.nii.gz"))).get_fdata()
    assert int(np.asarray(seg.pixel_array).sum()) == int(mask.sum()) and seg.StudyInstanceUID == pm.StudyInstanceUID
    assert dciodvfy_errors(heat) == [] and dciodvfy_errors(Path(seg.filename)) == []


def test_a_3d_model_maps_a_volume_back_onto_its_grid(tmp_path):
    torch.manual_seed(0)
    net = build_unet(spatial_dims=3, in_channels=1, channels=(8, 16), attention_levels=(False, False),
                     norm_num_groups=8, num_head_channels=8)
    prep = {"source": "test", "orientation": "RAS", "spacing_mm": [2.0, 2.0, 2.0], "size": [16, 16, 8],
            "intensity": {"method": "percentile", "percentiles": [0.5, 99.5]}}
    save_model(tmp_path / "m3d", net, make_process("ddpm", n_steps=50), "eps",
               {"data_prep": prep, "noise": {"kind": "gaussian"}})
    image, brain, affine = volume((20, 18, 10), spacing=(1.6, 2.0, 2.4), flip=True)
    write_nifti(tmp_path / "v.nii.gz", image, affine)
    write_nifti(tmp_path / "v_mask.nii.gz", brain, affine)
    result = detect(tmp_path / "m3d", tmp_path / "v.nii.gz", tmp_path / "out", mask=tmp_path / "v_mask.nii.gz",
                    **(FAST | {"erode": 1}))
    heat = nib.load(tmp_path / "out" / "v_heatmap.nii.gz")
    assert heat.shape == image.shape and np.allclose(heat.affine, affine, atol=1e-5)
    values = heat.get_fdata()
    assert values[brain == 0].max() == 0.0 and values[brain > 0].max() > 0.0
    assert result.rows[0]["nfe"] == 2  # one volume, 2 DDIM steps


def test_the_spread_between_samples_is_written_as_an_uncertainty_map(tmp_path, tiny_model):
    image, brain, affine = volume((16, 16, 4))
    write_nifti(tmp_path / "a.nii.gz", image, affine)
    write_nifti(tmp_path / "a_mask.nii.gz", brain, affine)
    result = detect(tiny_model, tmp_path / "a.nii.gz", tmp_path / "out", mask=tmp_path / "a_mask.nii.gz",
                    **(FAST | {"n_samples": 3}))
    spread = nib.load(tmp_path / "out" / "a_uncertainty.nii.gz")
    assert spread.shape == image.shape and np.allclose(spread.affine, affine, atol=1e-5)
    values = spread.get_fdata()
    assert values.min() >= 0 and values[brain > 0].min() > 0  # three draws of noise never agree exactly
    # the same grid and the scan's own range: the map is the csv's model-scale mean, in scan units
    low, high = np.percentile(image[brain > 0], [0.5, 99.5])
    mean_spread = float(result.rows[0]["mean_spread"])
    assert values[brain > 0].mean() == pytest.approx(mean_spread * (high - low) / 2, rel=1e-3)


def test_algorithm_errors_become_recipe_errors_naming_the_key(tmp_path, tiny_model):
    from medidiff import recipes, runs
    from medidiff.errors import RecipeError

    image, brain, affine = volume((16, 16, 2))
    write_nifti(tmp_path / "a.nii.gz", image, affine)
    section = {"model": str(tiny_model), "inputs": str(tmp_path / "a.nii.gz"), "progress": False,
               "reconstruction": {"sampler": "warp", "n_samples": 1}}
    recipe = recipes.parse_recipe({"task": "anomaly", "device": "cpu", "anomaly": section})
    with pytest.raises(RecipeError) as info:
        runs.run(recipe, tmp_path / "out")
    assert info.value.where == "anomaly.reconstruction.sampler" and "warp" in str(info.value)
    with pytest.raises(RecipeError, match="anomaly.reconstruction.n_samples"):
        recipes.parse_recipe({"task": "anomaly", "anomaly": section | {"reconstruction": {"n_samples": 0}}})


def test_per_scan_maps_give_one_threshold_for_every_scan(tmp_path, tiny_model):
    from medidiff.anomaly.config import AnomalySection

    off = AnomalySection().updated(scan_quantile=None)
    assert "scan_quantile" not in off.map_settings()["map"]  # off: thresholds saved before the option stay valid
    assert AnomalySection().map_settings()["map"]["scan_quantile"] == 0.9
    image, brain, affine = volume((16, 16, 4))
    for folder, name, arr in (("in", "a", image), ("in", "b", image * 7.0), ("cal", "calib", image)):
        (tmp_path / folder).mkdir(exist_ok=True)
        write_nifti(tmp_path / folder / f"{name}.nii.gz", arr, affine)
    out = tmp_path / "out"
    detect(tiny_model, tmp_path / "in", out, calibration=tmp_path / "cal", fpr=0.1, scan_quantile=0.9, **FAST)
    record = json.loads((out / "thresholds.json").read_text())
    assert "0.9-quantile" in record["units"] and "in_scan_units" not in record
    assert record["settings"]["map"]["scan_quantile"] == 0.9
    rows = {r["case"]: r for r in csv.DictReader((out / "scores.csv").open())}
    for case in ("a", "b"):  # the heatmap is the per-scan map: the threshold is one number in its units
        heat_img = nib.load(out / f"{case}_heatmap.nii.gz")
        heat = heat_img.get_fdata()
        assert float(rows[case]["threshold_scan_units"]) == pytest.approx(record["threshold"], rel=1e-6)
        assert float(heat_img.header["cal_min"]) == pytest.approx(record["threshold"], rel=1e-6)
        covered = heat[heat > 0]
        assert np.quantile(covered, 0.9) == pytest.approx(1.0, rel=0.02)  # in multiples of its own 0.9-quantile
    # scans 7x apart in intensity get the same heatmap (in the scans' units the two would differ 7x)
    np.testing.assert_allclose(nib.load(out / "a_heatmap.nii.gz").get_fdata(),
                               nib.load(out / "b_heatmap.nii.gz").get_fdata(), rtol=1e-3, atol=1e-4)
    assert "the same number for every scan" in (out / "report.md").read_text()
    assert "0.9-quantile of it over the brain" in (out / "report.html").read_text()
