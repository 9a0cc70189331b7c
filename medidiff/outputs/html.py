"""Self-contained HTML reports: one page per run, readable in any browser with no other file or network.

Every task writes ``report.html`` beside its ``report.md`` with the pieces here:

- ``view_arrays``: at case time, the slices a report shows (every slice holding a mask voxel, e.g. a
  finding or a reference lesion; else the ``n`` slices holding most of a map), kept with the case's
  completion record so the page can be written once every case is done (whatever the ranks, after a
  resume);
- ``case_section``: a case's slices rendered (``medidiff.outputs.figures``) as PNG images embedded as
  base64, one image per panel and slice, with one colour scale per map for the whole run;
- ``page`` and ``write_page``: the page itself: the run's settings and tables, a plain-language legend,
  the colour scales with their numbers, and per case a slice slider and a list of the slices with a
  finding or a reference lesion.

Orientation: slices are the axial ones (``figures.slice_axis``), drawn in the **radiological view** by
default (the patient's right on the image's left, as if facing the patient); a check box at the top of
the page switches every image to the neurological view (the mirror image) and the R/L letters at the
image edges follow. Slice numbers are the voxel index along the slice axis of the written NIfTI files,
counted from 0 (3D Slicer's IJK coordinates). The page's script only shows and hides what is already
on the page; without scripts every slice is shown, in the radiological view.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medidiff.arrays import to_numpy

from . import figures
from .files import PathLike, write_text

__all__ = ["Panel", "Scale", "Outline", "CaseSection", "Table", "view_arrays", "views_of", "run_scale",
           "write_run_page", "case_section", "page", "write_page", "ORIENTATION_LEGEND", "SLICE_LEGEND", "SCALE_LEGEND"]

#: The prefix of the keys ``view_arrays`` returns (kept with a case's other arrays).
PREFIX = "view_"
#: The most pixels along an image's longer side on the page.
_SIDE_PX = 300
_UNTAGGED = "No slice holds a finding or a reference outline; the slices shown hold most of the map."
#: Texts every report's legend holds.
ORIENTATION_LEGEND = ("Orientation letters",
                      "The letters at the edges of each image give the patient's side: R right, L left, A front "
                      "(anterior), P back (posterior), S head end (superior), I feet end (inferior). Images are "
                      "shown in the radiological view (the patient's right on the image's left, as if facing "
                      "the patient); the check box at the top switches to the neurological view (the mirror "
                      "image), and the letters follow.")
SLICE_LEGEND = ("Slice numbers",
                "The voxel index along the slice axis of the NIfTI files this run wrote, counted from 0, as 3D "
                "Slicer shows it in IJK coordinates (a viewer that counts from 1 shows the same slice as this "
                "number plus 1). The slider shows every slice listed below it; the list names the slices with "
                "a finding or a reference outline.")
SCALE_LEGEND = ("Colour scales",
                "Each map has one colour scale for every case of this run (numbers below), so the same colour "
                "means the same value in every case. Values at or below the bottom of a scale are not "
                "coloured.")


@dataclass(frozen=True)
class Scale:
    """One run-wide colour scale of a map.

    Attributes:
        layer: the map's name in the view arrays.
        label: what the map is, for the legend.
        units: its units.
        vmin: the bottom of the scale (not coloured at or below it).
        vmax: the top.
        cmap: a matplotlib colour map.
    """

    layer: str
    label: str
    units: str
    vmin: float
    vmax: float
    cmap: str = "inferno"


@dataclass(frozen=True)
class Outline:
    """How a mask is outlined: its colour, its name in the legend, and the word listing its slices."""

    colour: str
    label: str
    tag: str


@dataclass(frozen=True)
class Panel:
    """One image of each slice: a grey layer, optionally a map over it, and outlines (later ones on top)."""

    title: str
    base: str = "image"
    overlay: str | None = None
    outlines: tuple[str, ...] = ()
    alpha: float = 0.6


@dataclass(frozen=True)
class Table:
    """A table of the page: caption, header and rows of text cells."""

    caption: str
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass
class CaseSection:
    """A case's part of the page, its images already rendered (see ``case_section``)."""

    name: str
    facts: list[tuple[str, str]]
    plane: str
    axis: int
    n_slices: int
    slices: list[int]
    tags: list[list[str]]
    panels: list[str]
    images: list[list[str]]  # per slice, per panel: a PNG as base64
    size: tuple[int, int]
    markers: dict[str, dict[str, str]] | None
    note: str = ""
    untagged: str = ""


# ------------------------------------------------------------------------------------- case time


def _volume(x: Any) -> np.ndarray:
    """A ``(X, Y, Z)`` float array from ``(C, X, Y, Z)`` (first channel) or ``(X, Y, Z)``."""
    a = np.asarray(to_numpy(x))
    return a[0] if a.ndim == 4 else a


def view_arrays(image: Any, affine: Any, *, layers: Mapping[str, Any | None] = (),
                masks: Mapping[str, Any | None] = (), slices: Sequence[int] | None = None, n_default: int = 6,
                max_slices: int | None = None, oriented: bool = True) -> dict[str, torch.Tensor]:
    """The slices of one case a report shows, as tensors to keep with the case's record.

    The slices (along ``figures.slice_axis``) are those given, else those holding a voxel of any mask;
    where no mask has one, the ``n_default`` slices holding most of the first layer (else evenly spaced
    ones over the slices the image fills).

    Args:
        image: the scan ``(C, X, Y, Z)`` or ``(X, Y, Z)`` (its first channel is shown in grey).
        affine: its voxel-to-RAS affine (that of the written NIfTI files).
        layers: maps on the same grid, by name (``None`` entries are left out).
        masks: masks on the same grid, by name (``None`` entries are left out).
        slices: the slices to show (voxel indices along the slice axis), instead of choosing them.
        n_default: slices shown when no mask has a voxel.
        max_slices: at most this many slices, evenly spaced over those chosen (default: all of them).
        oriented: whether the affine gives the patient's directions (``False``: no orientation letters).

    Returns:
        ``{"view_axis", "view_index", "view_affine", "view_oriented", "view_image",
        "view_layer_<name>", "view_mask_<name>"}``; planes ``(K, ...)`` in array order.
    """
    img = _volume(image).astype(np.float32)
    aff = np.asarray(to_numpy(getattr(affine, "affine", affine)), dtype=np.float64)
    axis = figures.slice_axis(aff, img.shape)
    layers = {k: _volume(v).astype(np.float32) for k, v in dict(layers).items() if v is not None}
    masks = {k: _volume(v) > 0.5 for k, v in dict(masks).items() if v is not None}
    other = tuple(d for d in range(3) if d != axis)
    if slices is not None:
        chosen = sorted({int(i) for i in slices if 0 <= int(i) < img.shape[axis]})
    else:
        chosen = sorted({int(i) for m in masks.values() for i in np.nonzero(m.any(axis=other))[0]})
    if not chosen:
        if layers:
            chosen = figures.relevant_slices(next(iter(layers.values())), n_default, axis)
        else:
            nz = np.nonzero(np.abs(np.nan_to_num(img)).sum(axis=other))[0]
            lo, hi = (int(nz[0]), int(nz[-1])) if nz.size else (0, img.shape[axis] - 1)
            chosen = [lo + i for i in figures.relevant_slices(np.zeros(hi - lo + 1), n_default, 0)]
    if max_slices is not None and len(chosen) > max_slices:
        chosen = sorted({chosen[int(round(i))] for i in np.linspace(0, len(chosen) - 1, max_slices)})

    def planes(v: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.take(v, chosen, axis=axis), axis, 0)))

    out = {f"{PREFIX}axis": torch.tensor([axis]), f"{PREFIX}index": torch.tensor(chosen, dtype=torch.int64),
           f"{PREFIX}affine": torch.from_numpy(aff), f"{PREFIX}oriented": torch.tensor([int(oriented)]),
           f"{PREFIX}shape": torch.tensor(img.shape), f"{PREFIX}image": planes(img)}
    out.update({f"{PREFIX}layer_{k}": planes(v) for k, v in layers.items()})
    out.update({f"{PREFIX}mask_{k}": planes(v.astype(np.uint8)) for k, v in masks.items()})
    return out


def views_of(arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``view_arrays`` among a case's stored arrays (an empty dict when there are none)."""
    return {k: v for k, v in arrays.items() if k.startswith(PREFIX)}


def layer(view: Mapping[str, torch.Tensor], name: str) -> np.ndarray | None:
    """A layer (``image``, a map's name or ``mask_<name>``) of a case's view arrays, as ``(K, ...)`` NumPy."""
    key = f"{PREFIX}{name}" if name == "image" or name.startswith("mask_") else f"{PREFIX}layer_{name}"
    return None if key not in view else view[key].numpy()


def run_scale(views: Iterable[Mapping[str, torch.Tensor]], name: str, *, label: str, units: str,
              low: float = 0.0, cmap: str = "inferno", top: float | None = None) -> Scale | None:
    """One colour scale of the map ``name`` for all cases: ``low`` to the 99.5th percentile over their shown slices.

    Args:
        views: every case's view arrays.
        name: the map.
        label: what it is, for the legend.
        units: its units.
        low: the bottom of the scale.
        cmap: the colour map.
        top: a fixed top (e.g. ``ln 2`` for a binary entropy) instead of the percentile.

    Returns:
        The ``Scale``, or ``None`` when no case has the map.
    """
    maps = [m for m in (layer(v, name) for v in views) if m is not None]
    if not maps:
        return None
    vmin, vmax = figures.shared_scale(maps, low=low)
    return Scale(name, label, units, vmin, float(top) if top is not None else vmax, cmap)


# ------------------------------------------------------------------------------------- the page


def _b64(rgb: np.ndarray) -> str:
    return base64.b64encode(figures.png_bytes(rgb)).decode("ascii")


def case_section(name: str, view: Mapping[str, torch.Tensor], panels: Sequence[Panel], *,
                 scales: Iterable[Scale | None] = (), outlines: Mapping[str, Outline] = (),
                 facts: Sequence[tuple[str, str]] = (), note: str = "", grey: tuple[float, float] | None = None,
                 untagged: str = _UNTAGGED, view_mode: str = "radiological") -> CaseSection:
    """A case's slices rendered for the page: every panel at every shown slice, in ``view_mode``.

    Args:
        name: the case name.
        view: its ``view_arrays``.
        panels: the images of each slice; panels whose layers the case lacks are left out.
        scales: the run's colour scales (a map without one gets its own, from this case).
        outlines: how each mask is drawn and named.
        facts: ``(what, value)`` lines shown above the images.
        note: a sentence shown under them.
        grey: the grey window (default: the 0.5th to 99.5th percentile of the shown image slices).
        untagged: the sentence shown when no slice holds an outlined voxel.
        view_mode: ``radiological`` or ``neurological``: how the images are drawn (the page can mirror them).

    Returns:
        The ``CaseSection``.
    """
    scales = {s.layer: s for s in scales if s is not None}
    outlines = dict(outlines)
    axis = int(view[f"{PREFIX}axis"][0])
    index = [int(i) for i in view[f"{PREFIX}index"]]
    shape = [int(s) for s in view[f"{PREFIX}shape"]]
    layout = figures.SliceLayout.from_affine(view[f"{PREFIX}affine"].numpy(), axis)
    oriented = bool(int(view[f"{PREFIX}oriented"][0]))
    image = layer(view, "image")
    grey = grey or figures.grey_range([image])
    usable = [p for p in panels if layer(view, p.base) is not None
              and (p.overlay is None or layer(view, p.overlay) is not None)]
    for p in usable:  # a map without a run-wide scale gets this case's own
        if p.overlay is not None and p.overlay not in scales:
            vmin, vmax = figures.shared_scale([layer(view, p.overlay)])
            scales[p.overlay] = Scale(p.overlay, p.overlay, "", vmin, vmax)
    in_plane = [shape[d] for d in range(3) if d != axis]
    n_across, n_up = (in_plane[0], in_plane[1]) if layout.across < layout.up else (in_plane[1], in_plane[0])
    width_mm, height_mm = n_across * layout.spacing[0], n_up * layout.spacing[1]
    px = _SIDE_PX / max(width_mm, height_mm)
    size = (max(1, round(width_mm * px)), max(1, round(height_mm * px)))
    zoom = int(np.clip(_SIDE_PX // max(n_across, n_up), 1, 8))  # small images magnified; large ones as they are

    def oriented_plane(a: np.ndarray) -> np.ndarray:
        return figures.orient_slice(a, layout, view_mode)

    images, tags = [], []
    for k in range(len(index)):
        row = []
        for p in usable:
            base = oriented_plane(layer(view, p.base)[k])
            over = scale = None
            if p.overlay is not None:
                over = oriented_plane(layer(view, p.overlay)[k])
                scale = (scales[p.overlay].vmin, scales[p.overlay].vmax)
            lines = [(oriented_plane(layer(view, f"mask_{m}")[k]), outlines[m].colour) for m in p.outlines
                     if layer(view, f"mask_{m}") is not None]
            cmap = scales[p.overlay].cmap if p.overlay in scales else "inferno"
            row.append(_b64(figures.render_slice(base, grey, overlay=over, scale=scale, cmap=cmap, alpha=p.alpha,
                                                 outlines=lines, zoom=zoom)))
        images.append(row)
        tags.append([o.tag for m, o in outlines.items()
                     if layer(view, f"mask_{m}") is not None and layer(view, f"mask_{m}")[k].any()])
    markers = ({v: layout.markers(v) for v in figures.VIEWS} if oriented else None)
    return CaseSection(name=name, facts=list(facts), plane=layout.plane if oriented else "", axis=axis,
                       n_slices=shape[axis], slices=index, tags=tags, panels=[p.title for p in usable], images=images,
                       size=size, markers=markers, note=note, untagged=untagged)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:72em;
 padding:0 1em;color:#1a1a1a;line-height:1.45}
h1{font-size:1.5em}h2{font-size:1.25em;border-top:1px solid #ccc;padding-top:.8em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0 1em}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}caption{text-align:left;font-weight:600;padding:.2em 0}
dl.legend dt{font-weight:600;margin-top:.5em}dl.legend dd{margin-left:1.2em}
.swatch{display:inline-block;width:1.6em;height:.35em;vertical-align:middle;margin-right:.3em;border:1px solid #555}
.bar{vertical-align:middle;height:14px;width:256px;border:1px solid #555;margin:0 .4em}
.toolbar{position:sticky;top:0;background:#fff;padding:.4em 0;border-bottom:1px solid #ddd;z-index:2}
.facts td{text-align:left}.nav{margin:.5em 0}.nav input{width:20em;vertical-align:middle}
.slice{margin:.6em 0 1.2em}.slice h3{font-size:1em;margin:.2em 0}
.panels{display:flex;flex-wrap:wrap;gap:12px}.panel{text-align:center;font-size:.9em}
.frame{position:relative;display:inline-block;background:#000;line-height:0}
.frame img{image-rendering:pixelated;display:block}
.mk{position:absolute;color:#fff;font:bold 14px/1 monospace;text-shadow:0 0 3px #000,0 0 2px #000}
.mk.l{left:3px;top:50%;transform:translateY(-50%)}.mk.r{right:3px;top:50%;transform:translateY(-50%)}
.mk.t{top:3px;left:50%;transform:translateX(-50%)}.mk.b{bottom:3px;left:50%;transform:translateX(-50%)}
body.neuro .frame img{transform:scaleX(-1)}
.js .slice{display:none}.js .slice.on{display:block}
.jump a{margin-right:.6em;white-space:nowrap}.note{color:#444;font-size:.92em}
"""

_SCRIPT = """
document.documentElement.classList.add('js');
function showSlice(sec, k) {
  var all = sec.querySelectorAll('.slice');
  for (var i = 0; i < all.length; i++) { all[i].classList.toggle('on', i === k); }
  var slider = sec.querySelector('input.slider');
  if (slider) { slider.value = String(k); }
  var where = sec.querySelector('.where');
  if (where && all[k]) { where.textContent = all[k].getAttribute('data-label'); }
}
var cases = document.querySelectorAll('section.case');
for (var c = 0; c < cases.length; c++) {
  (function (sec) {
    var slider = sec.querySelector('input.slider');
    if (slider) { slider.addEventListener('input', function () { showSlice(sec, parseInt(slider.value, 10)); }); }
    var links = sec.querySelectorAll('a.go');
    for (var j = 0; j < links.length; j++) {
      links[j].addEventListener('click', function (e) {
        e.preventDefault(); showSlice(sec, parseInt(this.getAttribute('data-k'), 10));
      });
    }
    showSlice(sec, 0);
  })(cases[c]);
}
var box = document.getElementById('radiological');
function setView() {
  var rad = box.checked;
  document.body.classList.toggle('neuro', !rad);
  var marks = document.querySelectorAll('.mk');
  for (var m = 0; m < marks.length; m++) {
    marks[m].textContent = marks[m].getAttribute(rad ? 'data-rad' : 'data-neu');
  }
}
box.addEventListener('change', setView);
setView();
"""

_IJK = "ijk"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(t: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table><caption>{_e(t.caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _scale_html(s: Scale) -> str:
    bar = base64.b64encode(figures.png_bytes(figures.colour_bar(s.cmap))).decode("ascii")
    return (f"<p class=\"scale\"><b>{_e(s.label)}</b> ({_e(s.units)}): {s.vmin:.4g}"
            f"<img class=\"bar\" alt=\"colour scale of {_e(s.label)}\" src=\"data:image/png;base64,{bar}\">"
            f"{s.vmax:.4g} and above</p>")


def _marker_spans(markers: dict[str, dict[str, str]] | None) -> str:
    if markers is None:
        return "<span class=\"mk t\" data-rad=\"?\" data-neu=\"?\" title=\"orientation unknown\">?</span>"
    rad, neu = markers["radiological"], markers["neurological"]
    return "".join(f"<span class=\"mk {pos[0]}\" data-rad=\"{rad[pos]}\" data-neu=\"{neu[pos]}\">{rad[pos]}</span>"
                   for pos in ("left", "right", "top", "bottom"))


def _case_html(c: CaseSection, anchor: str) -> str:
    out = [f"<section class=\"case\" id=\"{anchor}\"><h2>{_e(c.name)}</h2>"]
    if c.facts:
        out.append("<table class=\"facts\"><tbody>" + "".join(
            f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in c.facts) + "</tbody></table>")
    plane = f"{c.plane} slice" if c.plane else "slice"
    coordinate = _IJK[c.axis]

    def label(i: int) -> str:
        return f"{plane} {i} ({coordinate} = {i} of 0-{c.n_slices - 1})"

    n = len(c.slices)
    if n > 1:
        out.append(f"<div class=\"nav\"><label>Slice <input class=\"slider\" type=\"range\" min=\"0\" max=\"{n - 1}\" "
                   f"value=\"0\" step=\"1\" aria-label=\"slice of {_e(c.name)}\"></label> "
                   f"<output class=\"where\">{_e(label(c.slices[0]))}</output></div>")
    flagged = [(k, i, t) for k, (i, t) in enumerate(zip(c.slices, c.tags)) if t]
    if flagged:
        links = "".join(f"<a class=\"go\" href=\"#{anchor}-s{i}\" data-k=\"{k}\">{i} ({_e(', '.join(t))})</a>"
                        for k, i, t in flagged)
        out.append(f"<p class=\"jump\">Slices with a finding or a reference outline: {links}</p>")
    else:
        out.append(f"<p class=\"jump\">{_e(c.untagged)}</p>")
    w, h = c.size
    for i, row in zip(c.slices, c.images):
        out.append(f"<div class=\"slice\" id=\"{anchor}-s{i}\" data-label=\"{_e(label(i))}\">"
                   f"<h3>{_e(label(i))}</h3><div class=\"panels\">")
        for title, b64 in zip(c.panels, row):
            out.append(f"<figure class=\"panel\"><div class=\"frame\"><img width=\"{w}\" height=\"{h}\" "
                       f"alt=\"{_e(c.name)}, {_e(title)}, {_e(label(i))}\" src=\"data:image/png;base64,{b64}\">"
                       f"{_marker_spans(c.markers)}</div><figcaption>{_e(title)}</figcaption></figure>")
        out.append("</div></div>")
    if c.note:
        out.append(f"<p class=\"note\">{_e(c.note)}</p>")
    out.append("</section>")
    return "".join(out)


def page(title: str, *, intro: Sequence[str] = (), tables: Sequence[Table] = (),
         legend: Sequence[tuple[str, str]] = (), scales: Iterable[Scale | None] = (),
         outlines: Mapping[str, Outline] = (), cases: Sequence[CaseSection] = ()) -> str:
    """The whole page as HTML text (images embedded; no external file, font or script).

    Args:
        title: the page title.
        intro: paragraphs under the title (the run's settings).
        tables: the run's tables.
        legend: ``(term, plain-language explanation)`` pairs; the orientation, slice-number and colour-scale
            entries are added.
        scales: the run's colour scales, shown with their numbers.
        outlines: the outline colours, shown in the legend.
        cases: the cases' sections.
    """
    parts = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
             f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>"]
    parts += [f"<p>{_e(p)}</p>" for p in intro]
    parts.append("<div class=\"toolbar\"><label><input type=\"checkbox\" id=\"radiological\" checked> "
                 "Radiological view (the patient's right on the image's left); clear for the neurological "
                 "view</label></div>")
    parts.append("<h2>How to read this report</h2><dl class=\"legend\">")
    for term, text in [*legend, ORIENTATION_LEGEND, SLICE_LEGEND, SCALE_LEGEND]:
        parts.append(f"<dt>{_e(term)}</dt><dd>{_e(text)}</dd>")
    parts.append("</dl>")
    outlines = dict(outlines)
    if outlines:
        parts.append("<p class=\"outlines\">Outlines: " + "; ".join(
            f"<span class=\"swatch\" style=\"background:{_e(o.colour)}\"></span>{_e(o.label)}"
            for o in outlines.values()) + " (drawn in this order; a later outline lies on top).</p>")
    parts += [_scale_html(s) for s in scales if s is not None]
    parts += [_table(t) for t in tables]
    if cases:
        parts.append("<p>Cases: " + ", ".join(f"<a href=\"#case-{k}\">{_e(c.name)}</a>"
                                             for k, c in enumerate(cases)) + "</p>")
    parts += [_case_html(c, f"case-{k}") for k, c in enumerate(cases)]
    parts.append(f"<script>{_SCRIPT}</script></body></html>\n")
    return "".join(parts)


def write_run_page(out_dir: PathLike, title: str, *, rows: Sequence[Mapping[str, Any]],
                   views: Mapping[str, Mapping[str, torch.Tensor]], panels: Sequence[Panel],
                   facts: Any, intro: Sequence[str] = (), tables: Sequence[Table] = (),
                   legend: Sequence[tuple[str, str]] = (), scales: Sequence[Scale | None] = (),
                   outlines: Mapping[str, Outline] = ()) -> Path:
    """A task's ``report.html``: one section per ``scores.csv`` row with kept views, a note naming the others.

    Args:
        out_dir: the run folder.
        title: the page title.
        rows: the ``scores.csv`` rows (``case`` names the case).
        views: per case name, its ``view_arrays`` (a case without them, complete from an earlier run, is named
            in the introduction and pointed to its ``_overlay.png``).
        panels: the panels of every case.
        facts: ``facts(row, view) -> [(label, value), ...]`` shown beside a case.
        intro, tables, legend, scales, outlines: see :func:`page`.
    """
    cases = [case_section(row["case"], views[row["case"]], panels, scales=scales, outlines=outlines,
                          facts=facts(row, views[row["case"]]))
             for row in rows if views.get(row["case"])]
    missing = [row["case"] for row in rows if not views.get(row["case"])]
    intro = list(intro)
    if missing:
        intro.append(f"No images kept for: {', '.join(missing)} (complete from an earlier run); see their "
                     f"_overlay.png files.")
    text = page(title, intro=intro, tables=tables, legend=legend, scales=scales, outlines=outlines, cases=cases)
    return write_page(text, Path(out_dir) / "report.html")


def write_page(text: str, path: PathLike, protected: Iterable[PathLike] = ()) -> Path:
    """Write the page atomically; returns ``path``."""
    return write_text(text, path, protected)


def md_table(table: Table) -> list[str]:
    """The lines of a Markdown table (for ``report.md``), from the same ``Table`` the page shows."""
    lines = ["| " + " | ".join(str(h) for h in table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table.rows]
    return lines
