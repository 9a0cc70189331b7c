"""The segmentation run's ``report.md``: settings, the metric table, per-case rows and overlays."""

from __future__ import annotations

from pathlib import Path

from medidiff import outputs
from medidiff.outputs import cell

__all__ = ["write_report"]


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
            lines.append(f"| {name} | {cell(m.get('dice'))} | {cell(m.get('hd95'), 2)} | {cell(m.get('ged'))} "
                         f"| {cell(m.get('ece'))} | {cell(m.get('uncertainty_error_auroc'))} |")
        lines.append("")
    lines += ["| case | voxels | volume (ml) | uncertainty | slices | time (s) | NFE |", "|---" * 7 + "|"]
    for row in rows:
        lines.append(f"| {row['case']} | {row['voxels']} | {cell(row['volume_ml'])} | {cell(row['uncertainty'], 4)} "
                     f"| {row['slices']} | {row['time_s']:.1f} | {row['nfe']} |")
    lines.append("")
    for row in rows:
        lines += [f"## {row['case']}", "", f"![{row['case']}]({row['case']}_overlay.png)", ""]
    return outputs.write_text("\n".join(lines), out_dir / "report.md")
