"""Parallel-beam CT on the core's operator protocol: Radon transform, its exact adjoint, filtered back-projection.

Owns :class:`ParallelBeamCT` (forward projection, the matched back-projector that is its exact adjoint,
FBP, Song et al. 2022's measurement-space merge on a full grid of views), view geometries
(:func:`view_angles`: sparse-view and limited-angle) and :func:`poisson_noise` (low-dose sinograms).

Conventions (those of scikit-image's ``radon``/``iradon``, which the tests compare against): pixel units,
rotation about pixel ``(H // 2, W // 2)``, detector bin ``j`` at offset ``j - n_det // 2``. Each view is the
image resampled bilinearly along rays and summed (ray-driven); the back-projector is the transpose of that
linear map, so ``<A x, y> = <x, A^T y>`` holds to rounding. FBP filters with Kak & Slaney's ramp (their
eq. 61, ch. 3) or Shepp-Logan filter and back-projects pixel by pixel with linear interpolation. Sinograms
are ``(B, C, views, detectors)``; a volume ``(B, C, D, H, W)`` is projected slice by slice along its first
spatial axis into ``(B, C, D, views, detectors)``, batched.

Written here rather than taken from a library: deepinv's ``Tomography`` (also grid-sample based) has an
approximate adjoint unless it back-propagates, and deepinv needs torchvision and a CUDA build of torch;
scikit-image's transforms are NumPy loops over angles, one image at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.operators import LinearOperator
from ..core.utils import bcast

__all__ = ["ParallelBeamCT", "view_angles", "ramp_filter", "poisson_noise"]

_CHUNK = 1 << 23  # samples per grid_sample call (bounds the memory of one call)
_CACHE = 1 << 25  # grid entries an operator keeps between calls (128 MiB in float32)


def view_angles(n_views: int, arc: float = 180.0, start: float = 0.0) -> torch.Tensor:
    """``n_views`` equally spaced projection angles in degrees over ``[start, start + arc)`` (float64).

    ``view_angles(60)`` is a sparse-view geometry over 180 degrees; ``view_angles(90, arc=90)`` a
    limited-angle one.
    """
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    if not 0 < arc <= 360:
        raise ValueError(f"arc must lie in (0, 360], got {arc}")
    return start + torch.arange(n_views, dtype=torch.float64) * (arc / n_views)


def ramp_filter(size: int, name: str = "ramp", dtype=torch.float64, device=None) -> torch.Tensor:
    """Frequency response of the discrete ramp filter for ``size`` padded bins (Kak & Slaney 1988, ch. 3, eq. 61).

    The band-limited ramp's samples ``h(0) = 1/4``, ``h(n) = -1 / (pi n)^2`` for odd ``n`` (0 for even ``n``),
    transformed with the FFT; ``shepp-logan`` multiplies by ``sinc`` (Shepp & Logan 1974).

    Args:
        size: even number of bins (the zero-padded detector length).
        name: ``ramp`` or ``shepp-logan``.

    Returns:
        a real tensor of shape ``(size,)``.
    """
    if size < 2 or size % 2:
        raise ValueError(f"size must be even and >= 2, got {size}")
    lag = torch.arange(size, dtype=torch.float64)
    lag = torch.minimum(lag, size - lag)  # circular distance
    h = torch.where(lag % 2 == 1, -1.0 / (math.pi * lag.clamp(min=1)) ** 2, torch.zeros_like(lag))
    h[0] = 0.25
    resp = 2 * torch.fft.fft(h).real
    if name == "shepp-logan":
        omega = math.pi * torch.fft.fftfreq(size, dtype=torch.float64)
        resp = resp * torch.where(omega == 0, torch.ones_like(omega), torch.sin(omega) / omega.where(omega != 0, 1.0))
    elif name != "ramp":
        raise ValueError(f"unknown filter {name!r}; choose ramp or shepp-logan")
    return resp.to(dtype=dtype, device=device)


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op):
        ctx.op = op
        return op._project(x)

    @staticmethod
    def backward(ctx, gy):
        return ctx.op._backproject(gy), None


class _BackProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, op):
        ctx.op = op
        return op._backproject(y)

    @staticmethod
    def backward(ctx, gx):
        return ctx.op._project(gx), None


class ParallelBeamCT(LinearOperator):
    """Parallel-beam Radon transform ``A`` (Radon 1917) with its exact adjoint, batched, differentiable.

    Args:
        image_shape: ``(H, W)`` of each slice.
        angles: projection angles in degrees (``view_angles``).
        circle: the object lies inside the inscribed circle (square images only): ``n_det = H``;
            otherwise ``n_det = ceil(sqrt(2) max(H, W))`` covers the whole image.
        full_angles: a full grid of views containing ``angles``; enables :meth:`merge` (Song et al. 2022).
    """

    def __init__(self, image_shape: tuple[int, int], angles, *, circle: bool = False, full_angles=None):
        h, w = (int(s) for s in image_shape)
        if h < 2 or w < 2:
            raise ValueError(f"image_shape must be at least 2 x 2, got {image_shape}")
        if circle and h != w:
            raise ValueError(f"circle=True needs a square image, got {image_shape}")
        self.angles = torch.as_tensor(angles, dtype=torch.float64).flatten()
        if self.angles.numel() < 1:
            raise ValueError("give at least one angle")
        self.image_shape, self.circle = (h, w), circle
        self._cache: dict = {}
        self.n_det = h if circle else int(math.ceil(math.sqrt(2) * max(h, w)))
        self.full = None
        if full_angles is not None:
            full = torch.as_tensor(full_angles, dtype=torch.float64).flatten()
            dist = (self.angles[:, None] - full[None, :]).abs()
            if bool((dist.min(dim=1).values > 1e-6).any()):
                raise ValueError("every measured angle must be one of full_angles")
            self.index = dist.argmin(dim=1)
            self.full = ParallelBeamCT(image_shape, full, circle=circle)

    @property
    def n_views(self) -> int:
        return self.angles.numel()

    # -- geometry ----------------------------------------------------------------------------------
    def _cached(self, key, make) -> torch.Tensor:
        """A grid from the cache, or made and kept while the cache stays under its budget."""
        grid = self._cache.get(key)
        if grid is None:
            grid = make()
            if sum(g.numel() for g in self._cache.values()) + grid.numel() <= _CACHE:
                self._cache[key] = grid
        return grid

    def _ray_grid(self, views: slice, dtype, device) -> torch.Tensor:
        return self._cached(("ray", views.start, views.stop, dtype, str(device)),
                            lambda: self._make_ray_grid(views, dtype, device))

    def _pixel_grid(self, views: slice, n: int, dtype, device) -> torch.Tensor:
        return self._cached(("pixel", views.start, views.stop, n, dtype, str(device)),
                            lambda: self._make_pixel_grid(views, n, dtype, device))

    def _make_ray_grid(self, views: slice, dtype, device) -> torch.Tensor:
        """Sampling positions ``(nv, n_det, n_det, 2)`` (rays by detector bins) for ``views``, from ``affine_grid``.

        Output pixel ``(i, j)`` of view ``theta`` samples the image at ``col = W//2 + s cos + v sin``,
        ``row = H//2 - s sin + v cos`` with ``s = j - n//2``, ``v = i - n//2``: an affine map of the
        normalised output coordinates.
        """
        h, w = self.image_shape
        n = self.n_det
        th = torch.deg2rad(self.angles[views])
        cos, sin = th.cos(), th.sin()
        a, b = (n - 1) / 2, (n - 1) / 2 - n // 2
        kx, ky = 2 / (w - 1), 2 / (h - 1)
        theta = torch.stack([
            torch.stack([kx * a * cos, kx * a * sin, kx * (w // 2 + b * cos + b * sin) - 1], dim=-1),
            torch.stack([-ky * a * sin, ky * a * cos, ky * (h // 2 - b * sin + b * cos) - 1], dim=-1),
        ], dim=1)
        return F.affine_grid(theta.to(dtype=dtype, device=device), [theta.shape[0], 1, n, n], align_corners=True)

    def _make_pixel_grid(self, views: slice, n: int, dtype, device) -> torch.Tensor:
        """Detector positions ``(nv, H, W, 2)`` of every pixel, for back-projecting ``(nv, C, 1, n_det)`` rows.

        Pixel ``(row, col)`` meets view ``theta`` at ``t = (col - W//2) cos - (row - H//2) sin + n//2``
        (``n`` detector bins).
        """
        h, w = self.image_shape
        th = torch.deg2rad(self.angles[views])
        cos, sin = th.cos(), th.sin()
        k = 2 / (n - 1)
        ax, ay = (w - 1) / 2, (h - 1) / 2  # col = ax (ox + 1), row = ay (oy + 1)
        zero = torch.zeros_like(cos)
        theta = torch.stack([
            torch.stack([k * ax * cos, -k * ay * sin, k * (ax * cos - ay * sin - (w // 2) * cos + (h // 2) * sin
                                                           + n // 2) - 1], dim=-1),
            torch.stack([zero, zero, zero], dim=-1),
        ], dim=1)
        return F.affine_grid(theta.to(dtype=dtype, device=device), [theta.shape[0], 1, h, w], align_corners=True)

    def _view_chunks(self, per_view: int):
        step = max(1, _CHUNK // max(1, per_view))
        return [slice(i, min(i + step, self.n_views)) for i in range(0, self.n_views, step)]

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 4 or tuple(x.shape[-2:]) != self.image_shape:
            raise ValueError(f"images must be (B, C, *spatial) ending in {self.image_shape}, got {tuple(x.shape)}")
        return x.reshape(1, -1, *self.image_shape)

    def _check_sino(self, y: torch.Tensor) -> None:
        if y.ndim < 4 or tuple(y.shape[-2:]) != (self.n_views, self.n_det):
            raise ValueError(f"sinograms must end in ({self.n_views}, {self.n_det}), got {tuple(y.shape)}")

    # -- raw linear maps (no autograd) ---------------------------------------------------------------
    def _project(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flat(x)
        n_img, n = flat.shape[1], self.n_det
        out = []
        for views in self._view_chunks(n_img * n * n):
            grid = self._ray_grid(views, x.dtype, x.device)
            src = flat.expand(grid.shape[0], -1, -1, -1)
            out.append(F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True).sum(dim=2))
        return torch.cat(out, dim=0).permute(1, 0, 2).reshape(*x.shape[:-2], self.n_views, n)

    def _backproject(self, y: torch.Tensor) -> torch.Tensor:
        self._check_sino(y)
        n = self.n_det
        flat = y.reshape(-1, self.n_views, n).permute(1, 0, 2)  # (views, images, n)
        n_img = flat.shape[1]
        x = torch.zeros(n_img, *self.image_shape, dtype=y.dtype, device=y.device)
        for views in self._view_chunks(n_img * n * n):
            grid = self._ray_grid(views, y.dtype, y.device)
            nv = grid.shape[0]
            g = flat[views].unsqueeze(2).expand(-1, -1, n, -1)
            shape = torch.zeros((), dtype=y.dtype, device=y.device).expand(nv, n_img, *self.image_shape)
            x += torch.ops.aten.grid_sampler_2d_backward(g, shape, grid, 0, 0, True, [True, False])[0].sum(dim=0)
        return x.reshape(*y.shape[:-2], *self.image_shape)

    # -- protocol ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sinograms ``(B, C, *extra, views, detectors)`` of images ``(B, C, *extra, H, W)``."""
        return _Project.apply(x, self)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Unfiltered back-projection, the exact transpose of :meth:`forward`."""
        return _BackProject.apply(y, self)

    def fbp(self, y: torch.Tensor, filter: str = "ramp") -> torch.Tensor:
        """Filtered back-projection (Kak & Slaney 1988, ch. 3, eq. 45 and 61), as scikit-image's ``iradon``.

        Args:
            y: sinograms ``(B, C, *extra, views, detectors)``.
            filter: ``ramp`` or ``shepp-logan``.

        Returns:
            images ``(B, C, *extra, H, W)`` (zero outside the inscribed circle when ``circle``).
        """
        self._check_sino(y)
        n = self.n_det
        if self.circle:  # as scikit-image: pad to the image diagonal (same centre bin) before filtering
            padded = int(math.ceil(math.sqrt(2) * n))
            before = padded // 2 - n // 2
            y = F.pad(y, (before, padded - n - before))
            n = padded
        size = max(64, 2 ** int(math.ceil(math.log2(2 * n))))
        resp = ramp_filter(size, filter, dtype=y.dtype, device=y.device)
        filtered = torch.fft.ifft(torch.fft.fft(y, n=size, dim=-1) * resp, dim=-1).real[..., :n]
        h, w = self.image_shape
        flat = filtered.reshape(-1, self.n_views, n).permute(1, 0, 2).unsqueeze(2)  # (views, images, 1, n)
        out = torch.zeros(flat.shape[1], h, w, dtype=y.dtype, device=y.device)
        for views in self._view_chunks(flat.shape[1] * h * w):
            grid = self._pixel_grid(views, n, y.dtype, y.device)
            out += F.grid_sample(flat[views], grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=True).sum(dim=0)
        img = out.reshape(*y.shape[:-2], h, w) * (math.pi / (2 * self.n_views))
        if self.circle:
            rows = torch.arange(h, device=y.device)[:, None] - h // 2
            cols = torch.arange(w, device=y.device)[None, :] - w // 2
            inside = (rows**2 + cols**2 <= (h // 2) ** 2).to(img.dtype)
            img = img * inside
        return img

    def merge(self, x, y, lam=1.0):
        """Song et al. 2022 (eq. 9) for CT: on the full grid of views, measured views become
        ``(1 - lam) A x + lam y``; FBP of the merged full sinogram.

        Args:
            x: images.
            y: measured sinograms (this operator's views).
            lam: weight of the measurement, a number or ``(B,)``.

        Returns:
            the merged images.
        """
        if self.full is None:
            raise ValueError("CT merge needs full_angles (a full grid of views containing the measured ones)")
        k = self.full.forward(x)
        measured = k[..., self.index, :]
        k = k.index_copy(-2, self.index.to(k.device), measured + bcast(lam, measured) * (y - measured))
        return self.full.fbp(k)


def poisson_noise(sino: torch.Tensor, i0: float, *, scale: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Low-dose sinogram: counts ``N ~ Poisson(I0 exp(-scale * p))``, returned as ``-log(max(N, 1) / I0) / scale``.

    Beer-Lambert with photon counting noise (e.g. Elbakri & Fessler 2002, eq. 1).

    Args:
        sino: noiseless line integrals.
        i0: incident photons per detector bin (e.g. 1e4 for low dose).
        scale: converts sinogram units into attenuation line integrals (e.g. ``mu_water * pixel_mm`` when the
            image is in water-relative units).
        generator: for reproducible noise.

    Returns:
        the noisy sinogram, same units as ``sino``.
    """
    if i0 <= 0 or scale <= 0:
        raise ValueError(f"i0 and scale must be positive, got {i0} and {scale}")
    rate = i0 * torch.exp(-scale * sino)
    counts = torch.poisson(rate, generator=generator)
    return -torch.log(counts.clamp(min=1) / i0) / scale
