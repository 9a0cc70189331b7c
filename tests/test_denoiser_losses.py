"""Parametrisations, the denoiser adapter, the DSM losses and their weightings, EMA, the U-Net builder."""

import pytest
import torch
from torch import nn

from medidiff.core.denoiser import (
    PARAMETRISATIONS,
    Denoiser,
    eps_from_x0,
    score_from_x0,
    target_for,
    x0_from_output,
)
from medidiff.core.ema import EMA
from medidiff.core.losses import diffusion_loss, snr_weight
from medidiff.core.processes import DDPM, VESDE, VPSDE, SubVPSDE
from medidiff.core.utils import bcast
from medidiff.nets import build_unet

PROCESSES = [DDPM(100), VPSDE(), SubVPSDE(), VESDE(0.01, 30.0)]


class Oracle(nn.Module):
    """A 'network' that outputs the exact target of its parametrisation for known (x0, eps)."""

    def __init__(self, process, prediction, x0, eps, scale_input=True):
        super().__init__()
        self.process, self.prediction, self.x0, self.eps = process, prediction, x0, eps
        self.scale_input = scale_input
        self.seen = None

    def forward(self, x, t_net):
        self.seen = x
        t = self._t
        a, s = (bcast(v, self.x0) for v in self.process.marginal(t))
        return target_for(self.prediction, self.x0, self.eps, a, s)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("prediction", PARAMETRISATIONS)
def test_exact_target_gives_exact_x0_and_zero_loss(process, prediction):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    net = Oracle(process, prediction, x0, eps)
    net._t = t
    den = Denoiser(net, process, prediction)
    x_t = process.noised(x0, t, eps)
    torch.testing.assert_close(den(x_t, t), x0)
    a, s = (bcast(v, x0) for v in process.marginal(t))
    torch.testing.assert_close(eps_from_x0(x_t, x0, a, s), eps)
    torch.testing.assert_close(score_from_x0(x_t, x0, a, s), -eps / s)
    for weighting in ("uniform", "min_snr"):
        loss = diffusion_loss(den, x0, t=t, noise=eps, weighting=weighting)
        assert loss.item() == pytest.approx(0.0, abs=1e-20)


def test_input_scaling_and_conditioning_channels():
    process = VESDE(0.01, 30.0)
    x0 = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    eps = torch.ones_like(x0)
    t = torch.tensor([1.0, 1.0], dtype=torch.float64)
    net = Oracle(process, "eps", x0, eps)
    net._t = t
    cond = torch.full((1, 3, 4, 4), 7.0, dtype=torch.float64)
    den = Denoiser(net, process, "eps").with_cond(cond)
    den(process.noised(x0, t, eps), t)
    assert net.seen.shape == (2, 4, 4, 4)
    # x_t = 30 * eps: the input is divided by sqrt(alpha^2 + sigma^2) = sqrt(1 + 900)
    torch.testing.assert_close(net.seen[:, :1], torch.full((2, 1, 4, 4), 30 / 901**0.5, dtype=torch.float64))
    torch.testing.assert_close(net.seen[:, 1:], cond.expand(2, -1, -1, -1))


def test_min_snr_weights():
    alpha = torch.tensor([0.99, 0.5, 0.1])
    sigma = (1 - alpha**2).sqrt()
    snr = alpha**2 / sigma**2
    clipped = snr.clamp(max=5.0)
    torch.testing.assert_close(snr_weight("eps", alpha, sigma, "min_snr", 5.0), clipped / snr)
    torch.testing.assert_close(snr_weight("x0", alpha, sigma, "min_snr", 5.0), clipped)
    torch.testing.assert_close(snr_weight("v", alpha, sigma, "min_snr", 5.0), clipped / (snr + 1))
    torch.testing.assert_close(snr_weight("eps", alpha, sigma, "uniform"), torch.ones(3))
    with pytest.raises(ValueError, match="unknown weighting"):
        snr_weight("eps", alpha, sigma, "snr")


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("prediction", PARAMETRISATIONS)
@pytest.mark.parametrize("gamma", [5.0, 1e9], ids=["gamma5", "unclipped"])
def test_min_snr_weight_is_the_x0_error_weighting_for_every_process(process, prediction, gamma):
    """Min-SNR's definition (Hang et al. 2023, eq. 5): the weighted target error equals ``min(SNR, gamma)`` times
    the squared error of the ``x0_hat`` the output implies, per sample, whatever the process and target."""
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.002, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    x0 = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    alpha, sigma = process.marginal(t)
    a, s = bcast(alpha, x0), bcast(sigma, x0)
    x_t = a * x0 + s * eps
    target = target_for(prediction, x0, eps, a, s)
    out = target + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    target_err = ((out - target) ** 2).flatten(1).mean(1)
    x0_err = ((x0_from_output(prediction, out, x_t, a, s) - x0) ** 2).flatten(1).mean(1)
    weight = snr_weight(prediction, alpha, sigma, "min_snr", gamma)
    torch.testing.assert_close(weight * target_err, ((alpha / sigma) ** 2).clamp(max=gamma) * x0_err,
                               rtol=1e-9, atol=0)


def test_loss_of_a_zero_network_is_the_target_energy():
    """A network that outputs 0 has eps-loss E[eps^2] = 1 and VE score-matching loss E[eps^2] = 1."""

    class Zero(nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    x0 = torch.zeros(256, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    for process, prediction in ((DDPM(100), "eps"), (VESDE(0.01, 30.0), "score")):
        loss = diffusion_loss(Denoiser(Zero(), process, prediction), x0, generator=g)
        assert loss.item() == pytest.approx(1.0, rel=0.02)


def test_simplex_noise_in_the_loss():
    process = DDPM(100)
    den = Denoiser(build_unet(2, channels=(8, 16), attention_levels=(False, False), norm_num_groups=8,
                              num_head_channels=8), process)
    loss = diffusion_loss(den, torch.zeros(2, 1, 16, 16), noise="simplex", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_ema_update_and_warmup():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)
    with ema.swapped(model):
        torch.testing.assert_close(model.weight, torch.full((1, 2), 1.2))
    torch.testing.assert_close(model.weight, torch.full((1, 2), 3.0))
    state = ema.state_dict()
    other = EMA(model, decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9 and other.num_updates == 1


def test_unet_builder_2d_3d_and_errors():
    net2 = build_unet(2, in_channels=2, cond_channels=1, channels=(8, 16), attention_levels=(False, True),
                      norm_num_groups=8, num_head_channels=8)
    assert net2(torch.zeros(1, 3, 16, 16), torch.tensor([5.0])).shape == (1, 2, 16, 16)
    assert build_unet(**net2.config).config == net2.config
    net3 = build_unet(3, channels=(8, 8), attention_levels=(False, False), norm_num_groups=8, num_head_channels=8)
    assert net3(torch.zeros(1, 1, 8, 8, 8), torch.tensor([0.5])).shape == (1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="norm_num_groups"):
        build_unet(2, channels=(12, 16), norm_num_groups=8, attention_levels=(False, False))
    with pytest.raises(ValueError, match="attention_levels"):
        build_unet(2, channels=(8, 16), attention_levels=(False,), norm_num_groups=8)


# -- the adapter's details ------------------------------------------------------------------------
class Recorder(nn.Module):
    """Returns a fixed multiple of its input's first channels and records what it was given."""

    def __init__(self, channels=1, dtype=None):
        super().__init__()
        self.channels, self.dtype, self.seen = channels, dtype, []

    def forward(self, x, t_net):
        self.seen.append((x.clone(), t_net.clone()))
        out = 0.5 * x[:, : self.channels]
        return out if self.dtype is None else out.to(self.dtype)


def test_batch_time_repeats_scalars_in_the_input_precision():
    from medidiff.core.utils import batch_time

    x64, x32 = torch.zeros(3, 1, 2, 2, dtype=torch.float64), torch.zeros(3, 1, 2, 2)
    t = batch_time(0.25, x64)
    assert t.shape == (3,) and t.dtype == torch.float64 and bool((t == 0.25).all())
    assert batch_time(torch.tensor(0.5, dtype=torch.float64), x32).dtype == torch.float32
    assert batch_time(torch.tensor([0.1, 0.2, 0.3]), x64).tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_input_scaling_when_alpha_and_sigma_are_both_below_one():
    """Sub-VP: ``alpha^2 + sigma^2 < 1`` away from t = 0 and 1; the input is divided by its square root,
    or passed as is with ``scale_input=False``; a Python-number time reaches the network as ``process.net_time``."""
    process = SubVPSDE()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    alpha, sigma = (v.item() for v in process.marginal(torch.tensor(0.3, dtype=torch.float64)))
    for scale, factor in ((True, (alpha**2 + sigma**2) ** -0.5), (False, 1.0)):
        net = Recorder()
        Denoiser(net, process, "x0", scale_input=scale)(x, 0.3)
        torch.testing.assert_close(net.seen[0][0], x * factor)
        torch.testing.assert_close(net.seen[0][1], torch.full((2,), 999 * 0.3, dtype=torch.float64))
    assert factor != pytest.approx((alpha**2 + sigma**2) ** -0.5)


def test_conditioning_and_dtypes():
    process = DDPM(100)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    bound = torch.full((1, 2, 4, 4), 3.0)  # one conditioning image for the batch, 2 channels (= batch size)
    net = Recorder()
    den = Denoiser(net, process, "x0", scale_input=False, time_fn=lambda t: 7 * t).with_cond(bound)
    assert (den.prediction, den.scale_input, den.time_fn(torch.tensor(1.0)).item()) == ("x0", False, 7.0)
    out = den(x, torch.full((2,), 0.5, dtype=torch.float64))
    assert out.dtype == torch.float64
    seen = net.seen[-1][0]
    assert seen.shape == (2, 3, 4, 4) and seen.dtype == torch.float64
    torch.testing.assert_close(seen[:, 1:], torch.full((2, 2, 4, 4), 3.0, dtype=torch.float64))
    other = torch.full((2, 2, 4, 4), -1.0)  # an explicit cond overrides the bound one
    den.net_output(x, 0.5, cond=other)
    den(x, 0.5, cond=other)
    for seen, _ in net.seen[-2:]:
        torch.testing.assert_close(seen[:, 1:], other.double())
    low = Denoiser(Recorder(dtype=torch.bfloat16), process, "eps")  # e.g. a network under autocast
    assert low(x, 0.5).dtype == low.net_output(x, 0.5).dtype == torch.float64


def test_unknown_parametrisations_and_weightings_say_what_exists():
    x = torch.zeros(1, 1, 2, 2)
    for call in (lambda: x0_from_output("noise", x, x, 1.0, 1.0), lambda: target_for("noise", x, x, 1.0, 1.0),
                 lambda: Denoiser(nn.Identity(), VPSDE(), "noise")):
        with pytest.raises(ValueError, match=r"unknown parametrisation 'noise'; choose one of \('eps'"):
            call()
    with pytest.raises(ValueError, match="unknown parametrisation 'noise'"):
        snr_weight("noise", torch.ones(1), torch.ones(1), "min_snr")


# -- the loss's details ---------------------------------------------------------------------------
class ExactFromInput(nn.Module):
    """A network that recovers its exact target from its (scaled) input, knowing ``x0`` and the times."""

    def __init__(self, process, prediction, x0, t):
        super().__init__()
        self.process, self.prediction, self.x0, self.t = process, prediction, x0, t

    def forward(self, x_in, t_net):
        a, s = (bcast(v, self.x0) for v in self.process.marginal(self.t))
        x_t = x_in[:, : self.x0.shape[1]] * torch.sqrt(a**2 + s**2)
        return target_for(self.prediction, self.x0, (x_t - a * self.x0) / s, a, s)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("prediction", PARAMETRISATIONS)
def test_loss_noises_the_image_as_the_process_does(process, prediction):
    """A network that is exact given ``x_t = alpha x0 + sigma eps`` has zero loss on the loss's own ``x_t``
    (with conditioning channels passed through), and a large one if ``x_t`` were formed otherwise."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    cond = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    den = Denoiser(ExactFromInput(process, prediction, x0, t), process, prediction, cond=cond)
    for weighting in ("uniform", "min_snr"):
        assert diffusion_loss(den, x0, t=t, cond=cond, weighting=weighting, generator=g).item() < 1e-20


def test_loss_mask_weights_and_per_sample_min_snr():
    """A zero eps-network's squared error is ``eps^2``: the loss is the mean of ``w_b * mean(eps^2 * mask)``
    over samples ``b``, with Min-SNR weights ``min(SNR_b, gamma) / SNR_b``."""

    class Zero(nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    process = DDPM(100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(3, 1, 4, 4)
    eps = torch.randn(3, 1, 4, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1)
    t = torch.tensor([0.05, 0.3, 0.9])
    mask = torch.zeros(3, 1, 4, 4)
    mask[..., :2] = 1.0
    den = Denoiser(Zero(), process, "eps")
    per_sample = (eps**2 * mask).flatten(1).mean(1)
    loss = diffusion_loss(den, x0, t=t, noise=eps, mask=mask)
    assert loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    alpha, sigma = process.marginal(t)
    snr = (alpha / sigma) ** 2
    for gamma in (1.0, 5.0):
        loss = diffusion_loss(den, x0, t=t, noise=eps, mask=mask, weighting="min_snr", gamma=gamma)
        weights = snr.clamp(max=gamma) / snr
        assert loss.item() == pytest.approx((weights * per_sample).mean().item(), rel=1e-6)
    # the default gamma is Hang et al.'s 5 (SNR at t = 0.05 is ~200, so any other value changes the weight)
    assert diffusion_loss(den, x0, t=t, noise=eps, weighting="min_snr").item() == pytest.approx(
        diffusion_loss(den, x0, t=t, noise=eps, weighting="min_snr", gamma=5.0).item())
    assert snr_weight("x0", alpha, sigma, "min_snr")[0].item() == pytest.approx(5.0)


class TimeEcho(nn.Module):
    """Outputs its time input everywhere (so that the loss depends on the drawn times)."""

    def forward(self, x, t_net):
        return bcast(t_net / 1000, x).expand_as(x)


def test_loss_draws_times_and_noise_from_the_generator():
    """The same seed gives the same loss (times and noise drawn from it), another seed another loss."""
    process = VPSDE()
    den = Denoiser(TimeEcho(), process)
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    def loss(seed, noise, kw):
        return diffusion_loss(den, x0, noise=noise, noise_kw=kw, generator=torch.Generator().manual_seed(seed)).item()

    for noise, kw in (("gaussian", None), ("simplex", {"octaves": 2})):
        assert loss(1, noise, kw) == loss(1, noise, kw) != loss(2, noise, kw)
