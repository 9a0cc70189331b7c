"""The segment task end to end on tiny models: files on the input grid, metrics, DICOM SEG, the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from medidiff.cli import main
from medidiff.core.processes import make_process
from medidiff.nets import build_segmentation_unet, build_unet
from medidiff.segment import segment
from medidiff.weights import save_model

FAST = {"members": 3, "steps": 2, "progress": False}
PREP = {"source": "test", "orientation": "RAS", "spacing_mm": [2.0, 2.0], "slicing_axis": 2, "size": [16, 16],
        "intensity": {"method": "percentile", "percentiles": [0.5, 99.5]},
        "labels": {"classes": ["background", "lesion"]}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    net = build_unet(spatial_dims=2, in_channels=1, cond_channels=1, channels=(8, 16), attention_levels=(False, False),
                     norm_num_groups=8, num_head_channels=8)
    folder = tmp_path_factory.mktemp("segmodel")
    save_model(folder, net, make_process("ddpm", n_steps=50), "eps", {"data_prep": PREP})
    return folder


def _case(folder: Path, shape=(20, 18, 4), spacing=(1.5, 2.0, 2.5), flip=True, annotations=True):
    """A volume with a bright square 'lesion', its label and two annotations, and a datalist."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid[:2] ** 2).sum(0) < 0.7
    image = np.where(brain, 60 + 10 * rng.random(shape), 0).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[8:12, 7:11, 1:3] = 1
    image[label > 0] *= 1.8
    wider = np.zeros_like(label)
    wider[7:13, 6:12, 1:3] = 1
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 7.0]
    if flip:
        affine[0, 0] *= -1
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("a.nii.gz", image), ("a_label.nii.gz", label), ("a_wide.nii.gz", wider)):
        nib.save(nib.Nifti1Image(arr, affine), folder / name)
    entry = {"image": "a.nii.gz", "label": "a_label.nii.gz"}
    if annotations:
        entry["annotations"] = ["a_wide.nii.gz"]
    (folder / "cases.json").write_text(json.dumps({"test": [entry]}))
    return image, label, affine


def test_a_nifti_datalist_gets_every_output_on_its_grid_and_metrics(tmp_path, tiny_model):
    image, label, affine = _case(tmp_path / "in")
    result = segment(tiny_model, tmp_path / "in" / "cases.json", tmp_path / "out", **FAST)
    out = tmp_path / "out"
    assert result.failures == 0 and len(result.rows) == 1
    for kind in ("segmentation", "probability", "uncertainty"):
        img = nib.load(out / f"a_{kind}.nii.gz")
        assert img.shape[:3] == image.shape and np.allclose(img.affine, affine, atol=1e-5)
    seg = nib.load(out / "a_segmentation.nii.gz").get_fdata()
    prob = nib.load(out / "a_probability.nii.gz").get_fdata()
    u = nib.load(out / "a_uncertainty.nii.gz").get_fdata()
    assert set(np.unique(seg)) <= {0.0, 1.0} and prob.min() >= 0 and prob.max() <= 1
    assert np.array_equal(seg > 0, prob >= 0.5)  # the fused labels are the thresholded mean soft map
    assert u.min() >= 0 and u.max() <= np.log(2) + 1e-6  # binary predictive entropy, nats
    # 3 members of 2 DDIM steps on each of the 4 slices
    assert result.rows[0]["nfe"] == 3 * 2 * 4 and result.rows[0]["slices"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("dice", "ece", "uncertainty_error_auroc", "ged"):
        assert key in metrics["per_case"]["a"]
    assert 0.0 <= metrics["per_case"]["a"]["dice"] <= 1.0
    assert (out / "a_overlay.png").stat().st_size > 1000 and (out / "report.md").is_file()
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert rows[0]["case"] == "a" and int(rows[0]["voxels"]) == int((seg > 0).sum())


def test_members_depend_on_the_seed_only(tmp_path, tiny_model):
    _case(tmp_path / "in", annotations=False)
    a = segment(tiny_model, tmp_path / "in" / "a.nii.gz", tmp_path / "o1", seed=4, batch_size=2, **FAST)
    b = segment(tiny_model, tmp_path / "in" / "a.nii.gz", tmp_path / "o2", seed=4, batch_size=5, **FAST)
    pa, pb = (nib.load(t / "a_probability.nii.gz").get_fdata() for t in (tmp_path / "o1", tmp_path / "o2"))
    assert a.rows[0]["nfe"] == b.rows[0]["nfe"] and np.allclose(pa, pb, atol=1e-5)
    again = segment(tiny_model, tmp_path / "in" / "a.nii.gz", tmp_path / "o1", seed=4, batch_size=2, **FAST)
    assert "1 complete from an earlier run" in again.summary and again.rows == a.rows  # a rerun resumes


def test_the_deterministic_unet_runs_through_the_same_task(tmp_path):
    torch.manual_seed(0)
    net = build_segmentation_unet(spatial_dims=2, in_channels=1, cond_channels=1, channels=(4, 8), num_res_units=1)
    save_model(tmp_path / "unet", net, make_process("ddpm", n_steps=50), "x0", {"data_prep": PREP})
    _case(tmp_path / "in", annotations=False)
    r = segment(tmp_path / "unet", tmp_path / "in" / "a.nii.gz", tmp_path / "out", members=1, steps=1,
                progress=False)
    u = nib.load(tmp_path / "out" / "a_uncertainty.nii.gz").get_fdata()
    # one member: no disagreement, so the predictive entropy is the U-Net's own (aleatoric) entropy
    mi = segment(tmp_path / "unet", tmp_path / "in" / "a.nii.gz", tmp_path / "o2", members=1, steps=1,
                 uncertainty="mutual_information", progress=False)
    assert r.rows[0]["nfe"] == 4 and mi.failures == 0
    assert u.max() > 0 and nib.load(tmp_path / "o2" / "a_uncertainty.nii.gz").get_fdata().max() == 0.0


def test_a_dicom_series_gets_a_dicom_seg(tmp_path, tiny_model):
    import highdicom as hd

    from medidiff.data import sample

    folder = sample.dicom_examples().get("ct_series")
    if folder is None:
        pytest.skip("pydicom's dicomdirtests series is missing")
    result = segment(tiny_model, folder, tmp_path / "out", **FAST)
    assert result.failures == 0
    seg_file = next((tmp_path / "out").glob("*_segmentation.dcm"))
    seg = hd.seg.segread(seg_file)
    sources = [p for p in folder.iterdir() if p.is_file()]
    assert seg.SOPClassUID.name == "Segmentation Storage" and int(seg.NumberOfFrames) == len(sources)
    nifti = nib.load(next((tmp_path / "out").glob("*_segmentation.nii.gz"))).get_fdata()
    assert int(np.asarray(seg.pixel_array).sum()) == int(nifti.sum())
    from dicom_helpers import dciodvfy_errors

    assert dciodvfy_errors(seg_file) == []  # a PACS accepts it
    source = pydicom.dcmread(sources[0])
    assert str(seg.PatientName) == str(source.PatientName) and seg.StudyInstanceUID == source.StudyInstanceUID
    anonymous = segment(tiny_model, folder, tmp_path / "anon", deidentify=True, **FAST)
    assert anonymous.failures == 0
    hidden = pydicom.dcmread(next((tmp_path / "anon").glob("*_segmentation.dcm")))
    assert str(hidden.PatientName) != str(source.PatientName) and hidden.get("PatientBirthDate", "") == ""
    assert hidden.StudyInstanceUID == source.StudyInstanceUID  # it still files with the scan


def test_cli_segment_and_a_recipe_error_naming_the_key(tmp_path, tiny_model, capsys):
    _case(tmp_path / "in", annotations=False)
    code = main(["segment", "--input", str(tmp_path / "in" / "a.nii.gz"), "--out", str(tmp_path / "out"),
                 "--model", str(tiny_model), "--members", "2", "--steps", "1", "--set", "progress=false"])
    assert code == 0 and (tmp_path / "out" / "a_segmentation.nii.gz").is_file()
    assert (tmp_path / "out" / "manifest.json").is_file() and (tmp_path / "out" / "recipe.yaml").is_file()
    code = main(["segment", "--input", str(tmp_path / "in" / "a.nii.gz"), "--out", str(tmp_path / "bad"),
                 "--model", str(tiny_model), "--set", "sampler=nope", "--set", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and "segment.sampling.sampler" in err


def test_a_region_limits_the_slices_segmented_and_the_metrics(tmp_path, tiny_model):
    from medidiff.cases import find_cases, load_case
    from medidiff.segment.config import SegmentSection
    from medidiff.segment.predict import analyse, case_metrics
    from medidiff.weights import load_denoiser

    _case(tmp_path / "in", annotations=False)
    model, info = load_denoiser(tiny_model)
    case = load_case(find_cases(tmp_path / "in" / "cases.json")[0])
    options = SegmentSection(progress=False).updated(members=3, steps=2)
    full = analyse(model, info, case, options, seed=1)
    region = torch.zeros(1, 20, 18, 4, dtype=torch.bool)
    region[0, 5:9, 5:9, 1:3] = True  # any voxel of a slice brings in the whole slice
    part = analyse(model, info, case, options, seed=1, region=region)
    assert (full.n_slices, part.n_slices) == (4, 2) and part.nfe == full.nfe // 2
    assert float(part.members[..., 1:3].amax()) > 0.0
    assert torch.equal(part.prepared.image, full.prepared.image)  # the whole scan prepared as without a region
    assert float(part.members[..., [0, 3]].abs().max()) == 0.0
    # the metrics count only the region's voxels: a prediction outside it would not change them
    whole = case_metrics(part, case.label, n_classes=2)
    inside = case_metrics(part, case.label, n_classes=2, region=region)
    brain = part.prepared.input_foreground[0] > 0.5
    p = part.probability[0][brain & region[0]]
    y = (case.label[0] > 0.5)[brain & region[0]].float()
    confident = (p - 0.5).abs() * 2
    assert inside["ece"] != pytest.approx(whole["ece"])
    assert inside["ece"] <= float((p - y).abs().max()) + 1e-6 and confident.numel() == int(region[0][brain].sum())
