"""Guidance hooks: exact data consistency, the measurement-space merge, DDS's CG step, DPS's gradient step."""

from __future__ import annotations

import math

import pytest
import torch

from medidiff.core import samplers
from medidiff.core.guidance import DPS, Compose, ConjugateGradient, MeasurementMerge, Projection, ddim_slope
from medidiff.core.operators import MaskOperator
from medidiff.core.processes import VPSDE
from medidiff.recon.masks import make_mask
from medidiff.recon.mri import MultiCoilMRI, SingleCoilMRI, birdcage_maps, fft2c, to_complex

D64 = torch.float64


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _denoiser(x, t):
    """A smooth, nonlinear, per-sample stand-in for a network: x0_hat = 0.8 tanh(x) + 0.1 x * t."""
    from medidiff.core.utils import bcast

    return 0.8 * torch.tanh(x) + 0.1 * x * bcast(t, x)


def _mri_problem(shape=(16, 16), seed=0):
    g = _g(seed)
    x = torch.randn(2, 2, *shape, generator=g, dtype=D64)
    op = SingleCoilMRI(make_mask(shape, "random", 4, 0.125, seed=seed).to(D64))
    return op, op(x), x


def test_projection_enforces_measured_data_exactly():
    op, y, _ = _mri_problem()
    x0 = torch.randn(2, 2, 16, 16, generator=_g(9), dtype=D64)
    out = Projection(op, y)(x0, x0, torch.full((2,), 0.5, dtype=D64))
    assert torch.allclose(op(out), y, atol=1e-12)
    # unmeasured k-space is left as it was
    unmeasured = (1 - op.mask) * (fft2c(to_complex(out)) - fft2c(to_complex(x0)))
    assert unmeasured.abs().max() < 1e-12
    # a masking operator: replacement of the known pixels
    mask = (torch.rand(1, 1, 8, 8, generator=_g(1)) > 0.5).to(D64)
    known = torch.randn(1, 1, 8, 8, generator=_g(2), dtype=D64)
    hook = Projection(MaskOperator(mask), mask * known)
    out = hook(x0[:1, :1, :8, :8], None, None)
    assert torch.allclose(out, (1 - mask) * x0[:1, :1, :8, :8] + mask * known, rtol=0, atol=1e-15)


def test_projection_refuses_non_coisometries():
    maps = birdcage_maps((8, 8), 4, dtype=torch.complex128)
    op = MultiCoilMRI(torch.ones(8, 8), maps)
    with pytest.raises(ValueError):
        Projection(op, torch.zeros(1, 4, 8, 8, dtype=torch.complex128))


def test_measurement_merge_weights_measured_entries():
    op, y, _ = _mri_problem()
    x0 = torch.randn(2, 2, 16, 16, generator=_g(3), dtype=D64)
    t = torch.full((2,), 0.3, dtype=D64)
    assert torch.allclose(MeasurementMerge(op, y, 0.0)(x0, x0, t), x0)
    assert torch.allclose(MeasurementMerge(op, y, 1.0)(x0, x0, t), Projection(op, y)(x0, x0, t))
    merged = MeasurementMerge(op, y, lambda t: 0.3)(x0, x0, t)
    assert torch.allclose(op(merged), 0.7 * op(x0) + 0.3 * y, atol=1e-12)
    with pytest.raises(ValueError):
        MeasurementMerge(op, y, 1.5)


def test_conjugate_gradient_hook():
    maps = birdcage_maps((16, 16), 4, dtype=torch.complex128)
    mask = make_mask((16, 16), "equispaced", 2, 0.25, seed=0).to(D64)
    op = MultiCoilMRI(mask, maps)
    x = torch.randn(1, 2, 16, 16, generator=_g(4), dtype=D64)
    y = op(x)
    x0 = torch.zeros_like(x)
    t = torch.full((1,), 0.5, dtype=D64)
    res = [float((op(ConjugateGradient(op, y, iters=k)(x0, x0, t)) - y).abs().norm()) for k in (1, 5, 30, 300)]
    assert res[0] > res[1] > res[2] > res[3]
    assert res[3] < 1e-9 * float(y.abs().norm())
    # with rho the step solves (A^H A + rho) x = A^H y + rho x0 exactly on a mask
    m = (torch.rand(1, 1, 6, 6, generator=_g(5)) > 0.5).to(D64)
    z = torch.randn(1, 1, 6, 6, generator=_g(6), dtype=D64)
    yy = m * torch.randn(1, 1, 6, 6, generator=_g(7), dtype=D64)
    out = ConjugateGradient(MaskOperator(m), yy, iters=3, rho=2.0)(z, z, t)
    assert torch.allclose(out, (m * yy + 2.0 * z) / (m + 2.0))
    with pytest.raises(ValueError):
        ConjugateGradient(op, y, iters=0)


def test_dps_gradient_matches_finite_differences():
    op, y, _ = _mri_problem(shape=(8, 8), seed=1)
    hook = DPS(op, y, zeta=0.5)
    x = torch.randn(2, 2, 8, 8, generator=_g(8), dtype=D64)
    t = torch.full((2,), 0.4, dtype=D64)
    x_in = x.clone().requires_grad_(True)
    g, loss = hook.gradient(_denoiser(x_in, t), x_in)

    def loss_of(xx):
        return ((y - op(_denoiser(xx, t))).abs() ** 2).flatten(1).sum(1)

    assert torch.allclose(loss, loss_of(x))
    v = torch.randn(2, 2, 8, 8, generator=_g(10), dtype=D64)
    h = 1e-6
    fd = (loss_of(x + h * v) - loss_of(x - h * v)) / (2 * h)
    assert torch.allclose((g * v).flatten(1).sum(1), fd, rtol=1e-6)
    # the correction is -zeta / ||residual|| * g per sample (no slope given: c = 1)
    out = hook(_denoiser(x_in, t), x_in, t)
    step = 0.5 / loss.sqrt()
    assert torch.allclose(out, _denoiser(x, t) - step[:, None, None, None] * g)
    assert not out.requires_grad
    with pytest.raises(ValueError):
        hook(_denoiser(x, t), x, t)  # no autograd graph


def test_ddim_slope():
    process = VPSDE()
    times = process.time_grid(4)
    slope = ddim_slope(process, times, eta=0.0)
    a, s = process.marginal(times)
    t = torch.full((3,), float(times[1]))
    expected = float(a[2] - s[2] * a[1] / s[1])
    assert torch.allclose(slope(t), torch.full((3,), expected), rtol=1e-6)
    assert torch.equal(slope(torch.full((1,), float(times[3]))), torch.ones(1))  # the last step returns x0_hat


def test_dps_through_ddim_equals_the_dps_update():
    """Through samplers.ddim, each state is the plain DDIM step minus zeta_t * grad (Chung et al. 2023, Alg. 1)."""
    process = VPSDE()
    steps, zeta = 4, 0.3
    op, y, _ = _mri_problem(shape=(8, 8), seed=2)
    times = process.time_grid(steps)
    hook = DPS(op, y, zeta, slope=ddim_slope(process, times))
    x_start = torch.randn(2, 2, 8, 8, generator=_g(11), dtype=D64)
    calls = []

    def denoiser(x, t):
        calls.append(x.requires_grad)  # the sampler runs the denoiser under autograd for a needs_grad hook
        return _denoiser(x, t)

    out = samplers.ddim(denoiser, x_start, process, steps, hook=hook)
    assert calls == [True] * steps  # one network evaluation per step, with autograd

    a, s = (v.tolist() for v in process.marginal(times))
    x = x_start
    for i in range(steps):
        t = torch.full((2,), float(times[i]), dtype=D64)
        x_in = x.clone().requires_grad_(True)
        x0 = _denoiser(x_in, t)
        loss = ((y - op(x0)).abs() ** 2).flatten(1).sum(1)
        (g,) = torch.autograd.grad(loss.sum(), x_in)
        zeta_t = (zeta / loss.sqrt()).detach()[:, None, None, None]
        x0 = x0.detach()
        if float(times[i + 1]) == 0:
            x = x0 - zeta_t * g
        else:
            x = a[i + 1] * x0 + s[i + 1] * (x - a[i] * x0) / s[i] - zeta_t * g
    assert torch.allclose(out, x, atol=1e-10)


def test_compose_runs_hooks_in_order_and_needs_grad():
    op, y, _ = _mri_problem(shape=(8, 8), seed=3)
    hook = Compose(DPS(op, y, 0.1), Projection(op, y))
    assert hook.needs_grad
    x = torch.randn(1, 2, 8, 8, generator=_g(12), dtype=D64)
    yy = y[:1]
    hook = Compose(DPS(op, yy, 0.1), Projection(op, yy))
    x_in = x.clone().requires_grad_(True)
    out = hook(_denoiser(x_in, torch.ones(1, dtype=D64)), x_in, torch.ones(1, dtype=D64))
    assert torch.allclose(op(out), yy, atol=1e-12)
    assert not math.isnan(float(out.sum()))


@pytest.mark.parametrize("hook_kind", ["projection", "cg"])
def test_data_consistent_sampling_through_ddim(hook_kind):
    """A DDIM run with a data-consistency hook ends on the measurements (the last step returns the hooked x0_hat)."""
    process = VPSDE()
    op, y, _ = _mri_problem(shape=(8, 8), seed=4)
    hook = Projection(op, y) if hook_kind == "projection" else ConjugateGradient(op, y, iters=2)
    x = torch.randn(2, 2, 8, 8, generator=_g(13), dtype=D64)
    out = samplers.ddim(_denoiser, x, process, 3, hook=hook)
    assert torch.allclose(op(out), y, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_dds_step_keeps_the_networks_noise_estimate(eta):
    """With ``ddim_gain`` the CG hook's ``x0`` makes the sampler's DDIM step DDS's (Algorithm 1): the corrected
    ``x0'`` with the network's noise estimate ``(x_t - alpha_t x0_hat) / sigma_t``; without, the estimate is taken
    from ``x0'``. ``clip`` starts CG from the clamped estimate."""
    from medidiff.core.guidance import ddim_gain

    process = VPSDE()
    times = process.time_grid(6)
    alpha, sigma = (v.double().tolist() for v in process.marginal(times))
    m = (torch.rand(2, 1, 6, 6, generator=_g(11)) > 0.4).to(D64)
    op, y = MaskOperator(m), m * torch.randn(2, 1, 6, 6, generator=_g(12), dtype=D64)
    plain = ConjugateGradient(op, y, iters=2)
    dds = ConjugateGradient(op, y, iters=2, gain=ddim_gain(process, times, eta))
    for i in (0, 2, 4):
        x_t = torch.randn(2, 1, 6, 6, generator=_g(20 + i), dtype=D64)
        x0_hat = 1.7 * torch.randn(2, 1, 6, 6, generator=_g(30 + i), dtype=D64)
        t = torch.full((2,), float(times[i]), dtype=D64)
        corrected, through = plain(x0_hat, x_t, t), dds(x0_hat, x_t, t)
        a_t, s_t, a_s, s_s = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        var = (eta * s_s) ** 2 * max(0.0, 1 - (a_t * s_s / (a_s * s_t)) ** 2)
        k = math.sqrt(s_s**2 - var)  # the weight of the noise estimate in the step
        step = a_s * through + k * (x_t - a_t * through) / s_t  # the sampler's step from the hook's x0
        assert torch.allclose(step, a_s * corrected + k * (x_t - a_t * x0_hat) / s_t, atol=1e-10)
        assert not torch.allclose(a_s * corrected + k * (x_t - a_t * corrected) / s_t, step)
    last = torch.full((2,), float(times[-2]), dtype=D64)  # the last step returns x0 itself: no gain
    assert torch.allclose(dds(x0_hat, x_t, last), plain(x0_hat, x_t, last))
    clipped = ConjugateGradient(op, y, iters=2, clip=0.5)(x0_hat, x_t, t)
    assert torch.allclose(clipped, plain(x0_hat.clamp(-0.5, 0.5), x_t, t))
    with pytest.raises(ValueError, match="clip"):
        ConjugateGradient(op, y, clip=0.0)
