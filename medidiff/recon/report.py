"""The recon run's figures and tables: each case's PNG panel, the metric table and ``report.md``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medidiff import outputs
from medidiff.outputs import cell

__all__ = ["panel_png", "metrics_table", "write_report", "LABELS"]

#: How each method is named in figures and tables.
LABELS = {"reference": "reference", "zerofilled": "zero-filled", "fbp": "FBP", "tv": "TV", "recon": "diffusion"}
_METRICS = ("psnr", "ssim", "nmse")


def panel_png(result, path: Path, *, n_slices: int = 1, protected: Iterable[Path] = ()) -> Path:
    """A PNG panel per case: reference (when known), baselines and diffusion in one grey scale; error maps below.

    Args:
        result: a ``CaseResult`` (slices ``(S, 1, H, W)`` by method).
        path: the PNG file.
        n_slices: slices shown (evenly spaced over the reconstructed ones), one row pair each.
        protected: input paths that must not be overwritten.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure

    images = dict(result.images)
    order = [k for k in ("zerofilled", "fbp", "tv", "recon") if k in images]
    ref = result.reference
    columns = (["reference"] if ref is not None else []) + order
    n = next(iter(images.values())).shape[0]
    idx = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(n_slices, n))})
    rows = len(idx) * (2 if ref is not None else 1)
    fig = Figure(figsize=(2.4 * len(columns), 2.5 * rows), dpi=100)
    axes = np.asarray(fig.subplots(rows, len(columns), squeeze=False))
    for r, s in enumerate(idx):
        shown = {"reference": ref, **images} if ref is not None else images
        lo, hi = np.percentile((ref if ref is not None else images["recon"])[s, 0].numpy(), [0.5, 99.5])
        top = axes[r * (2 if ref is not None else 1)]
        for c, key in enumerate(columns):
            top[c].imshow(shown[key][s, 0].numpy().T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            top[c].set_title(f"{LABELS[key]}" + (f" (slice {s})" if c == 0 and n > 1 else ""), fontsize=9)
        if ref is None:
            continue
        bottom = axes[r * 2 + 1]
        err_max = max(float((images[k][s, 0] - ref[s, 0]).abs().quantile(0.995)) for k in order) or 1.0
        bottom[0].axis("off")
        for c, key in enumerate(order, start=1):
            err = (images[key][s, 0] - ref[s, 0]).abs().numpy()
            bottom[c].imshow(err.T, cmap="inferno", vmin=0, vmax=err_max, origin="lower")
            bottom[c].set_title(f"|{LABELS[key]} - reference|", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{result.name}: reconstruction", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with outputs.atomic_write(path, protected) as tmp:
        fig.savefig(tmp, format="png")
    return path


def metrics_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``metrics.json``: per case and method the rows' metrics, and per method their mean over cases."""
    per_case: dict[str, dict[str, Any]] = {}
    methods: dict[str, dict[str, float]] = {}
    for row in rows:
        per_case.setdefault(row["case"], {})[row["method"]] = {k: row[k] for k in (*_METRICS, "nfe", "seconds")
                                                              if k in row}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and "psnr" in r]
        if mine:
            methods[method] = {k: round(float(np.mean([r[k] for r in mine])), 5) for k in (*_METRICS, "nfe", "seconds")}
    return {"methods": methods, "per_case": per_case}


def write_report(out_dir: Path, rows: list[dict[str, Any]], metrics: dict | None, settings: dict) -> Path:
    """Write ``report.md``: settings, the metric table (when there is a reference), per-case rows and panels."""
    s, m = settings["solver"], settings["measurement"]
    modality = settings["modality"]
    measured = (f"acceleration {m['acceleration']:g}, {m['mask']} mask, {m['coils']} coil(s)" if modality == "mri"
                else f"{m['views']} views over {m['limited_angle'] or 180:g} degrees, dose "
                     f"{'noiseless' if m['dose'] is None else format(m['dose'], 'g')}")
    lines = ["# Reconstruction report", "",
             f"Prior: `{settings['model']}` (step {settings.get('model_step')}); solver `{s['name']}` "
             f"({s['steps'] or 'default'} steps, t_start {s['t_start']:g}); "
             f"prior applied `{settings['prior']['mode']}`; "
             f"{modality.upper()}: {measured} (simulated from images, or as measured); seed {settings['seed']}.", ""]
    if metrics:
        lines += ["| method | PSNR (dB) | SSIM | NMSE | NFE | seconds |", "|---|---|---|---|---|---|"]
        for method, v in metrics["methods"].items():
            lines.append(f"| {LABELS.get(method, method)} | {cell(v['psnr'], 2)} | {cell(v['ssim'], 4)} | "
                         f"{cell(v['nmse'], 5)} | {cell(v['nfe'], 0)} | {cell(v['seconds'], 1)} |")
        lines.append("")
    lines += ["| case | method | PSNR (dB) | SSIM | NFE | seconds |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['case']} | {LABELS.get(row['method'], row['method'])} | {cell(row.get('psnr'), 2)} | "
                     f"{cell(row.get('ssim'), 4)} | {row['nfe']} | {cell(row['seconds'], 1)} |")
    lines.append("")
    for case in dict.fromkeys(r["case"] for r in rows):
        lines += [f"## {case}", "", f"![{case}]({case}_panel.png)", ""]
    return outputs.write_text("\n".join(lines), Path(out_dir) / "report.md")
