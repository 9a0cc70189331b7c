"""Fusing an ensemble of segmentations into one, and the members' conversions to and from the model's scale.

A diffusion model generates a mask as channels scaled to ``[-1, 1]``: one channel for a binary
segmentation (foreground 1, background -1), or one channel per class, one-hot, for a multi-class one
(Wolleb et al. 2022, MIDL). This module owns:

- conversions: label maps to such channels and back, and channels to probabilities;
- fusion of members ``(N, B, C, *spatial)``: the mean soft map, then a threshold (binary) or the argmax
  (multi-class); or STAPLE (Warfield et al. 2004, IEEE TMI, "Simultaneous truth and performance level
  estimation"), which weighs each member by its estimated sensitivity and specificity, from SimpleITK's
  ``STAPLEImageFilter`` (binary) and ``MultiLabelSTAPLEImageFilter`` (Rohlfing et al. 2004), installed with
  the ``staple`` extra.

Label maps are ``(B, 1, *spatial)`` integers (0 = background); probabilities ``(B, C, *spatial)`` with
``C = 1`` (foreground probability) for a binary segmentation and ``C = num_classes`` otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..arrays import to_numpy
from ..errors import MedidiffError

__all__ = [
    "channels_for",
    "labels_to_unit",
    "unit_to_probabilities",
    "unit_to_labels",
    "probabilities_to_labels",
    "mean_probability",
    "staple",
    "staple_probability",
    "fuse",
    "FUSIONS",
]

FUSIONS = ("mean", "staple")


def channels_for(num_classes: int) -> int:
    """Model channels for ``num_classes`` classes (background included): 1 when binary, else ``num_classes``."""
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be an integer >= 2, got {num_classes}")
    return 1 if num_classes == 2 else int(num_classes)


def _spatial_ok(x: torch.Tensor, what: str, lead: int) -> None:
    if x.ndim - lead not in (2, 3):
        raise ValueError(f"expected {what} with 2 or 3 spatial dims after {lead} leading axes, got {tuple(x.shape)}")


def _labels(labels: Any) -> torch.Tensor:
    y = torch.as_tensor(labels)
    _spatial_ok(y, "labels (B, 1, *spatial)", 2)
    if y.shape[1] != 1:
        raise ValueError(f"labels must have one channel (B, 1, *spatial), got {tuple(y.shape)}")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValueError("labels must be integers")
    return y.long()


def labels_to_unit(labels: Any, num_classes: int = 2) -> torch.Tensor:
    """A label map as the model's channels: one-hot scaled to ``[-1, 1]``.

    Args:
        labels: ``(B, 1, *spatial)`` integer labels in ``[0, num_classes)`` (bool for a binary mask).
        num_classes: number of classes, background included.

    Returns:
        float32 ``(B, 1, *spatial)`` (binary: foreground 1, background -1) or ``(B, num_classes, *spatial)``.
    """
    c = channels_for(num_classes)
    y = _labels(labels)
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    onehot = (y == 1) if c == 1 else torch.cat([y == k for k in range(c)], dim=1)
    return onehot.to(torch.float32) * 2.0 - 1.0


def unit_to_probabilities(x: Any, members: bool = False) -> torch.Tensor:
    """Channels in ``[-1, 1]`` (what the model generated) as probabilities.

    Each channel is mapped to ``(x + 1) / 2`` and clipped to ``[0, 1]``; with several channels they are
    then divided by their sum (a voxel where every channel is 0 gets the uniform distribution).

    Args:
        x: ``(B, C, *spatial)``, or members ``(N, B, C, *spatial)`` when ``members`` is true.
        members: ``x`` has a leading member axis.

    Returns:
        Probabilities of the same shape (float).
    """
    x = torch.as_tensor(x)
    lead = 3 if members else 2
    _spatial_ok(x, "members (N, B, C, *spatial)" if members else "channels (B, C, *spatial)", lead)
    x = x if x.is_floating_point() else x.float()
    channel = lead - 1
    q = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
    if x.shape[channel] == 1:
        return q
    total = q.sum(dim=channel, keepdim=True)
    uniform = torch.full_like(q, 1.0 / x.shape[channel])
    return torch.where(total > 0, q / total.clamp_min(torch.finfo(q.dtype).tiny), uniform)


def unit_to_labels(x: Any) -> torch.Tensor:
    """Channels in ``[-1, 1]`` as a label map: ``x > 0`` (binary) or the argmax over channels.

    Args:
        x: ``(B, C, *spatial)``.

    Returns:
        int64 labels ``(B, 1, *spatial)``.
    """
    x = torch.as_tensor(x)
    _spatial_ok(x, "channels (B, C, *spatial)", 2)
    return (x > 0).long() if x.shape[1] == 1 else x.argmax(dim=1, keepdim=True)


def probabilities_to_labels(p: Any, threshold: float = 0.5) -> torch.Tensor:
    """Probabilities as a label map: ``p >= threshold`` (binary) or the argmax over classes (ties: lowest class).

    Args:
        p: ``(B, C, *spatial)`` probabilities (``C = 1``: foreground probability).
        threshold: foreground threshold of a binary segmentation, in ``(0, 1]``.

    Returns:
        int64 labels ``(B, 1, *spatial)``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    p = torch.as_tensor(p)
    _spatial_ok(p, "probabilities (B, C, *spatial)", 2)
    return (p >= threshold).long() if p.shape[1] == 1 else p.argmax(dim=1, keepdim=True)


def _ensemble(p: Any) -> torch.Tensor:
    p = torch.as_tensor(p)
    _spatial_ok(p, "members (N, B, C, *spatial)", 3)
    if p.shape[0] < 1:
        raise ValueError("the ensemble has no members")
    return p


def mean_probability(p: Any) -> torch.Tensor:
    """The ensemble's mean soft map.

    Args:
        p: member probabilities ``(N, B, C, *spatial)``.

    Returns:
        ``(B, C, *spatial)``.
    """
    p = _ensemble(p)
    return (p if p.is_floating_point() else p.double()).mean(dim=0)


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise MedidiffError("STAPLE fusion needs SimpleITK, which is not installed.",
                            fix="pip install 'medidiff[staple]', or fuse with method 'mean'.") from e
    return sitk


def _member_labels(labels: Any) -> torch.Tensor:
    y = torch.as_tensor(labels)
    _spatial_ok(y, "member labels (N, B, 1, *spatial)", 3)
    if y.shape[2] != 1 or y.shape[0] < 1:
        raise ValueError(f"member labels must be (N, B, 1, *spatial) with N >= 1, got {tuple(y.shape)}")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValueError("member labels must be integers")
    if y.numel() and y.min() < 0:
        raise ValueError("member labels must be non-negative")
    return y.long()


def staple_probability(masks: Any, max_iterations: int = 100) -> torch.Tensor:
    """Binary STAPLE: each voxel's posterior probability of foreground given the members' masks.

    SimpleITK's ``STAPLEImageFilter`` (Warfield et al. 2004, Eqs. 12-16: EM over the true segmentation and
    each member's sensitivity and specificity). Where every member agrees on every voxel the members'
    mask is returned (STAPLE's fixed point; SimpleITK gives NaN when no member has any foreground).

    Args:
        masks: ``(N, B, 1, *spatial)`` binary masks (nonzero = foreground).
        max_iterations: EM iterations at most.

    Returns:
        float64 ``(B, 1, *spatial)`` probabilities.
    """
    m = _member_labels(masks) > 0
    sitk = _sitk()
    out = torch.empty(m.shape[1:], dtype=torch.float64)
    for b in range(m.shape[1]):
        raters = to_numpy(m[:, b, 0]).astype(np.uint8)
        if (raters == raters[:1]).all():
            out[b, 0] = torch.from_numpy(raters[0].astype(np.float64))
            continue
        f = sitk.STAPLEImageFilter()
        f.SetForegroundValue(1.0)
        f.SetMaximumIterations(int(max_iterations))
        prob = sitk.GetArrayFromImage(f.Execute([sitk.GetImageFromArray(r) for r in raters])).astype(np.float64)
        vote = raters.mean(axis=0)
        out[b, 0] = torch.from_numpy(np.where(np.isfinite(prob), prob, vote))
    return out


def staple(labels: Any, num_classes: int = 2, threshold: float = 0.5, max_iterations: int = 100) -> torch.Tensor:
    """STAPLE fusion of the members' label maps (Warfield et al. 2004; multi-label: Rohlfing et al. 2004).

    Binary: SimpleITK's ``STAPLEImageFilter`` posterior, thresholded. Multi-class: SimpleITK's
    ``MultiLabelSTAPLEImageFilter``; voxels it leaves undecided (tied posteriors) get the majority vote
    (ties: the lowest label).

    Args:
        labels: member label maps ``(N, B, 1, *spatial)``, integers in ``[0, num_classes)``.
        num_classes: number of classes, background included.
        threshold: foreground threshold of the binary posterior.
        max_iterations: EM iterations at most.

    Returns:
        int64 labels ``(B, 1, *spatial)``.
    """
    channels_for(num_classes)
    y = _member_labels(labels)
    if y.numel() and y.max() >= num_classes:
        raise ValueError(f"member labels must lie in [0, {num_classes}), got a {int(y.max())}")
    if num_classes == 2:
        return probabilities_to_labels(staple_probability(y, max_iterations), threshold)
    sitk = _sitk()
    out = torch.empty(y.shape[1:], dtype=torch.long)
    dtype = np.uint8 if num_classes < 255 else np.uint16
    for b in range(y.shape[1]):
        raters = to_numpy(y[:, b, 0]).astype(dtype)
        votes = np.stack([(raters == k).sum(axis=0) for k in range(num_classes)])
        majority = votes.argmax(axis=0)
        if (raters == raters[:1]).all():
            out[b, 0] = torch.from_numpy(raters[0].astype(np.int64))
            continue
        f = sitk.MultiLabelSTAPLEImageFilter()
        f.SetLabelForUndecidedPixels(num_classes)
        f.SetMaximumNumberOfIterations(int(max_iterations))
        fused = sitk.GetArrayFromImage(f.Execute([sitk.GetImageFromArray(r) for r in raters])).astype(np.int64)
        out[b, 0] = torch.from_numpy(np.where(fused == num_classes, majority, fused))
    return out


def fuse(p: Any, method: str = "mean", threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse an ensemble of member probabilities into one segmentation and one soft map.

    Args:
        p: member probabilities ``(N, B, C, *spatial)`` (``C = 1``: foreground probability; else class
            probabilities, one-hot for hard members).
        method: ``"mean"`` (threshold or argmax of the mean soft map) or ``"staple"`` (STAPLE over the
            members' own labels; binary: its posterior is the soft map, multi-class: the mean soft map).
        threshold: foreground threshold of a binary segmentation.

    Returns:
        ``(labels, probability)``: int64 ``(B, 1, *spatial)`` and float ``(B, C, *spatial)``.
    """
    if method not in FUSIONS:
        raise ValueError(f"method must be one of {FUSIONS}, got {method!r}")
    p = _ensemble(p)
    mean = mean_probability(p)
    if method == "mean":
        return probabilities_to_labels(mean, threshold), mean
    members = torch.stack([probabilities_to_labels(m, threshold) for m in p])
    c = p.shape[2]
    if c == 1:
        post = staple_probability(members).to(mean.dtype)
        return probabilities_to_labels(post, threshold), post
    return staple(members, num_classes=c), mean
