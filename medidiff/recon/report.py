"""The recon run's figures and tables: each case's PNG panel, the metric table, ``report.md`` and ``report.html``.

``case_view`` keeps what the HTML page shows of a case (its reconstructed slices, at most ``max_slices``
of them, for the reference and every method); ``write_html`` builds the page (``medidiff.outputs.html``)
with the error maps ``|method - reference|`` on one colour scale for every method and case of the run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medidiff import outputs
from medidiff.outputs import cell, figures
from medidiff.outputs import html as pages

__all__ = ["panel_png", "metrics_table", "write_report", "write_html", "case_view", "LABELS", "LEGEND"]

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


def _intro(settings: dict) -> str:
    s, m = settings["solver"], settings["measurement"]
    modality = settings["modality"]
    measured = (f"acceleration {m['acceleration']:g}, {m['mask']} mask, {m['coils']} coil(s)" if modality == "mri"
                else f"{m['views']} views over {m['limited_angle'] or 180:g} degrees, dose "
                     f"{'noiseless' if m['dose'] is None else format(m['dose'], 'g')}")
    return (f"Prior: `{settings['model']}` (step {settings.get('model_step')}); solver `{s['name']}` "
            f"({s['steps'] or 'default'} steps, t_start {s['t_start']:g}); "
            f"prior applied `{settings['prior']['mode']}`; "
            f"{modality.upper()}: {measured} (simulated from images, or as measured); seed {settings['seed']}.")


def _tables(rows: list[dict[str, Any]], metrics: dict | None) -> list[pages.Table]:
    tables = []
    if metrics:
        tables.append(pages.Table("Mean over the cases", ["method", "PSNR (dB)", "SSIM", "NMSE", "NFE", "seconds"],
                                  [[LABELS.get(method, method), cell(v["psnr"], 2), cell(v["ssim"], 4),
                                    cell(v["nmse"], 5), cell(v["nfe"], 0), cell(v["seconds"], 1)]
                                   for method, v in metrics["methods"].items()]))
    tables.append(pages.Table("Cases", ["case", "method", "PSNR (dB)", "SSIM", "NFE", "seconds"],
                              [[row["case"], LABELS.get(row["method"], row["method"]), cell(row.get("psnr"), 2),
                                cell(row.get("ssim"), 4), row["nfe"], cell(row["seconds"], 1)] for row in rows]))
    return tables


def write_report(out_dir: Path, rows: list[dict[str, Any]], metrics: dict | None, settings: dict) -> Path:
    """Write ``report.md``: settings, the metric table (when there is a reference), per-case rows and panels."""
    lines = ["# Reconstruction report", "", _intro(settings), ""]
    for table in _tables(rows, metrics):
        lines += [*pages.md_table(table), ""]
    for case in dict.fromkeys(r["case"] for r in rows):
        lines += [f"## {case}", "", f"![{case}]({case}_panel.png)", ""]
    return outputs.write_text("\n".join(lines), Path(out_dir) / "report.md")


#: The plain-language legend of the page.
LEGEND = [
    ("Reference", "The image the measurements were simulated from (or the fully sampled one), when known: what a "
                  "perfect reconstruction would give."),
    ("Zero-filled / FBP", "The classical reconstruction from the same measurements: for MRI the inverse Fourier "
                          "transform with the missing k-space set to zero, for CT filtered back-projection."),
    ("TV", "Total-variation reconstruction: a classical method that favours piecewise-flat images."),
    ("Diffusion", "The reconstruction with the diffusion model as prior, kept consistent with the measurements."),
    ("Error map", "The absolute difference from the reference at each voxel, in the image's units: dark is "
                  "close to the reference, bright is far from it."),
    ("PSNR, SSIM, NMSE", "Agreement with the reference: higher PSNR (dB) and SSIM (1 is perfect) and lower NMSE "
                         "are better."),
]


def case_view(geometry, *, max_slices: int = 32) -> dict:
    """What ``report.html`` shows of one case: its reconstructed slices (``medidiff.outputs.html.view_arrays``).

    Args:
        geometry: the ``(case or affine, volumes by method, reference volume)`` the case's files were written
            from (an affine when the input was measured data: then its orientation is unknown).
        max_slices: at most this many slices, evenly spaced over the reconstructed ones.
    """
    where, volumes, reference = geometry
    oriented = not isinstance(where, np.ndarray)
    affine = outputs.affine_of(where.image if oriented else where)
    recon = np.asarray(volumes["recon"])
    recon = recon[0] if recon.ndim == 4 else recon
    axis = figures.slice_axis(affine, recon.shape)
    done = np.nonzero(np.abs(recon).sum(axis=tuple(d for d in range(3) if d != axis)) > 0)[0]
    image = reference if reference is not None else volumes["recon"]
    return pages.view_arrays(image, affine, layers={**volumes, **({"reference": reference} if reference is not None
                                                                  else {})},
                             slices=[int(i) for i in done], max_slices=max_slices, oriented=oriented)


def write_html(out_dir: Path, rows: list[dict[str, Any]], metrics: dict | None, settings: dict,
               views: dict[str, dict]) -> Path:
    """Write ``report.html``: settings, legend, tables, and every case's slices by method with error maps.

    Args:
        out_dir: the run folder.
        rows: the ``scores.csv`` rows.
        metrics: ``metrics.json`` (or ``None``).
        settings: the run's settings.
        views: per case name, its ``case_view`` arrays.
    """
    import torch

    methods = [k for k in ("zerofilled", "fbp", "tv", "recon") if any(pages.layer(v, k) is not None
                                                                     for v in views.values())]
    for view in views.values():
        ref = pages.layer(view, "reference")
        for k in methods:
            got = pages.layer(view, k)
            if ref is not None and got is not None:
                view[f"{pages.PREFIX}layer_error_{k}"] = torch.from_numpy(np.abs(got - ref))
    errors = [pages.layer(v, f"error_{k}") for v in views.values() for k in methods]
    errors = [e for e in errors if e is not None]
    scales = []
    if errors:
        vmin, vmax = figures.shared_scale(errors)
        scales = [pages.Scale(f"error_{k}", f"|{LABELS[k]} - reference|", "image units", vmin, vmax)
                  for k in methods]
    panels = [pages.Panel("reference", base="reference"), *[pages.Panel(LABELS[k], base=k) for k in methods],
              *[pages.Panel(f"|{LABELS[k]} - reference|", overlay=f"error_{k}", alpha=1.0) for k in methods]]
    cases = []
    for case in dict.fromkeys(r["case"] for r in rows):
        view = views.get(case)
        if not view:
            continue
        mine = {r["method"]: r for r in rows if r["case"] == case}
        facts = [(f"{LABELS.get(k, k)}: PSNR (dB) / SSIM", f"{cell(r.get('psnr'), 2)} / {cell(r.get('ssim'), 4)}")
                 for k, r in mine.items() if "psnr" in r]
        note = ("" if bool(int(view[f"{pages.PREFIX}oriented"][0])) else
                "Measured data: the patient's directions are not known, so the images carry no orientation letters.")
        cases.append(pages.case_section(case, view, panels, scales=scales, facts=facts, note=note,
                                        untagged="The reconstructed slices are shown (at most 32, evenly spaced)."))
    # one legend entry for the error maps' shared scale
    shown_scales = scales[:1] and [pages.Scale(scales[0].layer, "Error maps |method - reference| (all methods)",
                                               scales[0].units, scales[0].vmin, scales[0].vmax)]
    text = pages.page("Reconstruction report", intro=[_intro(settings)], tables=_tables(rows, metrics),
                      legend=LEGEND, scales=shown_scales, cases=cases)
    return pages.write_page(text, Path(out_dir) / "report.html")
