"""Untrusted files: weights are never unpickled, checksums are checked, recipes build no Python objects,
headers that claim huge images are refused up front, and no patient identifier leaks into outputs."""

from __future__ import annotations

import builtins
import json
import pickle
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from anomaly_helpers import FAST, save_tiny_model
from pydicom.data import get_testdata_file

from medidiff.cli import main
from medidiff.data.dicom import read_series
from medidiff.data.nifti import read_nifti
from medidiff.errors import DataError, ModelError, RecipeError
from medidiff.manifest import sha256_file
from medidiff.recipes import load_recipe
from medidiff.train_checkpoints import find_checkpoint
from medidiff.weights import load_denoiser


class _Payload:
    """Unpickling this creates the file ``target``: the proof that a loader ran code."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return builtins.open, (self.target, "w")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("name", ["evil.pt", "evil.pth", "evil.ckpt", "evil.safetensors", "zip.safetensors"])
def test_pickled_weights_are_refused_unread(tmp_path, model, name):
    target = tmp_path / "pwned"
    weights = tmp_path / name
    if name.startswith("zip"):
        torch.save({"state": _Payload(target)}, weights)  # torch.save's zip archive, a pickle inside
    else:
        weights.write_bytes(pickle.dumps(_Payload(target), protocol=4))
    shutil.copy(model / "model.json", weights.with_suffix(".json"))
    with pytest.raises(ModelError, match="pickle|zip archive") as err:
        load_denoiser(weights)
    assert "never unpickles" in str(err.value) and str(weights) in str(err.value)
    assert not target.exists()
    code = main(["detect", "--model", str(weights), "--input", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 5  # a model error
    assert not target.exists()


def test_training_checkpoints_load_weights_only(tmp_path):
    target = tmp_path / "pwned"
    (tmp_path / "checkpoints").mkdir()
    torch.save({"step": 1, "x": _Payload(target)}, tmp_path / "checkpoints" / "step_0000001.pt")
    assert find_checkpoint(tmp_path) is None and not target.exists()  # refused by weights_only=True, skipped


def test_weights_are_checked_against_the_manifest_beside_them(tmp_path, model):
    folder = shutil.copytree(model, tmp_path / "m")
    digest = sha256_file(folder / "model.safetensors")
    (folder / "manifest.json").write_text(json.dumps({"outputs": {"model.safetensors": digest}}))
    load_denoiser(folder)
    (folder / "manifest.json").write_text(json.dumps({"outputs": {"model.safetensors": "0" * 64}}))
    with pytest.raises(ModelError, match="differs from 0000000000000000... recorded in manifest.json"):
        load_denoiser(folder)
    (folder / "manifest.json").unlink()
    (folder / "model.safetensors.sha256").write_text(f"{'f' * 64}  model.safetensors\n")
    with pytest.raises(ModelError, match="model.safetensors.sha256"):
        load_denoiser(folder)


def test_the_bundled_weights_match_their_manifest():
    root = Path(__file__).resolve().parents[1] / "data" / "weights"
    for name, step in (("demo_brain_2d", 11000), ("mri_brain_2d", 2500), ("ct_2d", 1200), ("seg_lesion_2d", 3000),
                       ("seg_unet_2d", 3000), ("healthy_brain_2d", 1500)):
        _, info = load_denoiser(root / f"{name}.safetensors")  # <name>.manifest.json records its SHA-256
        assert info.step == step


def test_a_python_tag_in_a_recipe_is_an_error_naming_its_line(tmp_path):
    target = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task: anomaly\nseed: 1\nanomaly:\n  inputs: !!python/object/apply:builtins.open "
                      f"['{target}', 'w']\n")
    with pytest.raises(RecipeError, match="line 4: could not determine a constructor for the tag") as err:
        load_recipe(recipe)
    assert "safe loader" in str(err.value) and not target.exists()


def _timed_refusal(fn, *args) -> DataError:
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        fn(*args)
    assert time.perf_counter() - start < 5
    return err.value


def test_headers_claiming_huge_images_are_refused_up_front(tmp_path, monkeypatch):
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\1\2\3\4")  # 356 + 4 bytes on disk
    err = _timed_refusal(read_nifti, path)
    assert "30000 x 30000 x 30000" in err.message and "TiB" in err.message and err.where == str(path)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 10000
    ds.save_as(tmp_path / "huge.dcm")
    err = _timed_refusal(read_series, [tmp_path / "huge.dcm"])
    assert "10000 x 65535 x 65535" in err.message and err.where == str(tmp_path / "huge.dcm")
    monkeypatch.setenv("MEDIDIFF_MAX_IMAGE_BYTES", "1K")  # configurable: a small real image is now too large
    ok = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.float32), np.eye(4)), ok)
    assert "limit of 1.0 KiB" in _timed_refusal(read_nifti, ok).message


IDENTIFIERS = ("passwd", "Hinterberger", "Annelie", "19610412")


def test_no_patient_identifier_reaches_names_logs_reports_or_manifests(tmp_path, model, data_series):
    folder = tmp_path / "export"
    for path in data_series(folder, n=3, rows=16, columns=16):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = "../../etc/passwd", "Hinterberger^Annelie", "19610412"
        ds.save_as(path)
    fast = [f"--set={k}={json.dumps(v)}" for k, v in FAST.items()]
    for deidentify in (False, True):
        out = tmp_path / f"out_{deidentify}"
        args = ["detect", "--model", str(model), "--input", str(folder), "--out", str(out), "--threshold", "0.1",
                *fast, f"--set=deidentify={str(deidentify).lower()}"]
        assert main(args) == 0
        files = [p for p in out.rglob("*") if p.is_file()]
        dicoms = [p for p in files if p.suffix == ".dcm"]
        assert len(dicoms) == 2 and any(p.name == "manifest.json" for p in files)  # heatmap (PM), mask (SEG)
        for path in files:
            assert not any(i.lower() in str(path.relative_to(out)).lower() for i in IDENTIFIERS), path
            if path.suffix == ".dcm":
                ds = pydicom.dcmread(path)
                assert (str(ds.PatientID) == "../../etc/passwd") is not deidentify  # kept only for PACS filing
                assert (ds.PatientBirthDate == "19610412") is not deidentify
                assert (b"Hinterberger" in path.read_bytes()) is not deidentify
                continue
            text = path.read_bytes().decode("latin-1").lower()
            assert not any(i.lower() in text for i in IDENTIFIERS), path
