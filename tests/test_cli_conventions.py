"""The command line's conventions: --version, -i/-o, --quiet/--verbose, --json, suggestions, exit codes, a
closed pipe, errors printed once, unsupported formats named, the device and progress bars, the command list."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from anomaly_helpers import save_tiny_model, volume, write_nifti
from pydicom.data import get_testdata_file
from train_helpers import MEDIDIFF, subprocess_env

import medidiff
from medidiff import runs
from medidiff.cli import (
    DETECT_METHODS,
    EXIT_CODES,
    EXIT_DATA,
    EXIT_ERROR,
    EXIT_FAILURES,
    EXIT_MODEL,
    EXIT_PIPE,
    EXIT_TRAINING,
    build_parser,
    exit_status,
    main,
)
from medidiff.errors import DataError, MedidiffError, ModelError, RecipeError, TrainingError

COMMANDS = ("info", "inspect", "convert", "train", "run", "detect", "reconstruct", "segment")


@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "case1.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(4, 5, 6), np.diag([2.0, 2.0, 3.0, 1.0])), path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def test_version(capsys):
    with pytest.raises(SystemExit) as code:
        main(["--version"])
    assert code.value.code == 0 and capsys.readouterr().out.strip() == f"medidiff {medidiff.__version__}"


def test_short_forms_of_input_and_out():
    parser = build_parser()
    for argv in (["detect", "--model", "m", "-i", "in", "-o", "out"], ["segment", "-i", "in", "-o", "out"],
                 ["reconstruct", "-i", "in", "--modality", "ct", "-o", "out"]):
        args = parser.parse_args(argv)
        assert (str(args.input), str(args.out)) == ("in", "out")
    assert str(parser.parse_args(["convert", "-i", "in", "-o", "out"]).input) == "in"
    assert str(parser.parse_args(["inspect", "-i", "in"]).input) == "in"
    for command in ("train", "run"):
        assert str(parser.parse_args([command, "r.yaml", "-o", "out"]).out) == "out"


def test_inspect_takes_one_input(scan, capsys):
    assert main(["inspect", "-i", str(scan)]) == 0 and "4x5x6" in capsys.readouterr().out
    with pytest.raises(SystemExit) as code:
        main(["inspect"])
    assert code.value.code == EXIT_ERROR and "the input is required: give PATH or -i/--input" in capsys.readouterr().err


def test_json_output_of_info_and_inspect(scan, capsys):
    import torch

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["medidiff"] == medidiff.__version__ and info["torch"] == torch.__version__
    assert info["cpu_threads"] == torch.get_num_threads() and set(info["optional_packages"]) >= {"pylibjpeg", "gdcm"}
    assert isinstance(info["cuda_available"], bool)
    assert main(["inspect", str(scan), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["name"], row["shape"], row["spacing"], row["orientation"], row["problems"]) == (
        "case1", [1, 4, 5, 6], [2.0, 2.0, 3.0], "RAS", [])


def test_quiet_and_verbose(tmp_path, capsys):
    emri = get_testdata_file("emri_small.dcm")
    assert main(["convert", emri, "-o", str(tmp_path / "q"), "--allow-unknown-geometry", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")  # errors only
    assert main(["convert", emri, "-o", str(tmp_path / "n"), "--allow-unknown-geometry"]) == 0
    out, err = capsys.readouterr()
    assert "1 series converted" in out and "WARNING medidiff.convert" in err and "INFO" not in err
    assert main(["convert", emri, "-o", str(tmp_path / "v"), "--allow-unknown-geometry", "--verbose"]) == 0
    assert re.search(r"INFO medidiff.convert: s301_MR_\w+: MR series 301, 64x64x10 voxels", capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["info", "--quiet", "--verbose"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv, hint", [
    (["detcet"], "did you mean 'detect'?"),
    (["segment", "-i", "a", "-o", "b", "--membres", "3"],
     "unrecognized arguments: --membres 3; did you mean --members?"),
    (["convert", "a", "-o", "b", "--allow-unknown-geometri"], "did you mean --allow-unknown-geometry?"),
    (["reconstruct", "-i", "a", "-o", "b", "--modality", "mri", "--solver", "merg"], "did you mean 'merge'?"),
    (["detect", "--model", "m", "-i", "a", "-o", "b", "--method", "counterfactal"], "did you mean 'counterfactual'?"),
])
def test_misspelt_command_option_or_choice_gets_a_suggestion(argv, hint, capsys):
    with pytest.raises(SystemExit) as code:
        main(argv)
    err = capsys.readouterr().err
    assert code.value.code == EXIT_ERROR and hint in err and "Traceback" not in err


def test_exit_codes_are_distinct_and_documented(capsys):
    assert [exit_status(e) for e in (RecipeError("x"), DataError("x"), ModelError("x"), TrainingError("x"),
                                     MedidiffError("x"))] == [2, 4, 5, 6, 2]
    assert len({EXIT_ERROR, EXIT_FAILURES, EXIT_DATA, EXIT_MODEL, EXIT_TRAINING, EXIT_PIPE}) == 6
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("2 a usage or recipe error", "3 the run finished but some cases failed", "4 a data error",
                   "5 a model error", "6 training could not go on", "130 interrupted",
                   "141 the output pipe was closed"):
        assert phrase in text and phrase in EXIT_CODES
    for command in ("detect", "convert", "inspect"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "4 a data error" in " ".join(capsys.readouterr().out.split())


def test_help_lists_exactly_the_commands_that_exist(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = re.findall(r"^    (\w+)\s", capsys.readouterr().out, flags=re.M)
    assert tuple(listed) == COMMANDS
    assert set(build_parser().parse_args(["info"])._commands) == set(COMMANDS)
    assert {"anomaly", "recon", "segment"} <= set(runs.TASKS)  # what detect, reconstruct and segment run
    for command in COMMANDS:
        with pytest.raises(SystemExit) as code:
            main([command, "--help"])
        assert code.value.code == 0


def test_unsupported_format_is_named(tmp_path, capsys):
    png = tmp_path / "slice.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert main(["inspect", str(png)]) == EXIT_DATA
    err = capsys.readouterr().err
    assert f"{png}: is a PNG image, not a DICOM file; medidiff reads NIfTI (.nii, .nii.gz), DICOM" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["convert", str(png), "-o", str(tmp_path / "out")]) == EXIT_DATA
    assert "is a PNG image" in capsys.readouterr().err


def test_broken_pipe_exits_quietly(monkeypatch, scan, capsys):
    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Closed())
    assert main(["inspect", str(scan)]) == EXIT_PIPE
    assert capsys.readouterr().err == ""


def test_broken_pipe_in_a_real_pipe():
    proc = subprocess.Popen([*MEDIDIFF, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env())
    proc.stdout.close()  # the reader is gone before anything is written, as `| head` after its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""  # no traceback, no "Exception ignored in: <stdout>"


def test_detect_prints_the_device_progress_and_each_error_once(tmp_path, tiny_model, capsys):
    image, brain, affine = volume((16, 16, 3))
    write_nifti(tmp_path / "scan.nii.gz", image, affine)
    out = tmp_path / "out"
    argv = ["detect", "--model", str(tiny_model), "-i", str(tmp_path / "scan.nii.gz"), "-o", str(out),
            "--threshold", "0.3", "--device", "cpu", "--set", "t_levels=[0.3]", "--set", "steps=2",
            "--set", "n_samples=2", "--set", "batch_size=1"]
    assert main(argv) == 0
    stdout, stderr = capsys.readouterr()
    assert stdout.splitlines()[0].startswith("device: cpu (") and "threads)" in stdout.splitlines()[0]
    bars = re.findall(r"healthy:\s+\d+%.*?\| (\d+)/(\d+) \[[0-9:]+<[0-9:?]+", stderr)  # count/total [elapsed<ETA
    assert bars and {total for _, total in bars} == {"6"}  # 3 slices x 2 members, one per batch
    assert main([*argv[:6], str(tmp_path / "quiet"), *argv[7:], "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    missing = tmp_path / "missing.nii.gz"
    assert main(["detect", "--model", str(tiny_model), "-i", str(missing), "-o", str(tmp_path / "o2")]) == EXIT_DATA
    err = capsys.readouterr().err
    assert err.count(f"{missing}: does not exist") == 1 and "Traceback" not in err


def test_quiet_turns_the_progress_bars_off(tmp_path, monkeypatch, capsys):
    import yaml
    from train_helpers import tiny_recipe

    recipe = tmp_path / "r.yaml"
    raw = tiny_recipe()
    raw["training"]["progress"] = True
    recipe.write_text(yaml.safe_dump(raw))
    seen = {}

    class Result:
        weights, step, summary, failures = None, 0, "", 0

    def fake_train(parsed, out):  # the recipe as the run would get it; nothing is trained
        seen["recipe"] = parsed
        return Result()

    monkeypatch.setattr(runs, "train", fake_train)
    assert main(["train", str(recipe), "-o", str(tmp_path / "o"), "--device", "cpu", "--quiet"]) == 0
    assert seen["recipe"].training.progress is False and capsys.readouterr() == ("", "")
    assert main(["train", str(recipe), "-o", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert seen["recipe"].training.progress is True
    assert capsys.readouterr().out.splitlines()[0].startswith("device: cpu (")


def test_detect_without_a_model_uses_the_bundled_healthy_brain_model(tmp_path, monkeypatch):
    """``--model`` is optional: detect then runs the bundled model of healthy brains (its weights and threshold)."""
    from medidiff.results import TaskResult

    recipes = []
    monkeypatch.setattr(runs, "run", lambda recipe, out: recipes.append(recipe) or TaskResult(summary="done"))
    assert main(["detect", "-i", "scan.nii.gz", "-o", str(tmp_path), "--quiet"]) == 0
    assert main(["detect", "--model", "m.safetensors", "-i", "scan.nii.gz", "-o", str(tmp_path), "--quiet"]) == 0
    assert [r.anomaly.model for r in recipes] == ["data/weights/healthy_brain_2d.safetensors", "m.safetensors"]
    bundled = Path(__file__).resolve().parents[1] / recipes[0].anomaly.model
    assert bundled.is_file() and bundled.with_name("healthy_brain_2d.thresholds.json").is_file()


def test_detect_method_lists_every_method_and_routes_to_the_reconstruction(tmp_path, monkeypatch, capsys):
    """``detect --method`` offers exactly the anomaly task's methods, lists them in ``--help``, and sets
    ``anomaly.reconstruction.method`` as ``--set method=...`` does (a later ``--set`` wins)."""
    from typing import get_args

    from medidiff.anomaly.config import HealthyOptions
    from medidiff.results import TaskResult

    assert tuple(DETECT_METHODS) == get_args(HealthyOptions.model_fields["method"].annotation)
    with pytest.raises(SystemExit):
        main(["detect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{method}: " in text for method in DETECT_METHODS)
    recipes = []
    monkeypatch.setattr(runs, "run", lambda recipe, out: recipes.append(recipe) or TaskResult(summary="done"))
    base = ["detect", "--model", "m.safetensors", "-i", "scan.nii.gz", "-o", str(tmp_path), "--quiet"]
    assert main([*base, "--method", "counterfactual", "--set", "guidance_weight=2"]) == 0
    assert main([*base, "--method", "invert", "--set", "method=patch"]) == 0
    assert main(base) == 0
    recon = [r.anomaly.reconstruction for r in recipes]
    assert (recon[0].method, recon[0].guidance_weight) == ("counterfactual", 2.0)
    assert [r.method for r in recon[1:]] == ["patch", "partial"]
