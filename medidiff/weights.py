"""Model weights on disk: ``model.safetensors`` with ``model.json`` beside it.

The JSON holds everything needed to rebuild the denoiser without the recipe: the network config
(``medidiff.nets.build_unet`` keyword arguments), the process config (``make_process`` keyword
arguments), the parametrisation, and free-form extras such as the training noise and the ``data_prep``
the data went through (orientation, spacing, size, intensity normalisation, slicing axis). Weights are
read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.denoiser import Denoiser
from .core.processes import Process, make_process
from .errors import ModelError
from .io import atomic_write, write_json

__all__ = ["save_model", "load_denoiser", "load_meta", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"
#: Identifies the layout of ``model.json``; bumped when it changes incompatibly.
FORMAT = "medidiff.model/1"


def _state_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous tensors that share no memory
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}


def save_model(
    directory: str | Path,
    net: nn.Module,
    process: Process,
    prediction: str,
    extra: dict[str, Any] | None = None,
    *,
    scale_input: bool = True,
) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` (atomically, each).

    Args:
        directory: the output folder (created when missing).
        net: the network; it must carry a JSON-able ``config`` (as ``medidiff.nets.UNet`` does).
        process: the forward process it was trained with.
        prediction: its parametrisation (``eps``, ``x0``, ``v`` or ``score``).
        extra: further JSON-able entries for ``model.json`` (``noise``, ``data_prep``, ``step``...).
        scale_input: the ``Denoiser`` input scaling the network was trained with.

    Returns:
        The path of the weights file.
    """
    from safetensors.torch import save

    config = getattr(net, "config", None)
    if not isinstance(config, dict):
        raise ModelError(f"cannot save a {type(net).__name__} without a build config", fix="build it with build_unet.")
    directory = Path(directory)
    meta = {
        "format": FORMAT,
        "net": config,
        "process": process.config(),
        "prediction": prediction,
        "scale_input": bool(scale_input),
        **(extra or {}),
    }
    weights = directory / WEIGHTS_NAME
    with atomic_write(weights) as tmp:
        tmp.write_bytes(save(_state_tensors(net), metadata={"format": FORMAT}))
    write_json(meta, directory / CONFIG_NAME)
    return weights


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS_NAME, path / CONFIG_NAME
    return path, path.with_suffix(".json")


def load_meta(path: str | Path) -> dict[str, Any]:
    """The ``model.json`` of a weights folder or ``.safetensors`` file.

    Raises:
        ModelError: it is missing, not JSON, or not a medidiff model config.
    """
    _, config_path = _paths(path)
    if not config_path.is_file():
        raise ModelError("model config not found", where=config_path,
                         fix=f"keep {CONFIG_NAME} beside the weights (medidiff writes both).")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model config is not readable JSON ({e})", where=config_path) from None
    missing = [k for k in ("net", "process", "prediction") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ModelError(f"model config lacks {', '.join(missing)}; it was not written by medidiff",
                         where=config_path)
    return meta


def load_denoiser(path: str | Path, device: str | torch.device = "cpu") -> tuple[Denoiser, dict[str, Any]]:
    """Rebuild a saved denoiser.

    Args:
        path: a folder holding ``model.safetensors`` and ``model.json``, or a ``.safetensors`` file with a
            ``.json`` of the same stem beside it.
        device: where to put the network.

    Returns:
        ``(denoiser, meta)``: the denoiser in eval mode and the parsed ``model.json``.

    Raises:
        ModelError: a file is missing or corrupt, or the weights do not fit the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .nets import build_unet

    weights_path, config_path = _paths(path)
    meta = load_meta(path)
    if not weights_path.is_file():
        raise ModelError("weights file not found", where=weights_path)
    try:
        net = build_unet(**meta["net"])
        process = make_process(**meta["process"])
        denoiser = Denoiser(net, process, meta["prediction"], scale_input=bool(meta.get("scale_input", True)))
    except (TypeError, ValueError) as e:
        raise ModelError(f"model config cannot be used ({e})", where=config_path,
                         fix="check that it was written by this version of medidiff.") from None
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"weights file is corrupt or not safetensors ({e})", where=weights_path) from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ModelError(f"weights do not fit the network in {config_path.name}: {' '.join(first[:3])}",
                         where=weights_path) from None
    return denoiser.to(device).eval(), meta
