"""Parallel-beam CT: scikit-image's radon/iradon as the reference, the exact adjoint, FBP, merge, TV, noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

from medidiff.core.operators import adjoint_test
from medidiff.recon import baselines
from medidiff.recon.ct import ParallelBeamCT, poisson_noise, ramp_filter, view_angles

D64 = torch.float64


def _phantom(n=32):
    """Shepp-Logan, zero outside the inscribed circle (scikit-image's circle geometry expects that)."""
    img = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True)
    yy, xx = np.ogrid[:n, :n]
    return img * (((yy - n // 2) ** 2 + (xx - n // 2) ** 2) <= (n // 2) ** 2)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("n,circle,views", [(32, False, 30), (32, True, 45), (33, False, 20)])
def test_radon_and_fbp_match_scikit_image(n, circle, views):
    img = _phantom(n)
    theta = view_angles(views).numpy()
    op = ParallelBeamCT((n, n), theta, circle=circle)
    sino = op(torch.from_numpy(img)[None, None])
    ref = radon(img, theta, circle=circle)  # (detectors, views)
    assert sino.shape == (1, 1, views, ref.shape[0])
    assert _rel(sino[0, 0].numpy().T, ref) < 1e-9
    for name in ("ramp", "shepp-logan"):
        rec = op.fbp(torch.from_numpy(ref.T.copy())[None, None], name)[0, 0].numpy()
        assert _rel(rec, iradon(ref, theta, output_size=n, circle=circle, filter_name=name)) < 0.02


def test_limited_angle_matches_scikit_image():
    img = _phantom(32)
    theta = view_angles(40, arc=120.0, start=10.0)
    assert float(theta[0]) == 10.0 and float(theta[-1]) == pytest.approx(127.0)
    op = ParallelBeamCT((32, 32), theta)
    sino = op(torch.from_numpy(img)[None, None])[0, 0].numpy().T
    assert _rel(sino, radon(img, theta.numpy(), circle=False)) < 1e-9


@pytest.mark.parametrize("shape,circle", [((24, 24), True), ((20, 26), False)])
def test_adjoint_is_exact(shape, circle):
    g = torch.Generator().manual_seed(0)
    op = ParallelBeamCT(shape, view_angles(17), circle=circle)
    x = torch.randn(2, 1, *shape, generator=g, dtype=D64)
    y = torch.randn(op(x).shape, generator=g, dtype=D64)
    assert adjoint_test(op, x, y) < 1e-12
    # autograd through the forward gives the same back-projection
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad((op(xr) * y).sum(), xr)
    assert torch.allclose(gx, op.adjoint(y))
    yr = y.clone().requires_grad_(True)
    (gy,) = torch.autograd.grad((op.adjoint(yr) * x).sum(), yr)
    assert torch.allclose(gy, op(x))


def test_volume_is_projected_slice_by_slice():
    g = torch.Generator().manual_seed(1)
    vol = torch.randn(2, 1, 3, 16, 16, generator=g, dtype=D64)
    op = ParallelBeamCT((16, 16), view_angles(10))
    sino = op(vol)
    assert sino.shape == (2, 1, 3, 10, op.n_det)
    assert torch.allclose(sino[:, :, 1], op(vol[:, :, 1]))
    y = torch.randn(sino.shape, generator=g, dtype=D64)
    assert adjoint_test(op, vol, y) < 1e-12
    assert torch.allclose(op.fbp(sino)[:, :, 2], op.fbp(sino[:, :, 2]))


def test_geometry_errors():
    with pytest.raises(ValueError):
        ParallelBeamCT((16, 20), view_angles(4), circle=True)
    with pytest.raises(ValueError):
        view_angles(0)
    with pytest.raises(ValueError):
        ParallelBeamCT((16, 16), view_angles(4))(torch.zeros(1, 1, 15, 16))
    with pytest.raises(ValueError):
        ramp_filter(64, "hann")
    with pytest.raises(ValueError):
        ParallelBeamCT((16, 16), [0.5], full_angles=view_angles(180))


def test_ramp_filter_is_the_discrete_ramp():
    resp = ramp_filter(64)
    freq = torch.fft.fftfreq(64, dtype=D64).abs()
    # close to |f| away from DC, with the small positive DC term of the band-limited ramp (Kak & Slaney eq. 61)
    assert float(resp[0]) == pytest.approx(0.5 - 4 / np.pi**2 * sum(1 / k**2 for k in range(1, 32, 2)), abs=1e-12)
    assert torch.allclose(resp[1:], 2 * freq[1:], atol=0.02)  # 2|f|: 1 at the Nyquist frequency
    assert bool((ramp_filter(64, "shepp-logan")[1:] < resp[1:]).all())


def test_merge_on_a_full_grid_of_views():
    img = torch.from_numpy(_phantom(32))[None, None]
    full = view_angles(90)
    op = ParallelBeamCT((32, 32), full[::3], full_angles=full)
    y = op(img)
    fbp_full = op.full.fbp(op.full(img))
    # when x already fits the data the merge is the FBP of its full sinogram, whatever lam
    for lam in (0.0, 0.5, 1.0):
        assert torch.allclose(op.merge(img, y, lam), fbp_full)
    # lam = 1 puts the measured views into the full sinogram: closer to the truth than the zero image's FBP
    merged = op.merge(torch.zeros_like(img), y, 1.0)
    assert _rel(merged.numpy(), img.numpy()) < _rel(torch.zeros_like(img).numpy(), img.numpy())
    with pytest.raises(ValueError):
        ParallelBeamCT((32, 32), full[::3]).merge(img, y)


def test_poisson_noise_statistics():
    g = torch.Generator().manual_seed(2)
    sino = torch.full((1, 1, 200, 100), 2.0, dtype=D64)
    noisy = poisson_noise(sino, 1e4, generator=g)
    # -log(N / I0) with N ~ Poisson(I0 e^-p): mean ~ p, variance ~ 1 / (I0 e^-p)
    assert float(noisy.mean()) == pytest.approx(2.0, abs=0.01)
    assert float(noisy.var()) == pytest.approx(1 / (1e4 * np.exp(-2.0)), rel=0.05)
    assert torch.equal(noisy, poisson_noise(sino, 1e4, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError):
        poisson_noise(sino, 0.0)


def test_tv_beats_fbp_on_sparse_views():
    img = torch.from_numpy(_phantom(32)).float()[None, None]
    op = ParallelBeamCT((32, 32), view_angles(20))
    y = op(img)
    y = y + 1e-3 * y.abs().max() * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    f = baselines.fbp(op, y)
    tv = baselines.tv_reconstruct(op, y, f, modality="ct", iters=60)

    def psnr(a):
        return float(10 * torch.log10(img.max() ** 2 / ((a - img) ** 2).mean()))

    assert psnr(tv) > psnr(f) + 5, (psnr(f), psnr(tv))
