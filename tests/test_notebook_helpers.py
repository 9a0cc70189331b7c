"""The notebooks' helpers: results beside the data, example folders, scans paired with masks, the slice viewer."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
import pytest

from medidiff import notebook
from medidiff.data.discover import discover
from medidiff.errors import DataError

matplotlib.use("Agg")


def _nifti(path: Path, value: float = 1.0, shape=(6, 5, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, value, np.float32), np.eye(4)), path)
    return path


def test_results_go_beside_the_data_named_after_it(tmp_path):
    scan = _nifti(tmp_path / "study" / "sub01.nii.gz")
    assert notebook.results_beside(scan, "anomaly") == tmp_path / "study" / "sub01_medidiff_anomaly"
    folder = notebook.results_beside(tmp_path / "study", "recon")
    assert folder == tmp_path / "study_medidiff_recon" and folder.is_dir()
    listing = tmp_path / "study" / "cases.json"
    listing.write_text("{}")
    assert notebook.results_beside(listing, "segment").name == "cases_medidiff_segment"


def test_an_example_folder_is_a_fresh_copy_under_tmpdir(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    a = _nifti(tmp_path / "a.nii.gz", 2.0)
    root = notebook.example_folder("demo", {"scans": [a], "masks": {"a_brain.nii.gz": a}})
    assert root.parent == tmp_path / "tmp" and root.name.startswith("medidiff_demo_")
    assert (root / "scans" / "a.nii.gz").read_bytes() == a.read_bytes()
    assert (root / "masks" / "a_brain.nii.gz").is_file()
    assert notebook.example_folder("demo", {"scans": [a]}) != root  # each call its own folder


def test_scans_are_paired_with_masks_and_labels_by_name(tmp_path):
    for case in ("sub01", "sub02", "sub10"):
        _nifti(tmp_path / "scans" / f"{case}.nii.gz")
    _nifti(tmp_path / "masks" / "sub01_brainmask.nii.gz")
    _nifti(tmp_path / "masks" / "sub02.nii.gz")
    _nifti(tmp_path / "masks" / "sub10_mask.nii")
    _nifti(tmp_path / "lesions" / "sub02_lesions.nii.gz")
    listing = notebook.pair_cases(tmp_path / "scans", tmp_path / "out", masks=tmp_path / "masks",
                                  labels=tmp_path / "lesions")
    entries = {Path(e["image"]).name: e for e in json.loads(listing.read_text())["test"]}
    assert {k: Path(v["mask"]).name for k, v in entries.items()} == {
        "sub01.nii.gz": "sub01_brainmask.nii.gz", "sub02.nii.gz": "sub02.nii.gz", "sub10.nii.gz": "sub10_mask.nii"}
    assert Path(entries["sub02.nii.gz"]["label"]).name == "sub02_lesions.nii.gz"
    assert "label" not in entries["sub01.nii.gz"]  # sub01 is not taken for sub10's prefix, nor the reverse
    sources = {s.name: s for s in discover(listing)}  # medidiff reads it as any datalist
    assert sources["sub10"].mask.name == "sub10_mask.nii" and sources["sub02"].label.name == "sub02_lesions.nii.gz"


def test_a_single_scan_takes_a_single_mask_and_a_datalist_passes_through(tmp_path):
    scan = _nifti(tmp_path / "x.nii.gz")
    mask = _nifti(tmp_path / "anything.nii.gz")
    listing = notebook.pair_cases(scan, tmp_path / "out", masks=mask)
    assert json.loads(listing.read_text())["test"] == [{"image": str(scan), "mask": str(mask)}]
    assert notebook.pair_cases(listing, tmp_path / "other") == listing
    assert [e["image"] for e in json.loads(notebook.pair_cases(scan, tmp_path / "o2").read_text())["test"]] == [
        str(scan)]


def test_pairing_errors_name_the_fix(tmp_path):
    for case in ("a", "b"):
        _nifti(tmp_path / "scans" / f"{case}.nii.gz")
    _nifti(tmp_path / "masks" / "a_1.nii.gz")
    _nifti(tmp_path / "masks" / "a_2.nii.gz")
    with pytest.raises(DataError, match="2 mask files for case a"):
        notebook.pair_cases(tmp_path / "scans", tmp_path / "out", masks=tmp_path / "masks")
    _nifti(tmp_path / "other" / "zz.nii.gz")
    with pytest.raises(DataError, match="no mask named like the scans"):
        notebook.pair_cases(tmp_path / "scans", tmp_path / "out", masks=tmp_path / "other")
    with pytest.raises(DataError, match="one mask file was given for 2 scans"):
        notebook.pair_cases(tmp_path / "scans", tmp_path / "out", masks=tmp_path / "other" / "zz.nii.gz")


def _volumes(tmp_path):
    scan = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    heat = np.zeros_like(scan)
    heat[2, 2, 3] = 5.0
    return _nifti(tmp_path / "scan.nii.gz", 1.0), scan, heat


def test_the_viewer_slides_over_the_slices_starting_at_the_largest_value(tmp_path):
    import ipywidgets

    path, scan, heat = _volumes(tmp_path)
    slider = notebook.slice_viewer({"file": path, "scan": scan, "heat": heat}, outlines={"red": heat > 1})
    assert isinstance(slider, ipywidgets.IntSlider)
    assert (slider.min, slider.max, slider.value) == (0, 3, 3)
    sagittal = notebook.slice_viewer({"scan": scan, "heat": heat}, axis=0)
    assert (sagittal.max, sagittal.value) == (5, 2)


def test_the_viewer_draws_without_ipywidgets(tmp_path, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    path, scan, heat = _volumes(tmp_path)
    monkeypatch.setattr(notebook, "_widgets", lambda: None)
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append([a.get_title() for a in plt.gcf().axes]))
    assert notebook.slice_viewer({"scan": scan, "heat": heat}, outlines={"cyan": heat > 1}, start=1) is None
    assert shown == [["scan\nslice 2 of 4", "heat\nslice 2 of 4"]]
    assert "medidiff[notebooks]" in capsys.readouterr().out
    plt.close("all")


def test_the_viewer_refuses_volumes_of_other_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        notebook.slice_viewer({"a": np.zeros((4, 4, 3)), "b": np.zeros((4, 4, 2))})
    with pytest.raises(ValueError, match="expected a volume"):
        notebook.volume(np.zeros((2, 2, 2, 2, 2)))


def test_a_dicom_path_is_read_as_medidiff_reads_a_scan():
    from pydicom.data import get_testdata_file

    from medidiff.data.discover import load

    path = get_testdata_file("CT_small.dcm")
    array = notebook.volume(path)
    assert array.shape == (128, 128, 1)
    np.testing.assert_array_equal(array, np.asarray(load(discover(path)[0]))[0])
    assert array.min() < -500 < 500 < array.max()  # Hounsfield units: air and bone


def test_slices_are_drawn_as_stored_or_mirrored(monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setattr(notebook, "_widgets", lambda: None)
    drawn = []
    monkeypatch.setattr(plt, "show", lambda: drawn.append(np.asarray(plt.gcf().axes[0].images[0].get_array())))
    scan = np.zeros((6, 5, 2), np.float32)
    scan[0, 4, 1] = 1.0  # first voxel along x, last along y
    notebook.slice_viewer({"scan": scan}, start=1)
    notebook.slice_viewer({"scan": scan}, start=1, mirror=True)
    assert drawn[0].shape == (5, 6) and drawn[0][0, 0] == 1.0  # x across from the left, y up
    assert drawn[1][0, -1] == 1.0
    plt.close("all")
