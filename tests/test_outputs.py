"""Writing results: atomic writes, safe names, NIfTI geometry, grid round trips, DICOM, PNG, tables."""

from __future__ import annotations

import csv
import json
import struct

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import CenterSpatialCropd, Compose, Orientationd, Spacingd

from medidiff import outputs
from medidiff.cases import to_input_grid
from medidiff.data import sample
from medidiff.errors import DataError

# An LPS-like, anisotropic input grid (as a DICOM series would give): x and y flipped, 2.5 mm slices.
AFFINE = np.array([[-0.9, 0, 0, 100.0], [0, -0.9, 0, 80.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
SHAPE = (60, 50, 20)


def smooth_volume() -> MetaTensor:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)
    xyz = ijk @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    f = np.sin(xyz[..., 0] / 15) + np.cos(xyz[..., 1] / 11) + xyz[..., 2] / 30
    return MetaTensor(torch.tensor(f, dtype=torch.float32)[None], affine=torch.tensor(AFFINE))


def png_size(path) -> tuple[int, int]:
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "text, expected",
    [
        ("/data/patients/sub-01_T1w.nii.gz", "sub-01_T1w"),
        ("C:\\scans\\case 7 (repeat).dcm", "case_7_repeat"),
        ("../../etc/passwd", "passwd"),
        ("..", "case"),
        ("", "case"),
        (".hidden", "hidden"),
        ("série_é", "s_rie"),
        ("a" * 100, "a" * 64),
    ],
)
def test_safe_case_name(text, expected):
    name = outputs.safe_case_name(text)
    assert name == expected
    assert all(c.isalnum() or c in "._-" for c in name) and not name.startswith(".")


def test_safe_case_name_removes_identifiers():
    assert outputs.safe_case_name("Doe_Peter_CT", identifiers=["Doe^Peter", "12345"]) == "CT"
    assert outputs.safe_case_name("12345", identifiers=["12345"]) == "case"


def test_result_path():
    p = outputs.result_path("/out", "/in/sub-01.nii.gz", "anomaly_mask", ".nii.gz")
    assert str(p) == "/out/sub-01_anomaly_mask.nii.gz"
    with pytest.raises(ValueError):
        outputs.result_path("/out", "a", "../x", "png")


# -------------------------------------------------------------------------------------------- atomic


def test_atomic_write_leaves_nothing_when_writer_raises(tmp_path):
    target = tmp_path / "table.csv"
    with pytest.raises(RuntimeError), outputs.atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(RuntimeError), outputs.atomic_write(target) as tmp:
        tmp.write_text("new")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with outputs.atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".csv")
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_atomic_write_refuses_inputs(tmp_path):
    src = tmp_path / "in" / "scan.nii.gz"
    src.parent.mkdir()
    src.write_bytes(b"input")
    for target in (src, tmp_path / "in" / ".." / "in" / "scan.nii.gz", src.parent / "new.nii.gz"):
        with pytest.raises(DataError, match="input"):
            outputs.write_json({}, target, protected=[src.parent])
    with pytest.raises(DataError, match="input"):
        outputs.write_text("x", src, protected=[src])
    assert src.read_bytes() == b"input"
    outputs.write_text("x", tmp_path / "out.txt", protected=[src.parent])  # elsewhere is fine


def test_write_json_and_table(tmp_path):
    obj = {"auroc": np.float32(0.5), "shape": torch.tensor([1, 2]), "path": tmp_path, "n": np.int64(3)}
    p = outputs.write_json(obj, tmp_path / "metrics.json")
    assert json.loads(p.read_text()) == {"auroc": 0.5, "shape": [1, 2], "path": str(tmp_path), "n": 3}
    rows = [{"case": "a", "dice": 0.75}, {"case": "b", "hd95": 2.5}]
    p = outputs.write_table(rows, tmp_path / "t.csv")
    with open(p) as f:
        back = list(csv.DictReader(f))
    assert back == [{"case": "a", "dice": "0.75", "hd95": ""}, {"case": "b", "dice": "", "hd95": "2.5"}]


def test_every_json_written_is_strict_with_null_for_nan_and_infinity(tmp_path):
    def strict(text):  # Python's json accepts NaN and Infinity; a strict parser does not
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c} written"))

    obj = {"auroc": float("nan"), "per_case": {"a": {"dice": np.float32("nan"), "hd95": np.float64("inf"),
                                                      "values": np.array([1.0, np.nan, -np.inf]),
                                                      "t": torch.tensor([np.nan, 2.0])}},
           "rows": [(1, float("-inf")), {"ok": 0.25}], "flag": True, "none": None, 3: "int key"}
    p = outputs.write_json(obj, tmp_path / "metrics.json")
    assert "NaN" not in p.read_text() and "Infinity" not in p.read_text()
    assert strict(p.read_text()) == {
        "auroc": None, "per_case": {"a": {"dice": None, "hd95": None, "values": [1.0, None, None],
                                          "t": [None, 2.0]}},
        "rows": [[1, None], {"ok": 0.25}], "flag": True, "none": None, "3": "int key"}
    with pytest.raises(TypeError, match="object"):
        outputs.write_json({"x": object()}, tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------- volumes


def test_write_like_keeps_affine_and_dtypes(tmp_path):
    ref = sample.brain_volume()
    heat = torch.rand(1, *ref.shape[1:])
    p = outputs.write_like(heat, ref, tmp_path / "c_heatmap.nii.gz")
    img = nib.load(p)
    np.testing.assert_array_equal(img.affine, ref.affine.numpy())
    assert img.shape == (80, 96, 80) and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), heat[0].numpy())
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and int(img.header["sform_code"]) == 1

    mask = heat[0] > 0.5  # (X, Y, Z) bool -> uint8
    img = nib.load(outputs.write_like(mask, ref, tmp_path / "c_mask.nii.gz"))
    assert img.get_data_dtype() == np.uint8
    assert int(np.asarray(img.dataobj).sum()) == int(mask.sum())

    two = np.stack([heat[0].numpy(), 2 * heat[0].numpy()])  # (C, X, Y, Z) -> 4D NIfTI
    img = nib.load(outputs.write_nifti(two, tmp_path / "two.nii", ref.affine))
    assert img.shape == (80, 96, 80, 2)
    np.testing.assert_allclose(img.get_fdata()[..., 1], two[1], rtol=1e-6)

    with pytest.raises(DataError, match="restore"):
        outputs.write_like(heat[:, :40], ref, tmp_path / "bad.nii.gz")
    with pytest.raises(DataError, match="affine"):
        outputs.write_nifti(np.zeros((4, 4, 4)), tmp_path / "no_affine.nii.gz")


def test_results_of_a_scan_without_world_geometry_are_marked_so(tmp_path):
    from medidiff.data.discover import discover, load

    data = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([1.5, 2.0, 3.0, 1.0]))
    img.set_sform(img.affine, code=0)
    img.set_qform(img.affine, code=0)
    nib.save(img, tmp_path / "unplaced.nii.gz")
    scan = load(discover(tmp_path / "unplaced.nii.gz")[0])
    assert scan.meta["geometry_known"] is False
    out = nib.load(outputs.write_like(scan[:1] * 2, scan, tmp_path / "o" / "unplaced_heatmap.nii.gz"))
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (0, 0)
    np.testing.assert_allclose(out.header.get_zooms(), (1.5, 2.0, 3.0))
    np.testing.assert_allclose(out.get_fdata(), data * 2, rtol=1e-6)
    placed = nib.load(outputs.write_like(scan[:1], nib.load(tmp_path / "o" / "unplaced_heatmap.nii.gz"),
                                         tmp_path / "o" / "again.nii.gz"))
    assert int(placed.header["sform_code"]) == 0  # a nibabel reference with codes 0 counts too
    known = nib.load(outputs.write_like(scan[:1], sample.brain_volume()[:, :6, :5, :4], tmp_path / "o" / "k.nii.gz"))
    assert int(known.header["sform_code"]) == 1


def test_crop_resample_round_trip_lands_on_input_grid():
    image = smooth_volume()
    prepare = Compose([
        Orientationd("image", "RAS", labels=None),
        Spacingd("image", (2.0, 2.0, 2.0), mode="bilinear"),
        CenterSpatialCropd("image", (20, 18, 16)),
    ])
    prepared = prepare({"image": image})["image"]
    assert prepared.shape == (1, 20, 18, 16)
    result = prepared.clone()  # an identity "result" on the model's grid
    back = to_input_grid(result, image, prepared)
    assert back.shape == image.shape
    np.testing.assert_array_equal(back.affine.numpy(), AFFINE)
    coverage = to_input_grid(torch.ones_like(prepared), image, prepared)[0]
    defined = coverage > 0.999  # inside the model's field of view (away from its edge)
    assert 0.2 < float(defined.float().mean()) < 0.5  # the crop covers part of the input
    err = (back[0] - image[0])[defined].abs()
    assert float(err.max()) < 0.02 and float(err.mean()) < 0.005  # two linear interpolations
    assert float(back[0][coverage == 0].abs().max()) == 0.0  # zero outside the model's field of view
    # the same as MONAI's own inverse of the transforms
    inverse = prepare.inverse({"image": prepared})["image"]
    assert float((inverse[0] - back[0]).abs().max()) < 1e-4
    # a mask comes back as a mask
    mask = (prepared > 1.0).float()
    mask_back = to_input_grid(mask, image, prepared, mode="nearest")
    assert set(torch.unique(mask_back).tolist()) <= {0.0, 1.0}
    with pytest.raises(DataError, match="prepared grid"):
        to_input_grid(result[:, :10], image, prepared)


# --------------------------------------------------------------------------------------------- DICOM


def test_parametric_map_matches_source_geometry(tmp_path):
    folder = sample.dicom_examples().get("ct_series")
    if folder is None:
        pytest.skip("pydicom's dicomdirtests series is missing")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    sources = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    ps = float(sources[0].PixelSpacing[0])
    affine = np.diag([-ps, -ps, 2.5, 1.0])  # columns -> -x, rows -> -y (LPS to RAS), slices -> +z
    affine[:3, 3] = np.asarray(sources[0].ImagePositionPatient, float) * [-1, -1, 1]
    hu = np.stack([d.pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in sources], -1)
    ref = MetaTensor(torch.tensor(hu, dtype=torch.float32)[None], affine=torch.tensor(affine))
    result = ref * 0.5 + 0.25
    out = outputs.write_parametric_map(result, ref, files, tmp_path / "map.dcm", unit="[hnsf'U]", protected=files)
    pm = pydicom.dcmread(out)
    assert pm.SOPClassUID.name == "Parametric Map Storage" and int(pm.NumberOfFrames) == len(files)
    assert pm.StudyInstanceUID == sources[0].StudyInstanceUID
    assert pm.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert pm.SeriesInstanceUID != sources[0].SeriesInstanceUID and "DERIVED" in pm.ImageType
    orientation = pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert list(orientation) == list(sources[0].ImageOrientationPatient)
    by_uid = {d.SOPInstanceUID: d for d in sources}
    pixels = np.asarray(pm.pixel_array)
    for k, group in enumerate(pm.PerFrameFunctionalGroupsSequence):
        src = by_uid[group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert list(group.PlanePositionSequence[0].ImagePositionPatient) == list(src.ImagePositionPatient)
        expected = (src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)) * 0.5 + 0.25
        np.testing.assert_allclose(pixels[k], expected, rtol=1e-6)  # float values, exact to float32
    shifted = MetaTensor(ref.as_tensor(), affine=torch.tensor(affine))
    shifted.affine[2, 3] += 1.25  # half a slice off: the slices are not on the grid
    with pytest.raises(DataError, match="grid"):
        outputs.write_parametric_map(result, shifted, files, tmp_path / "bad.dcm")
    assert not (tmp_path / "bad.dcm").exists()


# ----------------------------------------------------------------------------------------------- PNG


def test_relevant_slices_follow_heatmap_mass():
    heat = np.zeros((10, 12, 30))
    heat[2:5, 3:6, 17] = 1.0
    heat[2:5, 3:6, 5] = 0.5
    heat[2:3, 3:4, 25] = 0.1
    assert outputs.relevant_slices(heat, 2) == [5, 17]
    assert outputs.relevant_slices(heat, 5) == [5, 17, 25]  # only slices with mass
    assert outputs.relevant_slices(np.zeros((4, 4, 9)), 3) == [2, 4, 6]


def test_overlay_png_sizes(tmp_path):
    vol = sample.brain_volume()
    heat = torch.zeros_like(vol)
    heat[0, 30:40, 40:50, 50:53] = 2.0
    mask = sample.brain_mask()
    p = outputs.overlay_png(vol, heatmap=heat, contours={"brain": mask}, path=tmp_path / "c_overlay.png",
                       title="heatmap", units="a.u.", n_slices=4, ncols=2, panel_inches=2.0, dpi=50)
    assert png_size(p) == (int((2 * 2.0 + 0.9) * 50), int((2 * 2.0 + 0.5) * 50))
    p2 = outputs.overlay_png(vol[0, :, :, 40], heatmap=heat[0, :, :, 40], path=tmp_path / "slice.png", dpi=40)
    assert png_size(p2) == (int((2.5 + 0.9) * 40), int((2.5 + 0.5) * 40))
    p3 = outputs.overlay_png(vol, path=tmp_path / "plain.png", n_slices=5, ncols=5, panel_inches=1.0, dpi=40)
    assert png_size(p3) == (int((5 * 1.0 + 0.9) * 40), int((1.0 + 0.5) * 40))  # five slices, no colour bar
    with pytest.raises(DataError, match="shape"):
        outputs.overlay_png(vol, heatmap=heat[:, :10], path=tmp_path / "bad.png")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c_overlay.png", "plain.png", "slice.png"]


def test_parametric_map_round_trips_through_highdicom(tmp_path):
    hd = pytest.importorskip("highdicom")
    dicom = pytest.importorskip("medidiff.data.dicom")
    folder = sample.dicom_examples().get("ct_series")
    if folder is None:
        pytest.skip("pydicom's dicomdirtests series is missing")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    volume, affine, _ = dicom.read_series(files)
    ref = MetaTensor(torch.from_numpy(volume), affine=torch.from_numpy(affine))
    heat = torch.linspace(0.0, 3.0, volume.size).reshape(volume.shape)  # (1, X, Y, Z) on the input grid
    out = outputs.write_parametric_map(heat, ref, files, tmp_path / "heat.dcm", description="heatmap",
                                       protected=[folder])
    back = hd.imread(out).get_volume()  # highdicom's own reading: the frames on their world grid
    values = np.asarray(back.array, dtype=np.float64)
    assert values.size == volume.size and sorted(values.ravel()) == pytest.approx(sorted(heat.numpy().ravel()))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    # the same world position for every voxel: highdicom's affine (LPS) against the reader's (RAS)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij"), -1).reshape(-1, 3)
    world = (lps_to_ras @ back.affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    ours = np.rint((np.linalg.inv(affine) @ np.c_[world, np.ones(len(world))].T).T[:, :3]).astype(int)
    np.testing.assert_allclose(values.ravel(), heat.numpy()[0][ours[:, 0], ours[:, 1], ours[:, 2]], rtol=1e-6)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from medidiff.outputs import write_text

    old = os.umask(0o022)
    try:
        path = write_text("x", tmp_path / "result.txt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
