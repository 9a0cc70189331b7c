"""Bad input: each case gives a DataError that names the file and says what to do."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as nibabel_data
from pydicom.data import get_testdata_file

from medidiff.data import dicom
from medidiff.data.discover import Source, discover, load, load_label
from medidiff.errors import DataError


def _raises(call, *args, where, match, **kwargs) -> DataError:
    """Calls and checks the error: it names ``where``, matches ``match`` and carries a fix."""
    with pytest.raises(DataError, match=match) as info:
        call(*args, **kwargs)
    err = info.value
    assert err.where is not None and Path(where).name in err.where, err.where
    assert err.fix and "Fix:" in str(err)
    return err


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    _raises(discover, tmp_path / "empty", where=tmp_path / "empty", match="empty folder")


def test_folder_of_non_image_files(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "readme").write_text("hello")
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "report.dcm")
    err = _raises(discover, folder, where=folder, match="holds no NIfTI or DICOM images")
    assert "3 file(s) passed over" in err.message and "not a DICOM file" in err.message


def test_single_non_image_file(tmp_path):
    path = tmp_path / "table.xlsx"
    path.write_bytes(b"PK\x03\x04 not an image")
    _raises(discover, path, where=path, match="not a DICOM file")


def test_truncated_dicom():
    path = get_testdata_file("MR_truncated.dcm")
    (source,) = discover(path)  # the header is intact
    err = _raises(load, source, where=path, match="truncated pixel data")
    assert "8130 vs 8192" in err.message


def test_dicom_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path)
    _raises(discover, path, where=path, match="has no pixel data .CT Image Storage")
    # read directly (e.g. listed in a series), the same file also fails with its name
    _raises(dicom.read_series, [path], where=path, match="has no pixel data")


def test_mixed_series_without_a_rule(tmp_path, data_series):
    data_series(tmp_path / "in" / "one", n=2, series_number=4, modality="CT", description="abdomen")
    data_series(tmp_path / "in" / "two", n=2, series_number=5, modality="MR", description="flair")
    err = _raises(discover, tmp_path / "in", where=tmp_path / "in", match="holds 2 DICOM series")
    assert "'abdomen'" in err.message and "'flair'" in err.message
    assert "select='all', 'largest', 'modality:MR'" in err.fix


def test_missing_slice_is_reported_with_its_position(tmp_path, data_series):
    data_series(tmp_path / "s", n=6, origin=(0.0, 0.0, 10.0), gap=2.0, drop=(3,))
    (source,) = discover(tmp_path / "s")
    err = _raises(load, source, where=tmp_path / "s", match="missing 1 slice")
    assert "(0.000, 0.000, 16.000)" in err.message  # where slice 3 should have been
    assert "gap after the slice at (0.000, 0.000, 14.000)" in err.message


def test_uneven_slice_spacing(tmp_path, data_series):
    positions = [np.array([0.0, 0.0, z]) for z in (0.0, 2.0, 4.0, 7.1, 9.1)]
    data_series(tmp_path / "s", positions=positions)
    err = _raises(load, discover(tmp_path / "s")[0], where=tmp_path / "s", match="uneven slice spacing")
    assert "2.000 to 3.100 mm" in err.message


def test_several_volumes_at_the_same_positions(tmp_path, data_series):
    positions = [np.array([0.0, 0.0, z]) for z in (0.0, 2.0, 4.0, 0.0, 2.0, 4.0)]
    data_series(tmp_path / "s", positions=positions)
    _raises(load, discover(tmp_path / "s")[0], where=tmp_path / "s", match="same position")


def test_mixed_orientations(tmp_path, data_series):
    orientations = [(1, 0, 0, 0, 1, 0)] * 3 + [(0, 1, 0, 0, 0, -1)]
    data_series(tmp_path / "s", n=4, orientations=orientations)
    err = _raises(load, discover(tmp_path / "s")[0], where=tmp_path / "s", match="mixes 2 image orientations")
    assert "localizer" in err.fix


def test_mixed_image_sizes(tmp_path, data_series):
    uid = pydicom.uid.generate_uid()
    data_series(tmp_path / "s", n=3, series_uid=uid)
    data_series(tmp_path / "s", positions=[np.array([0.0, 0.0, 50.0])], rows=4, series_uid=uid)
    _raises(load, discover(tmp_path / "s")[0], where=tmp_path / "s", match=r"different sizes \(4x8, 6x8")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(tmp_path, bad):
    data = np.ones((4, 5, 6), np.float32)
    data[1, 2, 3] = bad
    data[0, 0, 0] = -bad
    path = _nifti(tmp_path / "bad.nii.gz", data)
    _raises(load, discover(path)[0], where=path, match="has 2 NaN or infinite voxel")


def test_4d_where_3d_is_expected():
    path = Path(nibabel_data) / "example4d.nii.gz"
    err = _raises(load, discover(path)[0], where=path, match=r"is 4D \(shape \(128, 96, 24, 2\)\)")
    assert "_0000" in err.fix and "multichannel=True" in err.fix
    image = load(discover(path)[0], multichannel=True)  # the documented way out
    assert tuple(image.shape) == (2, 128, 96, 24)


def test_zero_size_image(tmp_path):
    path = _nifti(tmp_path / "zero.nii.gz", np.zeros((0, 4, 4), np.float32))
    _raises(load, discover(path)[0], where=path, match=r"empty image \(shape \(0, 4, 4\)\)")


def test_empty_nifti_file(tmp_path):
    path = tmp_path / "nothing.nii"
    path.write_bytes(b"")
    _raises(load, discover(path)[0], where=path, match="empty file")


def test_corrupt_gzip_nifti(tmp_path):
    good = _nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).random((20, 20, 20), np.float32))
    raw = bytearray(good.read_bytes())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    _raises(load, discover(truncated)[0], where=truncated, match="corrupt gzip file")
    middle = len(raw) // 2
    raw[middle: middle + 40] = bytes(40)  # damage inside the stream: only the CRC can tell
    damaged = tmp_path / "damaged.nii.gz"
    damaged.write_bytes(raw)
    _raises(load, discover(damaged)[0], where=damaged, match="corrupt gzip file")


def test_nifti_with_singular_affine(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"] = 1, 0
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = [0, 0, 0, 0]
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None, header=header), path)
    _raises(load, discover(path)[0], where=path, match="singular or invalid affine")


def test_label_and_image_shapes_disagree(tmp_path):
    image = _nifti(tmp_path / "case.nii.gz", np.zeros((8, 8, 4), np.float32))
    label = _nifti(tmp_path / "case_seg.nii.gz", np.zeros((8, 8, 5), np.uint8))
    source = Source(name="case", kind="nifti", paths=[image], label=label)
    _raises(load_label, source, where=label, match=r"shape \(8, 8, 5\) but its image has shape \(8, 8, 4\)")


def test_label_on_a_shifted_grid(tmp_path):
    image = _nifti(tmp_path / "case.nii.gz", np.zeros((8, 8, 4), np.float32))
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    label = _nifti(tmp_path / "case_seg.nii.gz", np.zeros((8, 8, 4), np.uint8), shifted)
    source = Source(name="case", kind="nifti", paths=[image], label=label)
    _raises(load_label, source, where=label, match="lies 0.500 mm away from its image")


def test_compressed_dicom_without_decoder(monkeypatch):
    """Simulated: the JPEG 2000 decoder that pydicom finds here is reported missing."""
    path = get_testdata_file("JPEG2000.dcm")
    missing = SimpleNamespace(is_available=False,
                              missing_dependencies=["pylibjpeg - requires pylibjpeg-openjpeg>=2.0"])
    monkeypatch.setattr(dicom, "get_decoder", lambda uid: missing)
    err = _raises(load, discover(path)[0], where=path, match=r"is compressed \(.JPEG 2000")
    assert "pylibjpeg-openjpeg" in err.message and "medidiff[decoders]" in err.fix


def test_compressed_dicom_without_decoder_real():
    path = get_testdata_file("JPEG-LL.dcm")
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if pydicom.pixels.get_decoder(syntax).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    _raises(load, discover(path)[0], where=path, match="no decoder for it is installed")


def test_broken_symlink(tmp_path):
    link = tmp_path / "scan.nii.gz"
    link.symlink_to(tmp_path / "gone.nii.gz")
    _raises(discover, link, where=link, match="broken symbolic link")


def test_broken_symlink_inside_a_series_folder_is_skipped(tmp_path, data_series):
    data_series(tmp_path / "s", n=2)
    (tmp_path / "s" / "lost.dcm").symlink_to(tmp_path / "nowhere.dcm")
    skipped = []
    (source,) = discover(tmp_path / "s", skipped=skipped)
    assert len(source.paths) == 2
    assert [(p.name, why) for p, why in skipped] == [("lost.dcm", "is a broken symbolic link.")]


def test_folder_given_as_a_file(tmp_path):
    (tmp_path / "dir.dcm").mkdir()
    _raises(dicom.read_series, [tmp_path / "dir.dcm"], where=tmp_path / "dir.dcm", match="is a folder")
    source = Source(name="x", kind="nifti", paths=[tmp_path / "dir.dcm"])
    _raises(load, source, where=tmp_path / "dir.dcm", match="is a folder")


def test_missing_path(tmp_path):
    _raises(discover, tmp_path / "nope", where=tmp_path / "nope", match="does not exist")
