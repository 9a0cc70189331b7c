"""MRI forward models on the core's operator protocol: single-coil Cartesian, multi-coil SENSE, coil maps.

Images are complex and carried as two real channels ``(B, 2, *spatial)`` (real, imaginary); k-space is a
complex tensor ``(B, coils, *spatial)`` (1 coil for single-coil), zero where not measured. The Fourier
transform is centred and orthonormal over the last two axes (fastMRI's ``fft2c`` convention), so a 3D
volume ``(B, 2, D, H, W)`` is transformed slice by slice along its first spatial axis, batched.

Owns: :func:`fft2c`/:func:`ifft2c`, :class:`SingleCoilMRI`, :class:`MultiCoilMRI`, :func:`rss`,
:func:`birdcage_maps` (simulated coils) and :func:`estimate_maps` (coil maps from the calibration
region: low-resolution coil images over their root-sum-of-squares).

Written here rather than taken from a library: deepinv's ``MRI``/``MultiCoilMRI`` fit the protocol but
deepinv needs torchvision and would replace the CPU build of torch with a CUDA one; sigpy's ESPIRiT is
NumPy/numba (CuPy on GPUs), not differentiable, and adds numba and llvmlite; the operators are a few FFTs.
"""

from __future__ import annotations

import math

import torch

from ..core.operators import LinearOperator

__all__ = ["fft2c", "ifft2c", "to_complex", "to_channels", "SingleCoilMRI", "MultiCoilMRI", "rss",
           "birdcage_maps", "estimate_maps", "calibration_size"]

_DIMS = (-2, -1)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes: ``fftshift(fft2(ifftshift(x)))``."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_DIMS), norm="ortho"), dim=_DIMS)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal inverse 2D FFT over the last two axes (the adjoint and inverse of :func:`fft2c`)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=_DIMS), norm="ortho"), dim=_DIMS)


def to_complex(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2, *spatial)`` real/imaginary channels -> complex ``(B, *spatial)``."""
    if x.ndim < 4 or x.shape[1] != 2:
        raise ValueError(f"complex images need shape (B, 2, *spatial), got {tuple(x.shape)}")
    return torch.complex(x[:, 0], x[:, 1])


def to_channels(z: torch.Tensor) -> torch.Tensor:
    """Complex ``(B, *spatial)`` -> ``(B, 2, *spatial)`` real/imaginary channels."""
    return torch.stack([z.real, z.imag], dim=1)


def _mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(device=like.device, dtype=like.real.dtype)


class SingleCoilMRI(LinearOperator):
    """Single-coil Cartesian MRI ``A x = M F x`` (centred orthonormal FFT ``F``, sampling mask ``M``).

    A coisometry for a 0/1 mask, so hard k-space replacement and Song et al.'s merge apply.

    Args:
        mask: sampling mask broadcastable against k-space ``(B, 1, *spatial)``, e.g. ``(H, W)``.
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = torch.as_tensor(mask)
        self.coisometry = bool(((self.mask == 0) | (self.mask == 1)).all())

    def forward(self, x):
        return _mask(self.mask, x) * fft2c(to_complex(x)).unsqueeze(1)

    def adjoint(self, y):
        if y.shape[1] != 1:
            raise ValueError(f"single-coil k-space needs 1 coil channel, got shape {tuple(y.shape)}")
        return to_channels(ifft2c(_mask(self.mask, y) * y)[:, 0])

    def normal(self, x):
        m = _mask(self.mask, x)
        return to_channels(ifft2c(m * m * fft2c(to_complex(x))))


class MultiCoilMRI(LinearOperator):
    """SENSE (Pruessmann et al. 1999, eq. 1): ``A x = M F (S_c x)`` for each coil ``c``.

    Args:
        mask: sampling mask broadcastable against k-space ``(B, coils, *spatial)``.
        maps: complex coil sensitivities ``(B or 1, coils, *spatial)`` (a 2D ``(.., H, W)`` map set also
            serves a 3D volume slice by slice).
    """

    def __init__(self, mask: torch.Tensor, maps: torch.Tensor):
        if not maps.is_complex() or maps.ndim < 4:
            raise ValueError(f"maps must be complex with shape (B, coils, *spatial), got {maps.dtype} "
                             f"{tuple(maps.shape)}")
        self.mask, self.maps = torch.as_tensor(mask), maps

    def _maps(self, z: torch.Tensor) -> torch.Tensor:
        s = self.maps.to(device=z.device, dtype=z.dtype)
        if s.ndim == z.ndim:  # (B, coils, H, W) against (B, D, H, W): the same maps for every slice
            s = s.unsqueeze(2)
        return s

    def coil_images(self, x: torch.Tensor) -> torch.Tensor:
        """``S_c x``: complex ``(B, coils, *spatial)``."""
        z = to_complex(x)
        return self._maps(z) * z.unsqueeze(1)

    def forward(self, x):
        k = fft2c(self.coil_images(x))
        return _mask(self.mask, k) * k

    def adjoint(self, y):
        imgs = ifft2c(_mask(self.mask, y) * y)
        s = self._maps(imgs[:, 0])
        return to_channels((s.conj() * imgs).sum(dim=1))


def rss(coil_images: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Root-sum-of-squares coil combination ``sqrt(sum_c |x_c|^2)`` (Roemer et al. 1990), keeping ``dim``."""
    return (coil_images.abs() ** 2).sum(dim=dim, keepdim=True).sqrt()


def birdcage_maps(shape: tuple[int, ...], n_coils: int = 8, radius: float = 1.5, normalize: bool = True,
                  dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    """Simulated sensitivities of ``n_coils`` loops on a ring of ``radius`` (in half-FOV units) around the object.

    Each coil's field falls off as ``1 / distance`` and turns with the angle seen from the coil (a
    Biot-Savart-like model of a birdcage array). With ``normalize`` the maps satisfy ``sum_c |S_c|^2 = 1``.

    Args:
        shape: ``(H, W)`` or ``(D, H, W)``; for 3D the coils sit on a ring in the central slice.
        n_coils: number of coils.
        radius: ring radius relative to the half field of view (> 1 puts the coils outside the image).
        normalize: scale to unit root-sum-of-squares.
        dtype: complex dtype.

    Returns:
        complex maps ``(1, n_coils, *shape)``.
    """
    if n_coils < 1:
        raise ValueError(f"n_coils must be >= 1, got {n_coils}")
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must be (H, W) or (D, H, W), got {shape}")
    real = torch.float64
    axes = [(torch.arange(n, dtype=real) - n // 2) / (n / 2) for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    y, x = grids[-2], grids[-1]
    z = grids[0] if len(shape) == 3 else torch.zeros_like(x)
    maps = []
    for c in range(n_coils):
        phi = 2 * math.pi * c / n_coils
        dy, dx = y - radius * math.sin(phi), x - radius * math.cos(phi)
        dist = (dx**2 + dy**2 + z**2).sqrt()
        maps.append(torch.polar(1 / dist, torch.atan2(dy, dx) + phi))
    s = torch.stack(maps)
    if normalize:
        s = s / (s.abs() ** 2).sum(0, keepdim=True).sqrt()
    return s.unsqueeze(0).to(dtype)


def calibration_size(mask: torch.Tensor) -> tuple[int, int]:
    """Size ``(rows, cols)`` of a fully sampled rectangle around the k-space centre ``(H//2, W//2)`` of a mask.

    Grown from the centre by square rings, then one row or column at a time while the new edge is fully
    sampled (greedy); a 1D column mask gives ``(H, centre columns)``.
    """
    m = mask.bool().reshape(-1, *mask.shape[-2:]).all(dim=0) if mask.ndim > 2 else mask.bool()
    h, w = m.shape
    y0, x0 = y1, x1 = h // 2, w // 2
    if not m[y0, x0]:
        return 0, 0
    while (y0 > 0 and x0 > 0 and y1 < h - 1 and x1 < w - 1
           and bool(m[y0 - 1:y1 + 2, x0 - 1:x1 + 2].all())):  # square rings first
        y0, x0, y1, x1 = y0 - 1, x0 - 1, y1 + 1, x1 + 1
    grew = True
    while grew:  # then one side at a time while the new edge is fully sampled
        grew = False
        if x0 > 0 and bool(m[y0:y1 + 1, x0 - 1].all()):
            x0, grew = x0 - 1, True
        if x1 < w - 1 and bool(m[y0:y1 + 1, x1 + 1].all()):
            x1, grew = x1 + 1, True
        if y0 > 0 and bool(m[y0 - 1, x0:x1 + 1].all()):
            y0, grew = y0 - 1, True
        if y1 < h - 1 and bool(m[y1 + 1, x0:x1 + 1].all()):
            y1, grew = y1 + 1, True
    return y1 - y0 + 1, x1 - x0 + 1


def estimate_maps(kspace: torch.Tensor, mask: torch.Tensor | None = None, calib: int | None = None,
                  threshold: float = 0.02, eps: float = 1e-8) -> torch.Tensor:
    """Coil maps from the calibration region: low-resolution coil images over their root-sum-of-squares.

    The central ``calib x calib`` k-space block (Hann-windowed, zero elsewhere) gives smooth coil images
    ``c_k``; the maps are ``c_k / sqrt(sum |c_k|^2)`` (McKenzie et al. 2002, eq. 5, with the RSS as the
    reference), zero where the low-resolution RSS is below ``threshold`` of its maximum.

    Args:
        kspace: complex ``(B, coils, *spatial)`` k-space (undersampled is fine; only the centre is used).
        mask: the sampling mask, used to find the fully sampled centre when ``calib`` is not given.
        calib: side of the calibration block (default: the mask's fully sampled centre, at most 32).
        threshold: relative RSS level below which the maps are set to zero (background).
        eps: guards the division.

    Returns:
        complex maps shaped like ``kspace``.
    """
    if not kspace.is_complex():
        raise ValueError("kspace must be a complex tensor (B, coils, *spatial)")
    h, w = kspace.shape[-2:]
    if calib is None:
        if mask is None:
            raise ValueError("give the sampling mask or the calibration size")
        calib = min(min(calibration_size(mask)), 32)
    if calib < 2:
        raise ValueError(f"the calibration region must be at least 2 lines wide, got {calib}")
    win = torch.zeros(h, w, dtype=kspace.real.dtype, device=kspace.device)
    hann = torch.hann_window(calib + 2, periodic=False, dtype=win.dtype, device=win.device)[1:-1]
    y0, x0 = h // 2 - calib // 2, w // 2 - calib // 2
    win[y0:y0 + calib, x0:x0 + calib] = hann[:, None] * hann[None, :]
    low = ifft2c(kspace * win)
    ref = rss(low)
    maps = low / ref.clamp(min=eps)
    return torch.where(ref > threshold * ref.amax(dim=(-2, -1), keepdim=True), maps, torch.zeros_like(maps))
