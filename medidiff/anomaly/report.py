"""The anomaly run's ``report.md``: settings, threshold, metric table, per-case rows and overlays."""

from __future__ import annotations

from pathlib import Path

from medidiff import outputs
from medidiff.outputs import cell

__all__ = ["write_report"]


def write_report(out_dir: Path, rows: list[dict], metrics: dict | None, settings: dict) -> Path:
    """Write ``report.md`` from the run's ``scores.csv`` rows, metrics and ``detection.json`` settings."""
    record = settings.get("threshold_record") or {}
    if settings.get("threshold") is None:
        threshold = "none (no calibration scans or threshold given): no anomaly masks"
    else:
        origin = (f"calibrated at voxel FPR {record['fpr']:g}" if record.get("fpr") is not None
                  else f"from {record.get('source', 'the user')}")
        threshold = f"{settings['threshold']:.4g} ({origin})"
    r = settings["reconstruction"]
    lines = ["# Anomaly detection report", "",
             f"Model: `{settings['model']}`; method `{r['method']}`, sampler `{r['sampler']}` "
             f"({r['steps']} steps) from t_L = {r['t_levels']}, {r['n_samples']} sample(s), "
             f"{r['noise']} noise; threshold {threshold}.", ""]
    if metrics:
        lines += ["| case | voxel AUROC | AUPRC | Dice | dice_best (oracle threshold) |", "|---|---|---|---|---|"]
        for name, m in [*metrics["per_case"].items(), ("**all (pooled voxels)**", metrics)]:
            lines.append(f"| {name} | {cell(m.get('auroc'))} | {cell(m.get('auprc'))} | {cell(m.get('dice'))} "
                         f"| {cell(m.get('dice_best'))} |")
        lines.append("")
    lines += ["| case | score | max | voxels flagged | time (s) | NFE |", "|---|---|---|---|---|---|"]
    for row in rows:
        flagged = "—" if row["n_voxels_flagged"] == "" else row["n_voxels_flagged"]
        lines.append(f"| {row['case']} | {row['score']:.4f} | {row['max']:.4f} | {flagged} | {row['time_s']:.1f} "
                     f"| {row['nfe']} |")
    lines.append("")
    for row in rows:
        lines += [f"## {row['case']}", "", f"![{row['case']}]({row['case']}_overlay.png)", ""]
    return outputs.write_text("\n".join(lines), out_dir / "report.md")
