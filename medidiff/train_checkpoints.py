"""Training checkpoints: where they live, writing them atomically (keeping the newest few), finding the
newest readable one, checking that one fits the run that resumes from it, and the weights' checksum
that compares replicas.

A checkpoint is ``<out>/checkpoints/step_<step>.pt``, a ``torch.save`` of plain tensors, numbers and
lists (read back with ``weights_only=True``); what it holds is assembled by the engine (``medidiff.train``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TrainingError
from .outputs import atomic_write

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FORMAT",
    "checkpoint_paths",
    "find_checkpoint",
    "write_checkpoint",
    "check_resumable",
    "weights_checksum",
]

log = logging.getLogger("medidiff.train")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 1
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_paths(out_dir: str | Path) -> list[tuple[int, Path]]:
    """The checkpoints in ``out_dir/checkpoints`` as ``(step, path)``, newest first."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _CKPT_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def find_checkpoint(out_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint in ``out_dir/checkpoints`` and its contents (``None`` if there is none).

    Unreadable files (e.g. cut short by a crash outside ``atomic_write``) are skipped with a warning;
    the temporary files of interrupted writes never match the ``step_*.pt`` names.
    """
    for _, path in checkpoint_paths(out_dir):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped
            log.warning("skipping unreadable checkpoint %s (%s)", path, e)
    return None


def write_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` (atomically), then delete all but the newest ``keep``.

    Returns:
        The checkpoint's path.
    """
    path = Path(out_dir) / CHECKPOINT_DIR / f"step_{step:07d}.pt"
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    for _, old in checkpoint_paths(out_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def check_resumable(state: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    """Check that a checkpoint was written by the same model setup (``net_config``, ``process``...).

    Raises:
        TrainingError: an entry of ``expected`` differs from the checkpoint's.
    """
    for key, value in expected.items():
        if state.get(key) != value:
            raise TrainingError(
                f"cannot resume: the checkpoint's {key} ({state.get(key)}) differs from the recipe's ({value})",
                where=path, fix="restore the recipe the run was started with, or train into a new --out folder.")


def weights_checksum(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes), to compare replicas."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
