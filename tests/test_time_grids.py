"""Sampling time grids: strictly decreasing, inside ``[t_min, t_start]``, ending at 0, for every grid kind,
process, step count (1 to 1000) and start time (a property test), and no zero-length solver steps.

A repeated time is a zero-length step: a wasted network evaluation for most samplers and a division by
zero in DPM-Solver++(2M)'s step ratio ``r = h_prev / h``. Times must also be strictly increasing in
log-SNR (the variable multistep solvers step in).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from oracles import GAUSSIAN

from medidiff.core import samplers, schedules
from medidiff.core.processes import DDPM, VESDE, VPSDE, SubVPSDE

CONTINUOUS = {"vpsde": VPSDE(), "subvpsde": SubVPSDE(), "vesde": VESDE(0.01, 50.0)}
DISCRETE = {"ddpm1000": DDPM(1000), "ddpm50cos": DDPM(50, "cosine")}
KINDS = sorted(schedules.TIME_GRIDS)


def _check_grid(grid: torch.Tensor, steps: int, t_start: float, process) -> None:
    assert grid.dtype == torch.float64 and grid.shape == (steps + 1,)
    assert grid[-1].item() == 0.0
    times = grid[:-1]
    assert bool((times[1:] < times[:-1]).all()), f"repeated or rising times: {times[-6:].tolist()}"
    assert times[-1].item() >= process.t_min * (1 - 1e-12)
    assert times[0].item() <= t_start * (1 + 1e-12)
    lam = process.log_snr(times)
    assert bool(torch.isfinite(lam).all()) and bool((lam[1:] > lam[:-1]).all())


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(CONTINUOUS)), kind=st.sampled_from(KINDS), steps=st.integers(1, 1000),
       t_start=st.floats(1.001e-3, 1.0))
@example(name="vpsde", kind="quadratic", steps=80, t_start=1.0)  # ended [..., 0.0014, 0.001, 0.001, 0]
@example(name="vpsde", kind="quadratic", steps=40, t_start=0.25)
@example(name="subvpsde", kind="uniform", steps=1000, t_start=0.01)
@example(name="vesde", kind="logsnr", steps=1000, t_start=1.1e-5)
def test_continuous_grids_strictly_decrease_to_zero(name, kind, steps, t_start):
    process = CONTINUOUS[name]
    t_start = max(t_start, 1.001 * process.t_min)
    grid = process.time_grid(steps, t_start=t_start, kind=kind)
    _check_grid(grid, steps, t_start, process)
    assert grid[0].item() == t_start


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(DISCRETE)), kind=st.sampled_from(KINDS), steps=st.integers(1, 1000),
       t_start=st.floats(0.0, 1.0))
@example(name="ddpm1000", kind="logsnr", steps=1000, t_start=1.0)  # every grid point, densest near 1 and 0
@example(name="ddpm1000", kind="uniform", steps=250, t_start=0.25)  # AnoDDPM's whole chain below t_L
@example(name="ddpm1000", kind="quadratic", steps=251, t_start=0.25)
def test_ddpm_grids_fit_whenever_there_are_enough_grid_points(name, kind, steps, t_start):
    """Any step count up to the grid points at or below ``t_start`` fits, on grid; more raise ``ValueError``."""
    process = DISCRETE[name]
    t_start = max(t_start, 2 / process.n_steps)
    top = int(process.index(process.snap(torch.tensor(t_start, dtype=torch.float64))))
    if steps > top + 1:
        with pytest.raises(ValueError, match="do not fit"):
            process.time_grid(steps, t_start=t_start, kind=kind)
        return
    grid = process.time_grid(steps, t_start=t_start, kind=kind)
    _check_grid(grid, steps, 1.0, process)
    idx = process.index(grid[:-1])
    assert idx[0].item() == top and idx[-1].item() >= 0
    torch.testing.assert_close(grid[:-1], (idx.double() + 1) / process.n_steps, rtol=0, atol=0)


def test_grids_that_fit_are_unchanged():
    """Spreading only touches times at or below ``t_min``: the uniform and quadratic grids keep their values."""
    g = schedules.time_grid(20, "uniform", t_start=1.0, t_min=1e-3)
    torch.testing.assert_close(g, torch.linspace(1, 0, 21, dtype=torch.float64), rtol=0, atol=1e-15)
    q = schedules.time_grid(10, "quadratic", t_start=0.5, t_min=1e-3)
    torch.testing.assert_close(q[:-1], 0.5 * torch.linspace(1, 0, 11, dtype=torch.float64)[:-1] ** 2)
    # 80 quadratic steps: u^2 <= t_min for u = 1/80, 2/80; those two times are spread down to t_min
    v = schedules.time_grid(80, "quadratic", t_start=1.0, t_min=1e-3)
    last = (3 / 80) ** 2
    expected = torch.tensor([last, (last + 1e-3) / 2, 1e-3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(v[-4:], expected, rtol=0, atol=1e-15)


def test_bad_grids_raise():
    with pytest.raises(ValueError, match="at least one step"):
        schedules.time_grid(0)
    with pytest.raises(ValueError, match="unknown time grid"):
        schedules.time_grid(5, "cosine")
    for n in (2, 5):
        with pytest.raises(ValueError, match="t_start > t_min"):
            schedules.time_grid(n, t_start=1e-3, t_min=1e-3)
    assert schedules.time_grid(2).tolist() == [1.0, 0.5, 0.0]  # defaults: from t = 1
    for partial in ({}, {"log_snr": VPSDE().log_snr}, {"t_of_log_snr": VPSDE().t_of_log_snr}):
        with pytest.raises(ValueError, match="'logsnr' grid needs the process's log_snr and its inverse"):
            schedules.time_grid(5, "logsnr", **partial)
    with pytest.raises(ValueError, match="positive"):
        schedules.time_grid(1, t_start=0.0)
    assert schedules.time_grid(1, t_start=5e-4, t_min=1e-3).tolist() == [5e-4, 0.0]


@pytest.mark.parametrize("steps,t_start", [(80, 1.0), (40, 0.25), (300, 0.05)])
def test_dpm_solver_on_dense_quadratic_grids_is_finite_and_never_repeats_a_time(steps, t_start):
    """The issue's grids: every network evaluation is at a new time and the sample is finite and right."""
    process = VPSDE()
    den = GAUSSIAN.denoiser(process)
    times = []

    def recording(x, t):
        times.append(float(t[0]))
        return den(x, t)

    g = torch.Generator().manual_seed(0)
    x0 = GAUSSIAN.sample((4, 1, 8, 8), g)
    x = process.noised(x0, torch.full((4,), t_start, dtype=torch.float64), torch.randn(x0.shape, generator=g,
                                                                                            dtype=torch.float64))
    y = samplers.dpm_solver_2m(recording, x, process, steps, t_start=t_start, grid="quadratic")
    assert len(times) == steps == len(set(times))
    assert bool(torch.isfinite(y).all())
    assert abs(y.std().item() / GAUSSIAN.std - 1) < 0.15 and math.isfinite(y.mean().item())
