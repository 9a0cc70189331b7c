"""DICOM outputs a PACS accepts: the heatmap as a Parametric Map, masks as SEG, checked with dciodvfy.

Sources are pydicom's own MR and CT test files (a real five-slice CT series, single MR and CT slices, and
series made from the MR file). Every output must pass dciodvfy (dicom3tools) without an error, lie in its
source's study and frame of reference, and give back the values at the source slices' own positions.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from anomaly_helpers import FAST, save_tiny_model
from dicom_helpers import dciodvfy_errors
from pydicom.data import get_testdata_file

from medidiff import outputs
from medidiff.cases import find_cases, load_case
from medidiff.data import sample
from medidiff.outputs.dicom import frame_of_reference_for

hd = pytest.importorskip("highdicom")

STRIPPED = ("FrameOfReferenceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "PatientBirthDate",
            "PatientSex", "ReferringPhysicianName")


def _mr_series(folder, data_series, strip=()):
    """Four 16 x 16 slices with MR_small.dcm's headers (a real MR file), 3 mm apart; ``strip`` tags removed."""
    paths = data_series(folder, n=4, base="MR_small.dcm", rows=16, columns=16, gap=3.0,
                        orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0), pixel_spacing=(1.25, 1.5))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = "19610412"
        for tag in strip:
            if tag in ds:
                delattr(ds, tag)
        ds.save_as(path)
    return paths


def _source_values(ds) -> np.ndarray:
    """A source slice's values in its own units (rescaled), ``(rows, columns)``."""
    return ds.pixel_array * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


def _frames(obj) -> dict[tuple, tuple]:
    """``{source SOP instance UID: (ImagePositionPatient, frame)}`` of a multi-frame derived object."""
    pixels = np.asarray(obj.pixel_array).reshape(int(obj.NumberOfFrames), int(obj.Rows), int(obj.Columns))
    found = {}
    for k, group in enumerate(obj.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        found[uid] = (np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float), pixels[k])
    return found


def _check_geometry(obj, sources) -> dict:
    """The object lies in its sources' study, series references and frame of reference, frame by frame."""
    first = sources[0]
    assert obj.StudyInstanceUID == first.StudyInstanceUID and obj.SeriesInstanceUID != first.SeriesInstanceUID
    assert obj.FrameOfReferenceUID == first.get("FrameOfReferenceUID", obj.FrameOfReferenceUID)
    assert obj.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    shared = obj.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float),
                               np.asarray(first.ImageOrientationPatient, float), atol=1e-6)
    np.testing.assert_allclose(np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float),
                               np.asarray(first.PixelSpacing, float), atol=1e-6)
    frames = _frames(obj)
    assert set(frames) == {ds.SOPInstanceUID for ds in sources}  # one frame per source slice
    for ds in sources:
        np.testing.assert_allclose(frames[ds.SOPInstanceUID][0], np.asarray(ds.ImagePositionPatient, float),
                                   atol=1e-4)
    return {uid: frame for uid, (_, frame) in frames.items()}


def _write_both(source, tmp_path, **kw):
    """A heatmap (0.5 x the scan + 0.25) as a Parametric Map and (scan > its median) as SEG, for one case."""
    case = load_case(find_cases(source)[0])
    level = float(case.image.median())
    pm = outputs.write_parametric_map(case.image * 0.5 + 0.25, case.image, case.source.paths,
                                      tmp_path / "heatmap.dcm", description="test heatmap", unit="[arb'U]",
                                      protected=[source], **kw)
    seg = outputs.write_dicom_seg((case.image > level).to(torch.uint8), case.image, case.source.paths,
                                  tmp_path / "mask.dcm", classes=("background", "anomaly above threshold"),
                                  protected=[source], **kw)
    return case, level, pm, seg


def _sources(kind: str, tmp_path, data_series):
    examples = sample.dicom_examples()
    if kind == "mr_series":
        return tmp_path / "mr", _mr_series(tmp_path / "mr", data_series)
    if kind == "mr_stripped":
        return tmp_path / "mr", _mr_series(tmp_path / "mr", data_series, strip=STRIPPED)
    path = examples.get(kind)
    if path is None:
        pytest.skip(f"pydicom's test file for {kind} is missing")
    return path, sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


@pytest.mark.parametrize("kind", ["ct_series", "mr_series", "ct_slice", "mr_slice", "mr_stripped"])
def test_heatmap_and_mask_pass_dciodvfy_and_round_trip(kind, tmp_path, data_series):
    source, files = _sources(kind, tmp_path, data_series)
    before = {p: p.read_bytes() for p in files}
    case, level, pm_path, seg_path = _write_both(source, tmp_path / "out")
    assert dciodvfy_errors(pm_path) == [] and dciodvfy_errors(seg_path) == []
    assert {p: p.read_bytes() for p in files} == before  # the sources are never changed
    sources = [pydicom.dcmread(p) for p in files]

    pm = pydicom.dcmread(pm_path)
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and pm.SOPClassUID.name == "Parametric Map Storage"
    assert pm.Modality == "OT" and "DERIVED" in pm.ImageType and pm.SeriesDescription == "test heatmap"
    assert "FloatPixelData" in pm and pm.Laterality == sources[0].get("Laterality", "")
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "[arb'U]"
    assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.RealWorldValueIntercept) == 0.0
    frames = _check_geometry(pm, sources)
    for ds in sources:  # the map at each source pixel, straight from the source file
        np.testing.assert_allclose(frames[ds.SOPInstanceUID], _source_values(ds) * 0.5 + 0.25, rtol=1e-6, atol=1e-4)

    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID.name == "Segmentation Storage" and seg.SegmentationType == "BINARY"
    assert seg.SegmentSequence[0].SegmentLabel == "anomaly above threshold"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    masks = _check_geometry(seg, sources)
    for ds in sources:
        np.testing.assert_array_equal(masks[ds.SOPInstanceUID], (_source_values(ds) > level).astype(np.uint8))
    assert pm.FrameOfReferenceUID == seg.FrameOfReferenceUID
    if kind == "mr_stripped":  # no frame of reference in the source: one derived from its series, shared
        assert pm.FrameOfReferenceUID == frame_of_reference_for(sources[0].SeriesInstanceUID)
        assert pm.StudyDate == "" and pm.PatientBirthDate == "" and pm.AccessionNumber == ""
    else:
        assert pm.PatientName == sources[0].PatientName and pm.StudyDate == sources[0].StudyDate


def test_deidentified_outputs_keep_the_uids_and_lose_the_patient(tmp_path, data_series):
    files = _mr_series(tmp_path / "mr", data_series)
    _, _, pm_path, seg_path = _write_both(tmp_path / "mr", tmp_path / "out", deidentify=True)
    source = pydicom.dcmread(files[0])
    for path in (pm_path, seg_path):
        assert dciodvfy_errors(path) == []
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == "ANONYMOUS^" and ds.PatientID == "ANONYMOUS" and ds.PatientBirthDate == ""
        assert ds.PatientIdentityRemoved == "YES" and ds.StudyDate == "" and ds.DeidentificationMethod
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        raw = path.read_bytes()
        assert b"Doe" not in raw and b"19610412" not in raw and source.PatientID.encode() not in raw


def test_a_detect_run_on_an_mr_series_writes_a_parametric_map_and_a_seg(tmp_path, data_series):
    from medidiff.anomaly import detect

    folder = tmp_path / "mr"
    files = _mr_series(folder, data_series)
    for k, path in enumerate(files):  # a brain-like disc, so the tiny model has foreground to score
        ds = pydicom.dcmread(path)
        rr, cc = np.mgrid[0:16, 0:16]
        disc = ((rr - 7.5) ** 2 + (cc - 7.5) ** 2) < 36
        ds.PixelData = np.where(disc, 600 + 13 * ((rr * 3 + cc * 7 + k) % 11), 0).astype(np.int16).tobytes()
        ds.save_as(path)
    model = save_tiny_model(tmp_path / "model")
    result = detect(model, folder, tmp_path / "out", threshold=0.0, **FAST)
    assert result.failures == 0
    heat_pm = next((tmp_path / "out").glob("*_heatmap.dcm"))
    mask_seg = next((tmp_path / "out").glob("*_anomaly_mask.dcm"))
    assert dciodvfy_errors(heat_pm) == [] and dciodvfy_errors(mask_seg) == []
    sources = [pydicom.dcmread(p) for p in files]
    import nibabel as nib

    heat_nii = nib.load(next((tmp_path / "out").glob("*_heatmap.nii.gz")))
    mask_nii = nib.load(next((tmp_path / "out").glob("*_anomaly_mask.nii.gz")))
    pm = pydicom.dcmread(heat_pm)
    frames = _check_geometry(pm, sources)
    unit = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence[0]
    assert unit.CodeValue == "1" and pm.SeriesDescription == "medidiff anomaly heatmap"  # per-scan map: a ratio
    # the same values as the NIfTI heatmap, slice for slice, and as many flagged voxels as its NIfTI mask
    assert sum(float(f.sum()) for f in frames.values()) == pytest.approx(float(heat_nii.get_fdata().sum()), rel=1e-5)
    assert max(float(f.max()) for f in frames.values()) == pytest.approx(float(heat_nii.get_fdata().max()), rel=1e-6)
    masks = _check_geometry(hd.seg.segread(mask_seg), sources)
    assert sum(int(m.sum()) for m in masks.values()) == int(mask_nii.get_fdata().sum()) > 0


def test_single_ct_slice_from_pydicom_is_in_hounsfield_units(tmp_path):
    path = get_testdata_file("CT_small.dcm")
    case = load_case(find_cases(path)[0])
    out = outputs.write_parametric_map(case.image, case.image, case.source.paths, tmp_path / "ct.dcm",
                                       unit="[hnsf'U]", label="HU")
    pm = pydicom.dcmread(out)
    unit = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodeMeaning) == ("[hnsf'U]", "Hounsfield unit")
    np.testing.assert_allclose(np.asarray(pm.pixel_array).reshape(128, 128), _source_values(pydicom.dcmread(path)),
                               atol=1e-3)
