"""MONAI transform presets that prepare CT and MRI for the networks, and the map back to the input's units.

``preset(modality, ...)`` returns a ``monai.transforms.Compose`` of MONAI's own dictionary transforms:
load, channel first, orientation, spacing, intensity scaling to ``[-1, 1]`` (MRI by robust percentiles,
CT by a HU window), a foreground mask, pad/crop to the model's size and, for training, small random
augmentations. The one transform added here, ``ScaleToUnitd``, is MONAI's ``ScaleIntensityRange``
that also records the range it used (under ``"<key>_scaling"``), so that ``to_input_units`` can map
network outputs back to the input's units. Geometry is undone by ``medidiff.cases.restore`` (or
``Compose.inverse``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    ScaleIntensityRange,
    Spacingd,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile

from medidiff.core.utils import bcast

from .foreground import foreground

#: Suffix of the key under which ``ScaleToUnitd`` records its range: ``"image" -> "image_scaling"``.
SCALING_SUFFIX = "_scaling"


class ScaleToUnitd(MapTransform):
    """Linear map of intensities ``[a_min, a_max] -> [b_min, b_max]`` that records the range it used.

    ``a_min, a_max`` are either a fixed window (e.g. HU) or the image's ``percentiles``, computed by
    MONAI's ``percentile`` over all voxels and channels; the map itself is MONAI's ``ScaleIntensityRange``.
    The range is stored as ``data[key + "_scaling"] = {"a_min", "a_max", "b_min", "b_max"}`` for
    :func:`to_input_units`.

    Args:
        keys: image keys.
        window: fixed ``(a_min, a_max)`` in input units, or ``None``.
        percentiles: ``(lower, upper)`` percentiles in ``[0, 100]`` when ``window`` is ``None``.
        b_min: output value of ``a_min``.
        b_max: output value of ``a_max``.
        clip: clip the output to ``[b_min, b_max]``.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        window: Sequence[float] | None = None,
        percentiles: Sequence[float] = (0.5, 99.5),
        b_min: float = -1.0,
        b_max: float = 1.0,
        clip: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if window is None and not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {percentiles}")
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        self.b_min, self.b_max, self.clip = float(b_min), float(b_max), clip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if self.window is not None:
                a_min, a_max = self.window
            else:
                a_min, a_max = (float(percentile(img, q)) for q in self.percentiles)
            if a_max <= a_min:  # a constant image: keep it constant at b_min
                a_max = a_min + 1.0
            d[key] = ScaleIntensityRange(a_min, a_max, self.b_min, self.b_max, clip=self.clip)(img)
            d[f"{key}{SCALING_SUFFIX}"] = {"a_min": a_min, "a_max": a_max, "b_min": self.b_min, "b_max": self.b_max}
        return d


class Foregroundd(MapTransform):
    """The foreground mask of ``source`` under ``key`` (``medidiff.data.foreground.foreground``: the one rule)."""

    def __init__(self, source: str, key: str):
        super().__init__([source])
        self.source, self.key = source, key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = foreground(d[self.source])
        image = d[self.source]
        d[self.key] = type(image)(mask, meta=image.meta) if hasattr(image, "meta") else mask
        return d


def to_input_units(x: torch.Tensor, params: Mapping[str, Any], difference: bool = False) -> torch.Tensor:
    """Map network-scale values back to the input's units (the inverse of ``ScaleToUnitd``).

    Args:
        x: values on the network's scale, ``(B, C, *spatial)`` or ``(C, *spatial)``.
        params: the recorded range ``{"a_min", "a_max", "b_min", "b_max"}``: numbers for one image, or
            ``(B,)`` tensors after a DataLoader collated a batch.
        difference: ``x`` is a difference of two images (e.g. an anomaly map): scale only, no offset.

    Returns:
        ``x`` in input units (e.g. HU, or the scanner's MRI units). Values clipped by a CT window do not
        come back.
    """
    def value(name: str) -> torch.Tensor:
        v = torch.as_tensor(params[name], dtype=x.dtype, device=x.device)
        return bcast(v, x) if v.ndim == 1 and x.ndim > 1 and v.shape[0] == x.shape[0] else v

    scale = (value("a_max") - value("a_min")) / (value("b_max") - value("b_min"))
    if difference:
        return x * scale
    return (x - value("b_min")) * scale + value("a_min")


def foreground_crop(keys: Sequence[str], source_key: str, spatial_size: Sequence[int]) -> CropForegroundd:
    """``CropForegroundd`` to the bounding box of ``source_key``, except along axes sized -1 (kept whole).

    Followed by a centred pad/crop, this puts the foreground in the middle of the network's grid
    wherever it lies in the scan's field of view; a 2D model's slicing axis (-1) keeps every slice.
    """
    whole = 1 << 30  # a margin beyond any image: with allow_smaller, the axis is not cropped
    margin = [whole if int(s) == -1 else 0 for s in spatial_size]
    return CropForegroundd(list(keys), source_key=source_key, margin=margin, allow_smaller=True)


def preset(
    modality: str = "mri",
    *,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
    axcodes: str | None = "RAS",
    hu_window: Sequence[float] = (-1000.0, 1000.0),
    percentiles: Sequence[float] = (0.5, 99.5),
    keys: Sequence[str] = ("image",),
    label_key: str | None = None,
    train: bool = False,
    foreground: bool = True,
    foreground_key: str = "foreground",
    load: bool = True,
    elastic: bool = False,
    flip: bool = False,
) -> Compose:
    """A MONAI ``Compose`` preparing CT or MRI for a network on a fixed grid in ``[-1, 1]``.

    Steps: ``LoadImaged`` (with channel first; skipped if ``load=False`` for data already read as
    ``(C, *spatial)``) -> ``Orientationd(axcodes)`` -> ``Spacingd(pixdim)`` -> ``ScaleToUnitd`` (MRI:
    ``percentiles`` -> ``[-1, 1]``, unclipped; CT: ``hu_window`` -> ``[-1, 1]``, clipped) -> foreground
    mask under ``foreground_key`` (``medidiff.data.foreground``) -> with the
    mask, ``CropForegroundd`` to its bounding box (which centres it on the grid) ->
    ``ResizeWithPadOrCropd(spatial_size)`` (images padded with -1, masks with 0) -> for training:
    ``RandAffined`` (rotation up to 0.1 rad, scale 5 %, shift up to 4 voxels), optional ``RandFlipd``
    on the first axis (left-right for RAS) and elastic deformation, ``RandScaleIntensityd`` and
    ``RandShiftIntensityd`` (5 %) -> ``EnsureTyped``.

    Args:
        modality: ``"mri"`` or ``"ct"``.
        spatial_size: the network's grid; its length (2 or 3) sets the spatial dimensions.
        pixdim: voxel size in mm to resample to; ``None`` keeps the input's spacing.
        axcodes: orientation (``"RAS"``; its first two letters for 2D); ``None`` keeps the input's.
        hu_window: CT window ``(low, high)`` in HU mapped to ``[-1, 1]``.
        percentiles: MRI percentiles mapped to ``[-1, 1]``.
        keys: image keys.
        label_key: a label/mask key resampled with nearest neighbours (optional).
        train: add random augmentations.
        foreground: add a foreground mask under ``foreground_key``.
        foreground_key: its key.
        load: start by loading file paths with ``LoadImaged``.
        elastic: add a small random elastic deformation (training only).
        flip: add random flips along the first spatial axis (training only).

    Returns:
        The ``Compose``. Each output dict also holds ``"<key>_scaling"`` for :func:`to_input_units`.
    """
    modality = modality.lower()
    if modality not in ("mri", "ct"):
        raise ValueError(f"modality must be 'mri' or 'ct', got {modality!r}")
    ndim = len(spatial_size)
    if ndim not in (2, 3):
        raise ValueError(f"spatial_size must have 2 or 3 entries, got {spatial_size}")
    keys = list(keys)
    labels = [label_key] if label_key else []
    masks = labels + ([foreground_key] if foreground else [])
    spatial_keys = keys + masks
    steps: list = []
    if load:
        steps.append(LoadImaged(keys + labels, ensure_channel_first=True, image_only=True))
    if axcodes:
        steps.append(Orientationd(keys + labels, axcodes=axcodes[:ndim], labels=None))
    if pixdim is not None:
        steps.append(Spacingd(keys + labels, pixdim=tuple(pixdim)[:ndim],
                              mode=["bilinear"] * len(keys) + ["nearest"] * len(labels)))
    if modality == "ct":
        steps.append(ScaleToUnitd(keys, window=hu_window, clip=True))
    else:
        steps.append(ScaleToUnitd(keys, percentiles=percentiles, clip=False))
    if foreground:
        steps.append(Foregroundd(keys[0], foreground_key))
        # centre the foreground's bounding box on the grid, as detection does for new scans
        steps.append(foreground_crop(spatial_keys, foreground_key, spatial_size))
    steps.append(ResizeWithPadOrCropd(keys, spatial_size, mode="constant", value=-1.0))
    if masks:
        steps.append(ResizeWithPadOrCropd(masks, spatial_size, mode="constant", value=0.0))
    if train:
        interp = ["bilinear"] * len(keys) + ["nearest"] * len(masks)
        steps.append(RandAffined(
            spatial_keys, prob=0.8, rotate_range=(0.1,) if ndim == 2 else (0.1, 0.1, 0.1),
            scale_range=(0.05,) * ndim, translate_range=(4,) * ndim, mode=interp, padding_mode="border",
        ))
        if flip:
            steps.append(RandFlipd(spatial_keys, prob=0.5, spatial_axis=0))
        if elastic:
            elastic_cls = Rand2DElasticd if ndim == 2 else Rand3DElasticd
            extra = {"spacing": (16, 16)} if ndim == 2 else {"sigma_range": (5, 7)}
            steps.append(elastic_cls(spatial_keys, prob=0.3, magnitude_range=(1, 2), mode=interp,
                                     padding_mode="border", **extra))
        steps += [RandScaleIntensityd(keys, factors=0.05, prob=0.5), RandShiftIntensityd(keys, offsets=0.05, prob=0.5)]
    steps.append(EnsureTyped(spatial_keys, dtype=torch.float32))
    return Compose(steps)


#: Foreground quantile levels at which a new scan's intensities are matched to the training data's
#: (``matched_range``): the middle of the distribution, so lesions in its tails barely move the fit.
MATCH_LEVELS = tuple(round(0.05 * k, 2) for k in range(1, 19))  # 0.05 ... 0.90


def unit_range(low: float, high: float) -> dict[str, float]:
    """The record of the linear map taking ``[low, high]`` (input units) to ``[-1, 1]``."""
    return {"a_min": float(low), "a_max": float(high), "b_min": -1.0, "b_max": 1.0}


def _foreground_values(volume: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The foreground voxels of a volume (all voxels above its minimum without a mask), at most 4 M of them."""
    v = torch.as_tensor(volume).float().flatten()
    m = v > v.min() if mask is None else torch.as_tensor(mask).bool().flatten()
    fg = v[m] if bool(m.any()) else v
    if fg.numel() > 4_000_000:  # quantile has an input size limit; a strided subset gives the same range
        fg = fg[:: fg.numel() // 4_000_000 + 1]
    return fg


def foreground_range(volume: torch.Tensor, mask: torch.Tensor | None = None,
                     percentiles: tuple[float, float] = (0.5, 99.5)) -> dict[str, float]:
    """The intensity range that maps a volume to ``[-1, 1]``: robust percentiles of its foreground voxels.

    Training and detection both call this, so a model sees every input scaled the same way.

    Args:
        volume: the image, any shape.
        mask: foreground voxels (e.g. the brain); ``None`` uses the voxels above the volume's minimum.
        percentiles: lower and upper percentiles mapped to -1 and 1.

    Returns:
        ``{"a_min", "a_max", "b_min": -1.0, "b_max": 1.0}``, the record ``to_input_units`` inverts.
    """
    fg = _foreground_values(volume, mask)
    lo, hi = (float(torch.quantile(fg, p / 100)) for p in percentiles)
    return unit_range(lo, max(hi, lo + 1e-6))


def foreground_quantiles(volumes: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None = None,
                         levels: Sequence[float] = MATCH_LEVELS) -> list[float]:
    """Quantiles of the foreground voxels pooled over volumes (the training data's, on the network scale).

    Saved with a model (``data_prep.intensity.reference``) for ``matched_range``.
    """
    masks = list(masks) if masks is not None else [None] * len(volumes)
    share = -(-4_000_000 // max(len(volumes), 1))  # each volume contributes at most its share of 4 M values
    parts = []
    for volume, mask in zip(volumes, masks):
        values = _foreground_values(volume, mask)
        parts.append(values[:: values.numel() // share + 1].clone())  # a copy: the full set is freed
    fg = torch.cat(parts)
    return [round(float(q), 6) for q in torch.quantile(fg, torch.tensor(list(levels), dtype=fg.dtype))]


def matched_range(volume: torch.Tensor, mask: torch.Tensor | None, reference: Sequence[float],
                  levels: Sequence[float] = MATCH_LEVELS) -> dict[str, float]:
    """The linear intensity map under which a scan's foreground quantiles best match the training data's.

    Percentile scaling (``foreground_range``) lets bright or dark lesions that fill the scan's top or
    bottom percentile set its range, which dims or brightens all healthy tissue. This fits
    ``y = a x + b`` by least squares from the scan's foreground quantiles at ``levels`` to
    ``reference`` (the training foreground's quantiles at the same levels, on the network scale), so a
    few percent of lesion voxels barely move it. The contrast between tissues is kept (the map is linear).

    Args:
        volume: the scan, any shape (intensities in its own units).
        mask: its foreground (``None``: voxels above the minimum).
        reference: the training data's foreground quantiles (``foreground_quantiles``).
        levels: the quantile levels of ``reference``.

    Returns:
        The ``{"a_min", "a_max", "b_min": -1.0, "b_max": 1.0}`` record of the map.

    Raises:
        ValueError: lengths differ, or the scan's foreground is flat (one value over the levels).
    """
    if len(reference) != len(levels):
        raise ValueError(f"{len(reference)} reference quantiles for {len(levels)} levels")
    fg = _foreground_values(volume, mask).double()
    q = torch.quantile(fg, torch.tensor(list(levels), dtype=fg.dtype))
    ref = torch.tensor([float(r) for r in reference], dtype=fg.dtype)
    qc = q - q.mean()
    denominator = float((qc * qc).sum())
    slope = float((qc * (ref - ref.mean())).sum()) / denominator if denominator > 0 else 0.0
    if not slope > 0:
        raise ValueError("the scan's foreground is flat: its quantiles do not differ")
    offset = float(ref.mean()) - slope * float(q.mean())
    return unit_range((-1.0 - offset) / slope, (1.0 - offset) / slope)


def scale_to_unit(x: torch.Tensor, params: Mapping[str, Any], *, clip: bool = True) -> torch.Tensor:
    """Map intensities to the network scale with a recorded range (the inverse of ``to_input_units``).

    ``clip`` limits the result to ``[b_min, b_max]``; without it, voxels beyond the range (a lesion
    brighter than any healthy tissue) keep their distance from it.
    """
    a0, a1, b0, b1 = (float(params[k]) for k in ("a_min", "a_max", "b_min", "b_max"))
    y = (x - a0) / (a1 - a0) * (b1 - b0) + b0
    return y.clamp(b0, b1) if clip else y
