"""``medidiff convert``: no invented geometry, dcm2niix-style sidecars, the table of files written, the folder's
manifest, screened series descriptions and refusing a folder that holds an earlier conversion."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medidiff.cli import EXIT_DATA, main
from medidiff.data.dicom_headers import screen_text
from medidiff.data.inspect import CONVERTED_FILE, EarlierResults, convert, inspect_path
from medidiff.manifest import sha256_file
from medidiff.runs import convert as convert_run

EMRI = get_testdata_file("emri_small.dcm")  # Enhanced MR without ImagePositionPatient/Orientation/PixelSpacing


def _table(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_series_without_position_is_refused_by_default(tmp_path, capsys):
    assert main(["convert", EMRI, "-o", str(tmp_path / "out")]) == EXIT_DATA
    err = capsys.readouterr().err
    assert "has no position in the patient" in err and "--allow-unknown-geometry" in err
    assert err.count("has no position in the patient") == 1  # said once, not by the log and the error both
    assert not list((tmp_path / "out").glob("*.nii.gz"))
    (row,) = _table(tmp_path / "out" / "failures.csv")
    assert row["case"].startswith("s301_MR_") and "--allow-unknown-geometry" in row["fix"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["task"] == "convert" and manifest["status"] == "failed"


def test_allowed_series_without_position_has_no_world_geometry(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "-i", EMRI, "-o", str(out), "--allow-unknown-geometry"]) == 0
    captured = capsys.readouterr()
    assert "written without world geometry (NIfTI qform/sform codes 0)" in captured.err
    (image,) = out.glob("*.nii.gz")
    header = nib.load(image).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (0, 0)
    assert np.allclose(header.get_zooms(), (1.0, 1.0, 1.2))  # PixelSpacing absent: 1 mm, SpacingBetweenSlices 1.2
    side = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
    assert side["GeometryKnown"] is False and side["NiftiXformCode"] == 0 and side["Orientation"] is None
    assert side["GeometrySource"].startswith("none: no ImagePositionPatient/ImageOrientationPatient")
    assert "1 mm assumed for the missing PixelSpacing" in side["GeometrySource"]
    assert side["Warnings"][0].startswith("written without world geometry")
    assert (side["SeriesNumber"], side["Modality"], side["MagneticFieldStrength"]) == (301, "MR", 3.0)
    assert side["SpacingBetweenSlices"] == 1.2 and side["PulseSequenceName"] == "T1TFE"
    assert side["SeriesInstanceUID"] == pydicom.dcmread(EMRI, stop_before_pixels=True).SeriesInstanceUID
    for key in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName"):
        assert key not in side
    # read back, the volume says it has no position, and inspect shows it
    (row,) = inspect_path(image)
    assert row["orientation"] == "unknown" and any("qform and sform codes 0" in p for p in row["problems"])


def test_sidecar_acquisition_parameters_and_identifiers(tmp_path):
    ct = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(ct, stop_before_pixels=True)
    result = convert(ct, tmp_path / "plain")
    side = json.loads(result.sidecars[0].read_text())
    assert side["GeometryKnown"] is True and side["NiftiXformCode"] == 1 and side["Orientation"] == "LPS"
    assert side["GeometrySource"] == "DICOM ImagePositionPatient, ImageOrientationPatient and PixelSpacing"
    assert (side["Modality"], side["KVP"], side["SliceThickness"]) == ("CT", 120.0, 5.0)
    assert side["ExposureTime"] == pytest.approx(float(ds.ExposureTime) / 1000)  # BIDS: seconds
    assert side["StudyInstanceUID"] == ds.StudyInstanceUID and side["FrameOfReferenceUID"] == ds.FrameOfReferenceUID
    assert "PatientName" not in side and str(ds.PatientName) not in result.sidecars[0].read_text()
    assert side["PatientIdentifiers"].startswith("left out")
    header = nib.load(result.images[0]).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    kept = json.loads(convert(ct, tmp_path / "kept", keep_identifiers=True).sidecars[0].read_text())
    assert kept["PatientName"] == str(ds.PatientName) and kept["PatientID"] == ds.PatientID
    assert "PatientIdentifiers" not in kept


def test_mr_times_are_in_seconds(tmp_path):
    mr = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(mr, stop_before_pixels=True)
    side = json.loads(convert(mr, tmp_path).sidecars[0].read_text())
    assert side["RepetitionTime"] == pytest.approx(float(ds.RepetitionTime) / 1000)
    assert side["EchoTime"] == pytest.approx(float(ds.EchoTime) / 1000)
    assert side["FlipAngle"] == float(ds.FlipAngle) and side["ImagingFrequency"] == float(ds.ImagingFrequency)
    assert "MagneticFieldStrength" not in side  # absent from the header: left out, not guessed


def test_table_and_manifest_list_every_file(tmp_path, data_series):
    data_series(tmp_path / "in" / "a", n=3, series_number=4)
    data_series(tmp_path / "in" / "b", n=2, series_number=5, modality="MR")
    out = tmp_path / "out"
    result = convert_run(tmp_path / "in", out)
    rows = _table(out / CONVERTED_FILE)
    assert sorted(r["file"] for r in rows) == sorted(p.name for p in [*result.images, *result.sidecars])
    assert {r["kind"] for r in rows} == {"image", "sidecar"} and len(rows) == 4
    by_case = {r["case"]: r for r in rows if r["kind"] == "image"}
    assert {r["series_number"] for r in by_case.values()} == {"4", "5"}
    assert {r["shape"] for r in by_case.values()} == {"8x6x3", "8x6x2"}
    assert {r["geometry_known"] for r in rows} == {"yes"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "convert" and manifest["status"] == "finished" and manifest["series_converted"] == 2
    assert set(manifest["outputs"]) == {r["file"] for r in rows} | {CONVERTED_FILE}
    for name, digest in manifest["outputs"].items():
        assert digest == sha256_file(out / name)
    assert len(manifest["inputs"]) == 5 and "seed" not in manifest
    assert manifest["options"]["allow_unknown_geometry"] is False


def test_rerun_into_a_converted_folder_needs_overwrite(tmp_path, capsys):
    ct = get_testdata_file("CT_small.dcm")
    out = tmp_path / "out"
    assert main(["convert", ct, "-o", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["convert", ct, "-o", str(out)]) == EXIT_DATA
    err = capsys.readouterr().err
    assert f"{out}: the output folder already holds results of an earlier conversion" in err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, manifest included
    with pytest.raises(EarlierResults):
        convert(ct, out)
    (out / "s999_CT_stale.nii.gz").write_bytes(b"old")  # listed by the earlier table: removed on overwrite
    with open(out / CONVERTED_FILE, "a", encoding="utf-8") as handle:
        handle.write("s999_CT_stale.nii.gz,image,s999_CT_stale,CT,999,,1x1x1,1x1x1,yes\n")
    (out / "notes.txt").write_text("mine")  # not the conversion's: kept
    assert main(["convert", ct, "-o", str(out), "--overwrite"]) == 0
    assert not (out / "s999_CT_stale.nii.gz").exists() and (out / "notes.txt").read_text() == "mine"
    assert len(_table(out / CONVERTED_FILE)) == 2


def test_series_description_is_screened(tmp_path, data_series, capsys):
    data_series(tmp_path / "in", n=2, description="T1 DOE^JOHN axial")
    (row,) = inspect_path(tmp_path / "in")
    assert row["description"] == "T1 [removed] axial"
    assert main(["inspect", str(tmp_path / "in")]) == 0
    assert "DOE^JOHN" not in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "in"), "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["description"] == "T1 [removed] axial"
    result = convert(tmp_path / "in", tmp_path / "out")
    assert "DOE" not in result.images[0].name and "JOHN" not in result.images[0].name
    side = json.loads(result.sidecars[0].read_text())
    assert side["SeriesDescription"] == "T1 [removed] axial"
    assert "DOE^JOHN" not in (tmp_path / "out" / CONVERTED_FILE).read_text()


def test_screen_text_removes_the_patients_own_name_and_id():
    assert screen_text("Jane Doe T2 flair", ["Doe^Jane", "PID-77"]) == "[removed] T2 flair"
    assert screen_text("scan of PID-77", ["Doe^Jane", "PID-77"]) == "scan of [removed]"
    assert screen_text("T1 MPRAGE sag", ["Doe^Jane"]) == "T1 MPRAGE sag"
    assert screen_text("Janeway protocol", ["Doe^Jane"]) == "Janeway protocol"  # whole words only
    assert screen_text("ax\x00T2", []) == "ax T2"
