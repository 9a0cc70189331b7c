"""Cases: a scan with what belongs to it, prepared for a model and results restored onto its grid.

Every task reads its inputs through this module:

- ``find_cases(path)`` lists the cases at any input form ``medidiff.data.discover`` accepts (NIfTI,
  DICOM, datalists and CSV with ``label``/``mask``/``annotations``, nnU-Net folders); ``load_case``
  reads one as a ``Case`` (image, geometry, source, optional mask, label and several annotations),
  each companion file checked to lie on the image's grid.
- ``prepare(case, prep, ...)`` does to the scan what ``ModelInfo.data_prep`` says was done to the
  model's training data (RAS orientation, the model's spacing, intensities to the network scale, the
  foreground's bounding box centred on the model's grid); ``restore(values, prepared)`` is its exact
  inverse: geometry back onto the input grid and, on request, intensities back into the input's units.
- ``intensity_scaling`` is the intensity half of ``prepare``: a scan's map to the network scale.
- ``slicewise(fn, ...)`` applies a 2D model to a volume slice by slice along the model's slicing axis
  (slices with too little foreground skipped), ``fn`` receiving every kept slice as one batch.

The foreground rule is ``medidiff.data.foreground.foreground``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .arrays import plain
from .data.discover import Source, discover, load, load_companion
from .data.foreground import foreground
from .data.transforms import (
    MATCH_LEVELS,
    foreground_crop,
    foreground_range,
    matched_range,
    scale_to_unit,
    to_input_units,
    unit_range,
)
from .errors import DataError
from .modelinfo import DataPrep
from .outputs import affine_of, spatial_shape

__all__ = [
    "Case",
    "Prepared",
    "INTENSITY_MODES",
    "find_cases",
    "load_case",
    "intensity_scaling",
    "prepare",
    "restore",
    "to_input_grid",
    "slicewise",
    "plain",
]

log = logging.getLogger("medidiff.cases")

#: How a scan's intensities are mapped to the network scale (``intensity_scaling``).
INTENSITY_MODES = ("match", "own", "model")


@dataclass
class Case:
    """One scan and what belongs to it, on the scan's own grid.

    Attributes:
        name: a file-safe case name (the input's file or series stem).
        image: ``(C, X, Y, Z)`` MetaTensor with its voxel-to-RAS affine.
        source: where it was read from (kind, files, DICOM series).
        mask: a foreground mask ``(1, X, Y, Z)`` given with the case (``None``: found by ``prepare``).
        label: a reference label map ``(1, X, Y, Z)`` (lesions, a segmentation), if given.
        annotations: further label maps of the same case (several raters).
    """

    name: str
    image: Any
    source: Source
    mask: torch.Tensor | None = None
    label: torch.Tensor | None = None
    annotations: list[torch.Tensor] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """Every file read for the case (for a manifest's checksums)."""
        paths = [*self.source.paths, self.source.mask, self.source.label, *self.source.annotations]
        return [Path(p) for p in paths if p is not None and Path(p).is_file()]


def find_cases(path: str | Path, *, select: str | None = "all", mask: str | Path | None = None,
               label: str | Path | None = None, where: str = "inputs") -> list[Source]:
    """The cases at a path, with a single mask and label file given for a single scan.

    Args:
        path: any input form ``discover`` accepts.
        select: DICOM series selection rule.
        mask: a foreground mask file for a single scan (a datalist gives one per case).
        label: a label file for a single scan (a datalist gives one per case).
        where: the recipe key of ``path``, for messages.

    Returns:
        The cases' sources (nothing is read yet).

    Raises:
        DataError: nothing is found, or a single mask/label is given for several scans.
    """
    sources = discover(path, select=select)
    for given, key in ((mask, "mask"), (label, "label")):
        if given is None:
            continue
        if len(sources) != 1:
            raise DataError(f"a single {key} file was given for {len(sources)} scans", where=Path(path),
                            fix=f"give per-case {key}s in a JSON datalist ('{key}' entries).")
        setattr(sources[0], key, Path(given))
    return sources


def load_case(source: Source) -> Case:
    """Read a case: its image and every companion file (mask, label, annotations), each checked to lie
    on the image's grid.

    Raises:
        DataError: a file cannot be read or does not lie on the image's grid.
    """
    image = load(source)

    def companion(path: Path | None, what: str) -> torch.Tensor | None:
        return None if path is None else (plain(load_companion(source, path, what)) > 0.5).float()

    return Case(name=source.name, image=image, source=source, mask=companion(source.mask, "mask"),
                label=companion(source.label, "label"),
                annotations=[companion(p, "annotation") for p in source.annotations])


# ------------------------------------------------------------------------------------------- prepare


@dataclass
class Prepared:
    """A case prepared for a model, with what it takes to map results back.

    Attributes:
        case: the case.
        image: the network-scale image on the model's grid, ``(C, X', Y', Z')`` MetaTensor.
        foreground: its foreground ``(1, X', Y', Z')`` (float, 0/1).
        input_foreground: the foreground on the case's own grid ``(1, X, Y, Z)``.
        scaling: the intensity map (``to_input_units`` record).
        extra: further volumes prepared with the same geometry (e.g. labels), by name.
    """

    case: Case
    image: Any
    foreground: torch.Tensor
    input_foreground: torch.Tensor
    scaling: dict[str, float]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def intensity_scaling(volume: torch.Tensor, fg: torch.Tensor, prep: DataPrep,
                      intensity: str = "match") -> dict[str, float]:
    """The map of a scan's intensities to the network scale.

    Args:
        volume: the scan (channels averaged), in its own units.
        fg: its foreground mask.
        prep: the model's ``data_prep``.
        intensity: ``match`` fits the scan's middle foreground quantiles to the training data's
            (``matched_range``: robust to lesions that fill a scan's brightest or darkest percentile);
            ``own`` uses the scan's own foreground percentiles, as training did per volume; ``model``
            reuses the training data's range in absolute units (same scanner and protocol only). A CT
            window is always used as recorded; ``match`` falls back to ``own`` for a model saved without
            reference quantiles.

    Returns:
        The ``scale_to_unit`` / ``to_input_units`` record.

    Raises:
        ValueError: an unknown mode, or a scan whose foreground is flat.
    """
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"unknown intensity scaling {intensity!r}; use one of {INTENSITY_MODES}")
    rec = prep.intensity
    if rec.method == "hu_window":
        return unit_range(*rec.window)
    if rec.method in ("fixed", "complex"):
        return unit_range(*rec.range)
    if intensity == "model" and rec.low is not None:
        return unit_range(rec.low, rec.high)
    if intensity == "match" and rec.reference:
        return matched_range(volume, fg, rec.reference, rec.reference_levels or MATCH_LEVELS)
    if intensity == "match":
        log.info("the model records no reference quantiles: scaling by the scan's own percentiles")
    return foreground_range(volume, fg, tuple(rec.percentiles))


def prepare(case: Case, prep: DataPrep, *, spatial_dims: int, intensity: str = "match",
            extra: dict[str, torch.Tensor] | None = None) -> Prepared:
    """Prepare a case as the model's training data were (``ModelInfo.data_prep``).

    Reorients to the recorded orientation, resamples to ``spacing_mm`` (in-plane for a 2D model; the
    slicing axis keeps its own spacing) when the spacing differs, scales intensities
    (``intensity_scaling``), crops to the foreground's bounding box and pads/crops about its centre to
    ``size`` (in-plane for a 2D model) with -1, as the training data were. A percentile or matched range
    is not clipped (the residual of anomaly detection sees how far a lesion lies beyond healthy tissue);
    a CT window is.

    Args:
        case: the case (its ``mask`` is the foreground when given; else ``foreground``).
        prep: the model's ``data_prep``.
        spatial_dims: the model's spatial dimensions.
        intensity: ``match``, ``own`` or ``model`` (see ``intensity_scaling``).
        extra: further volumes on the case's grid to move with it (nearest neighbour), by name.

    Returns:
        The ``Prepared`` case.

    Raises:
        DataError: the scan holds NaN or infinite values, or no foreground.
        ValueError: an unknown intensity mode.
    """
    from monai.data import MetaTensor
    from monai.transforms import Orientationd, ResizeWithPadOrCropd, Spacingd

    values = plain(case.image)
    if not bool(torch.isfinite(values).all()):
        raise DataError("the scan holds NaN or infinite values", where=_where(case),
                        fix="repair or re-export the scan.")
    fg = plain(foreground(values) if case.mask is None else case.mask).float()
    if not bool(fg.any()):
        raise DataError("the scan has no foreground voxels", where=_where(case), fix="check the scan and its mask.")
    try:
        scaling = intensity_scaling(values.float().mean(0), fg[0], prep, intensity)
    except ValueError as e:
        if intensity not in INTENSITY_MODES:
            raise
        raise DataError(f"cannot match the scan's intensities to the model's: {e}", where=_where(case),
                        fix="check the scan and its foreground mask.") from None
    clip = prep.intensity.method == "hu_window"
    affine = case.image.affine.clone()
    extra = dict(extra or {})
    data = {"image": MetaTensor(scale_to_unit(values.float(), scaling, clip=clip), affine=affine),
            "fg": MetaTensor(fg, affine=affine.clone()),
            **{f"extra_{k}": MetaTensor(plain(v).float(), affine=affine.clone()) for k, v in extra.items()}}
    masks = ["fg", *(f"extra_{k}" for k in extra)]
    keys = ["image", *masks]
    if prep.orientation:
        data = Orientationd(keys, axcodes=prep.orientation, labels=None)(data)
    spacing, size = prep.grid(spatial_dims)
    if spacing is not None:
        current = np.linalg.norm(data["image"].affine.numpy()[:3, :3], axis=0)
        if any(t > 0 and abs(t - c) > 1e-3 * t for t, c in zip(spacing, current)):
            data = Spacingd(keys, pixdim=spacing, mode=["bilinear"] + ["nearest"] * len(masks),
                            padding_mode="border")(data)
    if size is not None:
        # centre the foreground's bounding box on the model's grid, wherever it lies in the field of view
        data = foreground_crop(keys, "fg", size)(data)
        data = ResizeWithPadOrCropd(["image"], size, mode="constant", value=-1.0)(data)
        data = ResizeWithPadOrCropd(masks, size, mode="constant", value=0.0)(data)
    return Prepared(case, data["image"], (plain(data["fg"]) > 0.5).float(), fg, scaling,
                    {k: plain(data[f"extra_{k}"]) for k in extra})


def _where(case: Case) -> Path | None:
    return Path(case.source.paths[0]) if case.source.paths else None


# ------------------------------------------------------------------------------------------- restore


def to_input_grid(result: Any, reference: Any, prepared_image: Any, *, mode: str = "bilinear",
                  fill: float = 0.0) -> Any:
    """Move a result computed on the model's grid back onto the input's grid (the geometric inverse).

    Whatever the preparation did to the geometry (orientation, spacing, crop, pad) is recorded in the
    prepared image's affine, so the result is resampled from the prepared grid to the input grid by their
    two affines with MONAI's ``SpatialResample``.

    Args:
        result: ``(C, *spatial)`` on the prepared grid.
        reference: the input as read (``MetaTensor`` ``(C, X, Y, Z)``): the target affine and shape.
        prepared_image: the prepared image the model saw (``MetaTensor``): the source affine.
        mode: ``bilinear`` for maps, ``nearest`` for masks and labels.
        fill: value outside the prepared field of view.

    Returns:
        A float32 ``MetaTensor`` ``(C, X, Y, Z)`` on the input grid with the input's affine.
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src_affine = torch.as_tensor(affine_of(prepared_image))
    dst_affine = torch.as_tensor(affine_of(reference))
    ndim = src_affine.shape[0] - 1
    values = plain(result).detach().cpu().float()
    if values.ndim == ndim:
        values = values[None]
    if tuple(values.shape[-ndim:]) != spatial_shape(prepared_image, ndim):
        raise DataError(f"result shape {tuple(values.shape)} does not match the prepared grid "
                        f"{spatial_shape(prepared_image, ndim)}", fix="pass the prepared image the model saw.")
    image = MetaTensor(values - fill, affine=src_affine)  # SpatialResample pads with zeros
    resample = SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float64)
    out = resample(image, dst_affine=dst_affine, spatial_size=spatial_shape(reference, ndim))
    return MetaTensor(out.float().as_tensor() + fill, affine=dst_affine, meta={"space": "RAS"})


def restore(values: torch.Tensor, prepared: Prepared, *,
            units: Literal["network", "image", "difference", "squared"] = "network",
            mode: str = "bilinear", fill: float | None = None) -> torch.Tensor:
    """Move values from the model's grid back onto the case's grid, optionally into the scan's units.

    The exact inverse of ``prepare``: an image prepared and restored with ``units="image"`` returns the
    scan (within interpolation error where it was resampled).

    Args:
        values: ``(C, X', Y', Z')`` on the prepared grid.
        prepared: what ``prepare`` returned.
        units: ``network`` (kept on the network scale), ``image`` (an image: ``to_input_units``),
            ``difference`` (a difference of images: scaled, no offset), ``squared`` (a squared difference).
        mode: ``bilinear`` for maps, ``nearest`` for masks and labels.
        fill: value outside the prepared field of view (default 0 on the output's scale).

    Returns:
        A float32 tensor ``(C, X, Y, Z)`` on the case's grid.
    """
    v = plain(values).detach().cpu().float()
    if units == "image":
        v = to_input_units(v, prepared.scaling)
    elif units in ("difference", "squared"):
        step = float(to_input_units(torch.ones(1), prepared.scaling, difference=True))
        v = v * (step**2 if units == "squared" else step)
    elif units != "network":
        raise ValueError(f"unknown units {units!r}")
    out = to_input_grid(v, prepared.case.image, prepared.image, mode=mode, fill=0.0 if fill is None else fill)
    return plain(out)


# ----------------------------------------------------------------------------------------- slice-wise


def slicewise(fn: Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]], x: torch.Tensor,
              fg: torch.Tensor, *, spatial_dims: int, axis: int = 2, min_foreground: float = 0.01,
              fills: Sequence[float | None] = ()) -> tuple[list[torch.Tensor], int]:
    """Apply a model to a volume: a 3D model to the whole volume, a 2D model to its slices, batched.

    Args:
        fn: ``fn(images, foregrounds) -> outputs``: ``images`` ``(N, C, *plane)`` (or ``(1, C, X, Y, Z)``
            for a 3D model), ``foregrounds`` ``(N, 1, ...)``; each output ``(N, C_k, ...)``.
        x: the prepared volume ``(C, X, Y, Z)``.
        fg: its foreground ``(1, X, Y, Z)``.
        spatial_dims: the model's spatial dimensions.
        axis: the slicing axis of a 2D model.
        min_foreground: least foreground share of a slice for it to be processed.
        fills: per output, the value of skipped slices: a number, or ``None`` to copy the input there
            (an output with the input's channels, e.g. a reconstruction); missing entries are 0.

    Returns:
        ``(outputs, n)``: each output as a volume ``(C_k, X, Y, Z)``, and the number of slices processed
        (no outputs when none was).
    """
    x, fg = plain(x).float(), plain(fg)
    if spatial_dims == 3:
        stack, fg_stack = x[None], fg[None]
        keep = torch.ones(1, dtype=torch.bool)
    else:
        stack, fg_stack = x.movedim(1 + axis, 0), fg.movedim(1 + axis, 0)  # (S, C, H, W)
        keep = fg_stack.flatten(1).float().mean(1) >= max(min_foreground, 1e-9)
    n = int(keep.sum())
    results = fn(stack[keep], fg_stack[keep]) if n else None
    outputs = []
    for k in range(len(results) if results is not None else 0):
        r = results[k].detach().cpu().float()
        value = fills[k] if k < len(fills) else 0.0
        full = (stack.clone() if value is None else
                torch.full((stack.shape[0], r.shape[1], *stack.shape[2:]), float(value)))
        full[keep] = r
        outputs.append(full.movedim(0, 1 + axis) if spatial_dims == 2 else full[0])
    return outputs, n
