"""PNG figures for a quick look: montages of slices with a heatmap overlay and mask outlines."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
        if key is None:  # evenly spaced over the slices that hold anything
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
