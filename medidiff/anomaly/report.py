"""The anomaly run's reports: ``report.md`` (settings, threshold, tables, overlays) and ``report.html``.

``case_view`` picks at case time what the HTML page shows of a case (every slice with a flagged voxel or
a reference lesion voxel; the scan, the heatmap, the spread between reconstructions, the outlines);
``write_html`` builds the page once every case is done (``medidiff.outputs.html``), with one colour scale
per map for the whole run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medidiff import outputs
from medidiff.outputs import cell
from medidiff.outputs import html as pages

__all__ = ["write_report", "write_html", "case_view", "LEGEND", "legend"]

#: Outline colours: the reference lesion is drawn last, on top of the flagged region.
OUTLINES = {"flagged": pages.Outline("#00bfff", "flagged region (above the threshold; blue)", "finding"),
            "lesion": pages.Outline("#39ff14", "reference lesion (from the labels given; green)", "lesion")}
#: The plain-language legend of the page.
LEGEND = [
    ("Heatmap", "How different each voxel of the scan is from the model's reconstruction of healthy tissue: the "
                "absolute difference, in the scan's own intensity units (as in the _heatmap NIfTI file). "
                "Brighter means more unusual. It is not a probability and not a diagnosis."),
    ("Threshold", "The heatmap value above which a voxel is flagged. It is set on the model's internal scale, "
                  "the same for every scan, so in a scan's own units (shown per case) it differs from scan to "
                  "scan."),
    ("FPR (false-positive rate)", "The share of voxels of healthy scans that lie above the threshold: an FPR of "
                                  "0.05 means about 5 in every 100 healthy voxels are flagged. A calibrated "
                                  "threshold is set on healthy scans to reach the FPR asked for."),
    ("Flagged region (anomaly mask)", "The voxels inside the scan's foreground whose heatmap is above the "
                                      "threshold (the _anomaly_mask NIfTI file): the blue outline."),
    ("Reference lesion", "The lesion drawn in the labels given with the scan: the green outline, drawn on top of "
                         "the blue one so that it is always visible."),
    ("Uncertainty", "How much several healthy reconstructions of the same scan disagree (their spread, in the "
                    "scan's units; only with more than one sample). Where it is high the model is unsure what "
                    "healthy tissue looks like, and a flagged voxel there deserves less trust."),
    ("AUROC, AUPRC, Dice", "How well the heatmap separates lesion from other voxels (1 is perfect; an AUROC of "
                           "0.5 is chance) and how much the flagged region overlaps the reference lesion."),
]
#: The heatmap and threshold entries when each scan's map is divided by its own scale (``map.scan_quantile``).
PER_SCAN_LEGEND = {
    "Heatmap": "How different each voxel of the scan is from the model's reconstruction of healthy tissue: the "
               "absolute difference divided by the scan's own {q:g}-quantile of it over the brain (as in the "
               "_heatmap NIfTI file), so 1 is a typical difference for this scan and 3 is three times that. "
               "Brighter means more unusual. It is not a probability and not a diagnosis.",
    "Threshold": "The heatmap value above which a voxel is flagged: one number for every scan, since each scan's "
                 "heatmap is on its own scale.",
}


def _scan_quantile(settings: dict) -> float | None:
    """The run's ``map.scan_quantile`` (``None``: the heatmaps are in the scans' intensity units)."""
    return (settings.get("map") or {}).get("scan_quantile")


def legend(settings: dict) -> list[tuple[str, str]]:
    """The page's legend for a run's ``detection.json`` settings (the heatmap's scale as the run made it)."""
    q = _scan_quantile(settings)
    if q is None:
        return LEGEND
    return [(k, PER_SCAN_LEGEND[k].format(q=q) if k in PER_SCAN_LEGEND else v) for k, v in LEGEND]


def _threshold_text(settings: dict) -> str:
    record = settings.get("threshold_record") or {}
    if settings.get("threshold") is None:
        return "none (no calibration scans or threshold given): no anomaly masks"
    origin = (f"calibrated at voxel FPR {record['fpr']:g}" if record.get("fpr") is not None
              else f"from {record.get('source', 'the user')}")
    q = _scan_quantile(settings)
    if q is not None:
        return (f"{settings['threshold']:.4g} ({origin}), in the heatmaps' units: each scan's residual over its own "
                f"{q:g}-quantile, the same number for every scan")
    return (f"{settings['threshold']:.4g} on the model's [-1, 1] scale ({origin}); each scan's heatmap is in its "
            "own intensity units, where the threshold is the case's value in the table below (and its heatmap's "
            "cal_min)")


def _method_text(r: dict) -> str:
    """The method and its own settings (a guided method's classifier or guidance weight)."""
    if r["method"] == "guided":
        return (f"method `guided` (classifier `{r['classifier']}`, scale {r['guidance_scale']:g} toward class "
                f"{r['target_class']}; NFE counts the denoiser's evaluations, the classifier's gradients are listed "
                "beside them)")
    if r["method"] == "counterfactual":
        return (f"method `counterfactual` (null-class inversion, decoding toward class {r['healthy_class']} with "
                f"guidance weight {r['guidance_weight']:g}; each decoding step counts two evaluations)")
    return f"method `{r['method']}`"


def _intro(settings: dict) -> str:
    r = settings["reconstruction"]
    return (f"Model: `{settings['model']}`; {_method_text(r)}, sampler `{r['sampler']}` "
            f"({r['steps']} steps) from t_L = {r['t_levels']}, {r['n_samples']} sample(s), "
            f"{r['noise']} noise; threshold {_threshold_text(settings)}.")


def _nfe_text(row: dict) -> str:
    """A case's network evaluations: the denoiser's, and the classifier's gradients when there are any."""
    extra = row.get("classifier_nfe", "")
    return f"{row['nfe']}" if extra in ("", None) else f"{row['nfe']} + {extra} classifier gradients"


#: Findings listed per case in the reports (the rest are in ``<case>_findings.csv``).
LISTED_FINDINGS = 5


def _findings_table(out_dir: Path, rows: list[dict]) -> pages.Table | None:
    """The largest flagged regions of each case, from its ``<case>_findings.csv``."""
    import csv

    listed = []
    for row in rows:
        path = Path(out_dir) / f"{row['case']}_findings.csv"
        if not path.is_file():
            continue
        with path.open(newline="", encoding="utf-8") as f:
            for finding in list(csv.DictReader(f))[:LISTED_FINDINGS]:
                listed.append([row["case"], finding["rank"], finding["volume_mm3"],
                               f"({finding['x_mm']}, {finding['y_mm']}, {finding['z_mm']})",
                               f"{float(finding['peak']):.4g}", finding["peak_voxel"]])
    if not listed:
        return None
    return pages.Table(f"Findings: the largest flagged regions of each case (at most {LISTED_FINDINGS}; all in "
                       "<case>_findings.csv)", ["case", "rank", "volume (mm³)", "centroid (world mm, RAS)",
                                                 "peak (scan units)", "peak voxel (i j k)"], listed)


def _tables(rows: list[dict], metrics: dict | None, bold: bool, out_dir: Path | None = None) -> list[pages.Table]:
    tables = []
    if metrics:
        pooled = "**all (pooled voxels)**" if bold else "all (pooled voxels)"
        tables.append(pages.Table("Detection metrics (against the reference lesions)",
                                  ["case", "voxel AUROC", "AUPRC", "Dice", "dice_best (oracle threshold)"],
                                  [[name, cell(m.get("auroc")), cell(m.get("auprc")), cell(m.get("dice")),
                                    cell(m.get("dice_best"))]
                                   for name, m in [*metrics["per_case"].items(), (pooled, metrics)]]))
    tables.append(pages.Table("Cases", ["case", "score", "max", "voxels flagged",
                                        "threshold (in the heatmap's units)", "time (s)", "NFE"],
                              [[row["case"], f"{row['score']:.4f}", f"{row['max']:.4f}",
                                "—" if row["n_voxels_flagged"] == "" else row["n_voxels_flagged"],
                                cell(row.get("threshold_scan_units"), fmt=".4g"),
                                f"{row['time_s']:.1f}", _nfe_text(row)] for row in rows]))
    if metrics and "lesions" in metrics:
        tables.append(pages.Table("Lesion-level detection (a lesion is found when a flagged voxel lies in it)",
                                  ["case", "lesions", "found", "false-positive findings"],
                                  [[row["case"], row["lesions"], row["lesions_found"], row["false_positive_findings"]]
                                   for row in rows if row.get("lesions", "") != ""]
                                  + [["all", metrics["lesions"], metrics["lesions_found"],
                                      f"{metrics['false_positive_findings']} "
                                      f"({metrics['false_positive_findings_per_scan']:.2f} per scan)"]]))
    found = None if out_dir is None else _findings_table(out_dir, rows)
    return tables + ([found] if found else [])


def write_report(out_dir: Path, rows: list[dict], metrics: dict | None, settings: dict) -> Path:
    """Write ``report.md`` from the run's ``scores.csv`` rows, metrics and ``detection.json`` settings."""
    lines = ["# Anomaly detection report", "", _intro(settings), ""]
    for table in _tables(rows, metrics, bold=True, out_dir=out_dir):
        lines += [*pages.md_table(table), ""]
    for row in rows:
        lines += [f"## {row['case']}", "", f"![{row['case']}]({row['case']}_overlay.png)", ""]
    return outputs.write_text("\n".join(lines), out_dir / "report.md")


def case_view(image: Any, heatmap: torch.Tensor, *, lesion: torch.Tensor | None = None,
              flagged: torch.Tensor | None = None, uncertainty: torch.Tensor | None = None,
              threshold: float | None = None, n_slices: int = 6) -> dict[str, torch.Tensor]:
    """What ``report.html`` shows of one case (kept with its record): ``medidiff.outputs.html.view_arrays``.

    Args:
        image: the scan (a MetaTensor with its affine), ``(C, X, Y, Z)``.
        heatmap: the heatmap in the scan's units, ``(1, X, Y, Z)``.
        lesion: the reference lesion mask, when given.
        flagged: the flagged voxels, when there is a threshold.
        uncertainty: the spread between reconstructions in the scan's units, when there are several.
        threshold: the threshold in this scan's units.
        n_slices: slices shown when nothing is flagged and there is no lesion (those holding most heatmap).
    """
    view = pages.view_arrays(image, image, layers={"heatmap": heatmap, "uncertainty": uncertainty},
                             masks={"flagged": flagged, "lesion": lesion}, n_default=n_slices)
    if threshold is not None:
        view["view_threshold"] = torch.tensor([float(threshold)], dtype=torch.float64)
    return view


def write_html(out_dir: Path, rows: list[dict], metrics: dict | None, settings: dict,
               views: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write ``report.html``: settings, legend, run-wide colour scales, tables and every case's slices.

    Args:
        out_dir: the run folder.
        rows: the ``scores.csv`` rows.
        metrics: ``metrics.json`` (or ``None``).
        settings: ``detection.json``.
        views: per case name, its ``case_view`` arrays (a case without them is listed without images).
    """
    shown = [v for v in views.values() if v]
    q = _scan_quantile(settings)
    heat_units = "scan's intensity units" if q is None else f"multiples of each scan's {q:g}-quantile"
    scales = [pages.run_scale(shown, "heatmap", label="Heatmap", units=heat_units),
              pages.run_scale(shown, "uncertainty", label="Uncertainty (spread)", units="scan's intensity units",
                              cmap="viridis")]
    panels = [pages.Panel("scan with outlines", outlines=("flagged", "lesion")),
              pages.Panel("heatmap", overlay="heatmap", outlines=("flagged", "lesion")),
              pages.Panel("uncertainty", overlay="uncertainty", outlines=("flagged", "lesion"))]
    def facts(row: dict, view: dict) -> list[tuple[str, str]]:
        out = [("case score (mean of the top heatmap values)", f"{row['score']:.4f}"),
               ("voxels flagged", "none (no threshold)" if row["n_voxels_flagged"] == ""
                else str(row["n_voxels_flagged"]))]
        if "view_threshold" in view:
            out.append(("threshold in this scan's units", f"{float(view['view_threshold'][0]):.4g}"))
        return out

    return pages.write_run_page(out_dir, "Anomaly detection report", rows=rows, views=views, panels=panels,
                                facts=facts, intro=[_intro(settings)],
                                tables=_tables(rows, metrics, bold=False, out_dir=out_dir), legend=legend(settings),
                                scales=scales, outlines=OUTLINES)
