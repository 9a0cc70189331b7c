"""Model weights on disk: ``model.safetensors`` with ``model.json`` beside it.

The JSON is one ``medidiff.modelinfo.ModelInfo``: everything needed to rebuild the denoiser without the
recipe (the network config, the process config, the parametrisation) and how its training data were
prepared (``data_prep``), which every task repeats on new data.

Weights files are untrusted input. They are read with safetensors only, whatever their extension: a
file that is a Python pickle or a ``torch.save`` archive (``.pt``, ``.pth``, ``.ckpt``, or renamed
``.safetensors``) is refused before any of it is parsed, since unpickling can run arbitrary code. When a
run manifest lies beside the weights (``manifest.json`` of the training run, or ``<stem>.manifest.json``)
or a ``<file>.sha256``, the file's SHA-256 must match it.
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

__all__ = ["save_model", "model_paths", "load_denoiser", "load_checked", "load_autoencoder", "load_meta",
           "check_weights_file",
           "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT"]

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


def model_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights file, model.json)`` of a weights folder or a ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS_NAME, path / CONFIG_NAME
    return path, path.with_suffix(".json")


_PICKLE_FIX = ("medidiff never unpickles weights (a pickle can run any code). If you trust its source, load it "
               "in PyTorch yourself and save the state_dict with safetensors (safetensors.torch.save_file) and "
               "its model.json; otherwise discard it.")


def _not_safetensors(path: Path) -> str | None:
    """Why a file is not a safetensors file (a pickle, a zip archive...), or ``None`` when it looks like one."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"is a Python pickle (protocol {head[1]}), not safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "is a zip archive (torch.save's format, which holds a pickle), not safetensors"
    if len(head) < 9:
        return f"is too short ({len(head)} bytes) to be a safetensors file"
    size = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{" or size < 2 or 8 + size > path.stat().st_size:
        return "is not a safetensors file (no safetensors header; it may be a pickle or a legacy torch file)"
    return None


def _expected_digest(weights: Path) -> tuple[str, Path] | None:
    """The SHA-256 recorded for ``weights`` beside it, and where, or ``None`` when nothing records it."""
    sidecar = weights.with_name(weights.name + ".sha256")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").split()
        return (text[0].lower() if text else "", sidecar)
    for manifest in (weights.with_name("manifest.json"), weights.with_name(weights.stem + ".manifest.json")):
        try:
            outputs = json.loads(manifest.read_text(encoding="utf-8")).get("outputs") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(outputs, dict):
            continue
        digest = outputs.get(weights.name)
        candidates = [v for k, v in outputs.items() if str(k).endswith(".safetensors")]
        if digest is None and manifest.name != "manifest.json" and len(candidates) == 1:
            digest = candidates[0]  # a run's model.safetensors, renamed with its manifest
        if digest is not None:
            return str(digest).lower(), manifest
    return None


def check_weights_file(path: str | Path) -> str:
    """Check an untrusted weights file before it is read: safetensors only, and its recorded checksum.

    Args:
        path: a weights folder or file.

    Returns:
        The file's SHA-256 (hex).

    Raises:
        ModelError: the file is missing, a pickle or other non-safetensors file (never unpickled), or it
            does not match the SHA-256 in the manifest or ``.sha256`` file beside it.
    """
    from .manifest import sha256_file

    weights, _ = model_paths(path)
    if not weights.is_file():
        raise ModelError("weights file not found", where=weights)
    reason = _not_safetensors(weights)
    if reason:
        raise ModelError(f"{reason}; it was not loaded.", where=weights, fix=_PICKLE_FIX)
    digest = sha256_file(weights)
    expected = _expected_digest(weights)
    if expected is not None and expected[0] != digest:
        raise ModelError(f"its SHA-256 {digest[:16]}... differs from {expected[0][:16]}... recorded in "
                         f"{expected[1].name}: the file was changed or damaged.", where=weights,
                         fix="get the weights again from their source (or remove the stale record).")
    return digest


def load_meta(path: str | Path) -> ModelInfo:
    """The ``model.json`` of a weights folder or ``.safetensors`` file, validated.

    Raises:
        ModelError: it is missing, not JSON, or not a valid medidiff model record (e.g. no ``data_prep``).
    """
    _, config_path = model_paths(path)
    if not config_path.is_file():
        raise ModelError("model config not found", where=config_path,
                         fix=f"keep {CONFIG_NAME} beside the weights (medidiff writes both).")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model config is not readable JSON ({e})", where=config_path) from None
    return parse_model_info(meta, config_path)


def load_denoiser(path: str | Path, device: str | torch.device = "cpu") -> tuple[Denoiser, ModelInfo]:
    """Rebuild a saved denoiser (``load_checked`` without the file's checksum)."""
    denoiser, info, _ = load_checked(path, device)
    return denoiser, info


def load_checked(path: str | Path, device: str | torch.device = "cpu") -> tuple[Denoiser, ModelInfo, str]:
    """Rebuild a saved denoiser, returning the SHA-256 its check computed (for run records).

    Args:
        path: a folder holding ``model.safetensors`` and ``model.json``, or a ``.safetensors`` file with a
            ``.json`` of the same stem beside it.
        device: where to put the network.

    The file is checked first (:func:`check_weights_file`): pickles are refused unread.

    Returns:
        ``(denoiser, info, sha256)``: the denoiser in eval mode, its ``ModelInfo`` and the weights' SHA-256.

    Raises:
        ModelError: a file is missing, corrupt, a pickle, fails its recorded checksum, or the weights do not
            fit the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .nets import build_network

    weights_path, config_path = model_paths(path)
    digest = check_weights_file(path)
    meta = load_meta(path)
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
    return denoiser.to(device).eval(), meta, digest


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo, str]:
    """A saved VQ-VAE (``model.arch: vqvae``, trained with ``training.objective: vqvae``), checked as
    :func:`load_checked` checks a denoiser.

    Returns:
        ``(vqvae, info, sha256)``: the ``medidiff.nets.VQVAE`` in eval mode with frozen weights, its ``ModelInfo``
        and the weights' SHA-256.

    Raises:
        ModelError: a file is missing, unsafe or corrupt, or the model is not a VQ-VAE.
    """
    denoiser, info, digest = load_checked(path, device)
    if info.net.get("arch") != "vqvae":
        raise ModelError(f"not a VQ-VAE (its network is {info.net.get('arch', 'diffusion_unet')})",
                         where=model_paths(path)[0],
                         fix="train one with model.arch: vqvae and training.objective: vqvae "
                             "(recipes/vqvae_brain_2d.yaml).")
    return denoiser.net.eval().requires_grad_(False), info, digest
