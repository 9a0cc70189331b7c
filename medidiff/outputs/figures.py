"""Figures: PNG montages for a quick look, and the slice rendering of the HTML reports.

``overlay_png`` writes a montage of slices with a heatmap overlay and mask outlines. The HTML reports
(``medidiff.outputs.html``) render single slices with the pieces below: ``slice_axis`` (the array axis
shown: a 2D image's, else the one closest to the patient's head-foot axis, i.e. axial slices),
``SliceLayout`` (which array axis runs across and which up, and the L/R, A/P, S/I letters at the
image edges, from the voxel-to-RAS affine), ``orient_slice`` (a slice turned into display order, in
radiological or neurological view), ``shared_scale`` (one colour scale for every case of a run),
``render_slice`` (grey image, colour map and outlines as RGB; later outlines are drawn on top) and
``png_bytes``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medidiff.arrays import to_numpy
from medidiff.errors import DataError

from .files import ArrayLike, PathLike, atomic_write


def _drop_channel(x: ArrayLike) -> np.ndarray:
    """As float64 NumPy, without a leading channel axis of length 1 (``(1, H, W)``, ``(1, X, Y, Z)``)."""
    a = to_numpy(x).astype(np.float64)
    return a[0] if a.ndim in (3, 4) and a.shape[0] == 1 else a


def relevant_slices(volume: ArrayLike, n: int, axis: int = -1) -> list[int]:
    """The ``n`` slices along ``axis`` holding the most mass of ``volume`` (e.g. a heatmap), in order.

    Args:
        volume: a 3D array (negative values and NaNs count as 0).
        n: number of slices wanted (fewer if the volume has fewer).
        axis: slicing axis.

    Returns:
        Sorted slice indices. If the volume is all zero, ``n`` evenly spaced slices.
    """
    v = np.nan_to_num(to_numpy(volume).astype(np.float64), nan=0.0)
    axis = axis % v.ndim
    mass = np.clip(v, 0, None).sum(axis=tuple(d for d in range(v.ndim) if d != axis))
    n = min(n, mass.size)
    if not mass.any():
        return sorted({int(round(i)) for i in np.linspace(0, mass.size - 1, n + 2)[1:-1]})
    order = np.argsort(-mass, kind="stable")[:n]
    return sorted(int(i) for i in order if mass[i] > 0) or [int(order[0])]


def overlay_png(
    image: ArrayLike,
    heatmap: ArrayLike | None = None,
    contours: ArrayLike | Mapping[str, ArrayLike] | None = None,
    path: PathLike = "overlay.png",
    title: str = "",
    units: str = "",
    n_slices: int = 6,
    *,
    slices: Sequence[int] | None = None,
    axis: int = -1,
    ncols: int = 3,
    cmap: str = "inferno",
    alpha: float = 0.5,
    threshold: float | None = None,
    vmax: float | None = None,
    panel_inches: float = 2.5,
    dpi: int = 100,
    protected: Iterable[PathLike] = (),
) -> Path:
    """Write a PNG montage of an image with an optional heatmap overlay and mask contours.

    For a 3D volume, the ``n_slices`` slices along ``axis`` holding the most heatmap mass (else contour
    mass, else evenly spaced ones) are shown. Slices are drawn in array order, first axis to the right
    and second axis up (for a RAS axial slice: patient's right on the right, anterior up). The heatmap
    is drawn where it exceeds ``threshold``, with a colour bar labelled with ``units``.

    Args:
        image: ``(H, W)`` / ``(X, Y, Z)``, optionally with a leading channel of 1.
        heatmap: a map of the same shape (optional).
        contours: a mask, or a dict ``{name: mask}``, drawn as outlines (optional).
        path: the PNG file to write.
        title: figure title.
        units: the heatmap's units, shown on the colour bar.
        n_slices: number of slices for a 3D volume.
        slices: the slices of a 3D volume to show (e.g. through the largest findings), instead of choosing.
        axis: slicing axis of a 3D volume.
        ncols: most panels per row.
        cmap: heatmap colour map.
        alpha: heatmap opacity.
        threshold: heatmap values at or below it are not drawn (default: 0).
        vmax: top of the heatmap colour scale (default: the heatmap's 99.5th percentile over the shown
            slices).
        panel_inches: size of one panel; the figure is ``ncols * panel + 0.9`` by
            ``nrows * panel + 0.5`` inches at ``dpi``.
        dpi: resolution.
        protected: input paths that must not be overwritten.

    Returns:
        ``path`` as a ``Path``.
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    img = _drop_channel(image)
    if img.ndim not in (2, 3):
        raise DataError(f"cannot draw an image of shape {tuple(image.shape)}", where=path)
    heat = None if heatmap is None else _drop_channel(heatmap)
    masks = {} if contours is None else (
        dict(contours) if isinstance(contours, Mapping) else {"": contours})
    masks = {k: _drop_channel(v) > 0.5 for k, v in masks.items()}
    for name, arr in (("heatmap", heat), *masks.items()):
        if arr is not None and arr.shape != img.shape:
            raise DataError(f"{name or 'contour'} shape {arr.shape} differs from the image's {img.shape}",
                            where=path)

    if img.ndim == 2:
        take, labels = [lambda a: a], [""]
    else:
        ax_ = axis % 3
        key = heat if heat is not None else (sum(m.astype(float) for m in masks.values()) if masks else None)
        if slices is not None:
            idx = sorted({int(i) % img.shape[ax_] for i in slices})
        elif key is None:  # evenly spaced over the slices that hold anything
            nz = np.nonzero(np.abs(img).sum(axis=tuple(d for d in range(3) if d != ax_)))[0]
            lo, hi = (int(nz[0]), int(nz[-1])) if nz.size else (0, img.shape[ax_] - 1)
            idx = [lo + i for i in relevant_slices(np.zeros(hi - lo + 1), n_slices, 0)]
        else:
            idx = relevant_slices(key, n_slices, ax_)
        take = [(lambda a, i=i: np.take(a, i, axis=ax_)) for i in idx]
        labels = [f"slice {i}" for i in idx]

    n = len(take)
    cols = min(ncols, n)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(cols * panel_inches + 0.9, rows * panel_inches + 0.5), dpi=dpi)
    grid = fig.add_gridspec(rows, cols, left=0.02, right=1 - 0.9 / (cols * panel_inches + 0.9),
                            bottom=0.02, top=1 - 0.45 / (rows * panel_inches + 0.5), wspace=0.04, hspace=0.12)
    finite = img[np.isfinite(img)]
    gray = np.percentile(finite, [0.5, 99.5]) if finite.size else (0, 1)
    norm = None
    if heat is not None:
        low = threshold if threshold is not None else 0.0
        shown = np.concatenate([f(heat).ravel() for f in take])
        shown = shown[np.isfinite(shown) & (shown > low)]
        top = vmax if vmax is not None else (np.percentile(shown, 99.5) if shown.size else low + 1.0)
        norm = matplotlib.colors.Normalize(vmin=low, vmax=max(float(top), low + 1e-6))
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (f, label) in enumerate(zip(take, labels)):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        ax.imshow(f(img).T, cmap="gray", origin="lower", vmin=gray[0], vmax=gray[1], interpolation="nearest")
        if heat is not None:
            h = f(heat)
            h = np.ma.masked_where(~np.isfinite(h) | (h <= norm.vmin), h)
            ax.imshow(h.T, cmap=cmap, norm=norm, origin="lower", alpha=alpha, interpolation="nearest")
        for j, m in enumerate(masks.values()):
            sl = f(m)
            if sl.any() and not sl.all():
                ax.contour(sl.T.astype(float), levels=[0.5], colors=[colors[(j + 2) % len(colors)]],
                           linewidths=0.8, origin="lower")
        ax.set_xticks([])
        ax.set_yticks([])
        if label:
            ax.set_title(label, fontsize=8)
    if any(masks) and any(name for name in masks):
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colors[(j + 2) % len(colors)], label=name)
                   for j, name in enumerate(masks) if name]
        fig.legend(handles=handles, loc="lower right", fontsize=7, frameon=False)
    if norm is not None:
        width = cols * panel_inches + 0.9
        cax = fig.add_axes([1 - 0.75 / width, 0.1, 0.12 / width, 0.75])
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
        bar.set_label(units, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_write(path, protected) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


# ------------------------------------------------------------------------------ slices for the HTML reports

#: The letter of each RAS world axis, for its negative and its positive direction.
_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))
#: The views: ``radiological`` shows the patient's right on the image's left, ``neurological`` on its right.
VIEWS = ("radiological", "neurological")
#: The name of the slices across each RAS world axis.
_PLANES = ("sagittal", "coronal", "axial")


def _unit_columns(affine: np.ndarray) -> np.ndarray:
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(cols, axis=0)
    return cols / np.where(norms > 0, norms, 1.0)


def slice_axis(affine: ArrayLike, shape: Sequence[int]) -> int:
    """The array axis a volume is shown along: a single-slice axis, else the one closest to head-foot.

    Args:
        affine: the voxel-to-RAS affine (4 x 4).
        shape: the spatial shape ``(X, Y, Z)``.

    Returns:
        0, 1 or 2: the axis whose voxel index is the slice number (axial slices for a scan in any
        voxel order; the one axis of length 1 of a 2D image).
    """
    shape = [int(s) for s in shape][-3:]
    flat = [d for d, s in enumerate(shape) if s == 1]
    if flat:
        return flat[-1]
    return int(np.argmax(np.abs(_unit_columns(to_numpy(affine))[2])))


@dataclass(frozen=True)
class SliceLayout:
    """How slices along one array axis are shown.

    Attributes:
        axis: the array axis sliced.
        across: the array axis running across the image (left to right).
        up: the array axis running up the image.
        across_sign: +1 when ``across`` points to the positive RAS direction of its world axis.
        up_sign: likewise for ``up``.
        across_world: the RAS world axis (0 x, 1 y, 2 z) closest to ``across``.
        up_world: the RAS world axis closest to ``up``.
        spacing: millimetres per voxel ``(across, up)``.
        plane: ``axial``, ``coronal`` or ``sagittal`` (the world axis the slice axis is closest to).
    """

    axis: int
    across: int
    up: int
    across_sign: int
    up_sign: int
    across_world: int
    up_world: int
    spacing: tuple[float, float]
    plane: str

    @classmethod
    def from_affine(cls, affine: ArrayLike, axis: int) -> SliceLayout:
        """The layout of slices along ``axis`` of a volume with this voxel-to-RAS affine.

        The in-plane axis closest to the lower world axis (x before y before z) runs across: axial and
        coronal slices have left-right across, sagittal ones anterior-posterior; the other runs up, its
        positive direction (anterior, superior) at the top.
        """
        a = to_numpy(affine).astype(np.float64)
        unit = np.abs(_unit_columns(a))
        p, q = [d for d in range(3) if d != axis]
        # the assignment of world axes to the two in-plane axes that best matches their directions
        options = [(wp, wq) for wp in range(3) for wq in range(3) if wp != wq]
        wp, wq = max(options, key=lambda o: unit[o[0], p] + unit[o[1], q])
        (across, w_across), (up, w_up) = sorted([(p, wp), (q, wq)], key=lambda t: t[1])
        sign = lambda d, w: 1 if a[w, d] >= 0 else -1  # noqa: E731
        spacing = np.linalg.norm(a[:3, :3], axis=0)
        plane = _PLANES[({0, 1, 2} - {w_across, w_up}).pop()]
        return cls(axis=axis, across=across, up=up, across_sign=sign(across, w_across), up_sign=sign(up, w_up),
                   across_world=w_across, up_world=w_up,
                   spacing=(float(spacing[across]) or 1.0, float(spacing[up]) or 1.0), plane=plane)

    def markers(self, view: str = "radiological") -> dict[str, str]:
        """The patient directions at the image's edges: ``{"left", "right", "top", "bottom"}`` letters.

        In the radiological view the world axis across points from right to left (the patient's right on
        the image's left, as if facing the patient); in the neurological view from left to right.
        """
        _check_view(view)
        neg, pos = _LETTERS[self.across_world]
        left, right = (pos, neg) if view == "radiological" else (neg, pos)
        down, top = _LETTERS[self.up_world]
        return {"left": left, "right": right, "top": top, "bottom": down}


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, not {view!r}")


def orient_slice(plane: ArrayLike, layout: SliceLayout, view: str = "radiological") -> np.ndarray:
    """A slice in display order: rows top to bottom, columns left to right, as ``layout`` and ``view`` say.

    Args:
        plane: the slice as indexed by the volume's two remaining axes, in array order.
        layout: the slices' ``SliceLayout``.
        view: ``radiological`` (patient's right on the image's left) or ``neurological`` (the mirror image).

    Returns:
        The 2D array to draw with row 0 at the top.
    """
    _check_view(view)
    a = np.asarray(to_numpy(plane))
    in_plane = [d for d in range(3) if d != layout.axis]
    if in_plane.index(layout.across) == 0:  # plane[across, up] -> [up, across]
        a = a.T
    if layout.up_sign > 0:  # the positive direction at the top (row 0)
        a = a[::-1]
    towards_right = layout.across_sign if view == "neurological" else -layout.across_sign
    if towards_right < 0:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)


def shared_scale(maps: Iterable[ArrayLike], *, percentile: float = 99.5, low: float = 0.0) -> tuple[float, float]:
    """One colour scale ``(vmin, vmax)`` for the maps of several cases: ``low`` to the ``percentile`` above it.

    Args:
        maps: every case's map (or the slices of it that are shown); NaNs are ignored.
        percentile: the top of the scale, over the values above ``low`` of all the maps together.
        low: the bottom of the scale.

    Returns:
        ``(vmin, vmax)`` with ``vmax > vmin`` (``low + 1`` when no value exceeds ``low``).
    """
    values = [v[np.isfinite(v) & (v > low)] for v in (np.asarray(to_numpy(m), dtype=np.float64).ravel()
                                                       for m in maps)]
    values = np.concatenate(values) if values else np.zeros(0)
    top = float(np.percentile(values, percentile)) if values.size else low + 1.0
    return float(low), max(top, float(low) + 1e-6)


def grey_range(images: Iterable[ArrayLike], percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """The grey window of an image: its finite values' percentiles (``(0, 1)`` if it has none)."""
    values = [np.asarray(to_numpy(m), dtype=np.float64).ravel() for m in images]
    values = np.concatenate(values) if values else np.zeros(0)
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    return lo, hi if hi > lo else lo + 1.0


def _hex_rgb(colour: str) -> np.ndarray:
    import matplotlib.colors

    return np.asarray(matplotlib.colors.to_rgb(colour), dtype=np.float64)


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner


def render_slice(
    image: ArrayLike,
    grey: tuple[float, float],
    *,
    overlay: ArrayLike | None = None,
    scale: tuple[float, float] | None = None,
    cmap: str = "inferno",
    alpha: float = 0.6,
    outlines: Sequence[tuple[ArrayLike, str]] = (),
    zoom: int = 1,
) -> np.ndarray:
    """One slice as RGB: the grey image, a colour map over it and outlines, magnified ``zoom`` times.

    Args:
        image: the 2D slice in display order (``orient_slice``).
        grey: the grey window ``(low, high)``.
        overlay: a map of the same shape, drawn where it exceeds the bottom of ``scale``.
        scale: the colour scale ``(vmin, vmax)`` of the overlay (one per run: ``shared_scale``).
        cmap: the overlay's colour map.
        alpha: the overlay's opacity.
        outlines: ``(mask, colour)`` pairs, drawn in order: a later outline lies on top of an earlier one.
        zoom: integer magnification (nearest neighbour), so outlines stay thin.

    Returns:
        ``(H * zoom, W * zoom, 3)`` uint8.
    """
    import matplotlib

    img = np.asarray(to_numpy(image), dtype=np.float64)
    lo, hi = grey
    g = np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    if overlay is not None:
        vmin, vmax = scale if scale is not None else shared_scale([overlay])
        o = np.asarray(to_numpy(overlay), dtype=np.float64)
        shown = np.isfinite(o) & (o > vmin)
        colours = matplotlib.colormaps[cmap](np.clip((np.nan_to_num(o) - vmin) / (vmax - vmin), 0, 1))[..., :3]
        rgb = np.where(shown[..., None], (1 - alpha) * rgb + alpha * colours, rgb)
    zoom = max(1, int(zoom))
    rgb = rgb.repeat(zoom, 0).repeat(zoom, 1)
    width = max(1, zoom // 3)
    for mask, colour in outlines:
        m = np.asarray(to_numpy(mask)) > 0.5
        if m.any():
            edge = _edge(m.repeat(zoom, 0).repeat(zoom, 1), width)
            rgb[edge] = _hex_rgb(colour)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def colour_bar(cmap: str = "inferno", width: int = 256, height: int = 14) -> np.ndarray:
    """A horizontal colour bar, low values on the left: ``(height, width, 3)`` uint8."""
    import matplotlib

    row = matplotlib.colormaps[cmap](np.linspace(0, 1, width))[:, :3]
    return (np.repeat(row[None], height, axis=0) * 255 + 0.5).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB (or grey) uint8 array as PNG file bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    return buffer.getvalue()
