"""Voxel-wise and case-level uncertainty of a segmentation ensemble.

The input is an ensemble of soft maps ``p`` of shape ``(N, B, C, *spatial)``: ``N`` members (e.g. masks
sampled by a conditional diffusion model with different seeds), ``B`` cases, and either ``C = 1``
channel holding the foreground probability of a binary segmentation, or ``C > 1`` channels holding the
class probabilities of a multi-class one (summing to one over ``C``; one-hot for hard members). Two or
three spatial dims.

Maps, all in nats (natural log) and computed per voxel:

- ``variance``: the members' variance of each class probability (population variance, at most 1/4);
- ``predictive_entropy``: ``H[mean_n p_n]``, the total uncertainty;
- ``expected_entropy``: ``mean_n H[p_n]``, the part each member states itself (aleatoric; zero for hard
  members);
- ``mutual_information``: predictive minus expected entropy, the part due to the members' disagreement
  (epistemic; zero when all members agree).

Total maps use the categorical distribution over all classes (binary: foreground and background) and
have one channel; per-class maps (``per_class=True``) use each class against the rest (binary entropy
of ``p_c``) and have ``C`` channels; for a binary segmentation both are the same.

Definitions: Gal (2016), *Uncertainty in Deep Learning*, PhD thesis, Sec. 3.3.1 (predictive entropy and
mutual information); Depeweg et al. (2018), ICML, "Decomposition of uncertainty in Bayesian deep
learning" (total = aleatoric + epistemic); used for diffusion-sampled segmentation ensembles by Wolleb
et al. (2022), MIDL, "Diffusion models for implicit image segmentation ensembles".
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "variance",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "uncertainty_maps",
    "case_uncertainty",
    "MAPS",
]

MAPS = ("variance", "predictive_entropy", "expected_entropy", "mutual_information")


def _members(p: Any) -> torch.Tensor:
    p = torch.as_tensor(p)
    if p.ndim not in (5, 6):
        raise ValueError(f"expected members (N, B, C, *spatial) with 2 or 3 spatial dims, got {tuple(p.shape)}")
    if p.shape[0] < 1:
        raise ValueError("the ensemble has no members")
    p = p.to(torch.float64) if not p.is_floating_point() else p
    if torch.isnan(p).any() or (p < -1e-6).any() or (p > 1 + 1e-6).any():
        raise ValueError("member probabilities must lie in [0, 1]")
    return p.clamp(0.0, 1.0)


def _neg_xlogx(p: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(p, p)  # 0 log 0 = 0


def _entropy(p: torch.Tensor, per_class: bool, channel: int) -> torch.Tensor:
    """Entropy of probabilities ``p`` along ``channel``: categorical (one channel kept) or one-vs-rest per class."""
    if per_class or p.shape[channel] == 1:  # binary entropy of each channel against the rest
        return _neg_xlogx(p) + _neg_xlogx(1.0 - p)
    return _neg_xlogx(p).sum(dim=channel, keepdim=True)


def variance(p: Any) -> torch.Tensor:
    """The members' variance of each class probability, per voxel.

    Args:
        p: member probabilities ``(N, B, C, *spatial)``.

    Returns:
        ``(B, C, *spatial)``: ``mean_n (p_n - mean p)^2`` (population variance; 0 when the members agree,
        1/4 for hard members split half and half).
    """
    return _members(p).var(dim=0, correction=0)


def predictive_entropy(p: Any, per_class: bool = False) -> torch.Tensor:
    """Entropy of the members' mean distribution, ``H[mean_n p_n]`` (Gal 2016, Sec. 3.3.1), in nats.

    Args:
        p: member probabilities ``(N, B, C, *spatial)``.
        per_class: one map per class (class against the rest) instead of one map over all classes.

    Returns:
        ``(B, 1, *spatial)`` (or ``(B, C, *spatial)`` per class); ``log 2`` for a 50/50 binary voxel.
    """
    return _entropy(_members(p).mean(dim=0), per_class, channel=1)


def expected_entropy(p: Any, per_class: bool = False) -> torch.Tensor:
    """The members' mean entropy, ``mean_n H[p_n]`` (Depeweg et al. 2018; the aleatoric part), in nats.

    Args:
        p: member probabilities ``(N, B, C, *spatial)``.
        per_class: one map per class (class against the rest).

    Returns:
        ``(B, 1, *spatial)`` (or ``(B, C, *spatial)``); zero when every member is hard (0 or 1).
    """
    return _entropy(_members(p), per_class, channel=2).mean(dim=0)


def mutual_information(p: Any, per_class: bool = False) -> torch.Tensor:
    """Mutual information between the prediction and the member, ``H[mean p] - mean H[p]`` (Gal 2016, Sec. 3.3.1).

    The part of the predictive entropy due to the members' disagreement; zero when all members are equal.

    Args:
        p: member probabilities ``(N, B, C, *spatial)``.
        per_class: one map per class (class against the rest).

    Returns:
        ``(B, 1, *spatial)`` (or ``(B, C, *spatial)``), non-negative.
    """
    p = _members(p)
    return (predictive_entropy(p, per_class) - expected_entropy(p, per_class)).clamp_min(0.0)


def uncertainty_maps(p: Any, per_class: bool = False) -> dict[str, torch.Tensor]:
    """Every uncertainty map of an ensemble at once.

    Args:
        p: member probabilities ``(N, B, C, *spatial)``.
        per_class: entropies per class (class against the rest) instead of over all classes.

    Returns:
        ``{"variance": (B, C, ...), "predictive_entropy", "expected_entropy", "mutual_information"}``, the
        entropies ``(B, 1, ...)`` (or ``(B, C, ...)`` per class).
    """
    p = _members(p)
    pe, ee = predictive_entropy(p, per_class), expected_entropy(p, per_class)
    return {"variance": variance(p), "predictive_entropy": pe, "expected_entropy": ee,
            "mutual_information": (pe - ee).clamp_min(0.0)}


def case_uncertainty(uncertainty: Any, region: Any = None) -> torch.Tensor:
    """A case-level uncertainty score: the mean of an uncertainty map over a region of each case.

    Averaging over the region where any member sees foreground (rather than the whole image) keeps the
    score from shrinking with the amount of confident background around a small structure.

    Args:
        uncertainty: a map ``(B, C, *spatial)`` (all channels are averaged).
        region: ``(B, 1, *spatial)`` or ``(B, C, *spatial)`` voxels that count (nonzero), e.g. the union of the
            members' foregrounds; ``None``: the whole image.

    Returns:
        ``(B,)`` float64 scores; 0 for a case whose region is empty.
    """
    u = torch.as_tensor(uncertainty).to(torch.float64)
    if u.ndim not in (4, 5):
        raise ValueError(f"expected a map of shape (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(u.shape)}")
    if region is None:
        return u.flatten(1).mean(dim=1)
    r = torch.as_tensor(region).to(device=u.device).bool()
    if r.ndim != u.ndim or r.shape[0] != u.shape[0] or r.shape[2:] != u.shape[2:] or r.shape[1] not in (1, u.shape[1]):
        raise ValueError(f"region of shape {tuple(r.shape)} does not match the map's {tuple(u.shape)}")
    w = r.expand_as(u).to(torch.float64)
    total = w.flatten(1).sum(dim=1)
    return (u * w).flatten(1).sum(dim=1) / total.clamp_min(1.0)
