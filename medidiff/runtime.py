"""Where a run executes: device choice, ``torchrun``/DDP set-up, seeds and RNG states.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``python`` run is rank 0 of 1. The
same code then serves one CPU, one GPU or many: ``init_distributed`` joins the process group (gloo on a
CPU, nccl on CUDA) only when there is more than one process.

RNG states are captured as plain tensors, lists and numbers so that checkpoints load with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .core.ensemble import member_seed
from .errors import RecipeError

__all__ = [
    "Dist",
    "env_rank",
    "resolve_device",
    "init_distributed",
    "seed_everything",
    "rng_state",
    "set_rng_state",
    "derived_seed",
]


def env_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the ``torchrun`` environment (``(0, 1, 0)`` without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


_DEVICE_FIX = "use auto, cpu, cuda or cuda:N."


def resolve_device(spec: str = "auto") -> torch.device:
    """The ``torch.device`` for ``auto``, ``cpu``, ``cuda`` or ``cuda:i``.

    ``auto`` picks CUDA when present. Under ``torchrun`` a bare ``cuda`` (or ``auto`` on a GPU machine)
    becomes ``cuda:LOCAL_RANK``.

    Raises:
        RecipeError: an unknown spec, or CUDA asked for where there is none.
    """
    spec = str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RecipeError(f"device {spec!r} asked for, but PyTorch sees no CUDA GPU", where="device",
                              fix="use --device cpu (or auto), or install a CUDA build of PyTorch.")
        if spec == "cuda":
            return torch.device("cuda", env_rank()[2] % torch.cuda.device_count())
        try:
            index = int(spec.split(":", 1)[1])
        except ValueError:
            raise RecipeError(f"unknown device {spec!r}", where="device", fix=_DEVICE_FIX) from None
        if index >= torch.cuda.device_count():
            raise RecipeError(f"device {spec!r} does not exist ({torch.cuda.device_count()} GPUs)", where="device")
        return torch.device("cuda", index)
    raise RecipeError(f"unknown device {spec!r}", where="device", fix=_DEVICE_FIX)


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        started_here: whether ``init_distributed`` created the process group (and so should end it).
    """

    rank: int = 0
    world_size: int = 1
    started_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this object created it."""
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()
            self.started_here = False


def init_distributed(device: torch.device) -> Dist:
    """Join the ``torchrun`` process group when there is more than one process.

    Args:
        device: this process's device (nccl is used on CUDA, gloo otherwise).

    Returns:
        The rank and world size.
    """
    rank, world, _ = env_rank()
    if world <= 1:
        return Dist()
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), started_here=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, started_here=True)


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. ``seed, rank, step``), the same on every platform."""
    return member_seed(*parts)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and PyTorch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict:
    """The global RNG states (PyTorch CPU and CUDA, NumPy, Python) as weights-only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
