"""Finding inputs (NIfTI files and folders, datalists, CSV, nnU-Net layout), batch failures, inspect."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as nibabel_data

from medidiff.data.batch import FailureLog, iter_loaded
from medidiff.data.discover import discover, load, load_label
from medidiff.data.inspect import convert_path, format_inspection, inspect_path
from medidiff.errors import DataError


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 2.0, 3.0, 1.0]) if affine is None else affine), path)
    return path


def _volume(value: float, shape=(6, 5, 4)) -> np.ndarray:
    return np.full(shape, value, np.float32) + np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_real_nifti_file_values_and_affine():
    path = Path(nibabel_data) / "anatomical.nii"
    reference = nib.load(path)
    (source,) = discover(path)
    assert (source.name, source.kind, source.label, source.split) == ("anatomical", "nifti", None, None)
    image = load(source)
    assert tuple(image.shape) == (1, *reference.shape)
    np.testing.assert_allclose(image[0].numpy(), reference.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(image.affine.numpy(), reference.affine)
    np.testing.assert_allclose(image.meta["spacing"], reference.header.get_zooms()[:3], rtol=1e-6)
    assert image.meta["filename_or_obj"] == str(path) and image.meta["modality"] == ""


def test_2d_nifti_is_a_single_slice(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = _nifti(tmp_path / "slice.nii.gz", data)
    image = load(discover(path)[0])
    assert tuple(image.shape) == (1, 3, 4, 1)
    np.testing.assert_array_equal(image[0, :, :, 0].numpy(), data)


def test_folder_of_nifti_files_gets_unique_safe_names(tmp_path):
    _nifti(tmp_path / "in" / "a" / "scan 1.nii.gz", _volume(0))
    _nifti(tmp_path / "in" / "b" / "scan 1.nii.gz", _volume(1))
    _nifti(tmp_path / "in" / "b" / "other.nii", _volume(2))
    sources = discover(tmp_path / "in")
    assert [s.name for s in sources] == ["scan_1", "other", "scan_1_2"]  # in path order
    assert float(load(sources[2])[0, 0, 0, 0]) == 1.0


def test_json_datalist_relative_paths_and_splits(tmp_path):
    _nifti(tmp_path / "imgs" / "a.nii.gz", _volume(0))
    _nifti(tmp_path / "imgs" / "b.nii.gz", _volume(10))
    _nifti(tmp_path / "imgs" / "c.nii.gz", _volume(20))
    _nifti(tmp_path / "segs" / "a.nii.gz", np.ones((6, 5, 4), np.uint8))
    datalist = {
        "training": [{"image": "imgs/a.nii.gz", "label": "segs/a.nii.gz"}],
        "validation": [{"image": "imgs/b.nii.gz"}],
        "test": ["imgs/c.nii.gz"],
    }
    path = tmp_path / "data.json"
    path.write_text(json.dumps(datalist))
    sources = discover(path)
    assert [(s.name, s.split) for s in sources] == [("a", "training"), ("b", "validation"), ("c", "test")]
    assert sources[0].label == tmp_path / "segs" / "a.nii.gz"
    assert float(load(sources[2])[0, 0, 0, 0]) == 20.0
    label = load_label(sources[0])
    assert tuple(label.shape) == (1, 6, 5, 4) and float(label.sum()) == 120.0


def test_datalist_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"training": [')
    with pytest.raises(DataError, match="not a readable JSON datalist"):
        discover(path)
    path.write_text(json.dumps({"train": []}))
    with pytest.raises(DataError, match="has none of the keys"):
        discover(path)
    path.write_text(json.dumps({"training": [{"image": "missing.nii.gz"}]}))
    with pytest.raises(DataError, match="lists an image that does not exist") as err:
        discover(path)
    assert err.value.where == str(path)


def test_csv_with_image_and_label_columns(tmp_path):
    _nifti(tmp_path / "x.nii.gz", _volume(0))
    _nifti(tmp_path / "y.nii.gz", _volume(5))
    _nifti(tmp_path / "x_seg.nii.gz", np.zeros((6, 5, 4), np.uint8))
    with (tmp_path / "cases.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image", "label"])
        writer.writerow(["x.nii.gz", "x_seg.nii.gz"])
        writer.writerow(["y.nii.gz", ""])
    sources = discover(tmp_path / "cases.csv")
    assert [(s.name, s.label) for s in sources] == [("x", tmp_path / "x_seg.nii.gz"), ("y", None)]


def test_datalist_entry_may_be_a_dicom_series(tmp_path, data_series):
    data_series(tmp_path / "dcm", n=3)
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "dcm"}]}))
    (source,) = discover(tmp_path / "list.json")
    assert source.kind == "dicom" and source.split == "training" and len(source.paths) == 3
    assert tuple(load(source).shape) == (1, 8, 6, 3)


def test_nnunet_folder_with_channels_and_labels(tmp_path):
    root = tmp_path / "Dataset001"
    for case, value in (("brain_001", 0), ("brain_002", 100)):
        _nifti(root / "imagesTr" / f"{case}_0000.nii.gz", _volume(value))
        _nifti(root / "imagesTr" / f"{case}_0001.nii.gz", _volume(value + 1000))
    _nifti(root / "labelsTr" / "brain_001.nii.gz", np.ones((6, 5, 4), np.uint8))
    _nifti(root / "imagesTs" / "brain_101_0000.nii.gz", _volume(7))
    _nifti(root / "imagesTs" / "brain_101_0001.nii.gz", _volume(8))
    (root / "dataset.json").write_text("{}")
    sources = discover(root)
    assert [(s.name, s.split, len(s.paths)) for s in sources] == [
        ("brain_001", "training", 2), ("brain_002", "training", 2), ("brain_101", "test", 2)]
    assert sources[0].label == root / "labelsTr" / "brain_001.nii.gz" and sources[1].label is None
    image = load(sources[1])
    assert tuple(image.shape) == (2, 6, 5, 4)
    assert (float(image[0, 0, 0, 0]), float(image[1, 0, 0, 0])) == (100.0, 1100.0)
    assert tuple(load_label(sources[0]).shape) == (1, 6, 5, 4)


def test_nnunet_channel_gap_is_an_error(tmp_path):
    _nifti(tmp_path / "imagesTr" / "c_0000.nii.gz", _volume(0))
    _nifti(tmp_path / "imagesTr" / "c_0002.nii.gz", _volume(0))
    with pytest.raises(DataError, match=r"channels \[0, 2\]"):
        discover(tmp_path)


def test_channels_on_different_grids_are_an_error(tmp_path):
    _nifti(tmp_path / "imagesTr" / "c_0000.nii.gz", _volume(0))
    _nifti(tmp_path / "imagesTr" / "c_0001.nii.gz", _volume(0, shape=(6, 5, 3)))
    with pytest.raises(DataError, match="different grid") as err:
        load(discover(tmp_path)[0])
    assert err.value.where.endswith("c_0001.nii.gz")


def test_failure_log_and_iter_loaded_skip_bad_cases(tmp_path):
    _nifti(tmp_path / "in" / "good1.nii.gz", _volume(0))
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    _nifti(tmp_path / "in" / "good2.nii.gz", _volume(3))
    log = FailureLog(tmp_path / "out")
    loaded = [(src.name, float(item[0, 0, 0, 0])) for src, item in iter_loaded(discover(tmp_path / "in"), log)]
    assert loaded == [("good1", 0.0), ("good2", 3.0)]
    with (tmp_path / "out" / "failures.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["case"] == "broken"
    assert rows[0]["file"].endswith("broken.nii.gz") and rows[0]["error"] and "again" in rows[0]["fix"]
    assert not list((tmp_path / "out").glob(".failures*"))  # no temporary file left behind


def test_iter_loaded_lets_bugs_through(tmp_path):
    def loader(source):
        raise ZeroDivisionError("a bug, not bad data")

    with pytest.raises(ZeroDivisionError):
        list(iter_loaded(["case"], FailureLog(tmp_path), loader=loader))
    assert not (tmp_path / "failures.csv").exists()


def test_inspect_lists_volumes_problems_and_skipped_files(tmp_path, data_series):
    _nifti(tmp_path / "in" / "vol.nii.gz", _volume(0))
    data_series(tmp_path / "in" / "dcm", n=4, series_number=9, description="axial T1")
    data_series(tmp_path / "in" / "gap", n=5, drop=(2,), series_number=10)
    (tmp_path / "in" / "notes.bin").write_bytes(b"hello")
    rows = {row["name"]: row for row in inspect_path(tmp_path / "in")}
    vol = rows["vol"]
    assert (vol["shape"], vol["spacing"], vol["orientation"], vol["problems"]) == (
        (1, 6, 5, 4), (1.5, 2.0, 3.0), "RAS", [])
    (series,) = [row for name, row in rows.items() if name.startswith("s009_CT_")]
    assert (series["shape"], series["orientation"], series["files"]) == ((1, 8, 6, 4), "LPS", 4)
    assert series["spacing"] == (0.6, 0.8, 2.5) and series["description"] == "axial T1"
    (gap,) = [row for name, row in rows.items() if name.startswith("s010_CT_")]
    assert gap["shape"] is None and "missing 1 slice" in gap["problems"][0]
    assert "notes.bin: skipped, is not a DICOM file" in rows["-"]["problems"][0]
    text = format_inspection(list(rows.values()))
    assert "1x6x5x4" in text and "0.6x0.8x2.5" in text and "    ! " in text and "missing 1 slice" in text
    assert text.splitlines()[0].split() == ["name", "modality", "description", "shape", "spacing",
                                            "orientation", "files"]


def test_inspect_reports_reading_warnings():
    from pydicom.data import get_testdata_file

    (row,) = inspect_path(get_testdata_file("emri_small.dcm"))
    assert row["shape"] == (1, 64, 64, 10) and row["modality"] == "MR"
    assert len(row["problems"]) == 2 and "position in the patient is unknown" in row["problems"][0]
    assert row["problems"][1] == "no PixelSpacing: 1 mm assumed" and row["orientation"] == "unknown"


def test_convert_never_overwrites_its_input(tmp_path):
    _nifti(tmp_path / "scan.nii.gz", _volume(0))
    before = (tmp_path / "scan.nii.gz").read_bytes()
    with pytest.raises(DataError, match="no series could be converted"):
        convert_path(tmp_path / "scan.nii.gz", tmp_path)
    assert (tmp_path / "scan.nii.gz").read_bytes() == before
    with (tmp_path / "failures.csv").open() as handle:
        (row,) = csv.DictReader(handle)
    assert row["case"] == "scan" and "refusing to write over an input" in row["error"]
