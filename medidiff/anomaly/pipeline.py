"""Anomaly detection end to end: scans in, heatmaps with the scans' geometry out.

Method: anomaly detection by healthy reconstruction with partial diffusion (AnoDDPM, Wyatt et al.
2022); see ``medidiff.anomaly.healthy`` for the reconstruction and ``medidiff.anomaly.maps`` for the map.

``detect(model, inputs, out_dir, ...)`` loads the model (``medidiff.weights.load_denoiser``), finds the
scans (``medidiff.data.discover``: NIfTI, DICOM, JSON datalists with ``image``/``label``/``mask``
entries), prepares each as the training data was (``model.json``'s ``data_prep``: RAS orientation,
in-plane spacing, the foreground centred on the model's grid, intensities matched to the training
data's, see ``intensity_scaling``), runs a 2D model slice by slice along the training slicing axis
(empty slices skipped), and writes per case, on the scan's own grid:

- ``<case>_heatmap.nii.gz``: the anomaly map in the scan's intensity units (absolute residual);
- ``<case>_heatmap_dicom/``: the same as a derived DICOM series, for DICOM scans (``dicom``);
- ``<case>_healthy.nii.gz``: the healthy reconstruction in the scan's units;
- ``<case>_uncertainty.nii.gz``: the spread (``std`` or ``mad``) between the ``n_samples`` healthy
  reconstructions, in the scan's units (high where the healthy anatomy is uncertain), when ``n_samples > 1``;
- ``<case>_anomaly_mask.nii.gz``: voxels above the calibrated threshold (uint8), when there is one;
- ``<case>_overlay.png``: the most anomalous slices with the map, lesion and flagged outlines;

and for the run ``scores.csv``, ``thresholds.json`` and ``detection.json`` (settings and threshold; without
calibration scans or a threshold, one saved beside the model is used, see ``model_threshold_path``),
``metrics.json`` and ``report.md`` when labels are given, ``failures.csv`` for skipped cases. Thresholds
and metrics use the map on the model's ``[-1, 1]`` scale, the same for every scan.

Registers the ``anomaly`` task: ``medidiff run recipe.yaml`` with ``task: anomaly``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medidiff import io
from medidiff.data.batch import FailureLog
from medidiff.data.discover import SPLITS, Source, discover, load
from medidiff.data.transforms import (
    MATCH_LEVELS,
    foreground_crop,
    foreground_range,
    matched_range,
    scale_to_unit,
    to_input_units,
    unit_range,
)
from medidiff.errors import DataError, MedidiffError, ModelError, RecipeError
from medidiff.metrics import detection_metrics

from . import maps, thresholds
from .healthy import healthy_nfe, patch_tiles, reconstruct_healthy

__all__ = ["detect", "run_recipe", "prepare_case", "PreparedCase", "resolve_path"]

log = logging.getLogger("medidiff.anomaly")

#: How scans are scaled to the network's intensities (``intensity_scaling``).
INTENSITY_MODES = ("match", "own", "model")

#: Share of voxels at the minimum above which the background is taken as exactly the minimum (skull-stripped).
_FLAT_BACKGROUND = 0.05


def resolve_path(path: str | Path | None, what: str) -> Path | None:
    """A path from a recipe: as given (relative to the working folder), else relative to the medidiff checkout.

    Raises:
        DataError: neither exists.
    """
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    checkout = Path(__file__).resolve().parents[2] / p
    if checkout.exists():
        return checkout
    raise DataError(f"{what} not found", where=p, fix="check the path (relative paths start at the working folder).")


# ------------------------------------------------------------------------------------------- inputs


def _datalist_masks(path: Path) -> dict[Path, Path]:
    """``{image file: mask file}`` from the optional ``mask`` entries of a JSON datalist."""
    if path.suffix.lower() != ".json":
        return {}
    content = json.loads(path.read_text(encoding="utf-8"))
    found = {}
    for key in SPLITS:
        for entry in content.get(key, []) if isinstance(content, dict) else []:
            if isinstance(entry, dict) and entry.get("mask") and isinstance(entry.get("image"), str):
                image, mask = (path.parent / entry[k] for k in ("image", "mask"))
                if not mask.exists():
                    raise DataError(f"lists a mask that does not exist: {mask}.", where=path,
                                    fix="correct the path (relative paths are read from the list's folder).")
                found[image.resolve()] = mask
    return found


def _load_on_grid(path: Path, image: Any, what: str) -> torch.Tensor:
    """A mask/label file read as ``(1, X, Y, Z)`` and checked to lie on the image's grid."""
    found = discover(path, select="largest")
    m = load(found[0])
    if tuple(m.shape[1:]) != tuple(image.shape[1:]) or not np.allclose(m.affine.numpy(), image.affine.numpy(),
                                                                         atol=1e-3):
        raise DataError(f"the {what} {path.name} does not lie on its image's grid "
                        f"(shape {tuple(m.shape[1:])} vs {tuple(image.shape[1:])})", where=path,
                        fix=f"resample the {what} onto the image grid.")
    return (m[:1] > 0.5).float()


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (a MetaTensor's data without its metadata)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def _foreground(image: torch.Tensor) -> torch.Tensor:
    """Voxels above the minimum (a skull-stripped or zero-filled background), else above Otsu's threshold."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    v = _plain(image).float().mean(0)
    at_min = v <= v.min()
    if float(at_min.float().mean()) > _FLAT_BACKGROUND:
        fg = ~at_min
    else:
        fg = torch.from_numpy(ndimage.binary_fill_holes(v.numpy() > threshold_otsu(v.numpy())))
    return fg[None].float()


class PreparedCase:
    """A scan prepared for the model, with what it takes to map results back.

    Attributes:
        image: the scan as read, ``(C, X, Y, Z)`` MetaTensor (the output grid).
        foreground: foreground on the scan's grid ``(1, X, Y, Z)``.
        prepared: the network-scale image on the model's grid ``(C, X', Y', Z')`` (MetaTensor).
        prepared_fg: its foreground ``(1, X', Y', Z')``.
        scaling: the intensity range (``to_input_units`` record).
    """

    def __init__(self, image, foreground, prepared, prepared_fg, scaling):
        self.image, self.foreground, self.scaling = image, foreground, scaling
        self.prepared, self.prepared_fg = prepared, prepared_fg


def intensity_scaling(volume: torch.Tensor, foreground: torch.Tensor, recorded: dict[str, Any],
                      intensity: str = "match") -> dict[str, float]:
    """The map of a scan's intensities to the network scale.

    Args:
        volume: the scan (channels averaged), in its own units.
        foreground: its foreground mask.
        recorded: the model's ``data_prep.intensity``.
        intensity: ``match`` fits the scan's middle foreground quantiles to the training data's
            (``matched_range``: robust to lesions that fill a scan's brightest or darkest percentile);
            ``own`` uses the scan's own foreground percentiles, as training did per volume; ``model``
            reuses the training data's range in absolute units (same scanner and protocol only). A CT
            model's HU window is always used as recorded; ``match`` falls back to ``own`` for a model
            saved without reference quantiles.

    Returns:
        The ``scale_to_unit`` / ``to_input_units`` record.
    """
    if intensity not in INTENSITY_MODES:
        raise RecipeError(f"unknown intensity scaling {intensity!r}", where="anomaly.intensity",
                          fix=f"use one of {INTENSITY_MODES}.")
    if recorded.get("method") == "hu_window":
        return unit_range(*recorded["window"])
    if intensity == "model" and "low" in recorded:
        return unit_range(recorded["low"], recorded["high"])
    if intensity == "match" and recorded.get("reference"):
        try:
            return matched_range(volume, foreground, recorded["reference"],
                                 recorded.get("reference_levels", MATCH_LEVELS))
        except ValueError as e:
            raise DataError(f"cannot match the scan's intensities to the model's: {e}",
                            fix="check the scan and its foreground mask.") from None
    if intensity == "match":
        log.info("the model records no reference quantiles: scaling by the scan's own percentiles")
    return foreground_range(volume, foreground, tuple(recorded.get("percentiles", (0.5, 99.5))))


def prepare_case(image: Any, prep: dict[str, Any], *, mask: torch.Tensor | None = None, intensity: str = "match",
                 spatial_dims: int = 2) -> PreparedCase:
    """Prepare a scan as the model's training data was (``data_prep`` of ``model.json``).

    Reorients to RAS, resamples to ``spacing_mm`` (in-plane for a 2D model; the slicing axis keeps its
    spacing) when the spacing differs, scales intensities (``intensity_scaling``), crops to the
    foreground's bounding box and pads/crops about its centre to ``size`` (in-plane for a 2D model)
    with -1, as the training data were.

    Args:
        image: ``(C, X, Y, Z)`` MetaTensor with its affine.
        prep: the model's ``data_prep``.
        mask: the foreground (e.g. brain) on the image grid; ``None`` finds it (see ``_foreground``).
        intensity: ``match``, ``own`` or ``model`` (see ``intensity_scaling``).
        spatial_dims: the model's spatial dimensions.

    Returns:
        The ``PreparedCase``.
    """
    from monai.transforms import Orientationd, ResizeWithPadOrCropd, Spacingd

    fg = _plain(_foreground(image) if mask is None else mask)
    if not bool(fg.any()):
        raise DataError("the scan has no foreground voxels", fix="check the scan and its mask.")
    values = _plain(image)
    if not bool(torch.isfinite(values).all()):
        raise DataError("the scan holds NaN or infinite values", fix="repair or re-export the scan.")
    scaling = intensity_scaling(values.float().mean(0), fg[0], prep.get("intensity", {}), intensity)
    from monai.data import MetaTensor

    # A statistical range (percentiles, matched quantiles) is not clipped: the model sees [-1, 1]
    # (``reconstruct_healthy`` clips), the residual sees how far a lesion lies beyond healthy tissue. A CT
    # window is a choice of what matters, so values outside it are clipped.
    clip = prep.get("intensity", {}).get("method") == "hu_window"
    data = {"image": MetaTensor(scale_to_unit(values.float(), scaling, clip=clip), affine=image.affine.clone()),
            "fg": MetaTensor(fg.float(), affine=image.affine.clone())}
    data = Orientationd(["image", "fg"], axcodes="RAS", labels=None)(data)
    axis = prep.get("slicing_axis", 2) if spatial_dims == 2 else None
    spacing, size = prep.get("spacing_mm"), prep.get("size")
    if spacing is not None:
        target = [float(s) for s in spacing]
        if axis is not None:
            target.insert(axis, -1.0)  # the slicing axis keeps its own spacing
        current = np.linalg.norm(data["image"].affine.numpy()[:3, :3], axis=0)
        if any(t > 0 and abs(t - c) > 1e-3 * t for t, c in zip(target, current)):
            data = Spacingd(["image", "fg"], pixdim=target, mode=["bilinear", "nearest"],
                            padding_mode="border")(data)
    if size is not None:
        grid = [int(s) for s in size]
        if axis is not None:
            grid.insert(axis, -1)
        # centre the foreground's bounding box on the model's grid, wherever it lies in the field of view
        data = foreground_crop(["image", "fg"], "fg", grid)(data)
        data = ResizeWithPadOrCropd(["image"], grid, mode="constant", value=-1.0)(data)
        data = ResizeWithPadOrCropd(["fg"], grid, mode="constant", value=0.0)(data)
    return PreparedCase(image, fg, data["image"], (data["fg"] > 0.5).float(), scaling)


# ------------------------------------------------------------------------------------------- the map


def _case_map(denoiser, case: PreparedCase, *, spatial_dims: int, axis: int, min_foreground: float,
              recon: dict[str, Any], map_opts: dict[str, Any]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The anomaly map, healthy image and spread between samples of a prepared case on the prepared grid,
    and the network evaluations."""
    x, fg = case.prepared.as_tensor().float(), case.prepared_fg.as_tensor()
    if spatial_dims == 3:
        stack, fg_stack = x[None], fg[None]
        keep = torch.ones(1, dtype=torch.bool)
    else:
        stack, fg_stack = x.movedim(1 + axis, 0), fg.movedim(1 + axis, 0)  # (S, C, H, W)
        keep = fg_stack.flatten(1).mean(1) >= max(min_foreground, 1e-9)
    healthy, spread = stack.clone(), torch.zeros_like(stack)
    score = torch.zeros_like(stack[:, :1])
    n = int(keep.sum())
    if n:
        device = next(denoiser.parameters()).device
        h, sp = reconstruct_healthy(denoiser, stack[keep].to(device), **recon)
        healthy[keep], spread[keep] = h.cpu(), sp.cpu()
        score[keep] = torch.from_numpy(maps.anomaly_map(stack[keep], healthy[keep], mask=fg_stack[keep],
                                                        spread=spread[keep], spatial_dims=spatial_dims, **map_opts))
    if spatial_dims == 2:
        healthy, spread, score = (a.movedim(0, 1 + axis) for a in (healthy, spread, score))
    else:
        healthy, spread, score = healthy[0], spread[0], score[0]
    n_patches = len(patch_tiles(stack.shape[2:], recon["patch_size"] or [-(-s // 2) for s in stack.shape[2:]]))
    per_image = healthy_nfe(method=recon["method"], t_levels=recon["t_levels"], sampler=recon["sampler"],
                            steps=recon["steps"], n_samples=recon["n_samples"], n_patches=n_patches,
                            process=denoiser.process)
    return score, healthy, spread, per_image * n


def _geometry(meta: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
    prep = meta.get("data_prep") or {}
    dims = int(meta["net"].get("spatial_dims", 2))
    if "size" not in prep:
        raise ModelError("model.json has no data_prep.size: cannot prepare scans for this model",
                         fix="train it with a medidiff recipe (which records data_prep).")
    return prep, dims, int(prep.get("slicing_axis", 2) or 2)


# ------------------------------------------------------------------------------------------- detect


def _sources(path: Path, select: str, mask: Path | None, labels: Path | None) -> tuple[list[Source], dict]:
    sources = discover(path, select=select)
    masks = _datalist_masks(path)
    extra: dict[str, dict[str, Path]] = {}
    for s in sources:
        entry = {}
        m = masks.get(Path(s.paths[0]).resolve())
        if m is not None:
            entry["mask"] = m
        if s.label is not None:
            entry["label"] = Path(s.label)
        extra[s.name] = entry
    for given, key in ((mask, "mask"), (labels, "label")):
        if given is not None:
            if len(sources) != 1:
                raise RecipeError(f"a single {key} file was given for {len(sources)} scans", where=f"anomaly.{key}",
                                  fix="give per-case masks and labels in a JSON datalist.")
            extra[sources[0].name][key] = given
    return sources, extra


def _analyse(denoiser, source: Source, files: dict, prep, dims, axis, opts) -> dict[str, Any]:
    """Everything about one case: the prepared scan, its map on the input grid, its healthy image."""
    start = time.perf_counter()
    image = load(source)
    mask = _load_on_grid(files["mask"], image, "mask") if "mask" in files else None
    label = _load_on_grid(files["label"], image, "label") if "label" in files else None
    case = prepare_case(image, prep, mask=mask, intensity=opts["intensity"], spatial_dims=dims)
    score, healthy, spread, nfe = _case_map(denoiser, case, spatial_dims=dims, axis=axis,
                                            min_foreground=opts["min_foreground"], recon=opts["recon"],
                                            map_opts=opts["map"])
    score_in = io.to_input_grid(score, image, case.prepared)
    healthy_in = io.to_input_grid(to_input_units(healthy, case.scaling), image, case.prepared, fill=0.0)
    spread = spread.sum(0, keepdim=True)  # over channels, as the residual
    spread_in = io.to_input_grid(spread, image, case.prepared)
    fg = case.prepared_fg.as_tensor() > 0.5
    return {"image": image, "case": case, "label": label, "score": score_in.as_tensor().clamp_min(0), "nfe": nfe,
            "healthy": healthy_in, "spread": spread_in.as_tensor().clamp_min(0),
            "mean_spread": float(spread[fg].mean()) if bool(fg.any()) else 0.0,
            "time_s": time.perf_counter() - start}


def _dicom_heatmap(heatmap: torch.Tensor, image, source: Source, out_dir: Path, inputs_path: Path) -> list[Path]:
    """The heatmap as a derived series beside a DICOM scan's own (none, with a warning, if it cannot be)."""
    try:
        return io.write_dicom_series(heatmap, image, source.paths, out_dir / f"{source.name}_heatmap_dicom",
                                     description="medidiff anomaly heatmap", protected=[inputs_path])
    except DataError as e:
        log.warning("%s: no DICOM heatmap (%s); the NIfTI heatmap is written", source.name, e)
        return []


def _units_factor(scaling: dict, residual: str) -> float:
    step = float(to_input_units(torch.ones(1), scaling, difference=True))
    return step**2 if residual == "squared" else step


def map_settings(opts: dict[str, Any]) -> dict[str, Any]:
    """The detection options a threshold depends on (what shapes the map), as saved beside it."""
    recon = {k: v for k, v in opts["recon"].items() if k not in ("seed", "batch_size", "spread")}
    return json.loads(json.dumps({**recon, **opts["map"], "intensity": opts["intensity"]}))


def model_threshold_path(model_path: Path) -> Path:
    """Where a threshold saved with a model lives: ``<stem>.thresholds.json`` beside it, or in its folder."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path / thresholds.THRESHOLDS_FILE
    return model_path.with_name(model_path.name.split(".")[0] + ".thresholds.json")


def _model_threshold(model_path: Path, opts: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
    """The threshold saved with the model, if it was calibrated with the same map settings."""
    path = model_threshold_path(model_path)
    if not path.is_file():
        log.warning("no calibration scans, no threshold and none saved with the model: no anomaly masks or Dice")
        return None, {}
    record = thresholds.load_record(path)
    saved, now = record.get("settings"), map_settings(opts)
    if saved != now:
        changed = sorted(k for k in set(saved or {}) | set(now) if (saved or {}).get(k) != now.get(k))
        log.warning("the threshold saved with the model (%s) was calibrated with other settings (%s): no anomaly "
                    "masks or Dice; give calibration scans or a threshold", path, ", ".join(changed))
        return None, {}
    value = record["threshold"]
    log.info("threshold %.4g saved with the model (%s, FPR %s)", value, path.name, record.get("fpr"))
    return value, {"threshold": value, "fpr": record.get("fpr"), "source": str(path)}


def _threshold(denoiser, threshold, calibration, fpr, select, prep, dims, axis, opts, out_dir, failures,
               model_path) -> tuple[float | None, dict[str, Any]]:
    if threshold is not None:
        try:
            value = float(threshold)
            return value, {"threshold": value, "source": "given"}
        except ValueError:
            path = resolve_path(threshold, "threshold file")
        value = thresholds.load_threshold(path)
        return value, {"threshold": value, "source": str(path)}
    if calibration is None:
        return _model_threshold(model_path, opts)
    path = resolve_path(calibration, "calibration scans")
    sources, files = _sources(path, select, None, None)
    values, fgs, names = [], [], []
    for source in tqdm(sources, desc="calibration", disable=not opts["progress"], leave=False):
        try:
            result = _analyse(denoiser, source, files[source.name], prep, dims, axis, opts)
        except MedidiffError as e:
            failures.record(f"calibration:{source.name}", e)
            continue
        values.append(result["score"])
        fgs.append(result["case"].foreground)
        names.append(source.name)
    if not values:
        raise DataError("no calibration scan could be used", where=path, fix="see failures.csv.")
    rates = sorted({0.01, 0.05, 0.10, float(fpr)})
    levels = thresholds.calibrate_many(values, fgs, fprs=rates)
    value = levels[rates.index(float(fpr))]
    record = {"threshold": value, "fpr": float(fpr), "source": str(path), "cases": names,
              "n_voxels": int(sum(int(f.sum()) for f in fgs)),
              "at_fpr": {f"{r:g}": t for r, t in zip(rates, levels)},
              "measured_fpr": thresholds.false_positive_rate(values, fgs, value), "settings": map_settings(opts)}
    thresholds.save_threshold(Path(out_dir) / thresholds.THRESHOLDS_FILE, value, fpr=fpr, extra=record)
    return value, record


def _number(value: Any, digits: int = 3) -> str:
    """A table cell: the number, or a dash where there is none (a case without lesions has no AUROC)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    return f"{value:.{digits}f}" if np.isfinite(value) else "—"


def _write_report(out_dir: Path, rows: list[dict], metrics: dict | None, settings: dict) -> Path:
    record = settings.get("threshold_record") or {}
    if settings.get("threshold") is None:
        threshold = "none (no calibration scans or threshold given): no anomaly masks"
    else:
        origin = (f"calibrated at voxel FPR {record['fpr']:g}" if record.get("fpr") is not None
                  else f"from {record.get('source', 'the user')}")
        threshold = f"{settings['threshold']:.4g} ({origin})"
    lines = ["# Anomaly detection report", "",
             f"Model: `{settings['model']}`; method `{settings['method']}`, sampler `{settings['sampler']}` "
             f"({settings['steps']} steps) from t_L = {settings['t_levels']}, {settings['n_samples']} sample(s), "
             f"{settings['noise']} noise; threshold {threshold}.", ""]
    if metrics:
        lines += ["| case | voxel AUROC | AUPRC | Dice | dice_best (oracle threshold) |", "|---|---|---|---|---|"]
        for name, m in [*metrics["per_case"].items(), ("**all (pooled voxels)**", metrics)]:
            lines.append(f"| {name} | {_number(m.get('auroc'))} | {_number(m.get('auprc'))} | {_number(m.get('dice'))} "
                         f"| {_number(m.get('dice_best'))} |")
        lines.append("")
    lines += ["| case | score | max | voxels flagged | time (s) | NFE |", "|---|---|---|---|---|---|"]
    for r in rows:
        flagged = "—" if r["n_voxels_flagged"] == "" else r["n_voxels_flagged"]
        lines.append(f"| {r['case']} | {r['score']:.4f} | {r['max']:.4f} | {flagged} | {r['time_s']:.1f} "
                     f"| {r['nfe']} |")
    lines.append("")
    for r in rows:
        lines += [f"## {r['case']}", "", f"![{r['case']}]({r['case']}_overlay.png)", ""]
    return io.write_text("\n".join(lines), out_dir / "report.md")


def detect(
    model: str | Path,
    inputs: str | Path,
    out_dir: str | Path,
    *,
    calibration: str | Path | None = None,
    threshold: float | str | None = None,
    fpr: float = 0.05,
    mask: str | Path | None = None,
    labels: str | Path | None = None,
    method: str = "partial",
    t_levels: Sequence[float] = (0.5,),
    sampler: str = "ddim",
    steps: int | None = 1,
    noise: str = "gaussian",
    noise_options: dict | None = None,
    n_samples: int = 24,
    reduce: str = "median",
    spread: str = "std",
    patch_size: Sequence[int] | None = None,
    patch_margin: int = 8,
    residual: str = "abs",
    median_size: int = 5,
    smooth_sigma: float = 1.0,
    spread_floor: float | None = 0.2,
    erode: int = 2,
    top_k: float = 0.01,
    intensity: str = "match",
    min_foreground: float = 0.01,
    batch_size: int = 16,
    overlay_slices: int = 6,
    dicom: bool = True,
    select: str = "all",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Anomaly heatmaps for the scans at ``inputs`` (see the module docstring for what is written).

    Args:
        model: weights (``.safetensors`` with its ``.json``, or a folder).
        inputs: scans: a NIfTI file or folder, DICOM, or a JSON datalist (``image``, ``label``, ``mask``).
        out_dir: the output folder.
        calibration: healthy scans to calibrate the threshold on (same forms as ``inputs``).
        threshold: a fixed threshold (number or ``thresholds.json`` path); overrides ``calibration``.
        fpr: voxel false-positive rate of the calibrated threshold.
        mask: foreground mask of a single scan (else from the datalist, else found automatically).
        labels: lesion mask of a single scan (else from the datalist); enables ``metrics.json``.
        method, t_levels, sampler, steps, noise, noise_options, n_samples, reduce, spread, patch_size,
            patch_margin: healthy reconstruction (``medidiff.anomaly.healthy.reconstruct_healthy``).
        residual, median_size, smooth_sigma, erode, spread_floor: the map (``medidiff.anomaly.maps.anomaly_map``;
            ``spread_floor`` weights the residual by ``f / (f + spread)`` between the samples, ``None``: off).
        top_k: share of voxels averaged into the case score.
        intensity: ``match``, ``own`` or ``model`` (see ``intensity_scaling``).
        min_foreground: least foreground share of a slice for it to be processed.
        batch_size: images per network call.
        overlay_slices: slices in each overlay PNG.
        dicom: for a DICOM scan, also write the heatmap as a derived DICOM series (``<case>_heatmap_dicom/``).
        select: DICOM series selection rule.
        seed: noise seed.
        device: where the model runs.
        progress: progress bars over cases and batches.

    Returns:
        ``{"outputs": [...], "inputs": [...], "scores": rows, "metrics": dict or None, "threshold": value,
        "failures": count, "summary": one line}``.
    """
    from medidiff.runtime import resolve_device
    from medidiff.weights import load_denoiser

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    model_path = resolve_path(model, "model weights")
    denoiser, meta = load_denoiser(model_path, device=device)
    prep, dims, axis = _geometry(meta)
    trained_noise = (meta.get("noise") or {}).get("kind", "gaussian")
    if noise != trained_noise:
        log.warning("the model was trained with %s noise, detection uses %s noise", trained_noise, noise)
    opts = {
        "intensity": intensity, "min_foreground": min_foreground, "progress": progress,
        "recon": {"method": method, "t_levels": list(t_levels), "sampler": sampler, "steps": steps, "noise": noise,
                  "noise_options": dict(noise_options or {}), "n_samples": n_samples, "reduce": reduce,
                  "spread": spread, "seed": seed, "batch_size": batch_size, "patch_size": patch_size,
                  "patch_margin": patch_margin},
        "map": {"kind": residual, "median_size": median_size, "sigma": smooth_sigma, "erode_iterations": erode,
                "spread_floor": spread_floor},
    }
    samples = 1 if method == "invert" else int(n_samples)  # the spread between samples is written when > 1
    failures = FailureLog(out_dir)
    thr, thr_record = _threshold(denoiser, threshold, calibration, fpr, select, prep, dims, axis, opts, out_dir,
                                 failures, model_path)
    inputs_path = resolve_path(inputs, "inputs")
    sources, files = _sources(inputs_path, select, resolve_path(mask, "mask"), resolve_path(labels, "labels"))
    outputs, rows, evaluated, read = [], [], {}, []
    for source in tqdm(sources, desc="cases", disable=not progress):
        try:
            r = _analyse(denoiser, source, files[source.name], prep, dims, axis, opts)
            name, image = source.name, r["image"]
            factor = _units_factor(r["case"].scaling, residual)
            written = [io.write_like(r["score"] * factor, image, io.result_path(out_dir, name, "heatmap", "nii.gz"),
                                     protected=[inputs_path]),
                       io.write_like(r["healthy"], image, io.result_path(out_dir, name, "healthy", "nii.gz"),
                                     protected=[inputs_path])]
            if samples > 1:
                written.append(io.write_like(r["spread"] * _units_factor(r["case"].scaling, "abs"), image,
                                             io.result_path(out_dir, name, "uncertainty", "nii.gz"),
                                             protected=[inputs_path]))
            if dicom and source.kind == "dicom":
                written += _dicom_heatmap(r["score"] * factor, image, source, out_dir, inputs_path)
            flagged = None
            if thr is not None:
                flagged = (r["score"] > thr) & (r["case"].foreground > 0.5)
                written.append(io.write_like(flagged.to(torch.uint8), image,
                                             io.result_path(out_dir, name, "anomaly_mask", "nii.gz"),
                                             protected=[inputs_path]))
            contours = {k: v for k, v in (("lesion", r["label"]), ("flagged", flagged)) if v is not None}
            written.append(io.overlay_png(
                image, r["score"] * factor, contours or None, io.result_path(out_dir, name, "overlay", "png"),
                title=f"{name}: anomaly map", units="|residual| (input units)", n_slices=overlay_slices,
                threshold=None if thr is None else thr * factor, protected=[inputs_path]))
        except MedidiffError as e:
            failures.record(source.name, e)
            log.warning("skipped %s: %s", source.name, e)
            continue
        outputs += written
        read += [Path(p) for p in source.paths if Path(p).is_file()]
        fg = r["case"].foreground
        n_flagged = int(flagged.sum()) if flagged is not None else ""
        rows.append({"case": name, "score": maps.case_score(r["score"], fg, top_k=top_k),
                     "max": float(r["score"].max()), "n_voxels_flagged": n_flagged,
                     "mean_spread": r["mean_spread"] if samples > 1 else "", "time_s": round(r["time_s"], 3),
                     "nfe": r["nfe"]})
        if r["label"] is not None:
            evaluated[name] = {"scores": r["score"], "labels": r["label"], "mask": fg, "score": rows[-1]["score"]}
    outputs.append(io.write_table(rows, out_dir / "scores.csv"))
    settings = {"model": str(model_path), "inputs": str(inputs_path), "calibration": calibration, "fpr": fpr,
                "threshold": thr, "threshold_record": thr_record, **opts["recon"], **opts["map"], "top_k": top_k,
                "intensity": intensity, "min_foreground": min_foreground, "model_noise": trained_noise,
                "model_step": meta.get("step"), "data_prep": {k: v for k, v in prep.items() if k != "slices"}}
    outputs.append(io.write_json(settings, out_dir / "detection.json"))
    if thr_record.get("source") not in (None,) and (out_dir / thresholds.THRESHOLDS_FILE).is_file():
        outputs.append(out_dir / thresholds.THRESHOLDS_FILE)
    metrics = None
    if evaluated:
        metrics = detection_metrics(evaluated, threshold=thr)
        metrics["dice_best_label"] = thresholds.ORACLE_LABEL
        metrics["nfe_per_slice"] = healthy_nfe(method=method, t_levels=t_levels, sampler=sampler, steps=steps,
                                               n_samples=n_samples, process=denoiser.process)
        outputs.append(io.write_json(metrics, out_dir / "metrics.json"))
    if rows:
        outputs.append(_write_report(out_dir, rows, metrics, settings))
    if len(failures):
        outputs.append(failures.path)
    summary = f"{len(rows)} case(s) analysed, {len(failures)} skipped"
    if metrics:
        summary += (f"; voxel AUROC {metrics['auroc']:.3f}, AUPRC {metrics['auprc']:.3f}, "
                    f"Dice {metrics.get('dice', float('nan')):.3f} (threshold at FPR {fpr:g}), "
                    f"{thresholds.ORACLE_LABEL} {metrics['dice_best']:.3f}")
    log.info("%s", summary)
    return {"outputs": outputs, "inputs": [model_path, *read], "scores": rows, "metrics": metrics, "threshold": thr,
            "failures": len(failures), "summary": summary}


def run_recipe(recipe: Any, out_dir: str | Path) -> dict[str, Any]:
    """The ``anomaly`` task: ``detect`` with the recipe's ``anomaly`` section, seed and device.

    Raises:
        RecipeError: the recipe has no ``anomaly`` section or no ``anomaly.inputs``.
    """
    section = recipe.anomaly
    if section is None or section.inputs is None:
        raise RecipeError("an anomaly recipe needs anomaly.inputs (and anomaly.model)", where="anomaly.inputs",
                          fix="set anomaly.inputs to a scan, a folder or a JSON datalist.")
    options = section.model_dump()
    model, inputs = options.pop("model"), options.pop("inputs")
    return detect(model, inputs, out_dir, seed=recipe.seed, device=recipe.device, **options)
