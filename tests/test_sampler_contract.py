"""The samplers' shared contract, checked for every sampler (and DDIM inversion).

``fn(denoiser, x, process, steps, *, t_start=1.0, hook=None, callback=None, generator=None, **kw)``:

- times reach the denoiser (and the process's SDE) as ``(B,)`` tensors of ``x``'s dtype and device, for
  multi-channel batches too; the first evaluation is at ``t_start``;
- a plain hook sees the ``x0_hat`` and ``x_t`` the denoiser saw, without autograd;
- ``callback`` sees every step: its index, time (the grid's), state and ``x0_hat``;
- ``progress=True`` shows a progress bar named after the sampler; by default nothing is printed;
- ``ddpm`` is ``ddim`` with ``eta = 1``;
- everything stays on ``x``'s device (checked on PyTorch's ``meta`` device, which has no data).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from oracles import GAUSSIAN

from medidiff.core import samplers
from medidiff.core.processes import VPSDE

NAMES = sorted(samplers.SAMPLERS) + ["ddim_invert"]
T_START = 0.6


def _fn(name):
    return samplers.ddim_invert if name == "ddim_invert" else samplers.get_sampler(name)


def _start(name):
    return {"t_end": T_START} if name == "ddim_invert" else {"t_start": T_START}


class CheckedVP(VPSDE):
    """A VP SDE whose ``sde`` checks the times it is given."""

    def sde(self, x, t):
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype and t.device == x.device, t
        return super().sde(x, t)


@pytest.mark.parametrize("name", NAMES)
def test_times_hook_and_callback_follow_the_contract(name):
    process = CheckedVP()
    den = GAUSSIAN.denoiser(process)
    calls, hooked, infos = [], [], []

    def denoiser(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype and t.device == x.device, t
        calls.append((x.clone(), t.clone()))
        out = den(x, t)
        calls[-1] += (out,)
        return out

    def hook(x0, x_t, t):
        assert not torch.is_grad_enabled() and not x_t.requires_grad
        x_seen, t_seen, out = calls[-1]
        assert torch.equal(x_t, x_seen) and torch.equal(t, t_seen) and torch.equal(x0, out)
        hooked.append(float(t[0]))
        return x0

    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = 4
    _fn(name)(denoiser, x, process, steps, hook=hook, callback=infos.append,
              generator=torch.Generator().manual_seed(1), **_start(name))
    assert len(hooked) == len(calls) > 0
    kind = inspect.signature(_fn(name)).parameters["grid"].default
    grid = process.time_grid(steps, t_start=T_START, kind=kind)
    if name == "ddim_invert":  # from the smallest time up to t_end
        assert calls[0][1][0].item() == pytest.approx(grid[steps - 1].item())
        assert [info["t"] for info in infos] == pytest.approx(grid[:-1].flip(0).tolist())
    else:
        assert calls[0][1][0].item() == pytest.approx(T_START)
        assert [info["t"] for info in infos] == pytest.approx(grid[:-1].tolist())
    assert [info["i"] for info in infos] == list(range(steps))
    for info in infos:
        assert set(info) == {"i", "t", "x", "x0_hat"}
        assert info["x"].shape == x.shape
        if name != "annealed_langevin":  # it reports x0_hat only at the end
            assert any(torch.equal(info["x0_hat"], c[2]) for c in calls)


@pytest.mark.parametrize("name", NAMES)
def test_progress_bar_only_when_asked(name, capsys):
    process = VPSDE()
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    _fn(name)(GAUSSIAN.denoiser(process), x, process, 3, **_start(name))
    assert capsys.readouterr().err == ""
    _fn(name)(GAUSSIAN.denoiser(process), x, process, 3, progress=True, **_start(name))
    assert name in capsys.readouterr().err


def test_ddpm_is_ddim_with_eta_one():
    process = VPSDE()
    den = GAUSSIAN.denoiser(process)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda fn, **kw: fn(den, x, process, 6, t_start=0.7, generator=torch.Generator().manual_seed(1), **kw)  # noqa: E731
    ancestral = run(samplers.ddpm)
    torch.testing.assert_close(ancestral, run(samplers.ddim, eta=1.0), rtol=0, atol=0)
    assert not torch.allclose(ancestral, run(samplers.ddim, eta=0.0))


def test_unknown_sampler_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown sampler 'dim'; choose one of \[.*'ddim'"):
        samplers.get_sampler("dim")
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.nfe("dim", 3)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_samplers_stay_on_the_inputs_device(name):
    """On the ``meta`` device (shapes only) every time tensor, noise draw and step stays where ``x`` is:
    a time made on the default device instead fails the denoiser's or the SDE's device check."""
    process = CheckedVP()

    def denoiser(x, t):
        assert t.device == x.device and t.shape == (x.shape[0],)
        return 0.5 * x

    x = torch.zeros(2, 1, 4, 4, device="meta", dtype=torch.float64)
    assert samplers.get_sampler(name)(denoiser, x, process, 3).device == x.device
