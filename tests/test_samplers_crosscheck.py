"""Cross-checks of medidiff's ``ddpm`` and ``ddim`` samplers against MONAI's and diffusers' schedulers.

The same MONAI ``DiffusionModelUNet`` (tiny, random weights, its zero-initialised layers made non-zero so
that the network output matters) and the same noise drive medidiff's sampler and a reference loop; the
results must agree to the tolerances stated in each test, on the error
``max |ours - ref| / max(1, max |ref|)``: an absolute difference for samples within [-1, 1], relative to
the sample's scale beyond (a random eps-network sampled from ``t = 1`` gives
``x0_hat ~ x / sqrt(alpha_bar_999)``, values of several hundred).

The reference schedulers keep their ``alphas_cumprod`` in float32, and in float32
``1 - alpha_bar_0 = 1e-4`` carries a relative rounding error of about ``6e-4``: unless a test says
otherwise, the reference scheduler is given the float64 tables of the medidiff process (the same betas),
so that the comparison tests the algorithms, not table rounding.

Also checked: medidiff's time grid is self-consistent (each step lands exactly on the next evaluated time
of the DDPM grid) and partial diffusion starts at the requested grid index.

diffusers and MONAI are imported unconditionally (both are in the ``test`` extras that ``scripts/test.sh``
installs): without them this module fails to collect rather than skipping, so the cross-checks always run.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medidiff.core.denoiser import Denoiser
from medidiff.core.processes import DDPM
from medidiff.core.samplers import ddim, ddpm
from medidiff.nets import build_unet

SHAPES = {2: (2, 1, 8, 8), 3: (1, 1, 8, 8, 8)}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # on _err: max abs difference / max(1, max |reference|)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks run fastest, and least disturbed by other jobs, on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_unet(dims: int, dtype: torch.dtype, seed: int = 0):
    """A tiny MONAI U-Net with random weights; its zero-initialised layers get random weights too."""
    torch.manual_seed(seed)
    net = build_unet(dims, channels=(8, 16), attention_levels=(False, False), norm_num_groups=8,
                     num_head_channels=8)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net.to(dtype).eval()


def _noise(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gen(seed=2):
    return torch.Generator().manual_seed(seed)


def _use_tables(scheduler, process: DDPM):
    """Give a MONAI or diffusers scheduler the process's float64 betas and alpha-bar tables."""
    scheduler.betas = process.betas.clone()
    scheduler.alphas = 1 - scheduler.betas
    scheduler.alphas_cumprod = process.alphas_cumprod.clone()
    return scheduler


def _err(ours, ref):
    """Max abs difference, relative to the sample's scale when that exceeds 1."""
    return (ours - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def _net_call(net, x, t):
    return net(x, torch.full((x.shape[0],), float(t), dtype=x.dtype))


# -- DDPM vs MONAI's DDPMScheduler -----------------------------------------------------------------
def _monai_ddpm(net, x, scheduler, generator):
    with torch.no_grad():
        for t in scheduler.timesteps:
            x, _ = scheduler.step(_net_call(net, x, t), int(t), x, generator=generator)
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_ddpm_matches_monai_ddpm_scheduler(dims, dtype, clip):
    """``ddpm`` with DDPM(50), 50 steps == MONAI's DDPMScheduler loop (50 train and inference steps).

    Same network, same initial noise, one generator seeded alike for both (both draw one noise tensor
    per step after the network call, none on the last step). ``clip_sample=True`` is matched by the hook
    ``x0.clamp(-1, 1)``. Tolerance: error < 1e-10 in float64 (seen ~1e-13), < 1e-5 in float32 (seen <= 3e-6).
    """
    n = 50
    net, process = _tiny_unet(dims, dtype), DDPM(n)
    scheduler = _use_tables(DDPMScheduler(num_train_timesteps=n, clip_sample=clip), process)
    scheduler.set_timesteps(n)
    x1 = _noise(SHAPES[dims], dtype)
    ref = _monai_ddpm(net, x1.clone(), scheduler, _gen())
    hook = (lambda x0, x, t: x0.clamp(-1, 1)) if clip else None
    ours = ddpm(Denoiser(net, process, "eps"), x1.clone(), process, n, hook=hook, generator=_gen())
    assert ours.dtype == dtype
    assert ref.abs().max() > 0.5  # a non-trivial sample
    assert _err(ours, ref) < TOL[dtype]


def test_ddpm_matches_monai_with_its_own_float32_tables():
    """Against MONAI's unmodified float32 tables, float32: error < 1e-3 (seen 1.4e-4).

    The residual is MONAI's float32 rounding of ``1 - alpha_bar`` at small ``t`` (about 6e-4 relative at
    step 0); medidiff computes its coefficients in float64. The float64 comparison above is exact.
    """
    n = 50
    net, process = _tiny_unet(2, torch.float32), DDPM(n)
    scheduler = DDPMScheduler(num_train_timesteps=n, clip_sample=False)
    scheduler.set_timesteps(n)
    x1 = _noise(SHAPES[2], torch.float32)
    ref = _monai_ddpm(net, x1.clone(), scheduler, _gen())
    ours = ddpm(Denoiser(net, process, "eps"), x1.clone(), process, n, generator=_gen())
    assert _err(ours, ref) < 1e-3


def test_ddpm_matches_monai_diffusion_inferer():
    """``ddpm`` == ``DiffusionInferer.sample`` with a DDPMScheduler; both draw from the global RNG.

    The inferer passes no generator, so medidiff runs with ``generator=None`` after the same
    ``torch.manual_seed``. float64; tolerance: error < 1e-10 (seen ~1e-13).
    """
    n, dtype = 50, torch.float64
    net, process = _tiny_unet(2, dtype), DDPM(n)
    scheduler = _use_tables(DDPMScheduler(num_train_timesteps=n, clip_sample=False), process)
    scheduler.set_timesteps(n)
    x1 = _noise(SHAPES[2], dtype)
    torch.manual_seed(7)
    with torch.no_grad():
        ref = DiffusionInferer(scheduler).sample(x1.clone(), net.net, scheduler, verbose=False)
    torch.manual_seed(7)
    ours = ddpm(Denoiser(net, process, "eps"), x1.clone(), process, n)
    assert _err(ours, ref) < 1e-10


# -- DDIM vs diffusers' and MONAI's DDIMScheduler -------------------------------------------------
T, STEPS = 1000, 20
GRID = list(range(T - 1, -1, -(T // STEPS)))  # 999, 949, ..., 49


def _diffusers_ddim(net, x, process, prediction, eta, noises):
    scheduler = DiffusersDDIM(num_train_timesteps=T, beta_schedule="linear", timestep_spacing="trailing",
                              set_alpha_to_one=True, clip_sample=False, prediction_type=prediction)
    scheduler.set_timesteps(STEPS)
    assert scheduler.timesteps.tolist() == GRID
    _use_tables(scheduler, process)
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            kw = {"variance_noise": noises[k]} if eta > 0 else {}
            x = scheduler.step(_net_call(net, x, t), int(t), x, eta=eta, **kw).prev_sample
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(eta, prediction, dtype):
    """``ddim`` (DDPM(1000), 20 steps) == diffusers' DDIMScheduler (trailing spacing, alpha_0 = 1, no clip).

    For ``eta=1`` the fresh noise of step ``k`` is passed to diffusers as ``variance_noise``: the tensors
    medidiff's generator draws, in order, after each of the first 19 network calls (diffusers' last step
    has zero variance, so its noise there is irrelevant). Both ``epsilon`` and ``v_prediction``.
    Tolerance: error < 1e-10 in float64 (seen ~1e-15), < 1e-5 in float32 (seen <= 7e-7).
    """
    net, process = _tiny_unet(2, dtype), DDPM(T)
    shape = SHAPES[2]
    x1 = _noise(shape, dtype)
    g = _gen()
    noises = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(STEPS - 1)]
    noises.append(torch.zeros(shape, dtype=dtype))
    name = {"eps": "epsilon", "v": "v_prediction"}[prediction]
    ref = _diffusers_ddim(net, x1.clone(), process, name, eta, noises)
    ours = ddim(Denoiser(net, process, prediction), x1.clone(), process, STEPS, eta=eta, generator=_gen())
    assert ref.abs().max() > 0.5
    assert _err(ours, ref) < TOL[dtype]


def _monai_ddim(prediction):
    scheduler = DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True,
                              prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])
    scheduler.set_timesteps(STEPS)
    # MONAI's step() moves from t to t - T // n; its set_timesteps() grid (linspace) is not that grid,
    # so it is replaced by the grid step() walks along.
    assert scheduler.num_train_timesteps // scheduler.num_inference_steps == T // STEPS
    scheduler.timesteps = torch.tensor(GRID)
    return scheduler


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_monai_ddim_on_a_consistent_grid(eta, prediction, dims):
    """``ddim`` (DDPM(1000), 20 steps) == MONAI's DDIMScheduler with ``timesteps`` forced to 999, 949, ..., 49.

    MONAI draws ``eta > 0`` noise from the generator after every network call, including the last
    (zero-variance) step, so with generators seeded alike the first 19 draws are those medidiff uses.
    float64; tolerance: error < 1e-10 (seen ~2e-15).
    """
    dtype = torch.float64
    net, process = _tiny_unet(dims, dtype), DDPM(T)
    scheduler = _use_tables(_monai_ddim(prediction), process)
    x1 = _noise(SHAPES[dims], dtype)
    x, g = x1.clone(), _gen()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x, _ = scheduler.step(_net_call(net, x, t), int(t), x, eta=eta, generator=g)
    ours = ddim(Denoiser(net, process, prediction), x1.clone(), process, STEPS, eta=eta, generator=_gen())
    assert x.abs().max() > 0.5
    assert _err(ours, x) < 1e-10


def test_ddim_matches_monai_inferer_with_a_consistent_grid():
    """``ddim`` (eta 0) == ``DiffusionInferer.sample`` with the grid-corrected MONAI DDIMScheduler, float32.

    Tolerance: error < 1e-5 (seen 3e-7).
    """
    dtype = torch.float32
    net, process = _tiny_unet(2, dtype), DDPM(T)
    scheduler = _use_tables(_monai_ddim("eps"), process)
    x1 = _noise(SHAPES[2], dtype)
    with torch.no_grad():
        ref = DiffusionInferer(scheduler).sample(x1.clone(), net.net, scheduler, verbose=False)
    ours = ddim(Denoiser(net, process, "eps"), x1.clone(), process, STEPS)
    assert _err(ours, ref) < 1e-5


# -- medidiff's own grid ---------------------------------------------------------------------------
class _Oracle(torch.nn.Module):
    """A network predicting the true ``x0``; records the times it is fed."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.times = x0, []

    def forward(self, x, timesteps):
        assert timesteps.shape == (x.shape[0],)
        self.times.append(timesteps[0].item())
        return self.x0.expand_as(x)


@pytest.mark.parametrize("steps", [10, 20, 50, 1000])
def test_grid_is_self_consistent(steps):
    """Every ``ddim`` step (eta 0) goes from the evaluated time exactly to the next evaluated time.

    The network is an oracle that returns the true ``x0``, so each step must map
    ``sqrt(abar_i) x0 + sqrt(1 - abar_i) eps`` to the same expression at the next evaluated index, taken
    from the ``alphas_cumprod`` table (float64; tolerance 1e-12). The network is fed MONAI's integer
    indices (to 1e-9), strictly decreasing, equal to ``process.time_grid``'s evaluation points; the
    denoiser sees times on the DDPM grid.
    """
    process, dtype = DDPM(T), torch.float64
    x0, eps = _noise((2, 1, 4, 4), dtype, 3), _noise((2, 1, 4, 4), dtype, 4)
    abar = process.alphas_cumprod
    oracle = _Oracle(x0)
    seen, states = [], []

    def denoiser(x, t):
        seen.append(t.clone())
        return Denoiser(oracle, process, "x0")(x, t)

    x1 = abar[-1].sqrt() * x0 + (1 - abar[-1]).sqrt() * eps
    out = ddim(denoiser, x1, process, steps, callback=lambda info: states.append(info["x"]))

    grid = process.time_grid(steps)[:-1]
    assert len(seen) == steps
    assert torch.equal(torch.stack([t[0] for t in seen]), grid)
    assert all(torch.all(t == t[0]) for t in seen)
    idx = torch.tensor(oracle.times)
    assert (idx - idx.round()).abs().max() < 1e-9
    idx = idx.round().long()
    assert torch.equal(idx, process.index(grid))
    assert idx[0] == T - 1 and idx[-1] >= 0 and torch.all(idx[1:] < idx[:-1])
    if steps == 20:
        assert idx.tolist() == GRID
    if steps == T:
        assert idx.tolist() == list(range(T - 1, -1, -1))
    for k in range(steps - 1):  # the step after evaluation k lands on the marginal of evaluation k + 1
        a = abar[idx[k + 1]]
        expected = a.sqrt() * x0 + (1 - a).sqrt() * eps
        assert (states[k] - expected).abs().max() < 1e-12
    assert (out - x0).abs().max() < 1e-12


@pytest.mark.parametrize("sampler", [ddim, ddpm])
def test_partial_diffusion_starts_at_index_249(sampler):
    """``t_start=0.25`` with DDPM(1000): the first network call is at MONAI index 249 (to 1e-9).

    With 10 steps the uniform grid then visits 224, 199, ..., 24.
    """
    process = DDPM(T)
    oracle = _Oracle(torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    x = _noise((1, 1, 4, 4), torch.float64)
    sampler(Denoiser(oracle, process, "x0"), x, process, 10, t_start=0.25, generator=_gen())
    idx = torch.tensor(oracle.times)
    assert (idx - idx.round()).abs().max() < 1e-9
    assert idx.round().long().tolist() == list(range(249, 0, -25))
