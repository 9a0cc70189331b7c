"""Samplers against exact results: each test pins one formula of a paper to a number it must reproduce.

Distribution tests (``test_samplers_oracle.py``) tolerate a few per cent; a wrong constant in a step size or a
variance can hide inside that. Here each piece is checked where its answer is known exactly:

- the DDPM/DDIM posterior variance of each ancestral step (Ho et al. 2020, eqs. 6-7; Song, Meng & Ermon 2021,
  eq. 16), step by step with the sampler's own noise, to 1e-12;
- the Langevin corrector's step ``2 (1 - beta_i) (r ||z|| / ||s||)^2`` with batch-mean norms (Song et al. 2021,
  Algorithm 5), on a DDPM whose ``beta_i`` are known, to 1e-12;
- annealed Langevin's stationary variance: on Gaussian data the moves ``x + eps s + sqrt(2 eps) z`` are an AR(1)
  chain whose stationary variance is ``v / (1 - eps / (2 v))`` (Song & Ermon 2019, Algorithm 1 with
  ``eps = step_lr sigma^2 / 2``);
- DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on a data prediction linear in ``lambda``, where the
  exponential integrator's solution is known in closed form, on grids with unequal log-SNR steps;
- Euler and Heun on the probability-flow ODE (Karras et al. 2022) converge at orders 1 and 2 to its exact
  solution on Gaussian data;
- DDIM inversion (the probability-flow ODE run forward) on Gaussian data, whose exact latent is
  ``alpha m + sqrt(alpha^2 s^2 + sigma^2) (x0 - m) / s``; first order in the step count;
- gradient guidance: a hook with ``needs_grad`` gets ``d x0_hat / d x_t`` (exact for the linear Gaussian
  denoiser) at no extra network evaluation, in every sampler;
- ``nfe`` equals the evaluations each sampler makes, with default and non-default options.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracles import GAUSSIAN

from medidiff.core import samplers
from medidiff.core.noise import noise_like
from medidiff.core.processes import DDPM, VESDE, VPSDE, SubVPSDE

M, S = GAUSSIAN.means[0], GAUSSIAN.stds[0]
PROCESSES = {"ddpm": DDPM(1000), "vpsde": VPSDE(), "subvpsde": SubVPSDE(), "vesde": VESDE(0.01, 20.0)}


def _marginal(process, t: float) -> tuple[float, float]:
    a, s = process.marginal(torch.tensor(t, dtype=torch.float64))
    return a.item(), s.item()


def _recording(den, log: list):
    def call(x, t):
        log.append((x.clone(), float(t[0])))
        return den(x, t)

    return call


# -- ancestral (eta > 0) variance -------------------------------------------------------------------
@pytest.mark.parametrize("n_steps,steps,eta,kind", [(50, 50, 1.0, None), (50, 10, 1.0, None), (50, 10, 0.5, None),
                                                    (50, 10, 1.0, "simplex")])
def test_ancestral_steps_have_the_posterior_variance(n_steps, steps, eta, kind):
    """Each DDIM step with ``eta`` from index ``i`` to ``j < i`` of a DDPM is
    ``sqrt(abar_j) x0 + sqrt(1 - abar_j - s^2) eps + s z`` with ``s^2 = eta^2 (1 - abar_j) / (1 - abar_i)
    (1 - abar_i / abar_j)`` (Song, Meng & Ermon 2021, eq. 16); for consecutive indices and ``eta = 1`` this is
    Ho et al.'s posterior mean and variance ``beta~_i = (1 - abar_{i-1}) / (1 - abar_i) beta_i`` (eqs. 6-7).

    The denoiser returns a fixed ``x0``; ``z`` is replayed from a twin generator, standard normal or, given as the
    sampler's ``noise``, simplex noise (AnoDDPM's reverse steps). Tolerance 1e-12.
    """
    def draw(x, g):
        return noise_like(x, kind, g, octaves=2, frequency=2.0) if kind else torch.randn(x.shape, generator=g,
                                                                                            dtype=x.dtype)

    process = DDPM(n_steps)
    abar = process.alphas_cumprod
    g0 = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 1, 4, 4, generator=g0, dtype=torch.float64)
    x = torch.randn(2, 1, 4, 4, generator=g0, dtype=torch.float64)
    states = []
    samplers.ddim(lambda x_t, t: x0.expand_as(x_t), x, process, steps, eta=eta, noise=draw if kind else None,
                  generator=torch.Generator().manual_seed(9), callback=lambda info: states.append(info["x"]))
    twin = torch.Generator().manual_seed(9)
    idx = process.index(process.time_grid(steps)[:-1]).tolist()
    assert len(states) == steps
    for k in range(steps - 1):
        i, j = idx[k], idx[k + 1]
        z = draw(x, twin)
        if steps == n_steps and eta == 1.0:  # Ho et al. 2020, eqs. 6-7
            beta = process.betas[i]
            c0, ct = abar[j].sqrt() * beta / (1 - abar[i]), (1 - beta).sqrt() * (1 - abar[j]) / (1 - abar[i])
            mean = c0 * x0 + ct * x
            expected = mean + ((1 - abar[j]) / (1 - abar[i]) * beta).sqrt() * z
        else:  # Song, Meng & Ermon 2021, eq. 12 with eq. 16
            var = eta**2 * (1 - abar[j]) / (1 - abar[i]) * (1 - abar[i] / abar[j])
            eps = (x - abar[i].sqrt() * x0) / (1 - abar[i]).sqrt()
            expected = abar[j].sqrt() * x0 + (1 - abar[j] - var).sqrt() * eps + var.sqrt() * z
        assert (states[k] - expected).abs().max().item() < 1e-12, f"step {k}"
        x = states[k]
    assert torch.equal(states[-1], x0.expand_as(x))


# -- predictor-corrector --------------------------------------------------------------------------
@pytest.mark.parametrize("process_name", ["ddpm10", "vesde"])
def test_corrector_step_is_algorithm_5(process_name):
    """Every corrector move is ``x + e s + sqrt(2 e) z`` with ``e = 2 a_i (r mean||z|| / mean||s||)^2``.

    ``a_i = 1 - beta_i`` for a 10-step DDPM sampled on all its 10 grid points (its betas are known), 1 for VE;
    the norms are per-sample norms averaged over the batch. Tolerance 1e-12 (float64).
    """
    process = DDPM(10) if process_name == "ddpm10" else VESDE(0.01, 20.0)
    steps, snr = 10 if process_name == "ddpm10" else 6, 0.2
    den = GAUSSIAN.denoiser(process)
    log = []
    x = process.prior_sample((3, 1, 4, 4), torch.Generator().manual_seed(0), dtype=torch.float64)
    samplers.predictor_corrector(_recording(den, log), x, process, steps, snr=snr,
                                 generator=torch.Generator().manual_seed(1))
    assert len(log) == 2 * steps
    twin = torch.Generator().manual_seed(1)
    grid = process.time_grid(steps)
    for k in range(steps):
        (before, t), (after, t_after) = log[2 * k], log[2 * k + 1]
        assert t == t_after == grid[k].item()
        alpha, sigma = _marginal(process, t)
        score = (alpha * den(before, torch.full((3,), t, dtype=torch.float64)) - before) / sigma**2
        z = torch.randn(before.shape, generator=twin, dtype=torch.float64)
        a_i = 1 - process.betas[9 - k].item() if process_name == "ddpm10" else 1.0
        e = 2 * a_i * (snr * z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean()) ** 2
        expected = before + e * score + (2 * e).sqrt() * z
        assert (after - expected).abs().max().item() < 1e-12, f"step {k}"
        if k < steps - 1:
            torch.randn(before.shape, generator=twin, dtype=torch.float64)  # the predictor's noise


def test_langevin_step_size_is_batch_mean():
    score = torch.tensor([[3.0, 4.0], [0.0, 1.0]]).reshape(2, 1, 1, 2)  # norms 5 and 1: mean 3
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).reshape(2, 1, 1, 2)  # norms 1 and 3: mean 2
    assert samplers.langevin_step_size(score, z, 0.5, 0.9).item() == pytest.approx(2 * 0.9 * (0.5 * 2 / 3) ** 2)


# -- annealed Langevin ------------------------------------------------------------------------------
@pytest.mark.parametrize("process_name", ["vesde", "vpsde"])
def test_annealed_langevin_reaches_the_ula_stationary_variance(process_name):
    """One noise level (t = 1), 60 moves of step ``e = step_lr sigma^2 / 2``: on Gaussian data (marginal
    variance ``v``) the chain's variance is ``v / (1 - e / (2 v))``: +6.9 % in std for ``step_lr = 0.5``.
    8,192 elements; tolerance 2 % (standard error 0.8 %)."""
    process = PROCESSES[process_name]
    states = []
    g = torch.Generator().manual_seed(2)
    x = process.prior_sample((8, 1, 32, 32), g, dtype=torch.float64)
    samplers.annealed_langevin(GAUSSIAN.denoiser(process), x, process, 1, n_inner=60, step_lr=0.5, generator=g,
                               callback=lambda info: states.append(info["x"]))
    alpha, sigma = _marginal(process, 1.0)
    v = alpha**2 * S**2 + sigma**2
    e = 0.5 * 0.5 * sigma**2
    expected = math.sqrt(v / (1 - e / (2 * v)))
    assert states[0].std().item() / expected == pytest.approx(1.0, abs=0.02)


# -- DPM-Solver++(2M) -------------------------------------------------------------------------------
@pytest.mark.parametrize("process_name,grid,tol", [("vesde", "quadratic", 2.5e-3), ("vpsde", "quadratic", 2e-2),
                                                   ("vpsde", "logsnr", 6e-3)])
def test_dpm_solver_2m_on_a_data_prediction_linear_in_lambda(process_name, grid, tol):
    """``D(x, t) = a + b lambda(t)`` (``lambda = log(alpha / sigma)``): the ODE ``x_t = (sigma_t / sigma_s) x_s +
    sigma_t int e^lambda D d lambda`` has the solution ``sigma_t [x_s / sigma_s + F(lambda_t) - F(lambda_s)]``
    with ``F(l) = e^l (a + b (l - 1))``. 20 steps: the state at the last evaluation time is within ``tol``
    (seen 1.3e-3, 1.05e-2 and 4.2e-3); the quadratic grids have unequal log-SNR steps, where the step ratio
    ``r = h_prev / h`` matters. On the uniform log-SNR grid the error falls as ``steps^-2`` (ratio 3.5-4.8)."""
    process = PROCESSES[process_name]
    a, b = 0.3, 0.2

    def den(x, t):
        lam = 0.5 * process.log_snr(t.double())
        return (a + b * lam).to(x.dtype).reshape(-1, 1, 1, 1).expand_as(x)

    def error(steps):
        times = process.time_grid(steps, kind=grid)
        states = []
        x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
        samplers.dpm_solver_2m(den, x, process, steps, grid=grid, callback=lambda info: states.append(info["x"]))
        (a0, s0), (a1, s1) = _marginal(process, times[0].item()), _marginal(process, times[steps - 1].item())
        l0, l1 = math.log(a0 / s0), math.log(a1 / s1)
        F = lambda l: math.exp(l) * (a + b * (l - 1))  # noqa: E731
        exact = s1 * (1.0 / s0 + F(l1) - F(l0))
        return (states[steps - 2] - exact).abs().max().item()

    e20 = error(20)
    assert e20 < tol
    if grid == "logsnr":
        assert 3.5 < e20 / error(40) < 4.8


# -- probability-flow ODE solvers -------------------------------------------------------------------
@pytest.mark.parametrize("name,order,process_name,grid", [("euler", 1, "vesde", "logsnr"),
                                                          ("heun", 2, "vesde", "quadratic"),
                                                          ("heun", 2, "subvpsde", "uniform")])
def test_ode_solvers_converge_at_their_order(name, order, process_name, grid):
    """On Gaussian data the probability-flow ODE keeps ``(x - alpha m) / sqrt(alpha^2 s^2 + sigma^2)`` fixed,
    so the exact output from prior noise is ``D(x_exact(t_last), t_last)``. Doubling the steps from 20 to 40
    divides the error by ``2^order`` (seen 2.00 for Euler, 4.07-4.41 for Heun; bounds 0.8x-1.2x)."""
    process = PROCESSES[process_name]
    den = GAUSSIAN.denoiser(process)
    x = process.prior_sample((2, 1, 8, 8), torch.Generator().manual_seed(0), dtype=torch.float64)
    a0, s0 = _marginal(process, 1.0)
    xi = (x - a0 * M) / math.sqrt(a0**2 * S**2 + s0**2)

    def error(steps):
        t_last = process.time_grid(steps, kind=grid)[-2].item()
        a, s = _marginal(process, t_last)
        exact = den(a * M + math.sqrt(a**2 * S**2 + s**2) * xi, torch.full((2,), t_last, dtype=torch.float64))
        return (samplers.get_sampler(name)(den, x, process, steps, grid=grid) - exact).abs().max().item()

    assert 0.8 * 2**order < error(20) / error(40) < 1.2 * 2**order


# -- DDIM inversion ---------------------------------------------------------------------------------
@pytest.mark.parametrize("process_name", sorted(PROCESSES))
def test_ddim_inversion_reaches_the_exact_latent(process_name):
    """Inverting Gaussian data to t = 0.5 follows the probability-flow ODE, whose solution is the same
    standardised value: ``alpha m + sqrt(alpha^2 s^2 + sigma^2) (x0 - m) / s``. Max error relative to the
    latent's range: < 0.03 with 100 steps (seen 0.004-0.013), halving when the steps double (ratio 1.6-2.3)."""
    process = PROCESSES[process_name]
    x0 = GAUSSIAN.sample((2, 1, 8, 8), torch.Generator().manual_seed(3))
    alpha, sigma = _marginal(process, 0.5)
    exact = alpha * M + math.sqrt(alpha**2 * S**2 + sigma**2) * (x0 - M) / S
    den = GAUSSIAN.denoiser(process)
    errors = [((samplers.ddim_invert(den, x0, process, n, t_end=0.5) - exact).abs().max() / exact.abs().max()).item()
              for n in (50, 100)]
    assert errors[1] < 0.03
    assert 1.6 < errors[0] / errors[1] < 2.3


# -- gradient guidance plumbing ---------------------------------------------------------------------
class GradientHook:
    """A gradient-guidance hook: records ``d sum(x0_hat) / d x_t`` and returns ``x0_hat`` unchanged."""

    needs_grad = True

    def __init__(self):
        self.seen = []

    def __call__(self, x0, x_t, t):
        assert torch.is_grad_enabled() and x_t.requires_grad and x0.requires_grad
        (grad,) = torch.autograd.grad(x0.sum(), x_t)
        self.seen.append((grad, float(t[0])))
        return x0


RUNS = [(name, 4, {}) for name in sorted(samplers.SAMPLERS)] + [("ddim_invert", 4, {})]


@pytest.mark.parametrize("name,steps,kw", RUNS, ids=[r[0] for r in RUNS])
def test_gradient_hook_sees_exact_jacobian_at_one_evaluation_per_call(name, steps, kw):
    """For Gaussian data ``x0_hat = m + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha m)``, so
    ``d sum(x0_hat) / d x_t`` is that factor everywhere. The hook sees it at every call (to 1e-12), the sampler
    makes as many denoiser calls as without the hook, and returns the same detached sample."""
    process = VPSDE()
    den = GAUSSIAN.denoiser(process)
    fn = samplers.ddim_invert if name == "ddim_invert" else samplers.get_sampler(name)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kwargs = {"t_end": 0.8} if name == "ddim_invert" else {"t_start": 0.8}
    plain, hooked, hook = [], [], GradientHook()
    y0 = fn(_recording(den, plain), x, process, steps, generator=torch.Generator().manual_seed(1), **kwargs, **kw)
    y1 = fn(_recording(den, hooked), x, process, steps, generator=torch.Generator().manual_seed(1), hook=hook,
            **kwargs, **kw)
    assert len(hooked) == len(plain) == len(hook.seen) > 0
    assert not y1.requires_grad
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-12)
    for grad, t in hook.seen:
        alpha, sigma = _marginal(process, t)
        factor = alpha * S**2 / (alpha**2 * S**2 + sigma**2)
        torch.testing.assert_close(grad, torch.full_like(grad, factor), rtol=0, atol=1e-12)


# -- network evaluations ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
@pytest.mark.parametrize("kw", [{}, {"n_corrector": 2, "n_inner": 3}], ids=["defaults", "options"])
def test_nfe_counts_every_network_evaluation(name, kw):
    process = VPSDE()
    calls = []
    import inspect

    params = inspect.signature(samplers.get_sampler(name)).parameters
    kw = {k: v for k, v in kw.items() if k in params}
    samplers.get_sampler(name)(_recording(GAUSSIAN.denoiser(process), calls),
                               process.prior_sample((1, 1, 2, 2)), process, 5, **kw)
    assert len(calls) == samplers.nfe(name, 5, **kw)
