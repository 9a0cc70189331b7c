"""MRI operators, fastMRI masks, coil maps and the classical baselines on a phantom."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import resize

from medidiff.core.operators import adjoint_test, cg_solve
from medidiff.recon import baselines, masks
from medidiff.recon.mri import (
    MultiCoilMRI,
    SingleCoilMRI,
    birdcage_maps,
    calibration_size,
    estimate_maps,
    fft2c,
    ifft2c,
    rss,
    to_channels,
    to_complex,
)

D64, C128 = torch.float64, torch.complex128

# fastmri 0.3.0, RandomMaskFunc / EquispacedMaskFractionFunc([cf], [R])((1, 64, 1), seed=7): sampled columns
FASTMRI_SEED7 = {
    ("random", 4): [0, 7, 13, 19, 25, 30, 31, 32, 33, 34, 48, 55, 56, 62],
    ("equispaced", 4): [4, 9, 15, 20, 25, 30, 31, 32, 33, 34, 36, 42, 47, 52, 58],
    ("random", 8): [0, 7, 13, 19, 31, 32, 33, 55, 62],
    ("equispaced", 8): [4, 16, 28, 31, 32, 33, 41, 53],
}


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _phantom(n=32):
    return torch.from_numpy(resize(shepp_logan_phantom(), (n, n), anti_aliasing=True))[None, None]


def _psnr(a, ref):
    return float(10 * torch.log10(ref.max() ** 2 / ((a - ref) ** 2).mean()))


def test_centred_orthonormal_fft():
    z = torch.randn(2, 3, 8, 6, generator=_g(), dtype=C128)
    assert torch.allclose(ifft2c(fft2c(z)), z)
    assert torch.allclose(fft2c(z).abs().pow(2).sum(), z.abs().pow(2).sum())  # Parseval
    k = fft2c(torch.ones(1, 1, 8, 6, dtype=C128))
    assert k[0, 0, 4, 3].real == pytest.approx(np.sqrt(48))  # DC in the centre bin (H//2, W//2)
    assert float(k.abs().sum() - k[0, 0, 4, 3].abs()) < 1e-12
    x = torch.randn(2, 2, 4, 5, generator=_g(1), dtype=D64)
    assert torch.equal(to_channels(to_complex(x)), x)
    with pytest.raises(ValueError):
        to_complex(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("spatial", [(12, 10), (3, 12, 10)])
def test_single_coil_adjoint_and_coisometry(spatial):
    mask = masks.make_mask(spatial, "random", 4, 0.16, seed=0).to(D64)
    op = SingleCoilMRI(mask)
    x = torch.randn(2, 2, *spatial, generator=_g(2), dtype=D64)
    y = torch.randn(op(x).shape, generator=_g(3), dtype=C128)
    assert adjoint_test(op, x, y) < 1e-10
    assert op.coisometry
    assert torch.allclose(op.normal(x), op.adjoint(op(x)))
    assert torch.allclose(op(op.adjoint(op(x))), op(x))  # A A^H = I on measured data
    if len(spatial) == 3:  # slice-wise: slice d of the volume is the 2D operator on slice d
        op2 = SingleCoilMRI(mask)
        assert torch.allclose(op(x)[:, :, 1], op2(x[:, :, 1]))


@pytest.mark.parametrize("spatial", [(12, 10), (3, 12, 10)])
def test_multi_coil_adjoint(spatial):
    maps = birdcage_maps(spatial[-2:], 4, dtype=C128)
    assert torch.allclose((maps.abs() ** 2).sum(1), torch.ones(1, *spatial[-2:], dtype=D64))
    mask = masks.make_mask(spatial, "equispaced", 4, 0.16, seed=1).to(D64)
    op = MultiCoilMRI(mask, maps)
    x = torch.randn(2, 2, *spatial, generator=_g(4), dtype=D64)
    y = torch.randn(op(x).shape, generator=_g(5), dtype=C128)
    assert op(x).shape == (2, 4, *spatial)
    assert adjoint_test(op, x, y) < 1e-10
    maps3 = birdcage_maps((3, 12, 10), 6, dtype=C128)
    op3 = MultiCoilMRI(torch.ones(12, 10), maps3)
    x3 = torch.randn(1, 2, 3, 12, 10, generator=_g(6), dtype=D64)
    assert adjoint_test(op3, x3, torch.randn(1, 6, 3, 12, 10, generator=_g(7), dtype=C128)) < 1e-10
    with pytest.raises(ValueError):
        MultiCoilMRI(mask, maps.real)


@pytest.mark.parametrize("kind,accel", sorted(FASTMRI_SEED7))
def test_masks_match_fastmri(kind, accel):
    cf = {4: 0.08, 8: 0.04}[accel]
    fn = masks.random_mask if kind == "random" else masks.equispaced_mask
    cols = fn(64, accel, cf, seed=7)
    assert torch.nonzero(cols).flatten().tolist() == FASTMRI_SEED7[(kind, accel)]


@pytest.mark.parametrize("accel,cf", [(4, 0.08), (8, 0.04)])
def test_mask_statistics(accel, cf):
    n = 320
    n_low = round(n * cf)
    counts = []
    for seed in range(200):
        cols = masks.random_mask(n, accel, cf, seed)
        assert masks.center_lines(cols) >= n_low
        pad = (n - n_low + 1) // 2
        assert bool(cols[pad:pad + n_low].all())
        counts.append(int(cols.sum()))
    # expected N / R columns; the random part is binomial: the mean of 200 draws within 4 standard errors
    p = (n / accel - n_low) / (n - n_low)
    assert abs(np.mean(counts) - n / accel) < 4 * np.sqrt((n - n_low) * p * (1 - p) / len(counts))
    eq = masks.equispaced_mask(n, accel, cf, seed=0)
    assert abs(int(eq.sum()) - n / accel) <= 2
    assert torch.equal(masks.random_mask(n, accel, cf, 3), masks.random_mask(n, accel, cf, 3))
    assert not torch.equal(masks.random_mask(n, accel, cf, 3), masks.random_mask(n, accel, cf, 4))
    m2 = masks.make_mask((24, n), "random", accel, seed=5)
    assert m2.shape == (24, n) and bool((m2 == m2[:1]).all())
    with pytest.raises(ValueError):
        masks.random_mask(n, 4, 0.5)
    with pytest.raises(ValueError):
        masks.make_mask((8, 8), "spiral")


def test_gaussian_mask():
    m = masks.gaussian_mask((64, 64), acceleration=6, calib=12, seed=0)
    assert abs(masks.acceleration_of(m) - 6) < 0.3
    assert bool(m[26:38, 26:38].all())
    rows, cols = calibration_size(m)
    assert rows * cols >= 12 * 12 and min(rows, cols) >= 11
    assert float(m[24:40, 24:40].float().mean()) > float(m[:8, :8].float().mean())  # variable density
    assert torch.equal(m, masks.gaussian_mask((64, 64), 6, 12, seed=0))


def test_coil_maps_from_calibration_region():
    n = 32
    img = _phantom(n)
    true = birdcage_maps((n, n), 6, dtype=C128)
    k = fft2c(true * img[:, 0].to(C128).unsqueeze(1))
    mask = masks.make_mask((n, n), "equispaced", 3, 0.25, seed=0).to(D64)
    assert calibration_size(mask) == (n, 8)
    est = estimate_maps(mask * k, mask)
    inside = img[0, 0] > 0.05
    err = (est[0][:, inside] - true[0][:, inside]).abs().norm() / true[0][:, inside].abs().norm()
    assert float(err) < 0.2
    # SENSE (CG on the normal equations) with the estimated maps does about as well as with the true ones
    op = MultiCoilMRI(mask, est)
    rec = cg_solve(op, mask * k, iters=30)
    ref = cg_solve(MultiCoilMRI(mask, true), mask * k, iters=30)
    p_est = _psnr(to_complex(rec).abs()[:, None] * inside, img * inside)
    p_true = _psnr(to_complex(ref).abs()[:, None] * inside, img * inside)
    assert p_est > p_true - 2.5 and p_est > 22, (p_est, p_true)
    assert torch.allclose(rss(true * img[:, 0].unsqueeze(1)), img.to(D64))
    with pytest.raises(ValueError):
        estimate_maps(k)


def test_tv_beats_zero_filled():
    img = _phantom(32)
    x = torch.cat([img, torch.zeros_like(img)], 1)
    op = SingleCoilMRI(masks.make_mask((32, 32), "gaussian", 3, 0.25, seed=0).to(D64))
    y = op(x)
    zf = baselines.zero_filled(op, y)
    tv = baselines.tv_reconstruct(op, y, zf, modality="mri", iters=60)
    p_zf, p_tv = _psnr(to_complex(zf).abs()[:, None], img), _psnr(to_complex(tv).abs()[:, None], img)
    assert p_tv > p_zf + 3, (p_zf, p_tv)
    with pytest.raises(ValueError):
        baselines.tv_reconstruct(op, y, zf)
