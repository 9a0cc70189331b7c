"""DICOM reading: real pydicom test files, slice ordering, rescale, multi-frame, DICOMDIR, naming."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medidiff.data import dicom
from medidiff.data.discover import discover, load
from medidiff.errors import DataError

NAME = re.compile(r"^s\d{3}_[A-Za-z0-9]+_[0-9a-f]{8}$")


def _expected_plane(ds) -> np.ndarray:
    """Stored pixels with rescale, transposed to (X = column, Y = row)."""
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    return (ds.pixel_array.astype(np.float64) * slope + intercept).T


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm"])
def test_single_file_values_geometry_and_meta(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    (source,) = discover(path)
    image = load(source)
    assert tuple(image.shape) == (1, ds.Columns, ds.Rows, 1)
    np.testing.assert_allclose(image[0, :, :, 0].numpy(), _expected_plane(ds))
    assert image.meta["modality"] == ds.Modality
    assert image.meta["filename_or_obj"] == path
    # voxel (i, j) -> IPP + i * row_dir * PixelSpacing[1] + j * col_dir * PixelSpacing[0], in RAS
    ipp, iop = np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float)
    dr, dc = map(float, ds.PixelSpacing)
    for i, j in [(0, 0), (ds.Columns - 1, 0), (0, ds.Rows - 1), (5, 9)]:
        lps = ipp + i * iop[:3] * dc + j * iop[3:] * dr
        ras = image.affine.numpy() @ [i, j, 0, 1]
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-6)
    np.testing.assert_allclose(image.meta["spacing"], [dc, dr, float(ds.SliceThickness)], rtol=1e-6)


def test_ct_in_hounsfield_units():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    image = load(discover(get_testdata_file("CT_small.dcm"))[0])
    assert float(ds.RescaleIntercept) == -1024.0
    assert float(image.min()) == float(ds.pixel_array.min()) - 1024.0
    assert float(image.max()) == float(ds.pixel_array.max()) - 1024.0


def test_matches_nibabel_dicom_wrapper_in_plane():
    """nibabel's DICOM wrapper indexes (row, column); medidiff indexes (column, row) and is RAS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nibabel calls its DICOM readers experimental
        from nibabel.nicom import dicomwrappers

        path = get_testdata_file("MR_small.dcm")
        wrapper = dicomwrappers.wrapper_from_file(path)
    ours = load(discover(path)[0]).affine.numpy()
    for r, c in [(0, 0), (63, 0), (0, 63), (17, 40)]:
        lps = wrapper.affine @ [r, c, 0, 1]
        np.testing.assert_allclose(ours @ [c, r, 0, 1], np.diag([-1, -1, 1, 1]) @ lps, atol=1e-5)


def test_shuffled_series_is_sorted_along_the_normal(tmp_path, data_series):
    data_series(tmp_path / "s", n=7, gap=3.0)
    (source,) = discover(tmp_path / "s")
    assert source.kind == "dicom" and len(source.paths) == 7
    image = load(source)
    assert tuple(image.shape) == (1, 8, 6, 7)  # (C, X = columns, Y = rows, Z = slices)
    i, j, k = np.meshgrid(np.arange(8), np.arange(6), np.arange(7), indexing="ij")
    np.testing.assert_array_equal(image[0].numpy(), 1000 * k + 10 * j + i - 1024)
    np.testing.assert_allclose(image.meta["spacing"], [0.6, 0.8, 3.0], atol=1e-6)


def test_slices_ordered_by_position_not_instance_number(tmp_path, data_series):
    """Positions given in decreasing z: slice index k must still follow the normal (+z)."""
    positions = [np.array([0.0, 0.0, 40.0 - 2.0 * k]) for k in range(4)]
    data_series(tmp_path / "s", positions=positions)
    image = load(discover(tmp_path / "s")[0])
    # stored slice 3 is lowest in z, so it becomes Z index 0
    np.testing.assert_array_equal(image[0, 0, 0, :].numpy(), np.array([3000, 2000, 1000, 0]) - 1024)
    np.testing.assert_allclose(image.affine.numpy()[:3, 2], [0, 0, 2.0], atol=1e-6)
    np.testing.assert_allclose(image.affine.numpy()[:3, 3], [0, 0, 34.0], atol=1e-6)


def test_enhanced_ct_frames_use_functional_groups():
    path = get_testdata_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    image = load(discover(path)[0])
    assert tuple(image.shape) == (1, 512, 512, 2)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    dr, dc = map(float, shared.PixelMeasuresSequence[0].PixelSpacing)
    transform = shared.PixelValueTransformationSequence[0]
    slope, intercept = float(transform.RescaleSlope), float(transform.RescaleIntercept)
    normal = np.cross(iop[:3], iop[3:])
    frames = ds.PerFrameFunctionalGroupsSequence
    ipps = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in frames]
    order = np.argsort([p @ normal for p in ipps])
    affine = image.affine.numpy()
    for k, f in enumerate(order):
        for i, j in [(0, 0), (511, 0), (0, 511), (100, 300)]:
            lps = ipps[f] + i * iop[:3] * dc + j * iop[3:] * dr
            np.testing.assert_allclose((affine @ [i, j, k, 1])[:3], lps * [-1, -1, 1], atol=1e-4)
        np.testing.assert_allclose(image[0, :, :, k].numpy(), ds.pixel_array[f].T * slope + intercept)


def test_multiframe_without_geometry_keeps_frames_and_says_so():
    path = get_testdata_file("emri_small.dcm")
    ds = pydicom.dcmread(path)
    (source,) = discover(path)
    image = load(source)
    assert tuple(image.shape) == (1, 64, 64, 10)
    np.testing.assert_array_equal(image[0].numpy(), ds.pixel_array.transpose(2, 1, 0))
    _, _, info = dicom.read_series(source.paths)
    assert any("position in the patient is unknown" in p for p in info["problems"])
    np.testing.assert_allclose(image.meta["spacing"][2], 1.2)  # SpacingBetweenSlices


def test_rgb_image_gives_three_channels():
    path = get_testdata_file("SC_rgb.dcm")
    ds = pydicom.dcmread(path)
    image = load(discover(path)[0])
    assert tuple(image.shape) == (3, ds.Columns, ds.Rows, 1)
    np.testing.assert_array_equal(image[:, :, :, 0].numpy(), ds.pixel_array.transpose(2, 1, 0))


def test_dicomdir_series_and_selection_rules():
    path = get_testdata_file("dicomdirtests/DICOMDIR")
    with pytest.raises(DataError, match="holds 13 DICOM series") as err:
        discover(path)
    assert "select=" in str(err.value) and "SmartScore" in str(err.value)
    everything = discover(path, select="all")
    assert len(everything) == 13 and len({s.name for s in everything}) == 13
    assert all(NAME.match(s.name) for s in everything)
    assert {s.series.modality for s in discover(path, select="modality:ct")} == {"CT"}
    assert len(discover(path, select="modality:CT")) == 3
    (largest,) = discover(path, select="largest")
    assert largest.series.images == 7
    (smart,) = discover(path, select="description:smartscore")
    image = load(smart)
    assert tuple(image.shape) == (1, 16, 16, 5)
    np.testing.assert_allclose(image.meta["spacing"], [0.488281, 0.488281, 2.5], atol=1e-5)
    with pytest.raises(DataError, match="no DICOM series matches"):
        discover(path, select="modality:PT")
    with pytest.raises(DataError, match="unknown series selection rule"):
        discover(path, select="biggest")


def test_series_folder_selection_and_safe_names(tmp_path, data_series):
    data_series(tmp_path / "study" / "a", n=3, series_number=2, modality="CT", description="Jane Doe head")
    data_series(tmp_path / "study" / "b", n=5, series_number=3, modality="MR", description="T1 axial")
    with pytest.raises(DataError, match="holds 2 DICOM series"):
        discover(tmp_path / "study")
    (mr,) = discover(tmp_path / "study", select="modality:MR")
    assert mr.series.images == 5 and mr.name.startswith("s003_MR_")
    (big,) = discover(tmp_path / "study", select="largest")
    assert big.name == mr.name
    (ct,) = discover(tmp_path / "study", select="description:HEAD")
    assert NAME.match(ct.name) and "Doe" not in ct.name and "Jane" not in ct.name
    assert ct.name.startswith("s002_CT_")


def test_folder_skips_non_images_and_records_why(tmp_path, data_series):
    data_series(tmp_path / "s", n=3)
    (tmp_path / "s" / "notes.bin").write_bytes(b"not dicom at all")
    report = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    report.save_as(tmp_path / "s" / "report.dcm")
    skipped = []
    (source,) = discover(tmp_path / "s", skipped=skipped)
    assert len(source.paths) == 3
    reasons = {p.name: why for p, why in skipped}
    assert set(reasons) == {"notes.bin", "report.dcm"}
    assert "not a DICOM file" in reasons["notes.bin"]
    assert "no pixel data" in reasons["report.dcm"] and "SR" in reasons["report.dcm"]
