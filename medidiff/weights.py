"""Model weights on disk: ``model.safetensors`` with ``model.json`` beside it.

The JSON is one ``medidiff.modelinfo.ModelInfo``: everything needed to rebuild the denoiser without the
recipe (the network config, the process config, the parametrisation) and how its training data were
prepared (``data_prep``), which every task repeats on new data. Weights are read with safetensors
only: nothing is ever unpickled.
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
from .modelinfo import FORMAT, ModelInfo, parse_model_info
from .outputs import atomic_write, write_json

__all__ = ["save_model", "load_denoiser", "load_meta", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"


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
        extra: further entries of ``ModelInfo`` (``data_prep`` is required; ``noise``, ``step``...); keys
            that are not ``ModelInfo`` fields are kept under ``extra``.
        scale_input: the ``Denoiser`` input scaling the network was trained with.

    Returns:
        The path of the weights file.

    Raises:
        ModelError: the record is invalid (e.g. no ``data_prep``).
    """
    from safetensors.torch import save

    config = getattr(net, "config", None)
    if not isinstance(config, dict):
        raise ModelError(f"cannot save a {type(net).__name__} without a build config", fix="build it with build_unet.")
    directory = Path(directory)
    fields = dict(extra or {})
    others = {k: fields.pop(k) for k in list(fields) if k not in ModelInfo.model_fields}
    raw = {"format": FORMAT, "net": config, "process": process.config(), "prediction": prediction,
           "scale_input": bool(scale_input), **fields}
    if others:
        raw["extra"] = {**raw.get("extra", {}), **others}
    info = parse_model_info(raw, directory / CONFIG_NAME)
    weights = directory / WEIGHTS_NAME
    with atomic_write(weights) as tmp:
        tmp.write_bytes(save(_state_tensors(net), metadata={"format": FORMAT}))
    write_json(info.to_json(), directory / CONFIG_NAME)
    return weights


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS_NAME, path / CONFIG_NAME
    return path, path.with_suffix(".json")


def load_meta(path: str | Path) -> ModelInfo:
    """The ``model.json`` of a weights folder or ``.safetensors`` file, validated.

    Raises:
        ModelError: it is missing, not JSON, or not a valid medidiff model record (e.g. no ``data_prep``).
    """
    _, config_path = _paths(path)
    if not config_path.is_file():
        raise ModelError("model config not found", where=config_path,
                         fix=f"keep {CONFIG_NAME} beside the weights (medidiff writes both).")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model config is not readable JSON ({e})", where=config_path) from None
    return parse_model_info(meta, config_path)


def load_denoiser(path: str | Path, device: str | torch.device = "cpu") -> tuple[Denoiser, ModelInfo]:
    """Rebuild a saved denoiser.

    Args:
        path: a folder holding ``model.safetensors`` and ``model.json``, or a ``.safetensors`` file with a
            ``.json`` of the same stem beside it.
        device: where to put the network.

    Returns:
        ``(denoiser, info)``: the denoiser in eval mode and its ``ModelInfo``.

    Raises:
        ModelError: a file is missing or corrupt, or the weights do not fit the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .nets import build_network

    weights_path, config_path = _paths(path)
    meta = load_meta(path)
    if not weights_path.is_file():
        raise ModelError("weights file not found", where=weights_path)
    try:
        net = build_network(**meta.net)
        process = make_process(**meta.process)
        denoiser = Denoiser(net, process, meta.prediction, scale_input=meta.scale_input)
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
