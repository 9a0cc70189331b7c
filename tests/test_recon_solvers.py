"""Recon solvers against exact answers: oracle and Gaussian denoisers; priors on any size; z-TV; Poisson-disc masks."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import Mixture

from medidiff.core.operators import MaskOperator, adjoint_test
from medidiff.core.processes import make_process
from medidiff.nets import build_unet
from medidiff.recon import masks, problems, solvers
from medidiff.recon.mbir import ZTotalVariation, z_diff, z_diff_adjoint
from medidiff.recon.prior import AnySize, pad_multiple

PROCESS = make_process("ddpm", n_steps=40)


class Wrapped(torch.nn.Module):
    """A denoiser function with the ``process`` attribute the solvers read."""

    def __init__(self, fn, process=PROCESS):
        super().__init__()
        self.fn, self.process = fn, process

    def forward(self, x, t):
        return self.fn(x, t)


def _phantom(h=16, w=16, slices=1):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    disc = ((yy / 0.8) ** 2 + (xx / 0.6) ** 2 < 1).double()
    img = 40 * disc + 30 * disc * (xx > 0.1) + 20 * ((yy - 0.2) ** 2 + xx**2 < 0.05)
    return torch.stack([img * (1 + 0.1 * k) for k in range(slices)])[:, None]


def _oracle(truth):
    return Wrapped(lambda x, t: truth.to(x.dtype).expand_as(x) + 0 * x)


MRI_SINGLE = {"acceleration": 4, "coils": 1}
MRI_MULTI = {"acceleration": 4, "coils": 4, "known_maps": True}


@pytest.mark.parametrize("name", ["dds", "dps", "pc", "merge"])
@pytest.mark.parametrize("setting", [MRI_SINGLE, MRI_MULTI], ids=["single", "multi"])
def test_every_solver_returns_the_truth_with_an_oracle_denoiser(name, setting):
    problem = problems.simulate_mri(_phantom(), **setting, seed=3)
    op, y, x_init = problem.network()
    truth = problem.scale.to_network(problem.reference).float()
    result = solvers.get_solver(name)(_oracle(truth), op, y, x_init, steps=5,
                                      generator=torch.Generator().manual_seed(0))
    assert result.image.shape == x_init.shape
    assert float((result.image - truth).abs().max()) < 1e-4
    assert result.nfe == (10 if name == "pc" else 5)
    back = problem.to_output(problem.scale.to_physical(result.image.double()))
    assert torch.allclose(back, problem.reference, atol=1e-3)  # the network scale is undone exactly


@pytest.mark.parametrize("name", ["dds", "dps"])
def test_ct_solvers_return_the_truth_with_an_oracle_denoiser(name):
    problem = problems.simulate_ct(_phantom() * 10 - 200, views=12)
    op, y, x_init = problem.network()
    truth = problem.scale.to_network(problem.reference).float()
    result = solvers.get_solver(name)(_oracle(truth), op, y, x_init, steps=4)
    assert float((result.image - truth).abs().max()) < 1e-4


@pytest.mark.parametrize("options", [{}, {"noise_estimate": "network", "clip": 50.0}], ids=["corrected", "network"])
def test_dds_with_a_gaussian_prior_keeps_the_data_and_follows_ddim_elsewhere(options):
    """Unit-variance Gaussian data under a VP process: a DDIM step multiplies x by ``a_s a_t + s_s s_t``. With the
    network's noise estimate (DDS's Algorithm 1) the unmeasured pixels, which CG leaves alone, follow the same DDIM
    path, and the last step returns the data-consistent image."""
    gauss = Mixture((1.0,), (0.0,), (1.0,))
    den = Wrapped(gauss.denoiser(PROCESS))
    mask = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.4).double()
    op = MaskOperator(mask)
    y = op(torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    x_init = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    steps = 6
    result = solvers.dds(den, op, y, x_init, steps=steps, eta=0.0, generator=torch.Generator().manual_seed(5),
                         **options)
    start, _ = solvers.start_state(PROCESS, x_init, 1.0, torch.Generator().manual_seed(5))
    grid = PROCESS.time_grid(steps).tolist()
    alpha, sigma = (v.tolist() for v in PROCESS.marginal(torch.tensor(grid, dtype=torch.float64)))
    factor = alpha[steps - 1] * math.prod(alpha[i + 1] * alpha[i] + sigma[i + 1] * sigma[i] for i in range(steps - 1))
    expected = torch.where(mask > 0, y, start * factor)
    assert torch.allclose(result.image, expected, atol=1e-10)


def test_dds_noise_estimate_is_checked_and_changes_the_path():
    problem = problems.simulate_mri(_phantom(), acceleration=4, seed=1)
    op, y, x_init = problem.network(torch.float64)
    den = Wrapped(lambda x, t: 0.8 * torch.tanh(x))  # nonlinear: a correction now changes later estimates
    runs = {k: solvers.dds(den, op, y, x_init, steps=4, eta=0.0, noise_estimate=k,
                           generator=torch.Generator().manual_seed(2)).image for k in ("corrected", "network")}
    assert not torch.allclose(runs["corrected"], runs["network"])
    with pytest.raises(ValueError, match="noise_estimate"):
        solvers.dds(den, op, y, x_init, steps=4, noise_estimate="mine")


def test_dds_fits_the_data_of_a_real_image_exactly():
    problem = problems.simulate_mri(_phantom(), acceleration=4, mask="poisson", seed=0)
    op, y, x_init = problem.network(torch.float64)
    gauss = Wrapped(Mixture((1.0,), (0.0,), (1.0,)).denoiser(PROCESS))
    result = solvers.dds(gauss, op, y, x_init, steps=3)
    assert float((op(result.image) - y).abs().norm() / y.abs().norm()) < 1e-8


def test_warm_start_begins_from_the_diffused_estimate():
    x_init = torch.full((2, 1, 4, 4), 0.5)
    x, t = solvers.start_state(PROCESS, x_init, 0.3, [torch.Generator().manual_seed(i) for i in range(2)])
    assert t == pytest.approx(12 / 40)  # snapped to the DDPM grid
    alpha, sigma = PROCESS.marginal(torch.tensor(t))
    noise = torch.stack([torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    assert torch.allclose(x, alpha * x_init + sigma * noise, atol=1e-6)
    with pytest.raises(ValueError, match="t_start"):
        solvers.start_state(PROCESS, x_init, 0.0)
    with pytest.raises(ValueError, match="solver"):
        solvers.get_solver("nope")


def test_merge_needs_an_operator_with_a_merge():
    from medidiff.recon.ct import ParallelBeamCT, view_angles

    op = ParallelBeamCT((8, 8), view_angles(4))
    with pytest.raises(ValueError, match="merge"):
        solvers.pc(_oracle(torch.zeros(1, 1, 8, 8)), op, op(torch.zeros(1, 1, 8, 8)), torch.zeros(1, 1, 8, 8), steps=2)


# -- priors on any image size ------------------------------------------------------------------------
def test_padding_round_trip_and_shifts():
    x = torch.randn(2, 1, 37, 23)
    padded, crop = pad_multiple(x, 8)
    assert padded.shape[-2:] == (40, 24) and torch.equal(padded[crop], x)
    padded, crop = pad_multiple(x, 8, offsets=[5, 7])
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0 and torch.equal(padded[crop], x)
    tiny, crop = pad_multiple(torch.randn(1, 1, 3, 2), 16)  # pads beyond the image: repeated reflection
    assert tiny.shape[-2:] == (16, 16) and tiny[crop].shape[-2:] == (3, 2)


@pytest.mark.parametrize("mode, extra", [("whole", {}), ("patches", {"patch": 16, "overlap": 4}),
                                         ("patches", {"patch": 16})])
def test_any_size_equals_a_pointwise_denoiser_exactly(mode, extra):
    pointwise = Wrapped(lambda x, t: torch.tanh(x) * (1 + t.reshape(-1, 1, 1, 1)))
    prior = AnySize(pointwise, multiple=8, mode=mode, shift=True, generator=torch.Generator().manual_seed(0), **extra)
    x = torch.randn(3, 1, 37, 23)
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(prior(x, t), pointwise(x, t), atol=1e-6)


def test_any_size_with_a_unet_on_an_odd_image():
    torch.manual_seed(0)
    net = build_unet(spatial_dims=2, in_channels=1, channels=(8, 16), attention_levels=(False, False),
                     norm_num_groups=8, num_head_channels=8)
    from medidiff.core.denoiser import Denoiser

    den = Denoiser(net, PROCESS, "eps").eval()
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        x = torch.randn(2, 1, 16, 16)
        whole = AnySize(den, multiple=2)
        assert torch.allclose(whole(x, t), den(x, t), atol=1e-6)  # already a multiple: no padding
        one_tile = AnySize(den, multiple=2, mode="patches", patch=16)
        assert torch.allclose(one_tile(x, t), den(x, t), atol=1e-6)  # one tile is the whole image
        odd = torch.randn(2, 1, 21, 13)
        for prior in (AnySize(den, multiple=2), AnySize(den, multiple=2, mode="patches", patch=16, overlap=4)):
            assert prior(odd, t).shape == odd.shape



def test_any_size_bf16_runs_the_network_under_autocast_and_keeps_the_dtype():
    from medidiff.core.precision import bf16_native

    seen = []

    def probe(x, t):
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.nn.functional.conv2d(x, torch.full((1, 1, 3, 3), 1 / 9), padding=1)

    x, t = torch.randn(2, 1, 13, 11, dtype=torch.float64), torch.full((2,), 0.5)
    exact = AnySize(Wrapped(probe), multiple=4)(x.float(), t)
    fast = AnySize(Wrapped(probe), multiple=4, bf16=True)(x.float(), t)
    assert seen == [False, bf16_native(x.device)]
    assert fast.dtype == torch.float32 and fast.shape == x.shape
    assert torch.allclose(fast, exact, atol=2e-2)  # bf16 keeps ~3 significant digits
    if bf16_native(x.device):
        assert not torch.equal(fast, exact)


# -- DiffusionMBIR ----------------------------------------------------------------------------------
def test_z_differences_and_their_adjoint():
    x, d = torch.randn(5, 1, 3, 3, dtype=torch.float64), torch.randn(4, 1, 3, 3, dtype=torch.float64)
    assert torch.allclose((z_diff(x) * d).sum(), (x * z_diff_adjoint(d)).sum())


def test_z_tv_pulls_slices_together_and_keeps_agreeing_ones():
    problem = problems.simulate_mri(_phantom(slices=3), acceleration=4, seed=1)
    op, y, x_init = problem.network(torch.float64)
    same = x_init[:1].expand(3, -1, -1, -1).clone()
    hook = ZTotalVariation(op, op(same), weight=1.0)
    assert torch.allclose(hook(same, same, torch.ones(3)), same, atol=1e-8)  # consistent and flat along z
    spread = [float(z_diff(x).abs().mean()) for x in (x_init, ZTotalVariation(op, y, 10.0, admm_iters=5)(
        x_init, x_init, torch.ones(3)))]
    assert spread[1] < spread[0]
    truth = problem.scale.to_network(problem.reference)
    result = solvers.dds(_oracle(truth), op, y, x_init, steps=3, z_tv=0.01)
    assert result.image.shape == x_init.shape and result.nfe == 3


def test_real_image_operator_adjoint():
    problem = problems.simulate_mri(_phantom(32, 32), acceleration=4, coils=3, seed=0)
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    y = torch.randn(problem.y.shape, dtype=torch.complex128)
    assert adjoint_test(problem.op, x, y) < 1e-10


# -- Poisson-disc masks -----------------------------------------------------------------------------
@pytest.mark.parametrize("accel", [4, 8])
def test_poisson_disc_mask(accel):
    m = masks.poisson_mask((48, 40), accel, calib=8, seed=3)
    assert abs(masks.acceleration_of(m) - accel) / accel < 0.05
    assert bool(m[20:28, 16:24].all())  # the calibration square
    assert torch.equal(m, masks.poisson_mask((48, 40), accel, calib=8, seed=3))
    assert not torch.equal(m, masks.poisson_mask((48, 40), accel, calib=8, seed=4))
    outer = m.clone()
    outer[20:28, 16:24] = False
    pts = outer.nonzero().double()
    dist = torch.cdist(pts, pts) + 1e9 * torch.eye(len(pts), dtype=torch.float64)
    assert float(dist.min()) >= 1.0  # no two samples share a point and the disc spreads them
    # variable density: the centre quarter is denser than the rest
    inner = m[12:36, 10:30].double().mean()
    assert float(inner) > float(m.double().mean())
    assert torch.equal(masks.make_mask((48, 40), "poisson", accel, 0.2, seed=3), m.float())


def test_a_3d_prior_denoises_the_stack_of_slices_as_one_volume(tmp_path):
    from medidiff.recon.config import PriorOptions
    from medidiff.recon.reconstruct import make_prior
    from medidiff.weights import load_denoiser, save_model

    torch.manual_seed(0)
    net = build_unet(spatial_dims=3, in_channels=1, channels=(8, 16), attention_levels=(False, False),
                     norm_num_groups=8, num_head_channels=8)
    save_model(tmp_path, net, PROCESS, "eps", {"data_prep": {"source": "test", "size": [8, 8, 8]}})
    den, info = load_denoiser(tmp_path)
    prior = make_prior(den, info, PriorOptions(shift=False))
    x, t = torch.randn(5, 1, 10, 12), torch.full((5,), 0.5)
    with torch.no_grad():
        out = prior(x, t)
        padded, crop = pad_multiple(x.movedim(0, 1)[None], 2)  # (1, 1, 6, 10, 12)
        expected = den(padded, t[:1])[crop][0].movedim(1, 0)
    assert out.shape == x.shape and torch.allclose(out, expected, atol=1e-6)


def test_solver_options_take_the_modality_s_validated_dps_step_unless_set():
    from medidiff.recon.config import DPS_ZETA, SolverOptions

    dps = SolverOptions(name="dps")
    assert dps.kwargs("mri")["zeta"] == DPS_ZETA["mri"] == 3.0
    assert dps.kwargs("ct")["zeta"] == DPS_ZETA["ct"] == 0.03
    assert SolverOptions(name="dps", zeta=0.5).kwargs("ct")["zeta"] == 0.5
    assert "zeta" not in SolverOptions().kwargs("ct")  # DDS takes no step size


def test_dds_options_default_to_the_validated_step():
    from medidiff.recon.config import SolverOptions

    for modality in ("ct", "mri"):
        kw = SolverOptions().kwargs(modality)
        assert (kw["noise_estimate"], kw["clip"]) == ("network", 1.0)
    assert SolverOptions(clip=None).kwargs("ct")["clip"] is None
    assert SolverOptions(noise_estimate="corrected").kwargs("ct")["noise_estimate"] == "corrected"
    assert SolverOptions(name="merge").kwargs("mri")["lam"] == 1.0
    assert (SolverOptions().kwargs("ct")["eta"], SolverOptions().kwargs("mri")["eta"]) == (0.0, 0.15)
    assert SolverOptions(eta=0.5).kwargs("ct")["eta"] == 0.5
    assert "eta" not in SolverOptions(name="dps").kwargs("ct")  # DPS: the solver's ancestral eta = 1
