"""Processes and schedules: closed forms, cross-checks with MONAI's schedulers, SDE simulations."""

import math

import pytest
import torch

from medidiff.core import schedules
from medidiff.core.processes import DDPM, VESDE, VPSDE, SubVPSDE, make_process
from medidiff.core.utils import bcast

ALL = [DDPM(1000), DDPM(200, "cosine"), VPSDE(), SubVPSDE(), VESDE(0.01, 20.0)]


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_ddpm_alpha_bar_matches_monai(schedule):
    from monai.networks.schedulers import DDPMScheduler

    monai_name = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta", "cosine": "cosine"}[schedule]
    kw = {} if schedule == "cosine" else {"beta_start": 2e-4, "beta_end": 0.015}
    ref = DDPMScheduler(num_train_timesteps=1000, schedule=monai_name, **kw)
    p = DDPM(1000, schedule, **kw)
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    alpha, sigma = p.marginal(t)
    torch.testing.assert_close(alpha**2, ref.alphas_cumprod.double(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha), rtol=0, atol=1e-12)


def test_sigmoid_and_karras_and_geometric():
    b = schedules.betas("sigmoid", 100)
    assert b[0] > 1e-4 and b[-1] < 0.02 and bool((b[1:] > b[:-1]).all())
    k = schedules.karras_sigmas(0.002, 80.0, 10)
    assert k[0].item() == pytest.approx(80.0) and k[-1].item() == pytest.approx(0.002)
    g = schedules.ve_sigmas(0.01, 50.0, 5)
    ratios = g[:-1] / g[1:]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (5000.0) ** 0.25))
    with pytest.raises(ValueError, match="unknown beta schedule"):
        schedules.betas("cosin", 10)


@pytest.mark.parametrize("process", ALL, ids=lambda p: type(p).__name__)
def test_log_snr_inverse_and_monotone(process):
    t = torch.linspace(process.t_min, 1.0, 57, dtype=torch.float64)
    lam = process.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    torch.testing.assert_close(process.t_of_log_snr(lam), t, rtol=0, atol=1e-7)


def test_vpsde_closed_form():
    p = VPSDE(0.1, 20.0)
    t = torch.tensor([0.3], dtype=torch.float64)
    log_mean = -0.25 * 0.09 * 19.9 - 0.5 * 0.3 * 0.1
    alpha, sigma = p.marginal(t)
    assert alpha.item() == pytest.approx(math.exp(log_mean))
    assert sigma.item() == pytest.approx(math.sqrt(1 - math.exp(2 * log_mean)))
    sub = SubVPSDE(0.1, 20.0).marginal(t)[1]
    assert sub.item() == pytest.approx(1 - math.exp(2 * log_mean))
    ve = VESDE(0.01, 50.0).marginal(t)[1]
    assert ve.item() == pytest.approx(0.01 * 5000**0.3)


@pytest.mark.parametrize("t_end", [0.15, 0.6])
@pytest.mark.parametrize("process", ALL, ids=lambda p: type(p).__name__)
def test_forward_marginal_matches_sde_simulation(process, t_end):
    """Euler-Maruyama simulation of the forward SDE from x0 = 0.7 to ``t_end`` (500 steps, 10,000 paths):
    the empirical mean matches ``alpha(t) x0`` within 4 standard errors + 2 %, the std ``sigma(t)`` within 3 %.
    At t = 0.15 sub-VP's ``sigma = 1 - alpha^2`` is a third of VP's ``sqrt(1 - alpha^2)``: its diffusion
    ``sqrt(beta (1 - alpha^4))`` is tested where it differs from VP's."""
    g = torch.Generator().manual_seed(0)
    x0 = 0.7
    x = torch.full((10000, 1, 1, 1), x0, dtype=torch.float64)
    n = 500
    t0 = process.t_min if isinstance(process, VESDE) else 0.0
    if isinstance(process, VESDE):  # VE starts at sigma_min noise, not at a point
        x = x + process.marginal(torch.tensor(t0, dtype=torch.float64))[1] * torch.randn(x.shape, generator=g,
                                                                                            dtype=torch.float64)
    dt = (t_end - t0) / n
    for k in range(n):
        t = torch.full((x.shape[0],), t0 + k * dt, dtype=torch.float64)
        drift, diffusion = process.sde(x, t)
        x = x + drift * dt + bcast(diffusion, x) * math.sqrt(dt) * torch.randn(x.shape, generator=g,
                                                                             dtype=torch.float64)
    alpha, sigma = process.marginal(torch.tensor(t_end, dtype=torch.float64))
    se = sigma.item() / math.sqrt(x.shape[0])
    assert x.mean().item() == pytest.approx(alpha.item() * x0, rel=0.02, abs=4 * se)
    assert x.std().item() == pytest.approx(sigma.item(), rel=0.03)


def test_ddpm_grid_and_net_time():
    p = DDPM(1000)
    grid = p.time_grid(20)
    assert torch.equal(p.index(grid[:-1]), torch.arange(999, 0, -50))
    assert grid[-1].item() == 0
    assert p.net_time(grid[:3]).tolist() == [999.0, 949.0, 899.0]
    partial = p.time_grid(10, t_start=0.25)
    assert p.index(partial[:1]).item() == 249
    dense = p.time_grid(50, kind="logsnr")  # many times crowd near t_min: repeats move up the grid
    idx = p.index(dense[:-1])
    assert bool((idx[1:] < idx[:-1]).all()) and idx[-1].item() == 0
    with pytest.raises(ValueError, match="do not fit"):
        p.time_grid(300, t_start=0.25)


def test_training_times_are_in_range():
    g = torch.Generator().manual_seed(0)
    d = DDPM(50).sample_time(1000, g)
    assert set(torch.round(d * 50).long().tolist()) == set(range(1, 51))
    c = VPSDE().sample_time(1000, g)
    assert c.min().item() >= 1e-3 and c.max().item() <= 1.0


@pytest.mark.parametrize("process", ALL, ids=lambda p: type(p).__name__)
def test_config_round_trip(process):
    rebuilt = make_process(**process.config())
    t = torch.linspace(0.01, 1, 7, dtype=torch.float64)
    for a, b in zip(process.marginal(t), rebuilt.marginal(t)):
        torch.testing.assert_close(a, b)


def test_prior_matches_marginal_at_one():
    for p in ALL:
        x = p.prior_sample((4000, 1, 2, 2), torch.Generator().manual_seed(1))
        alpha, sigma = p.marginal(torch.tensor(1.0, dtype=torch.float64))
        expected = math.sqrt(alpha.item() ** 2 + sigma.item() ** 2)
        assert x.std().item() == pytest.approx(expected, rel=0.03)


def test_schedules_are_float64_and_sigmoid_is_symmetric():
    for name in schedules.BETA_SCHEDULES:
        b = schedules.betas(name, 10)
        assert b.dtype == torch.float64 and b.shape == (10,), name
    assert schedules.ve_sigmas(0.01, 50.0, 4).dtype == schedules.karras_sigmas(0.01, 50.0, 4).dtype == torch.float64
    b = schedules.betas("sigmoid", 11)  # sigmoid on [-6, 6]: symmetric about the middle
    torch.testing.assert_close(b - 1e-4, (0.02 - b).flip(0), rtol=0, atol=1e-15)
    assert b[5].item() == pytest.approx((1e-4 + 0.02) / 2)
    s = schedules.betas("scaled_linear", 5)
    assert s[0].item() == pytest.approx(0.00085, rel=1e-12) and s[-1].item() == pytest.approx(0.012, rel=1e-12)


def test_ddpm_beta_is_the_step_increment_of_log_alpha_bar():
    """``beta(t) = N log((1 - beta_{k-1}))^-1`` on ``((k - 1) / N, k / N]``, continuous-time form of step k."""
    p = DDPM(10)
    t = torch.tensor([0.0, 0.05, 0.1, 0.1001, 0.55, 1.0], dtype=torch.float64)
    k = torch.tensor([1, 1, 1, 2, 6, 10])
    torch.testing.assert_close(p.beta(t), -10 * torch.log1p(-p.betas[k - 1]), rtol=1e-12, atol=0)


def test_vp_beta_is_linear():
    p = VPSDE(0.1, 20.0)
    torch.testing.assert_close(p.beta(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)),
                               torch.tensor([0.1, 10.05, 20.0], dtype=torch.float64))


def test_net_time_conventions():
    t = torch.tensor([0.001, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(VPSDE().net_time(t), 999 * t)  # score_sde's continuous-time embedding input
    torch.testing.assert_close(DDPM(1000).net_time(t), torch.tensor([0.0, 499.0, 999.0], dtype=torch.float64))


@pytest.mark.parametrize("process", ALL, ids=lambda p: type(p).__name__)
def test_training_times_are_reproducible_from_the_generator(process):
    draw = lambda seed: process.sample_time(64, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


def test_process_names():
    for p in ALL:
        assert p.config()["name"] in ("ddpm", "vpsde", "subvpsde", "vesde")
    with pytest.raises(ValueError, match=r"unknown process 'vp'; choose one of \['ddpm', 'subvpsde', 've"):
        make_process("vp")
