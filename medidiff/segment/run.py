"""Segmentation end to end: scans in, segmentations with uncertainty maps on the scans' own grids out.

``segment(model, inputs, out_dir, options)`` loads a segmentation model (``medidiff.weights.load_denoiser``;
a conditional diffusion model of masks, or the deterministic U-Net saved the same way), reads the cases
(``medidiff.cases``: NIfTI, DICOM, datalists with ``image``/``label``/``mask``/``annotations``), analyses
each (``medidiff.segment.predict``) and writes per case, on the scan's own grid:

- ``<case>_segmentation.nii.gz``: the fused labels (uint8; 0 background);
- ``<case>_probability.nii.gz``: the members' mean soft map (foreground probability, or one channel per class);
- ``<case>_uncertainty.nii.gz``: the chosen uncertainty map (default: predictive entropy, nats);
- ``<case>_segmentation.dcm``: the labels as a DICOM SEG in the source's study, for DICOM scans (``dicom``);
- ``<case>_overlay.png``: the most uncertain slices with the uncertainty heatmap, each member's contour,
  the fused contour and the reference's;

and for the run ``scores.csv`` (with each case's metrics), ``segmentation.json`` (settings),
``metrics.json`` (``dice``, ``hd95``, ``ged``, ``ece``, ``uncertainty_error_auroc``: means over the cases
with a label, and per case) when labels are given, ``report.md``, ``report.html`` (a self-contained page: every
slice with a segmented or a reference voxel, one uncertainty colour scale for the run;
``medidiff.segment.report``), and ``failures.csv`` for skipped cases.
The loop over cases is ``medidiff.batch.Batch``'s: sharded across ``torchrun`` ranks, and a run started
again skips the cases already complete.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medidiff import outputs
from medidiff.batch import Batch, CaseOutput, fingerprint
from medidiff.cases import find_cases, load_case
from medidiff.data.batch import FailureLog
from medidiff.errors import DataError
from medidiff.outputs.html import views_of
from medidiff.results import TaskResult
from medidiff.sections import open_model

from .config import SegmentSection
from .predict import CaseSegmentation, analyse, case_metrics, num_classes
from .report import case_view, write_html, write_report
from .sample import members_nfe

__all__ = ["segment", "METRICS"]

log = logging.getLogger("medidiff.segment")

#: The run's metrics, averaged over the cases with a label.
METRICS = ("dice", "hd95", "ged", "ece", "uncertainty_error_auroc")


def _reference(r: CaseSegmentation, n_classes: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The case's reference labels (multi-class labels read as they are) and all its annotations."""
    case = r.case
    if case.label is None:
        return None, []
    target = case.label
    if n_classes > 2:
        from medidiff.data.discover import load_companion

        target = load_companion(case.source, case.source.label, "label").as_tensor().float()
    return target, [target, *case.annotations] if case.annotations else []


def _write_case(r: CaseSegmentation, options: SegmentSection, classes: list[str], out_dir: Path,
                inputs: Path, target: torch.Tensor | None) -> list[Path]:
    """Every file of one case."""
    from medidiff import __version__

    case, protected = r.case, [inputs]

    def path(kind: str, ext: str = "nii.gz") -> Path:
        return outputs.result_path(out_dir, case.name, kind, ext)

    labels = r.labels.to(torch.uint8)
    written = [outputs.write_like(labels, case.image, path("segmentation"), dtype=np.uint8, protected=protected),
               outputs.write_like(r.probability, case.image, path("probability"), protected=protected),
               outputs.write_like(r.uncertainty, case.image, path("uncertainty"), protected=protected)]
    if options.dicom and case.source.kind == "dicom":
        try:
            written.append(outputs.write_dicom_seg(labels, case.image, case.source.paths, path("segmentation", "dcm"),
                                                   classes=classes, software_version=__version__,
                                                   protected=protected, deidentify=options.deidentify))
        except DataError as e:
            log.warning("%s: no DICOM SEG (%s); the NIfTI segmentation is written", case.name, e)
    contours = {f"member {k + 1}": m > 0 for k, m in enumerate(r.member_labels)}
    contours["fused"] = labels > 0
    if target is not None:
        contours["reference"] = target > 0.5
    written.append(outputs.overlay_png(
        case.image, r.uncertainty.sum(0, keepdim=True), contours, path("overlay", "png"),
        title=f"{case.name}: {r.member_labels.shape[0]} members, fused, {options.uncertainty}",
        units=options.uncertainty.replace("_", " "), n_slices=options.overlay_slices, protected=protected))
    return written


def _summary_metrics(rows: list[dict], nfe: int) -> dict[str, Any] | None:
    """The run's metrics from the rows of the cases with a label: means, and each case's own."""
    per_case = {row["case"]: {k: row[k] for k in METRICS if row.get(k) not in ("", None)}
                for row in rows if row.get("dice") not in ("", None)}
    if not per_case:
        return None
    out: dict[str, Any] = {}
    for key in METRICS:
        values = [m[key] for m in per_case.values() if key in m and np.isfinite(m[key])]
        if values:
            out[key] = float(np.mean(values))
    return {**out, "n_cases": len(per_case), "nfe_per_slice": nfe, "per_case": per_case}


def segment(model: str | Path, inputs: str | Path, out_dir: str | Path, options: SegmentSection | None = None, *,
            seed: int = 0, device: str | torch.device = "cpu", resolve=None, **changes: Any) -> TaskResult:
    """Segmentations with uncertainty maps for the scans at ``inputs`` (see the module docstring).

    Args:
        model: weights (``.safetensors`` with its ``.json``, or a folder) of a segmentation model.
        inputs: scans: a NIfTI file or folder, DICOM, or a JSON datalist.
        out_dir: the output folder.
        options: the ``segment`` section (default: its defaults); ``changes`` are applied to it, options of
            ``sampling`` given by their own names (``members=5``).
        seed: base seed of the members.
        device: where the model runs.
        resolve: ``resolve(path, what) -> Path`` for the section's relative paths (default: as given).

    Returns:
        The ``TaskResult``: outputs, inputs, the ``scores.csv`` rows, metrics, failures, summary.

    Raises:
        ValueError: an unknown or invalid option.
        ModelError, DataError: the model or the inputs cannot be used.
    """
    options = (options or SegmentSection()).updated(**changes)
    resolve = resolve or (lambda p, what: None if p is None else Path(p))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(model)
    denoiser, info, digest, device = open_model(model_path, device)
    n_classes = num_classes(info, model_path)
    classes = list(info.data_prep.labels.classes)
    inputs_path = Path(inputs)
    with Batch(out_dir, device, progress=options.progress) as batch:
        sources = find_cases(inputs_path, select=options.select, mask=resolve(options.mask, "mask"),
                             label=resolve(options.labels, "labels"))

        def one(source) -> CaseOutput:
            r = analyse(denoiser, info, load_case(source), options, seed=seed)
            target, annotations = _reference(r, n_classes)
            written = _write_case(r, options, classes, out_dir, inputs_path, target)
            scores = case_metrics(r, target, annotations, n_classes) if target is not None else {}
            voxel_ml = abs(float(np.linalg.det(outputs.affine_of(r.case.image)[:3, :3])))
            fg = int((r.labels > 0).sum())
            row = {"case": r.case.name, "voxels": fg, "volume_ml": round(fg * voxel_ml / 1000.0, 4),
                   "uncertainty": r.score, "max_uncertainty": float(r.uncertainty.max()),
                   **{k: scores.get(k, "") for k in METRICS}, "slices": r.n_slices, "time_s": round(r.time_s, 3),
                   "nfe": r.nfe}
            view = case_view(r.case.image, r.labels, r.uncertainty, reference=target, n_slices=options.overlay_slices)
            return CaseOutput(files=written, row=row, arrays=view, inputs=r.case.files)

        settings = options.model_dump(mode="json", exclude={"model", "inputs", "labels", "mask", "progress"})
        got = batch.run(sources, one, key=fingerprint({"stage": "cases", "model": digest, "seed": seed,
                                                       "settings": settings}))
        if got is None:
            return TaskResult(summary=f"rank {batch.rank} of {batch.world_size}: its cases are written; rank 0 "
                                      "writes the run's tables")
    rows = got.rows
    written_all = [*got.files, outputs.write_table(rows, out_dir / "scores.csv")]
    settings = {"model": str(model_path), "inputs": str(inputs_path), "classes": classes,
                **options.model_dump(mode="json", exclude={"model", "inputs"}), "model_step": info.step,
                "nfe_per_slice": members_nfe(options.sampling),
                "data_prep": info.data_prep.model_dump(mode="json", exclude={"slices"}, exclude_none=True)}
    written_all.append(outputs.write_json(settings, out_dir / "segmentation.json"))
    metrics = _summary_metrics(rows, members_nfe(options.sampling))
    if metrics:
        written_all.append(outputs.write_json(metrics, out_dir / "metrics.json"))
    if rows:
        written_all.append(write_report(out_dir, rows, metrics, settings))
        written_all.append(write_html(out_dir, rows, metrics, settings,
                                      {row["case"]: views_of(got.arrays.get(row["case"], {})) for row in rows}))
    failures = FailureLog(out_dir)
    failures.extend(got.failures)
    if len(failures):
        written_all.append(failures.path)
    summary = f"{len(rows)} case(s) segmented, {len(failures)} skipped"
    if got.resumed:
        summary += f" ({got.resumed} complete from an earlier run)"
    if metrics:
        summary += "; " + ", ".join(f"{k} {metrics[k]:.3f}" for k in METRICS if k in metrics)
    log.info("%s", summary)
    return TaskResult(outputs=written_all, inputs=[model_path, *got.inputs], rows=rows, metrics=metrics,
                      summary=summary, failures=len(failures))
