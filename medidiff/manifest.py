"""The run manifest: what produced a run's outputs (versions, device, seed, recipe hash, checksums, times).

``manifest.json`` sits in every run's output folder beside the resolved ``recipe.yaml``. ``environment()``
also feeds ``medidiff info``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import platform
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import medidiff

from .outputs import write_json

__all__ = ["environment", "optional_packages", "now", "sha256_file", "Manifest", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"

#: Optional packages worth reporting: DICOM decoders and extras.
OPTIONAL = ("pylibjpeg", "gdcm", "nilearn", "opensimplex")


def now() -> str:
    """The current UTC time in ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file at ``path``, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def optional_packages() -> dict[str, bool]:
    """Whether each optional package (DICOM decoders pylibjpeg and gdcm, extras) is importable."""
    return {name: importlib.util.find_spec(name) is not None for name in OPTIONAL}


def environment() -> dict[str, Any]:
    """Versions of medidiff, Python, PyTorch and MONAI, and the devices PyTorch sees."""
    import monai

    cuda = torch.cuda.is_available()
    return {
        "medidiff": medidiff.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "executable": sys.executable,
    }


class Manifest:
    """Collects a run's provenance and writes it to ``manifest.json`` (atomically, each time).

    Args:
        out_dir: the run's output folder.
        recipe_text: the resolved recipe as saved in ``recipe.yaml`` (its SHA-256 is recorded).
        seed: the run's seed (None: the run draws no random numbers; no ``seed`` entry).
        device: the device it runs on.
        inputs: input files whose SHA-256 should be recorded.
        **fields: further JSON-able entries (task, world size...).
    """

    def __init__(self, out_dir: str | Path, *, recipe_text: str, seed: int | None, device: str,
                 inputs: Iterable[str | Path] = (), **fields: Any):
        self.path = Path(out_dir) / MANIFEST_NAME
        self.data: dict[str, Any] = {
            **environment(),
            "device": str(device),
            "seed": None if seed is None else int(seed),
            "recipe_sha256": hashlib.sha256(recipe_text.encode("utf-8")).hexdigest(),
            "start_time": now(),
            "end_time": None,
            "inputs": {str(p): sha256_file(p) for p in inputs},
            "outputs": {},
            **fields,
        }
        if seed is None:
            del self.data["seed"]

    def add_outputs(self, paths: Iterable[str | Path]) -> None:
        """Record the SHA-256 of written files, keyed by their path relative to the output folder."""
        for p in paths:
            p = Path(p)
            try:
                key = str(p.relative_to(self.path.parent))
            except ValueError:
                key = str(p)
            self.data["outputs"][key] = sha256_file(p)

    def update(self, **fields: Any) -> None:
        self.data.update(fields)

    def write(self, *, finished: bool = False) -> Path:
        """Write ``manifest.json``; ``finished`` stamps the end time."""
        if finished:
            self.data["end_time"] = now()
        return write_json(self.data, self.path)
