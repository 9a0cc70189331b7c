"""One case segmented: an ensemble of masks on the scan's own grid, fused, with its uncertainty and metrics.

``analyse`` prepares the case as the model's training data were (``medidiff.cases.prepare``: RAS, the
model's spacing, intensities matched to the training data's), samples the ensemble
(``medidiff.segment.sample``) slice by slice for a 2D model (``medidiff.cases.slicewise``; slices with
too little foreground are background), moves every member's soft mask back onto the scan's grid
(``medidiff.cases.restore``) and there fuses them (``medidiff.segment.fusion``) and computes the
uncertainty maps (``medidiff.segment.uncertainty``). ``case_metrics`` scores it against the case's label
and annotations (``medidiff.metrics``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from medidiff import metrics
from medidiff.cases import Case, Prepared, plain, prepare, restore, slicewise
from medidiff.errors import ModelError
from medidiff.modelinfo import ModelInfo

from . import uncertainty as unc
from .config import SegmentSection
from .fusion import channels_for, fuse, probabilities_to_labels, unit_to_probabilities
from .sample import members_nfe, sample_members

__all__ = ["CaseSegmentation", "analyse", "case_metrics", "num_classes"]


@dataclass
class CaseSegmentation:
    """One case segmented, on the case's own grid.

    Attributes:
        prepared: the case as the model saw it.
        members: every member's class probabilities ``(N, C, X, Y, Z)`` (``C = 1``: foreground).
        member_labels: every member's labels ``(N, 1, X, Y, Z)``.
        probability: the fused soft map ``(C, X, Y, Z)``.
        labels: the fused labels ``(1, X, Y, Z)`` (int64).
        uncertainty: the chosen uncertainty map ``(1 or C, X, Y, Z)``.
        score: the case-level uncertainty (mean over the members' foreground union).
        nfe: network evaluations spent on the case.
        n_slices: slices segmented (1 for a 3D model).
        time_s: seconds spent on the case.
    """

    prepared: Prepared
    members: torch.Tensor
    member_labels: torch.Tensor
    probability: torch.Tensor
    labels: torch.Tensor
    uncertainty: torch.Tensor
    score: float
    nfe: int
    n_slices: int
    time_s: float

    @property
    def case(self) -> Case:
        return self.prepared.case


def num_classes(info: ModelInfo, where=None) -> int:
    """Classes (background included) a segmentation model generates.

    Raises:
        ModelError: the model records no labels (it is not a segmentation model).
    """
    if info.data_prep.labels is None:
        raise ModelError("this model records no labels: it is not a segmentation model", where=where,
                         fix="use a model trained with data.labels (e.g. recipes/seg_lesion_2d.yaml).")
    return len(info.data_prep.labels.classes)


def _uncertainty_map(p: torch.Tensor, name: str, per_class: bool) -> torch.Tensor:
    if name == "variance":
        return unc.variance(p)
    return getattr(unc, name)(p, per_class=per_class)


def analyse(denoiser, info: ModelInfo, case: Case, options: SegmentSection, *, seed: int = 0,
            bf16: bool = True, region: torch.Tensor | None = None) -> CaseSegmentation:
    """Segment one case with an ensemble and map everything back onto its grid.

    Args:
        denoiser: the conditional mask denoiser (``medidiff.weights.load_denoiser``).
        info: its ``ModelInfo`` (``data_prep`` with ``labels``).
        case: the case.
        options: the ``segment`` section.
        seed: base seed of the members.
        bf16: evaluate the network under bf16 autocast where the device supports it.
        region: a mask on the case's grid ``(1, X, Y, Z)``: a 2D model segments only the slices it reaches
            (the rest is background), while the whole scan still sets the preparation (intensities, centring)
            as in training. ``None``: every slice with foreground.

    Returns:
        The ``CaseSegmentation``.

    Raises:
        DataError: the case cannot be prepared (no foreground, NaNs, a flat foreground).
        ModelError: the model is not a segmentation model.
    """
    start = time.perf_counter()
    k = num_classes(info)
    c = channels_for(k)
    o = options.sampling
    dims, prep = info.spatial_dims, info.data_prep
    axis = 2 if prep.slicing_axis is None else prep.slicing_axis
    extra = None if region is None else {"region": plain(region).float()}
    prepared = prepare(case, prep, spatial_dims=dims, intensity=options.intensity, extra=extra)
    fg = prepared.foreground
    if region is not None and dims == 2:
        reached = prepared.extra["region"].movedim(1 + axis, 1).flatten(2).amax(2) > 0.5  # (1, S)
        shape = [1] * fg.dim()
        shape[1 + axis] = -1
        fg = fg * reached.reshape(shape).float()
    device = next(denoiser.parameters()).device

    def segment(stack: torch.Tensor, _fg: torch.Tensor) -> list[torch.Tensor]:
        m = sample_members(denoiser, stack.to(device), o, channels=c, seed=seed, bf16=bf16,
                           progress=options.progress and stack.shape[0] > 1)
        p = unit_to_probabilities(m.cpu(), members=True)  # (N, S, C, ...)
        return [p.movedim(0, 1).flatten(1, 2)]  # (S, N * C, ...)

    x = plain(prepared.image).float()
    results, n = slicewise(segment, x, fg, spatial_dims=dims, axis=axis,
                           min_foreground=options.min_foreground, fills=(0.0,))
    on_model = results[0] if n else torch.zeros((o.members * c, *x.shape[1:]))
    members = restore(on_model, prepared).clamp(0.0, 1.0)  # bilinear; 0 outside the model's field of view
    members = members.reshape(o.members, c, *members.shape[1:])
    if c > 1:  # background where the members' classes do not reach (skipped slices, outside the field of view)
        members[:, 0] += (1.0 - members.sum(dim=1)).clamp_min(0.0)
    p = members[:, None]  # (N, 1, C, X, Y, Z): one case
    labels, probability = fuse(p, options.fusion, options.threshold)
    u = _uncertainty_map(p, options.uncertainty, options.per_class)[0].float()
    member_labels = torch.stack([probabilities_to_labels(m, options.threshold)[0] for m in p])
    region = (member_labels > 0).any(dim=0)
    score = float(unc.case_uncertainty(u[None], region[None])[0])
    return CaseSegmentation(prepared=prepared, members=members, member_labels=member_labels,
                            probability=probability[0].float(), labels=labels[0], uncertainty=u, score=score,
                            nfe=members_nfe(o) * n, n_slices=n, time_s=time.perf_counter() - start)


def _spacing(image) -> list[float]:
    from medidiff.outputs import affine_of

    return [float(v) for v in np.linalg.norm(affine_of(image)[:3, :3], axis=0)]


def case_metrics(r: CaseSegmentation, target: torch.Tensor, annotations: list[torch.Tensor] | None = None,
                 n_classes: int = 2, region: torch.Tensor | None = None) -> dict[str, float]:
    """Dice, HD95 (mm), ECE and uncertainty-error AUROC of one case, and GED with several annotations.

    ECE and the AUROC count the voxels of the case's foreground; GED (Kohl et al. 2018) compares the members'
    labels with the annotations (``1 - IoU`` distances) over the voxels any of them marks or the foreground.

    Args:
        r: the case segmented.
        target: reference labels ``(1, X, Y, Z)`` on the case's grid.
        annotations: every annotation of the case (the reference among them), ``(1, X, Y, Z)`` each.
        n_classes: classes, background included.
        region: a mask ``(1, X, Y, Z)`` on the case's grid that limits ECE, the AUROC and GED (with the
            foreground) to where the case was segmented (``analyse``'s ``region``).

    Returns:
        ``{"dice", "hd95", "ece", "uncertainty_error_auroc"}`` and ``"ged"`` with two or more annotations.
    """
    y = target.round().long()[None]
    pred = r.labels[None]
    fg = r.prepared.input_foreground[None] > 0.5
    if region is not None:
        fg = fg & (plain(region)[None] > 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = metrics.segmentation_metrics(pred, y, spacing=_spacing(r.case.image), num_classes=n_classes)
    out["ece"] = metrics.expected_calibration_error(r.probability[None], y, mask=fg)
    out["uncertainty_error_auroc"] = metrics.uncertainty_error_auroc(r.uncertainty.sum(0, keepdim=True)[None],
                                                                     pred, y, mask=fg)
    if annotations is not None and len(annotations) >= 2:
        a = torch.stack([t.round().long() for t in annotations])  # (M, 1, X, Y, Z)
        region = fg[0] | (r.member_labels > 0).any(dim=0) | (a > 0).any(dim=0)
        out["ged"] = metrics.generalized_energy_distance(r.member_labels[:, region], a[:, region], n_classes)
    return out
