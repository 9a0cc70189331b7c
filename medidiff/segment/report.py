"""The segmentation run's ``report.md``: settings, the metric table, per-case rows and overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medidiff import outputs

__all__ = ["write_report"]


def _cell(value: Any, digits: int = 3) -> str:
    """A table cell: the number, or a dash where there is none (HD95 of an empty mask, GED of one annotation)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    return f"{value:.{digits}f}" if np.isfinite(value) else "—"


def write_report(out_dir: Path, rows: list[dict], metrics: dict | None, settings: dict) -> Path:
    """Write ``report.md`` from the run's ``scores.csv`` rows, ``metrics.json`` and ``segmentation.json`` settings."""
    s = settings["sampling"]
    lines = ["# Segmentation report", "",
             f"Model: `{settings['model']}` (classes: {', '.join(settings['classes'])}); {s['members']} members, "
             f"sampler `{s['sampler']}` with {s['steps']} steps ({settings['nfe_per_slice']} network evaluations "
             f"per slice); fusion `{settings['fusion']}` at {settings['threshold']:g}; uncertainty map "
             f"`{settings['uncertainty']}` (nats; the case score is its mean over the members' foreground).", ""]
    if metrics:
        lines += ["| case | Dice | HD95 (mm) | GED | ECE | uncertainty-error AUROC |", "|---|---|---|---|---|---|"]
        for name, m in [*metrics["per_case"].items(), ("**mean**", metrics)]:
            lines.append(f"| {name} | {_cell(m.get('dice'))} | {_cell(m.get('hd95'), 2)} | {_cell(m.get('ged'))} "
                         f"| {_cell(m.get('ece'))} | {_cell(m.get('uncertainty_error_auroc'))} |")
        lines.append("")
    lines += ["| case | voxels | volume (ml) | uncertainty | slices | time (s) | NFE |", "|---" * 7 + "|"]
    for row in rows:
        lines.append(f"| {row['case']} | {row['voxels']} | {_cell(row['volume_ml'])} | {_cell(row['uncertainty'], 4)} "
                     f"| {row['slices']} | {row['time_s']:.1f} | {row['nfe']} |")
    lines.append("")
    for row in rows:
        lines += [f"## {row['case']}", "", f"![{row['case']}]({row['case']}_overlay.png)", ""]
    return outputs.write_text("\n".join(lines), out_dir / "report.md")
