"""The ``medidiff`` command: help, info, train end to end in a subprocess, clear errors, inspect and convert."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import yaml
from train_helpers import MEDIDIFF, ROOT, subprocess_env, tiny_recipe

from medidiff.cli import main
from medidiff.manifest import sha256_file
from medidiff.weights import load_denoiser


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as code:
        main(["--help"])
    assert code.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "inspect", "convert", "train", "run"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for option in ("--out", "--device", "--set", "--seed", "--resume", "--debug"):
        assert option in out


def test_info_reports_versions_and_decoders(capsys):
    import monai
    import torch

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and monai.__version__ in out
    assert "cuda" in out and "pylibjpeg" in out and "gdcm" in out


def test_train_tiny_2d_recipe_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([*MEDIDIFF, "train", str(ROOT / "recipes" / "train_tiny_2d.yaml"), "--out", str(out),
                           "--device", "cpu"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights:" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000020.pt", "step_0000030.pt"]
    meta = json.loads((out / "model.json").read_text())
    assert meta["net"]["channels"] == [8, 16] and meta["process"]["n_steps"] == 100
    assert meta["prediction"] == "eps" and meta["noise"]["kind"] == "gaussian"
    assert meta["data_prep"]["source"] == "synthetic" and meta["data_prep"]["size"] == [16, 16]
    denoiser, _ = load_denoiser(out)
    assert denoiser.net.config == meta["net"]
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["training"]["steps"] == 30 and recipe["device"] == "cpu"  # resolved, with --device applied
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["seed"] == 0 and manifest["device"] == "cpu"
    assert manifest["outputs"]["model.safetensors"] == sha256_file(out / "model.safetensors")
    for key in ("medidiff", "torch", "monai", "python", "recipe_sha256", "start_time", "end_time"):
        assert manifest[key]
    log = (out / "train.log").read_text()
    assert "step 30/30" in log and "validation loss" in log
    assert len((out / "history.csv").read_text().splitlines()) == 31
    assert any((out / "tb").iterdir())
    from matplotlib import image as mpimg

    grid = mpimg.imread(out / "samples" / "step_0000030.png")
    assert grid.shape[:2] == (16, 4 * 16)


def test_misspelt_key_is_one_clear_message(tmp_path, capsys):
    raw = tiny_recipe()
    raw["training"]["lr_warmup"] = raw["training"].pop("lr_warmup_steps")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "'training.lr_warmup'" in err and "did you mean 'training.lr_warmup_steps'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert main(["train", str(recipe), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_set_overrides_and_unavailable_task(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    assert main(["run", str(recipe), "--set", "training.lr=oops", "--out", str(tmp_path / "o")]) == 2
    assert "'training.lr'" in capsys.readouterr().err
    assert main(["run", str(recipe), "--set", "task=dream", "--out", str(tmp_path / "o")]) == 2
    assert "task 'dream' is not available" in capsys.readouterr().err


def test_inspect_and_convert_a_nifti(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("medidiff.data.inspect")
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "case1.nii.gz")
    assert main(["inspect", str(tmp_path / "case1.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "case1" in out and "4x5x6" in out
    assert main(["convert", str(tmp_path / "case1.nii.gz"), "--out", str(tmp_path / "nifti")]) == 0
    written = list((tmp_path / "nifti").glob("*.nii.gz"))
    assert len(written) == 1 and np.allclose(nib.load(written[0]).get_fdata(), volume)
    assert main(["inspect", str(tmp_path / "missing")]) == 4  # a data error
    assert "missing" in capsys.readouterr().err
