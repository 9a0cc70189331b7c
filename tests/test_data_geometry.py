"""Geometry: voxel-to-world positions of DICOM series, as loaded and as written to NIfTI.

The reference is the DICOM standard's equation applied to each slice's own tags (LPS), converted to
RAS; optionally the dcm2niix converter too, compared voxel by voxel in world space.
"""

from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from scipy.spatial.transform import Rotation

from medidiff.data import dicom
from medidiff.data.discover import discover, load
from medidiff.data.inspect import convert_path

OBLIQUE = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
OBLIQUE_IOP = tuple(OBLIQUE[:, 0]) + tuple(OBLIQUE[:, 1])
TOL_MM = 1e-3


def _dicom_world(path, i: int, j: int) -> np.ndarray:
    """RAS position of pixel (column i, row j) of one file, straight from its tags (PS3.3 C.7.6.2.1.1)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ipp = np.array(ds.ImagePositionPatient, float)
    iop = np.array(ds.ImageOrientationPatient, float)
    row_spacing, column_spacing = map(float, ds.PixelSpacing)
    lps = ipp + iop[:3] * column_spacing * i + iop[3:] * row_spacing * j
    return lps * [-1, -1, 1]


def _check_against_tags(paths, affine: np.ndarray, volume: np.ndarray) -> None:
    """Each file's slice is found by its pixel values (slice k holds 1000 k + ...), then compared."""
    columns, rows = volume.shape[:2]
    points = [(0, 0), (columns - 1, 0), (0, rows - 1), (columns - 1, rows - 1), (3, 2)]
    for path in paths:
        k = int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber) - 1
        (z,) = np.flatnonzero(volume[0, 0, :] == 1000 * k - 1024)
        for i, j in points:
            world = (affine @ [i, j, z, 1])[:3]
            np.testing.assert_allclose(world, _dicom_world(path, i, j), atol=TOL_MM)
            assert volume[i, j, z] == 1000 * k + 10 * j + i - 1024


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), OBLIQUE_IOP],
                         ids=["axial", "sagittal", "oblique"])
def test_loaded_series_matches_each_slice_tags(tmp_path, data_series, orientation):
    paths = data_series(tmp_path / "s", n=6, orientation=orientation, gap=2.5, pixel_spacing=(0.8, 0.6))
    image = load(discover(tmp_path / "s")[0])
    _check_against_tags(paths, image.affine.numpy(), image[0].numpy())


def test_written_nifti_keeps_the_geometry(tmp_path, data_series):
    paths = data_series(tmp_path / "s", n=5, orientation=OBLIQUE_IOP, gap=3.0, pixel_spacing=(0.7, 0.9))
    (written,) = convert_path(tmp_path / "s", tmp_path / "out")
    assert written.name.endswith(".nii.gz") and written.parent == tmp_path / "out"
    img = nib.load(written)
    assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1
    assert img.get_data_dtype() == np.int16  # whole HU values are stored compactly
    _check_against_tags(paths, img.affine, img.get_fdata())
    np.testing.assert_allclose(img.header.get_best_affine(), img.get_qform(), atol=TOL_MM)


def test_single_slice_round_trip_through_nifti(tmp_path):
    path = get_testdata_file("CT_small.dcm")
    image = load(discover(path)[0])
    (written,) = convert_path(path, tmp_path)
    img = nib.load(written)
    np.testing.assert_allclose(img.affine, image.affine.numpy(), atol=TOL_MM)
    np.testing.assert_array_equal(img.get_fdata(), image[0].numpy())
    assert img.shape == (128, 128, 1) and nib.aff2axcodes(img.affine) == ("L", "P", "S")


def test_gantry_tilt_keeps_the_shear(tmp_path, data_series):
    positions = [np.array([0.0, 0.5 * k, 2.0 * k]) for k in range(5)]  # each slice shifted in y
    paths = data_series(tmp_path / "s", positions=positions)
    volume, affine, info = dicom.read_series(paths)
    _check_against_tags(paths, affine, volume[0])
    assert any("gantry tilt" in p for p in info["problems"])
    np.testing.assert_allclose(affine[:3, 2], [0, -0.5, 2.0], atol=1e-9)


def test_enhanced_multiframe_converts_with_its_frame_positions(tmp_path):
    path = get_testdata_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    (written,) = convert_path(path, tmp_path)
    affine = nib.load(written).affine
    positions = sorted((np.array(f.PlanePositionSequence[0].ImagePositionPatient, float)
                        for f in ds.PerFrameFunctionalGroupsSequence), key=lambda p: -p[2])
    for k, ipp in enumerate(positions):  # orientation (-1, 0, 0, 0, 1, 0): the normal points to -z
        np.testing.assert_allclose((affine @ [0, 0, k, 1])[:3], ipp * [-1, -1, 1], atol=TOL_MM)


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")
@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), OBLIQUE_IOP], ids=["axial", "oblique"])
def test_every_voxel_matches_dcm2niix_in_world_space(tmp_path, data_series, orientation):
    """dcm2niix flips the row axis, so voxels are matched through the two affines, not by array index.

    dcm2niix's affine is stored as float32; here positions still agree to about 2e-6 mm, so the
    1e-3 mm tolerance holds.
    """
    data_series(tmp_path / "s", n=6, orientation=orientation, gap=2.5, pixel_spacing=(0.8, 0.6))
    subprocess.run(["dcm2niix", "-z", "n", "-f", "ref", "-o", str(tmp_path), str(tmp_path / "s")],
                   check=True, capture_output=True)
    reference = nib.load(tmp_path / "ref.nii")
    ours = load(discover(tmp_path / "s")[0])
    values = ours[0].numpy()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij"), -1).reshape(-1, 3)
    world = (ours.affine.numpy() @ np.c_[index, np.ones(len(index))].T)
    theirs = np.linalg.inv(reference.affine) @ world
    nearest = np.rint(theirs[:3]).astype(int)
    assert np.abs(reference.affine @ np.r_[nearest, np.ones((1, len(index)))] - world).max() < TOL_MM
    assert sorted(map(tuple, nearest.T)) == sorted(np.ndindex(reference.shape))  # a one-to-one match
    np.testing.assert_array_equal(values[tuple(index.T)], reference.get_fdata()[tuple(nearest)])
