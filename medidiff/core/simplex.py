"""Simplex gradient noise on batches of points, vectorised in torch for 2 or 3 dimensions.

This module owns the lattice part of simplex noise: skewing points to their simplex cell, hashing the
cell's corners through per-field permutation tables, and summing the corners' gradient contributions.
``medidiff.core.noise.simplex`` builds seeded, multi-octave, normalised noise images on top of it.

Method: K. Perlin, "Noise hardware" (SIGGRAPH 2001 course notes), as set out by S. Gustavson, "Simplex
noise demystified" (2005): noise = sum over the simplex's corners of ``(r^2 - |d|^2)_+^4 * <g, d>``.
"""

from __future__ import annotations

import math

import torch

#: Entries of a permutation table; a field repeats every ``PERIOD`` lattice cells along each axis.
PERIOD = 256

#: Squared radius of a corner's kernel; 0.5 keeps the noise continuous across simplex faces.
RADIUS2 = 0.5

#: Factors that bring one octave of raw noise into ``[-1, 1]``: the reciprocal of its maximum
#: (measured by hill-climbing: 1/99.2 in 2D, 1/108.7 in 3D), rounded down.
SCALE = {2: 99.0, 3: 108.0}


def gradients(ndim: int) -> torch.Tensor:
    """Unit gradient directions, shape ``(n, ndim)``: 16 evenly spaced in 2D, the 12 cube-edge ones in 3D.

    Args:
        ndim: 2 or 3.

    Returns:
        A float64 tensor of unit vectors.
    """
    if ndim == 2:
        angle = torch.arange(16, dtype=torch.float64) * (2 * math.pi / 16)
        return torch.stack([angle.cos(), angle.sin()], dim=1)
    if ndim == 3:
        edges = [(1, 1, 0), (-1, 1, 0), (1, -1, 0), (-1, -1, 0), (1, 0, 1), (-1, 0, 1),
                 (1, 0, -1), (-1, 0, -1), (0, 1, 1), (0, -1, 1), (0, 1, -1), (0, -1, -1)]  # fmt: skip
        return torch.tensor(edges, dtype=torch.float64) / math.sqrt(2)
    raise ValueError(f"simplex noise has 2 or 3 spatial dimensions, got {ndim}")


def skew_factors(ndim: int) -> tuple[float, float]:
    """``(F, G)``: ``x + F * sum(x)`` maps the simplex lattice to the integer grid, ``u - G * sum(u)`` back."""
    return (math.sqrt(ndim + 1) - 1) / ndim, (1 - 1 / math.sqrt(ndim + 1)) / ndim


def _row_lookup(table: torch.Tensor, index: torch.Tensor) -> list[torch.Tensor]:
    """Rows ``table[index]`` of a ``(R, ndim)`` table, as ``ndim`` column views, in one gather where possible.

    float32 rows of 2 (3) values are read as one float64 (complex128) each, so a single
    ``index_select`` fetches a whole gradient; that is several times faster than row indexing.
    """
    rows, ndim = table.shape
    if table.dtype != torch.float32:
        return [table[:, a].index_select(0, index) for a in range(ndim)]
    width, packed = (2, torch.float64) if ndim == 2 else (4, torch.complex128)
    table = torch.nn.functional.pad(table, (0, width - ndim)).contiguous().view(packed).reshape(-1)
    values = table.index_select(0, index)
    values = torch.view_as_real(values) if values.is_complex() else values.unsqueeze(-1)
    values = values.view(torch.float32).reshape(-1, width)
    return [values[:, a] for a in range(ndim)]


def lattice_noise(coords: list[torch.Tensor], perm: torch.Tensor) -> torch.Tensor:
    """One octave of raw simplex noise at given points, for ``F`` independent fields at once.

    Args:
        coords: ``ndim`` (2 or 3) float tensors of shape ``(F, N)``: the points' coordinates along
            each axis in lattice units. They are overwritten to save memory.
        perm: one permutation of ``range(PERIOD)`` per field, shape ``(F, PERIOD)``, on the points'
            device; it sets both the lattice hash and the gradient at each lattice vertex.

    Returns:
        Noise of shape ``(F, N)`` in ``[-1, 1]``, zero at the lattice vertices, with mean zero over
        a field (each vertex's gradient is as likely as its opposite).
    """
    ndim = len(coords)
    fields, npts = coords[0].shape
    skew, unskew = skew_factors(ndim)
    # Hash tables, flat over fields: entry ``e`` of field ``f`` sits at ``f * 2P + e`` and holds
    # ``f * 2P + perm[e mod P]``, so each lookup's result already points into its field's row.
    row = (torch.arange(fields, device=perm.device, dtype=torch.int32) * (2 * PERIOD)).unsqueeze(1)
    table = (torch.cat([perm, perm], dim=1).to(torch.int32) + row).reshape(-1)
    grads = gradients(ndim).to(coords[0])
    grad_table = grads[(table - row.repeat_interleave(2 * PERIOD)) % grads.shape[0]]

    # Skew to the hypercubic grid; the cell's origin corner and the offset d0 from it (unskewed).
    c = [x.reshape(-1) for x in coords]
    s = c[0] + c[1]
    for x in c[2:]:
        s += x
    s *= skew
    cell = [torch.floor(x + s) for x in c]
    t = cell[0] + cell[1]
    for x in cell[2:]:
        t += x
    t *= unskew
    d0 = [x.sub_(i).add_(t) for x, i in zip(c, cell)]
    idx = [i.to(torch.int32).bitwise_and_(PERIOD - 1) for i in cell]
    idx[-1] = (idx[-1].view(fields, npts) + row).reshape(-1)  # the first lookup picks the field's row
    del s, t, cell

    # The point's simplex: corner k adds 1 along the k axes where d0 is largest. ge[a][b] is
    # [d0_a >= d0_b] (ties to the lower axis), computed as floor(d0_a - d0_b) + 1 since |d0_a - d0_b| < 1.
    ge = [[None] * ndim for _ in range(ndim)]
    for a in range(ndim):
        for b in range(a + 1, ndim):
            ge[a][b] = torch.floor(d0[a] - d0[b]).add_(1)
            ge[b][a] = 1 - ge[a][b]

    out = torch.zeros_like(d0[0])
    for k in range(ndim + 1):
        if k == 0:
            d, corner = d0, idx
        elif k == ndim:
            d, corner = [x + (k * unskew - 1) for x in d0], [i + 1 for i in idx]
        else:
            step = []
            for a in range(ndim):
                others = [ge[a][b] for b in range(ndim) if b != a]
                if k == 1:  # a is the largest
                    o = others[0] if ndim == 2 else others[0] * others[1]
                else:  # k == 2 in 3D: a is not the smallest
                    o = others[0] + others[1] - others[0] * others[1]
                step.append(o)
            d = [(x + k * unskew).sub_(o) for x, o in zip(d0, step)]
            corner = [i + o.to(torch.int32) for i, o in zip(idx, step)]
        h = table.index_select(0, corner[-1])  # h = perm[i_last]; h = perm[h + i_a]; ...
        for a in range(ndim - 2, 0, -1):
            h = table.index_select(0, h + corner[a])
        g = _row_lookup(grad_table, h + corner[0])
        w = d[0] * d[0]
        for x in d[1:]:
            w.addcmul_(x, x)
        w.neg_().add_(RADIUS2).clamp_(min=0).square_().square_()
        dot = g[0] * d[0]
        for a in range(1, ndim):
            dot.addcmul_(g[a], d[a])
        out.addcmul_(w, dot)
    return out.mul_(SCALE[ndim]).view(fields, npts)
