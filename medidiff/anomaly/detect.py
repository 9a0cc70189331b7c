"""Anomaly detection end to end: scans in, heatmaps with the scans' geometry out.

Method: anomaly detection by healthy reconstruction with partial diffusion (AnoDDPM, Wyatt et al.
2022); see ``medidiff.anomaly.healthy`` for the reconstruction and ``medidiff.anomaly.maps`` for the map.

``detect(model, inputs, out_dir, options)`` loads the model (``medidiff.weights.load_denoiser``), reads
the cases (``medidiff.cases``: NIfTI, DICOM, datalists with ``image``/``label``/``mask`` entries),
prepares each as the training data were (``ModelInfo.data_prep``), runs a 2D model slice by slice
along the training slicing axis (``medidiff.cases.slicewise``; empty slices skipped) and writes per
case, on the scan's own grid (``medidiff.cases.restore``):

- ``<case>_heatmap.nii.gz``: the anomaly map in the scan's intensity units (absolute residual), or with
  ``map.scan_quantile`` in multiples of the scan's own residual quantile (unitless: the threshold is then one
  number for every scan);
- ``<case>_heatmap.dcm``: for DICOM scans (``dicom``), the same as a DICOM Parametric Map (float values,
  one frame per source slice) in the scan's study and frame of reference;
- ``<case>_healthy.nii.gz``: the healthy reconstruction in the scan's units;
- ``<case>_uncertainty.nii.gz``: the spread (``std`` or ``mad``) between the ``n_samples`` healthy
  reconstructions, in the scan's units (high where the healthy anatomy is uncertain), when ``n_samples > 1``;
- ``<case>_anomaly_mask.nii.gz``: voxels above the threshold (uint8), when there is one; for DICOM scans
  also ``<case>_anomaly_mask.dcm``, a DICOM SEG in the scan's study and frame of reference;
- ``<case>_findings.csv``: the flagged voxels' connected regions, largest first (volume in mm³, centroid in
  world mm, peak value and voxel; ``medidiff.anomaly.findings``), when there is a threshold;
- ``<case>_overlay.png``: the slices through the largest findings (without findings, the most anomalous
  slices) with the map, lesion and flagged outlines;

and for the run ``scores.csv``, ``thresholds.json`` and ``detection.json`` (settings and threshold; without
calibration scans or a threshold, one saved beside the model is used, see ``thresholds.saved_threshold``),
``metrics.json`` when labels are given (voxel AUROC/AUPRC/Dice and lesion-level counts: lesions found and
false-positive findings per scan), ``report.md`` and ``report.html`` (a self-contained page: every
slice with a flagged voxel or a reference lesion, one colour scale for the run; ``medidiff.anomaly.report``),
``failures.csv`` for skipped cases. Thresholds
and metrics use the map on the model's ``[-1, 1]`` scale (or, with ``map.scan_quantile``, the per-scan map), the
same for every scan.

The loop over cases (and over calibration scans) is ``medidiff.batch.Batch``'s: under ``torchrun`` the
cases are shared out between the ranks (each loads the model; calibration is sharded too and its
threshold computed once, on rank 0, and broadcast), a case's completion is recorded once all its files are
written, a run started again skips complete cases, and rank 0 writes the run's tables from every case's
record.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medidiff import outputs
from medidiff.batch import Batch, BatchResult, CaseOutput, fingerprint
from medidiff.cases import Case, Prepared, find_cases, load_case, plain, prepare, restore, slicewise
from medidiff.data.batch import FailureLog
from medidiff.errors import DataError
from medidiff.metrics import detection_metrics
from medidiff.modelinfo import ModelInfo
from medidiff.outputs.html import views_of
from medidiff.results import TaskResult
from medidiff.sections import open_model
from medidiff.weights import model_paths

from . import findings, maps, thresholds
from .config import AnomalySection
from .guided import load_classifier
from .healthy import healthy_evaluations, patch_tiles, reconstruct_healthy
from .latent import LATENT_THRESHOLDS_FILE, calibrate_thresholds, open_codec, save_thresholds
from .report import case_view, write_html, write_report

__all__ = ["detect", "analyse", "CaseMaps", "latent_calibration", "with_model_noise"]

log = logging.getLogger("medidiff.anomaly")


@dataclass
class CaseMaps:
    """One case analysed: its maps on the case's own grid.

    Attributes:
        prepared: the case as the model saw it.
        score: the anomaly map on the model's scale, ``(1, X, Y, Z)``.
        healthy: the healthy reconstruction in the scan's units, ``(C, X, Y, Z)``.
        spread: the spread between reconstructions on the model's scale, ``(1, X, Y, Z)``.
        mean_spread: its mean over the prepared foreground.
        nfe: denoiser evaluations spent on the case.
        time_s: seconds spent on the case.
        classifier_nfe: classifier gradients spent on the case (method ``guided``).
    """

    prepared: Prepared
    score: torch.Tensor
    healthy: torch.Tensor
    spread: torch.Tensor
    mean_spread: float
    nfe: int
    time_s: float
    classifier_nfe: int = 0

    @property
    def case(self) -> Case:
        return self.prepared.case


def analyse(denoiser, info: ModelInfo, case: Case, options: AnomalySection, *, seed: int = 0) -> CaseMaps:
    """The anomaly map, healthy image and spread between reconstructions of one case, on its own grid.

    Raises:
        DataError: the case cannot be prepared (no foreground, NaNs, a flat foreground).
    """
    start = time.perf_counter()
    dims, prep = info.spatial_dims, info.data_prep
    axis = 2 if prep.slicing_axis is None else prep.slicing_axis
    prepared = prepare(case, prep, spatial_dims=dims, intensity=options.intensity)
    device = next(denoiser.parameters()).device
    recon = options.reconstruction
    codec = open_codec(recon, info, device)[0] if recon.method == "latent" else None

    def heal(stack: torch.Tensor, fg_stack: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, sp = reconstruct_healthy(denoiser, stack.to(device), recon, seed=seed, progress=options.progress,
                                    codec=codec)  # the slices of a case (one scan: latent's per-scan rule)
        h, sp = h.cpu(), sp.cpu()
        score = maps.anomaly_map(stack, h, options.map, mask=fg_stack, spread=sp, spatial_dims=dims)
        return h, sp, torch.from_numpy(score)

    x = plain(prepared.image).float()
    results, n = slicewise(heal, x, prepared.foreground, spatial_dims=dims, axis=axis,
                           min_foreground=options.min_foreground, fills=(None, 0.0, 0.0))
    healthy, spread, score = results if n else (x.clone(), torch.zeros_like(x), torch.zeros_like(x[:1]))
    score = torch.from_numpy(maps.per_scan(score, prepared.foreground > 0.5, options.map.scan_quantile)[0])
    plane = x.shape[1:] if dims == 3 else [s for i, s in enumerate(x.shape[1:]) if i != axis]
    n_patches = len(patch_tiles(plane, recon.patch_size or [-(-s // 2) for s in plane]))
    per_image = healthy_evaluations(recon, n_patches=n_patches, process=denoiser.process)
    spread = spread.sum(0, keepdim=True)  # over channels, as the residual
    fg = prepared.foreground > 0.5
    return CaseMaps(prepared=prepared, score=restore(score, prepared).clamp_min(0),
                    healthy=restore(healthy, prepared, units="image"), spread=restore(spread, prepared).clamp_min(0),
                    mean_spread=float(spread[fg].mean()) if bool(fg.any()) else 0.0, nfe=per_image.denoiser * n,
                    time_s=time.perf_counter() - start, classifier_nfe=per_image.classifier * n)


def _units(options: AnomalySection) -> str:
    """``scan``: the map in multiples of each scan's own scale (``map.scan_quantile``), else ``squared`` or
    ``difference`` (a residual in the scan's intensity units)."""
    if options.map.scan_quantile is not None:
        return "scan"
    return "squared" if options.map.residual == "squared" else "difference"


def heatmap_label(options: AnomalySection) -> str:
    """What a heatmap's values are, in words (overlays, reports)."""
    if options.map.scan_quantile is not None:
        return f"residual / the scan's {options.map.scan_quantile:g}-quantile"
    return "residual² (input units²)" if options.map.residual == "squared" else "|residual| (input units)"


def restore_factor(prepared: Prepared, units: str) -> float:
    """The factor ``restore(..., units=units)`` multiplies values by."""
    from medidiff.data.transforms import to_input_units

    step = float(to_input_units(torch.ones(1), prepared.scaling, difference=True))
    return step**2 if units == "squared" else step


def _heatmap_unit(case: Case, units: str) -> str:
    """The UCUM unit of a case's heatmap: Hounsfield units (squared) for CT, arbitrary units otherwise, none (``1``)
    for a map in multiples of the scan's own scale."""
    if units == "scan":
        return "1"
    if str(case.image.meta.get("modality", "")).upper() == "CT":
        return "[hnsf'U]2" if units == "squared" else "[hnsf'U]"
    return "[arb'U]"


def _dicom_outputs(heatmap: torch.Tensor, flagged: torch.Tensor | None, case: Case, options: AnomalySection,
                   out_dir: Path, inputs: Path) -> list[Path]:
    """For a DICOM scan, the heatmap as a Parametric Map and the flagged voxels as a SEG, in the scan's study.

    Either is left out, with a warning, when the scan cannot carry it (the NIfTI files are written anyway).
    """
    from medidiff import __version__

    common = {"protected": [inputs], "deidentify": options.deidentify, "software_version": __version__}
    written = []
    try:
        written.append(outputs.write_parametric_map(
            heatmap, case.image, case.source.paths, outputs.result_path(out_dir, case.name, "heatmap", "dcm"),
            description="medidiff anomaly heatmap", label="anomaly map", unit=_heatmap_unit(case, _units(options)),
            **common))
        if flagged is not None:
            written.append(outputs.write_dicom_seg(
                flagged.to(torch.uint8), case.image, case.source.paths,
                outputs.result_path(out_dir, case.name, "anomaly_mask", "dcm"),
                classes=("background", "anomaly above threshold"), description="medidiff anomaly mask",
                series_number=9901, **common))
    except DataError as e:
        log.warning("%s: no DICOM output (%s); the NIfTI files are written", case.name, e)
    return written


def _calibrate(denoiser, info: ModelInfo, options: AnomalySection, path: Path, out_dir: Path, batch: Batch,
               seed: int, digests: dict[str, str]) -> tuple[float, dict[str, Any], list[dict[str, str]]]:
    """Calibrate the threshold on the healthy scans at ``path`` (sharded; written as ``thresholds.json``).

    Returns:
        ``(threshold, record, failures)`` on every rank (computed on rank 0, broadcast).
    """

    def one(source) -> CaseOutput:
        r = analyse(denoiser, info, load_case(source), options, seed=seed)
        return CaseOutput(files=[], row={"case": r.case.name},
                          arrays={"score": r.score, "fg": r.prepared.input_foreground})

    key = fingerprint({"stage": "calibration", **digests, "seed": seed, "settings": options.map_settings()})
    got = batch.run(find_cases(path, select=options.select), one, key=key, stage="calibration")
    outcome: tuple = (None, None, [], "")
    if got is not None:
        failures = [{**f, "case": f"calibration:{f['case']}"} for f in got.failures]
        outcome = (None, None, failures, "no calibration scan could be used")
        if got.rows:
            outcome = (*_calibration_threshold(options, path, got, out_dir), failures, "")
    value, record, failures, error = batch.broadcast(outcome)
    if error:
        raise DataError(error, where=path, fix="see failures.csv.")
    return value, record, failures


def _calibration_threshold(options: AnomalySection, path: Path, got: BatchResult, out_dir: Path
                           ) -> tuple[float, dict[str, Any]]:
    """The threshold at ``options.fpr`` over the gathered calibration maps, saved as ``thresholds.json``."""
    names = [row["case"] for row in got.rows]
    values = [got.arrays[n]["score"] for n in names]
    fgs = [got.arrays[n]["fg"] for n in names]
    fpr = float(options.fpr)
    rates = sorted({0.01, 0.05, 0.10, fpr})
    levels = thresholds.calibrate_many(values, fgs, fprs=rates)
    value = levels[rates.index(fpr)]
    record = {"threshold": value, "fpr": fpr, "source": str(path), "cases": names,
              "n_voxels": int(sum(int(f.sum()) for f in fgs)),
              "at_fpr": {f"{r:g}": t for r, t in zip(rates, levels)},
              "measured_fpr": thresholds.false_positive_rate(values, fgs, value),
              "settings": options.map_settings()}
    thresholds.save_threshold(out_dir / thresholds.THRESHOLDS_FILE, value, fpr=fpr, extra=record,
                              scan_quantile=options.map.scan_quantile)
    return value, record


def _threshold(denoiser, info: ModelInfo, options: AnomalySection, model_path: Path, out_dir: Path,
               batch: Batch, seed: int, resolve, digests: dict[str, str]
               ) -> tuple[float | None, dict[str, Any], list[dict]]:
    """The threshold: given, calibrated on healthy scans, or saved with the model (in that order).

    Returns:
        ``(threshold, record, calibration failures)``.
    """
    if options.threshold is not None:
        try:
            value = float(options.threshold)
            return value, {"threshold": value, "source": "given"}, []
        except ValueError:
            path = resolve(options.threshold, "threshold file")
        value = thresholds.load_threshold(path)
        return value, {"threshold": value, "source": str(path)}, []
    if options.calibration is None:
        return (*thresholds.saved_threshold(model_path, options.map_settings(), options.fpr), [])
    return _calibrate(denoiser, info, options, resolve(options.calibration, "calibration scans"), out_dir,
                      batch, seed, digests)


@dataclass
class _ScanUnits:
    """A case's maps in its scan's units: the heatmap, the spread (``None`` for one sample), the threshold."""

    heatmap: torch.Tensor
    spread: torch.Tensor | None
    threshold: float | None


def _scan_units(r: CaseMaps, options: AnomalySection, threshold: float | None) -> _ScanUnits:
    units = _units(options)
    factor = 1.0 if units == "scan" else restore_factor(r.prepared, units)  # a per-scan map has no units
    spread = (r.spread * restore_factor(r.prepared, "difference") if options.reconstruction.samples > 1 else None)
    return _ScanUnits(r.score * factor, spread, None if threshold is None else threshold * factor)


def _write_case(r: CaseMaps, units: _ScanUnits, options: AnomalySection, threshold: float | None, out_dir: Path,
                inputs: Path) -> tuple[list[Path], torch.Tensor | None, list[findings.Finding]]:
    """Every file of one case, its flagged voxels (``None`` without a threshold) and their regions."""
    case, protected = r.case, [inputs]
    heatmap, in_units = units.heatmap, units.threshold

    def path(kind: str, ext: str = "nii.gz") -> Path:
        return outputs.result_path(out_dir, case.name, kind, ext)

    display = None if in_units is None else (in_units, max(in_units, float(heatmap.max())))
    written = [outputs.write_like(heatmap, case.image, path("heatmap"), protected=protected, display=display,
                                  description=None if in_units is None else f"medidiff anomaly map; threshold "
                                                                            f"{in_units:.6g} (cal_min)"),
               outputs.write_like(r.healthy, case.image, path("healthy"), protected=protected)]
    if units.spread is not None:
        written.append(outputs.write_like(units.spread, case.image, path("uncertainty"), protected=protected))
    flagged = None
    if threshold is not None:
        flagged = (r.score > threshold) & (r.prepared.input_foreground > 0.5)
        written.append(outputs.write_like(flagged.to(torch.uint8), case.image, path("anomaly_mask"),
                                          protected=protected))
    found = [] if flagged is None else findings.findings(flagged, heatmap, outputs.affine_of(case.image))
    if flagged is not None:
        written.append(outputs.write_table([f.row() for f in found], path("findings", "csv"), protected=protected,
                                           columns=findings.FINDING_COLUMNS))
    if options.dicom and case.source.kind == "dicom":
        written += _dicom_outputs(heatmap, flagged, case, options, out_dir, inputs)
    contours = {k: v for k, v in (("lesion", case.label), ("flagged", flagged)) if v is not None}
    written.append(outputs.overlay_png(
        case.image, heatmap, contours or None, path("overlay", "png"), title=f"{case.name}: anomaly map",
        units=heatmap_label(options), n_slices=options.overlay_slices,
        slices=findings.finding_slices(found, options.overlay_slices) or None,
        threshold=in_units, protected=protected))
    return written, flagged, found


def detect(model: str | Path, inputs: str | Path, out_dir: str | Path, options: AnomalySection | None = None, *,
           seed: int = 0, device: str | torch.device = "cpu", resolve=None, **changes: Any) -> TaskResult:
    """Anomaly heatmaps for the scans at ``inputs`` (see the module docstring for what is written).

    Args:
        model: weights (``.safetensors`` with its ``.json``, or a folder).
        inputs: scans: a NIfTI file or folder, DICOM, or a JSON datalist (``image``, ``label``, ``mask``).
        out_dir: the output folder.
        options: the ``anomaly`` section (default: its defaults); ``changes`` are applied to it, options of
            ``reconstruction`` and ``map`` given by their own names (``t_levels=[0.3]``).
        seed: noise seed.
        device: where the model runs.
        resolve: ``resolve(path, what) -> Path`` for the section's relative paths (default: as given).

    Returns:
        The ``TaskResult``: outputs, inputs, the ``scores.csv`` rows, metrics, threshold, failures, summary.

    Raises:
        ValueError: an unknown or invalid option.
        ModelError, DataError: the model or the inputs cannot be used.
    """
    options = (options or AnomalySection()).updated(**changes)
    resolve = resolve or (lambda p, what: None if p is None else Path(p))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(model)
    denoiser, info, digest, device = open_model(model_path, device)
    options, classifier_path, classifier_digest = _open_classifier(options, resolve, device)
    options, latent_files = _open_latent(options, info, model_path, resolve, device)
    digests = {"model": digest, **({"classifier": classifier_digest} if classifier_digest else {}),
               **{k: v[1] for k, v in latent_files.items()}}
    options = with_model_noise(options, info)
    if options.reconstruction.noise != info.noise.kind:
        log.warning("the model was trained with %s noise, detection uses %s noise", info.noise.kind,
                    options.reconstruction.noise)
    with Batch(out_dir, device, progress=options.progress) as batch:
        if (options.reconstruction.method == "latent" and options.reconstruction.latent_thresholds is None
                and options.calibration is not None):  # the latent threshold map first, from the same scans
            path = latent_calibration(denoiser, info, options, resolve(options.calibration, "calibration scans"),
                                       out_dir, seed, latent_files["autoencoder"][1], device)
            options = options.updated(latent_thresholds=str(path))
            latent_files["latent_thresholds"] = (path, digests.setdefault("latent_thresholds", _digest(path)))
        thr, thr_record, calibration_failures = _threshold(denoiser, info, options, model_path, out_dir, batch,
                                                           seed, resolve, digests)
        inputs_path = Path(inputs)
        sources = find_cases(inputs_path, select=options.select, mask=resolve(options.mask, "mask"),
                             label=resolve(options.labels, "labels"))

        def one(source) -> CaseOutput:
            r = analyse(denoiser, info, load_case(source), options, seed=seed)
            units = _scan_units(r, options, thr)
            written, flagged, found = _write_case(r, units, options, thr, out_dir, inputs_path)
            fg = r.prepared.input_foreground
            row = {"case": r.case.name, "score": maps.case_score(r.score, fg, top_k=options.top_k),
                   "max": float(r.score.max()), "n_voxels_flagged": int(flagged.sum()) if flagged is not None else "",
                   "n_findings": len(found) if flagged is not None else "",
                   "largest_finding_mm3": found[0].volume_mm3 if found else "",
                   "threshold_scan_units": "" if units.threshold is None else units.threshold,
                   "mean_spread": r.mean_spread if options.reconstruction.samples > 1 else "",
                   "time_s": round(r.time_s, 3), "nfe": r.nfe}
            if options.reconstruction.method == "guided":  # the classifier's gradients, beside the denoiser's
                row["classifier_nfe"] = r.classifier_nfe
            if flagged is not None and r.case.label is not None:
                row.update(findings.lesion_detection(flagged, r.case.label))
            arrays = {} if r.case.label is None else {"score": r.score, "labels": r.case.label, "mask": fg}
            arrays.update(case_view(r.case.image, units.heatmap, lesion=r.case.label, flagged=flagged,
                                    uncertainty=units.spread, threshold=units.threshold,
                                    n_slices=options.overlay_slices))
            return CaseOutput(files=written, row=row, arrays=arrays, inputs=r.case.files)

        settings = options.model_dump(mode="json", exclude={"model", "inputs", "threshold", "calibration",
                                                            "labels", "mask", "progress"})
        key = fingerprint({"stage": "cases", **digests, "seed": seed, "threshold": thr, "settings": settings})
        got = batch.run(sources, one, key=key)
        if got is None:
            return TaskResult(summary=f"rank {batch.rank} of {batch.world_size}: its cases are written; rank 0 "
                                      "writes the run's tables")
        return _summarise(got, calibration_failures, denoiser, info, options, model_path, inputs_path, out_dir,
                          thr, thr_record, classifier=(classifier_path, classifier_digest), latent=latent_files)


def with_model_noise(options: AnomalySection, info: ModelInfo) -> AnomalySection:
    """The options with the model's training noise options when they noise with the model's kind of noise and
    name no options of their own (a simplex-trained model is noised with the simplex noise it learned)."""
    recon = options.reconstruction
    if recon.noise == info.noise.kind and not recon.noise_options and info.noise.options:
        return options.updated(noise_options=dict(info.noise.options))
    return options


def _digest(path: Path) -> str:
    from medidiff.weights import check_weights_file

    return check_weights_file(path)


def _open_latent(options: AnomalySection, info: ModelInfo, model_path: Path, resolve, device
                 ) -> tuple[AnomalySection, dict[str, tuple[Path, str]]]:
    """Method ``latent``'s VQ-VAE and threshold map: paths resolved as the model's is, the VQ-VAE checked against
    the model's record and loaded once.

    The VQ-VAE is ``autoencoder`` when given, else the path the model's ``model.json`` records, looked up from the
    working folder, else beside the latent model (a folder or file of the same last name, or that name with
    ``.safetensors``), else in the medidiff checkout.

    Returns:
        ``(options, files)``: the options naming the resolved paths, and ``{"autoencoder": (path, sha256),
        "latent_thresholds": (path, sha256)}`` (the map only when given); ``(options, {})`` for other methods.

    Raises:
        DataError: a file is missing. ModelError: it is unsafe or corrupt. ValueError: the model is not a latent
            one, or the VQ-VAE is not the one it was trained on.
    """
    recon = options.reconstruction
    if recon.method != "latent":
        return options, {}
    record = info.autoencoder
    if recon.autoencoder is not None:
        path = resolve(recon.autoencoder, "autoencoder weights")
    elif record is None:
        raise ValueError("method: latent needs a latent diffusion model (trained with training.autoencoder, e.g. "
                         "recipes/latent_brain_2d.yaml); this model has no autoencoder")
    else:
        folder = model_path.parent  # beside a model folder, or beside a weights file
        recorded = Path(record.path)
        candidates = [recorded, folder / recorded.name, folder / f"{recorded.name}.safetensors"]
        found = [p for p in candidates if model_paths(p)[0].is_file()]
        path = found[0] if found else resolve(record.path, "autoencoder weights")
    options = options.updated(autoencoder=str(path))
    _, digest = open_codec(options.reconstruction, info, device)
    files = {"autoencoder": (Path(path), digest)}
    if recon.latent_thresholds is not None:
        thresholds = resolve(recon.latent_thresholds, "latent threshold map")
        options = options.updated(latent_thresholds=str(thresholds))
        files["latent_thresholds"] = (Path(thresholds), _digest(thresholds))
    return options, files


def latent_calibration(denoiser, info: ModelInfo, options: AnomalySection, path: Path, out_dir: Path, seed: int,
                        autoencoder_sha256: str, device) -> Path:
    """Method ``latent``'s threshold map from the healthy scans at ``path`` (``medidiff.anomaly.latent``), written
    as ``latent_thresholds.safetensors``. Every rank computes the same map and writes it atomically.

    Raises:
        DataError: no scan could be used.
    """
    dims, prep = info.spatial_dims, info.data_prep
    axis = 2 if prep.slicing_axis is None else prep.slicing_axis
    codec, _ = open_codec(options.reconstruction, info, device)
    stacks, names = [], []
    for source in find_cases(path, select=options.select):
        try:
            case = load_case(source)
            prepared = prepare(case, prep, spatial_dims=dims, intensity=options.intensity)
        except DataError as e:
            log.warning("latent thresholds: %s skipped (%s)", source, e)
            continue

        def keep(stack: torch.Tensor, _fg: torch.Tensor) -> tuple[torch.Tensor]:
            stacks.append(stack)
            return (stack[:, :1],)

        if slicewise(keep, plain(prepared.image).float(), prepared.foreground, spatial_dims=dims, axis=axis,
                     min_foreground=options.min_foreground)[1]:
            names.append(case.name)
    if not stacks:
        raise DataError("no calibration scan could be used for the latent threshold map", where=path)
    thresholds, record = calibrate_thresholds(denoiser, [s.to(device) for s in stacks], options.reconstruction,
                                              codec=codec, seed=seed, progress=options.progress)
    record.update(source=str(path), cases=names, autoencoder_sha256=autoencoder_sha256)
    return save_thresholds(out_dir / LATENT_THRESHOLDS_FILE, thresholds, record)


def _open_classifier(options: AnomalySection, resolve, device) -> tuple[AnomalySection, Path | None, str | None]:
    """Method ``guided``'s classifier: its path resolved as the model's is, the file checked and loaded once.

    Returns:
        ``(options, path, sha256)``: the options naming the resolved path; ``(options, None, None)`` for other
        methods.

    Raises:
        DataError: the file is missing. ModelError: it is unsafe or corrupt. ValueError: it is not a classifier.
    """
    if options.reconstruction.method != "guided":
        return options, None, None
    path = resolve(options.reconstruction.classifier, "classifier weights")
    loaded = load_classifier(path, device)
    return options.updated(classifier=str(path)), path, loaded.sha256


def _summarise(got: BatchResult, calibration_failures: list[dict], denoiser, info: ModelInfo,
               options: AnomalySection, model_path: Path, inputs_path: Path, out_dir: Path, thr: float | None,
               thr_record: dict[str, Any], *, classifier: tuple[Path | None, str | None] = (None, None),
               latent: dict[str, tuple[Path, str]] | None = None) -> TaskResult:
    """The run's tables from every case's record (rank 0): scores, settings, metrics, report, failures."""
    rows = got.rows
    classifier_path, classifier_digest = classifier
    written_all = [*got.files, outputs.write_table(rows, out_dir / "scores.csv")]
    settings = {"model": str(model_path), "inputs": str(inputs_path), "threshold": thr, "threshold_record": thr_record,
                **options.model_dump(mode="json", exclude={"model", "inputs", "threshold"}),
                **({"classifier_sha256": classifier_digest} if classifier_digest else {}),
                **{f"{name}_sha256": digest for name, (_, digest) in (latent or {}).items()},
                "model_noise": info.noise.kind, "model_step": info.step,
                "data_prep": info.data_prep.model_dump(mode="json", exclude={"slices"}, exclude_none=True)}
    written_all.append(outputs.write_json(settings, out_dir / "detection.json"))
    if thr_record.get("source") is not None and (out_dir / thresholds.THRESHOLDS_FILE).is_file():
        written_all.append(out_dir / thresholds.THRESHOLDS_FILE)
    made = (latent or {}).get("latent_thresholds", (None,))[0]
    if made is not None and made.parent == out_dir and made.name == LATENT_THRESHOLDS_FILE:
        written_all.append(made)
    evaluated = {row["case"]: {"scores": got.arrays[row["case"]]["score"], "labels": got.arrays[row["case"]]["labels"],
                               "mask": got.arrays[row["case"]]["mask"], "score": row["score"]}
                 for row in rows if "labels" in got.arrays.get(row["case"], {})}
    metrics = None
    if evaluated:
        metrics = detection_metrics(evaluated, threshold=thr)
        metrics["dice_best_label"] = thresholds.ORACLE_LABEL
        per_slice = healthy_evaluations(options.reconstruction, process=denoiser.process)
        metrics["nfe_per_slice"] = per_slice.denoiser
        if options.reconstruction.method == "guided":
            metrics["classifier_nfe_per_slice"] = per_slice.classifier
        counted = [row for row in rows if row.get("lesions", "") != ""]
        if counted:  # lesion-level detection beside the voxel metrics (medidiff.anomaly.findings)
            metrics.update({k: int(sum(int(row[k]) for row in counted))
                            for k in ("lesions", "lesions_found", "false_positive_findings")})
            metrics["false_positive_findings_per_scan"] = metrics["false_positive_findings"] / len(counted)
        written_all.append(outputs.write_json(metrics, out_dir / "metrics.json"))
    if rows:
        written_all.append(write_report(out_dir, rows, metrics, settings))
        written_all.append(write_html(out_dir, rows, metrics, settings,
                                      {row["case"]: views_of(got.arrays.get(row["case"], {})) for row in rows}))
    failures = FailureLog(out_dir)
    failures.extend([*calibration_failures, *got.failures])
    if len(failures):
        written_all.append(failures.path)
    summary = f"{len(rows)} case(s) analysed, {len(failures)} skipped"
    if got.resumed:
        summary += f" ({got.resumed} complete from an earlier run)"
    if metrics:
        summary += (f"; voxel AUROC {metrics['auroc']:.3f}, AUPRC {metrics['auprc']:.3f}, "
                    f"Dice {metrics.get('dice', float('nan')):.3f} (threshold at FPR {options.fpr:g}), "
                    f"{thresholds.ORACLE_LABEL} {metrics['dice_best']:.3f}")
    log.info("%s", summary)
    weights = [model_paths(p)[0] for p in (model_path, classifier_path) if p is not None]  # files, for the manifest
    weights += [model_paths(p)[0] for p, _ in (latent or {}).values()
                if not (p.parent == out_dir and p.name == LATENT_THRESHOLDS_FILE)]  # a map made here is an output
    inputs = [*weights, *got.inputs]
    return TaskResult(outputs=written_all, inputs=inputs, rows=rows, metrics=metrics,
                      summary=summary, failures=len(failures), extra={"threshold": thr})
