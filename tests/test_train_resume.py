"""Exact resume: a run stopped (or killed with SIGKILL) after a checkpoint and resumed matches an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import MEDIDIFF, single_thread, subprocess_env, tiny_recipe  # noqa: F401

from medidiff import recipes, runs
from medidiff.train import PAUSE_ENV, find_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

#: 20 training images in batches of 4: 5 batches an epoch, so the interruptions fall mid-epoch.
RAW = tiny_recipe(training={"steps": 12, "checkpoint_every": 4, "grad_accum_steps": 2, "batch_size": 2},
                  data={"num_samples": 22})


def _train(out, *overrides):
    return runs.train(recipes.parse_recipe(RAW, overrides=overrides), out)


def _assert_same_run(a, b, out_a, out_b):
    assert a.step == b.step == 12
    assert a.history["step"] == b.history["step"] == list(range(1, 13))
    torch.testing.assert_close(torch.tensor(b.history["loss"]), torch.tensor(a.history["loss"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(b.history["val_loss"]), torch.tensor(a.history["val_loss"]),
                               rtol=0, atol=1e-6)
    wa, wb = load_file(str(out_a / "model.safetensors")), load_file(str(out_b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6)
    ca, cb = find_checkpoint(out_a)[1], find_checkpoint(out_b)[1]
    for key in ca["model"]:
        torch.testing.assert_close(cb["model"][key], ca["model"][key], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(out), out
    finally:
        torch.set_num_threads(before)


def test_stop_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    whole, whole_out = uninterrupted
    first = _train(tmp_path, "training.stop_after=6")
    assert first.step == 6 and find_checkpoint(tmp_path)[0].name == "step_0000006.pt"
    resumed = _train(tmp_path, "training.resume=true")
    _assert_same_run(whole, resumed, whole_out, tmp_path)
    assert "resumed from" in (tmp_path / "train.log").read_text()


def test_resume_after_sigkill_matches_uninterrupted(tmp_path, uninterrupted):
    whole, whole_out = uninterrupted
    recipe_file = tmp_path / "recipe_in.yaml"
    recipe_file.write_text(yaml.safe_dump(RAW))
    out = tmp_path / "run"
    env = dict(subprocess_env(), **{PAUSE_ENV: "8"})
    proc = subprocess.Popen([*MEDIDIFF, "train", str(recipe_file), "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = out / "checkpoints" / "step_0000008.pt"
    deadline = time.monotonic() + 240
    try:
        while not target.exists():
            if proc.poll() is not None:
                pytest.fail(f"training ended before its checkpoint (rc {proc.returncode}): {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint at step 8 within the time limit")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert find_checkpoint(out)[1]["step"] == 8
    assert not (out / "checkpoints" / "step_0000012.pt").exists()
    resumed = runs.train(recipes.load_recipe(recipe_file, ["training.resume=true"]), out)
    _assert_same_run(whole, resumed, whole_out, out)
