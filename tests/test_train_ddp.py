"""DDP: one recipe under ``torchrun --nproc_per_node 2`` on a CPU (gloo) ends with the same weights on both ranks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch.distributed as dist
import yaml
from train_helpers import subprocess_env, tiny_recipe

from medidiff.weights import load_denoiser

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")


def test_torchrun_two_cpu_ranks_agree(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(training={"steps": 6, "checkpoint_every": 3, "val_every": 3},
                                                 device="auto")))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medidiff.cli", "train", str(recipe), "--out", str(out)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "finished" and manifest["device"] == "cpu"
    sums = manifest["replica_checksums"]  # all-gathered from both ranks at the end of training
    assert len(sums) == 2 and sums[0] == sums[1]
    # rank 0 alone wrote the files: one log, one set of checkpoints (6 steps / 3 = 2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003.pt", "step_0000006.pt"]
    assert (out / "train.log").read_text().count("checkpoint ") == 2
    denoiser, meta = load_denoiser(out)
    assert meta.step == 6
