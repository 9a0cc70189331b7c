"""Batch runs over a folder with good and broken scans: killed and resumed, sharded over two ranks, locked.

The reference is one clean single-process run; a run killed (SIGKILL) at several points and started again
with the same command, and a run under ``torchrun`` with two CPU ranks, must give the same tables and maps.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch.distributed as dist
from anomaly_helpers import FAST, save_tiny_model, volume, write_nifti
from train_helpers import subprocess_env

from medidiff.anomaly import detect
from medidiff.batch import STATE_DIR, shard
from medidiff.cli import main
from medidiff.errors import DataError
from medidiff.outputs.lock import LOCK_NAME, RunLock, lock_holder

GOOD = ("a", "b", "c")
BROKEN = {"empty": b"", "garbage": b"\x1f\x8b\x08 not really gzip" * 3}
CLI_FAST = [f"--set={k}={json.dumps(v)}" for k, v in FAST.items()] + ["--set=fpr=0.1", "--calibration"]



def _killed_run(args: list[str], kill_at: int) -> None:
    """``medidiff`` in a forked child, SIGKILLed just before ``os.replace``'s ``kill_at``-th call: it dies with a
    finished temporary file beside a final name never written, as a crash between writing and renaming."""
    count, real = [0], os.replace

    def replace(src, dst):
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)

    os.replace = replace
    main(args)
    os._exit(0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A datalist of three labelled scans and two broken files, healthy calibration scans, a tiny model."""
    root = tmp_path_factory.mktemp("batch")
    entries = []
    for i, name in enumerate(GOOD):
        image, _, affine = volume((16, 16, 3), seed=i)
        label = np.zeros(image.shape, np.uint8)
        label[6:10, 6:10, 1] = 1
        write_nifti(root / f"{name}.nii.gz", np.where(label > 0, image * 1.6, image), affine)
        write_nifti(root / f"{name}_label.nii.gz", label, affine)
        entries.append({"image": f"{name}.nii.gz", "label": f"{name}_label.nii.gz"})
    for name, content in BROKEN.items():
        (root / f"{name}.nii.gz").write_bytes(content)
        entries.append({"image": f"{name}.nii.gz"})
    (root / "list.json").write_text(json.dumps({"test": entries}))
    calib = root / "calib"
    calib.mkdir()
    for i in range(2):
        image, _, affine = volume((16, 16, 3), seed=10 + i)
        write_nifti(calib / f"h{i}.nii.gz", image, affine)
    model = save_tiny_model(root / "model")
    reference = root / "reference"
    result = detect(model, root / "list.json", reference, calibration=calib, fpr=0.1, **FAST)
    assert len(result.rows) == 3 and result.failures == 2
    return root, model, reference


def _args(root: Path, model: Path, out: Path) -> list[str]:
    return ["detect", "--model", str(model), "--input", str(root / "list.json"), "--out", str(out), *CLI_FAST,
            str(root / "calib")]


def _table(path: Path, drop=("time_s",)) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(path.open())]


def assert_same_results(out: Path, reference: Path) -> None:
    """Same scores, failures, metrics, threshold and maps as the reference run."""
    assert _table(out / "scores.csv") == _table(reference / "scores.csv")
    assert _table(out / "failures.csv") == _table(reference / "failures.csv")
    for name in ("metrics.json", "thresholds.json"):
        assert json.loads((out / name).read_text()) == json.loads((reference / name).read_text()), name
    for case in GOOD:
        for kind in ("heatmap", "healthy", "anomaly_mask"):
            a = np.asarray(nib.load(out / f"{case}_{kind}.nii.gz").dataobj)
            np.testing.assert_array_equal(a, np.asarray(nib.load(reference / f"{case}_{kind}.nii.gz").dataobj))
    failed = {row["case"]: row for row in _table(out / "failures.csv")}
    assert set(failed) == set(BROKEN) and all(row["file"].endswith(".nii.gz") and row["error"]
                                              for row in failed.values())


def _assert_no_partial_files(out: Path) -> None:
    """Every file under its final name is whole (temporary files are hidden, and swept by the next run)."""
    for path in out.iterdir():
        if path.name.startswith("."):
            continue
        if path.name.endswith(".nii.gz"):
            np.asarray(nib.load(path).dataobj)  # reads (and CRC-checks) the whole stream
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            assert path.read_bytes()[-8:-4] == b"IEND"


def test_a_run_killed_at_several_points_resumes_to_the_same_results(dataset, tmp_path, capsys):
    root, model, reference = dataset
    out = tmp_path / "run"
    fork = multiprocessing.get_context("fork")
    # os.replace calls: recipe.yaml, manifest.json, then 2 per calibration scan, thresholds.json, 6 per good
    # case (4 maps, arrays, record) and 1 per broken one: killed inside calibration, just before case a's
    # record, in the middle of case b (after resuming a), and before a broken case's record
    for k in (3, 12, 16, 10):
        child = fork.Process(target=_killed_run, args=(_args(root, model, out), k))
        child.start()
        child.join(300)
        assert child.exitcode == -signal.SIGKILL
        _assert_no_partial_files(out)
        assert lock_holder(out)["pid"] == child.pid  # the dead run's lock is left behind
    done_before = len(list((out / STATE_DIR / "cases").glob("*.json")))
    assert main(_args(root, model, out)) == 3  # finished, but some cases failed
    captured = capsys.readouterr()
    assert "taking over the stale lock" in captured.err
    assert done_before >= 2 and "complete from an earlier run" in captured.out
    assert not (out / LOCK_NAME).exists() and not [p for p in out.rglob(".*.tmp*")]
    assert_same_results(out, reference)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and "a_heatmap.nii.gz" in manifest["outputs"]


def test_a_changed_output_is_made_again(dataset, tmp_path):
    root, model, reference = dataset
    out = tmp_path / "run"
    detect(model, root / "list.json", out, calibration=root / "calib", fpr=0.1, **FAST)
    (out / "b_heatmap.nii.gz").write_bytes(b"damaged")
    again = detect(model, root / "list.json", out, calibration=root / "calib", fpr=0.1, **FAST)
    assert "(2 complete from an earlier run)" in again.summary  # a and c; b is redone
    assert_same_results(out, reference)
    changed = detect(model, root / "list.json", out, calibration=root / "calib", fpr=0.1, **{**FAST, "steps": 1})
    assert "earlier run" not in changed.summary  # other settings: nothing is reused


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_two_cpu_ranks_give_the_single_process_results(dataset, tmp_path):
    root, model, reference = dataset
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medidiff.cli", *_args(root, model, out)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # rank 0 exits 3 (some cases failed); torchrun says 1
    assert_same_results(out, reference)
    records = {p.stem: json.loads(p.read_text()) for p in (out / STATE_DIR / "cases").glob("*.json")}
    assert set(records) == {*GOOD, *BROKEN}  # one record per case, written by the one rank that did it
    assert {r["rank"] for r in records.values()} == {0, 1}
    calibration = [json.loads(p.read_text())["rank"] for p in (out / STATE_DIR / "calibration").glob("*.json")]
    assert sorted(calibration) == [0, 1]  # calibration scans shared out too; one threshold
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"


def test_shards_partition_the_cases():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items and all(len(p) in (3, 4) for p in parts)


def test_the_lock_names_a_live_holder_and_takes_over_a_dead_ones(tmp_path, caplog):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for pid in (live.pid, dead.pid):
            import socket

            (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                          "start": "then", "command": "medidiff detect"}))
            if pid == live.pid:
                with pytest.raises(DataError, match=f"another run is writing into this folder: PID {pid}"):
                    RunLock(tmp_path).acquire()
                continue
            with RunLock(tmp_path), RunLock(tmp_path):  # re-entrant within a process
                assert lock_holder(tmp_path)["pid"] == os.getpid()
            assert "stale lock" in caplog.text and not (tmp_path / LOCK_NAME).exists()
    finally:
        live.kill()
        live.wait()
