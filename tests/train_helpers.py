"""Tiny recipes and settings shared by the training, recipe and command-line tests."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: A U-Net small enough for a CPU test: two levels, no attention but the middle block's.
TINY_MODEL = {"channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 8, "num_head_channels": 8}


def tiny_recipe(dims: int = 2, **sections) -> dict:
    """A raw recipe dict for a tiny synthetic run; ``sections`` are merged into the defaults."""
    raw = {
        "seed": 3,
        "device": "cpu",
        "data": {"spatial_dims": dims, "size": [16, 16] if dims == 2 else [8, 8, 8], "num_samples": 24},
        "model": dict(TINY_MODEL),
        "process": {"name": "ddpm", "n_steps": 100},
        "training": {"steps": 12, "batch_size": 4, "lr": 1e-3, "lr_warmup_steps": 3, "log_every": 4,
                     "val_every": 6, "checkpoint_every": 4, "tensorboard": False, "progress": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(copy.deepcopy(values))
        else:
            raw[name] = values
    return raw


def subprocess_env() -> dict:
    """Environment for medidiff subprocesses: one thread each (the test machines are small and shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


MEDIDIFF = [sys.executable, "-m", "medidiff.cli"]


@pytest.fixture
def single_thread():
    """Run the test's own training on one thread (oversubscribed threads are many times slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
