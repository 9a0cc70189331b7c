"""The segmentation run's reports: ``report.md`` (settings, tables, overlays) and ``report.html``.

``case_view`` picks at case time what the HTML page shows of a case (every slice with a segmented voxel or
a reference voxel; the scan, the uncertainty map, the outlines); ``write_html`` builds the page once every
case is done (``medidiff.outputs.html``), with one uncertainty colour scale for the whole run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medidiff import outputs
from medidiff.outputs import cell
from medidiff.outputs import html as pages

__all__ = ["write_report", "write_html", "case_view", "LEGEND"]

#: Outline colours: the reference is drawn last, on top of the segmentation.
OUTLINES = {"segmentation": pages.Outline("#00bfff", "segmentation (the fused members; blue)", "segmented"),
            "reference": pages.Outline("#39ff14", "reference (the label given; green)", "reference")}
#: The plain-language legend of the page.
LEGEND = [
    ("Segmentation (mask)", "The voxels the model assigns to a structure: several members (samples of the model) "
                            "are drawn and fused, a voxel being kept where their mean probability reaches the "
                            "fusion threshold (the _segmentation NIfTI file): the blue outline."),
    ("Reference", "The label given with the scan, when there is one: the green outline, drawn on top of the blue "
                  "one so that it is always visible."),
    ("Uncertainty", "How much the members disagree at each voxel (by default the predictive entropy, in nats: 0 "
                    "where all members agree, up to 0.69 for two classes where they split half and half). High "
                    "uncertainty marks where the outline is least certain and deserves a closer look."),
    ("Dice, HD95, GED, ECE", "Dice: overlap with the reference (1 is perfect); HD95: the 95th percentile of the "
                             "distance between the outlines, in mm; GED: how far the members' spread is from the "
                             "raters' (lower is better); ECE: how far the probabilities are from the observed "
                             "frequencies (lower is better)."),
]


def _intro(settings: dict) -> str:
    s = settings["sampling"]
    return (f"Model: `{settings['model']}` (classes: {', '.join(settings['classes'])}); {s['members']} members, "
            f"sampler `{s['sampler']}` with {s['steps']} steps ({settings['nfe_per_slice']} network evaluations "
            f"per slice); fusion `{settings['fusion']}` at {settings['threshold']:g}; uncertainty map "
            f"`{settings['uncertainty']}` (nats; the case score is its mean over the members' foreground).")


def _tables(rows: list[dict], metrics: dict | None, bold: bool) -> list[pages.Table]:
    tables = []
    if metrics:
        mean = "**mean**" if bold else "mean"
        tables.append(pages.Table("Segmentation metrics (against the references)",
                                  ["case", "Dice", "HD95 (mm)", "GED", "ECE", "uncertainty-error AUROC"],
                                  [[name, cell(m.get("dice")), cell(m.get("hd95"), 2), cell(m.get("ged")),
                                    cell(m.get("ece")), cell(m.get("uncertainty_error_auroc"))]
                                   for name, m in [*metrics["per_case"].items(), (mean, metrics)]]))
    tables.append(pages.Table("Cases", ["case", "voxels", "volume (ml)", "uncertainty", "slices", "time (s)", "NFE"],
                              [[row["case"], row["voxels"], cell(row["volume_ml"]), cell(row["uncertainty"], 4),
                                row["slices"], f"{row['time_s']:.1f}", row["nfe"]] for row in rows]))
    return tables


def write_report(out_dir: Path, rows: list[dict], metrics: dict | None, settings: dict) -> Path:
    """Write ``report.md`` from the run's ``scores.csv`` rows, ``metrics.json`` and ``segmentation.json`` settings."""
    lines = ["# Segmentation report", "", _intro(settings), ""]
    for table in _tables(rows, metrics, bold=True):
        lines += [*pages.md_table(table), ""]
    for row in rows:
        lines += [f"## {row['case']}", "", f"![{row['case']}]({row['case']}_overlay.png)", ""]
    return outputs.write_text("\n".join(lines), out_dir / "report.md")


def case_view(image: Any, labels: torch.Tensor, uncertainty: torch.Tensor, *, reference: torch.Tensor | None = None,
              n_slices: int = 6) -> dict[str, torch.Tensor]:
    """What ``report.html`` shows of one case (kept with its record): ``medidiff.outputs.html.view_arrays``.

    Args:
        image: the scan (a MetaTensor with its affine), ``(C, X, Y, Z)``.
        labels: the fused labels ``(1, X, Y, Z)`` (0 background).
        uncertainty: the uncertainty map ``(K, X, Y, Z)`` (summed over its channels).
        reference: the reference labels, when given.
        n_slices: slices shown when nothing is segmented and there is no reference (the most uncertain).
    """
    return pages.view_arrays(image, image, layers={"uncertainty": uncertainty.sum(0, keepdim=True)},
                             masks={"segmentation": labels > 0,
                                    "reference": None if reference is None else reference > 0.5},
                             n_default=n_slices)


def write_html(out_dir: Path, rows: list[dict], metrics: dict | None, settings: dict,
               views: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write ``report.html``: settings, legend, the run-wide uncertainty scale, tables and every case's slices.

    Args:
        out_dir: the run folder.
        rows: the ``scores.csv`` rows.
        metrics: ``metrics.json`` (or ``None``).
        settings: ``segmentation.json``.
        views: per case name, its ``case_view`` arrays (a case without them is listed without images).
    """
    shown = [v for v in views.values() if v]
    scales = [pages.run_scale(shown, "uncertainty", label=f"Uncertainty ({settings['uncertainty']})", units="nats",
                              cmap="viridis")]
    panels = [pages.Panel("scan with outlines", outlines=("segmentation", "reference")),
              pages.Panel("uncertainty", overlay="uncertainty", outlines=("segmentation", "reference"))]

    def facts(row: dict, _view: dict) -> list[tuple[str, str]]:
        out = [("segmented voxels", str(row["voxels"])), ("volume (ml)", cell(row["volume_ml"])),
               ("mean uncertainty over the members' foreground (nats)", cell(row["uncertainty"], 4))]
        if row.get("dice") not in ("", None):
            out.append(("Dice with the reference", cell(row["dice"])))
        return out

    return pages.write_run_page(out_dir, "Segmentation report", rows=rows, views=views, panels=panels, facts=facts,
                                intro=[_intro(settings)], tables=_tables(rows, metrics, bold=False), legend=LEGEND,
                                scales=scales, outlines=OUTLINES)
