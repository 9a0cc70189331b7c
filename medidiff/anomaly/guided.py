"""The classifier of method ``guided`` (Wolleb et al. 2022): loaded once, checked against the model, as a hook.

Wolleb et al. 2022 ("Diffusion Models for Medical Anomaly Detection", sec. 3) encode a scan by DDIM to
``t_L`` and decode it by DDIM with the gradient of a classifier of noisy images, trained on scans labelled
only healthy or diseased, pushing each step toward "healthy". ``classifier_guidance`` turns the weights named
by ``HealthyOptions.classifier`` (trained with ``training.objective: classification``) into the core's
``ClassifierGuidance`` hook; ``medidiff.anomaly.healthy`` runs the inversion and the guided decoding.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch

from medidiff.core.guidance import ClassifierGuidance, NoisyClassifier
from medidiff.core.processes import Process, make_process

from .config import HealthyOptions

__all__ = ["classifier_guidance", "load_classifier", "LoadedClassifier"]


class LoadedClassifier(NamedTuple):
    """A saved noise-aware classifier: ``classifier(x_t, t) -> logits`` on its own process, its spatial dims, its
    number of classes and its weights' SHA-256 (recorded with a run as the model's is)."""

    classifier: NoisyClassifier
    spatial_dims: int
    classes: int
    sha256: str


@functools.lru_cache(maxsize=4)
def _load(path: str, stamp: tuple[int, int], device: str) -> tuple[torch.nn.Module, dict, bool, int, int, str]:
    from medidiff.weights import load_checked

    denoiser, info, digest = load_checked(path, device)
    if info.net.get("arch") != "classifier":
        arch = info.net.get("arch", "diffusion_unet")
        raise ValueError(f"classifier: {path} is not a noise-aware classifier (its network is {arch}); train one "
                         "with training.objective: classification")
    net = denoiser.net.eval().requires_grad_(False)
    return net, dict(info.process), info.scale_input, info.spatial_dims, int(info.net["num_classes"]), digest


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> LoadedClassifier:
    """A saved noise-aware classifier, read once per file version and device.

    Args:
        path: its weights (``.safetensors`` with its ``.json``, or a folder).
        device: where it runs.

    Returns:
        The ``LoadedClassifier``: ``(classifier, spatial_dims, classes, sha256)``.

    Raises:
        ModelError: the file is missing, unsafe or corrupt.
        ValueError: it is not a classifier.
    """
    from medidiff.weights import model_paths

    weights = model_paths(path)[0]
    stat = weights.stat() if weights.is_file() else None
    stamp = (stat.st_mtime_ns, stat.st_size) if stat else (0, 0)
    net, process, scale_input, dims, classes, digest = _load(str(path), stamp, str(device))
    return LoadedClassifier(NoisyClassifier(net, make_process(**process), scale_input=scale_input), dims, classes,
                            digest)


def classifier_guidance(opts: HealthyOptions, process: Process, x: torch.Tensor) -> ClassifierGuidance:
    """The hook of method ``guided``: ``opts.classifier``'s gradient toward ``opts.target_class``, scaled.

    Args:
        opts: the options (``classifier``, ``guidance_scale``, ``target_class``).
        process: the denoiser's process, which the classifier must share (its times mean the same noise).
        x: the images to reconstruct (their device and spatial dims).

    Returns:
        The ``medidiff.core.guidance.ClassifierGuidance`` hook.

    Raises:
        ValueError: the classifier is of another process or dimension, or has no class ``target_class``.
    """
    classifier, dims, classes, _ = load_classifier(opts.classifier, x.device)
    if classifier.process.config() != process.config():
        raise ValueError(f"classifier: trained on process {classifier.process.config()}, the model on "
                         f"{process.config()}; train the classifier with the model's process section")
    if dims != x.ndim - 2:
        raise ValueError(f"classifier: a {dims}D classifier cannot guide {x.ndim - 2}D images")
    if opts.target_class >= classes:
        raise ValueError(f"target_class: {opts.target_class} is not one of the classifier's {classes} classes")
    return ClassifierGuidance(classifier, process, opts.guidance_scale, opts.target_class)
