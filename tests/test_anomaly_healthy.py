"""Healthy reconstruction on the shared core, checked with oracle denoisers in 2D and 3D."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medidiff.anomaly.healthy import healthy_nfe, patch_tiles, reconstruct_healthy
from medidiff.core.processes import DDPM
from medidiff.runtime import derived_seed


class Oracle(nn.Module):
    """A denoiser that knows the healthy image: ``x0_hat`` is always ``healthy`` (and it counts its calls)."""

    def __init__(self, healthy: torch.Tensor, process):
        super().__init__()
        self.healthy, self.process, self.calls, self.inputs = healthy, process, 0, []

    def forward(self, x_t, t):
        self.calls += 1
        self.inputs.append((x_t.clone(), float(t[0])))
        return self.healthy.expand_as(x_t).clone()


class Identity(nn.Module):
    """``x0_hat = x_t``: a one-step reconstruction returns the noised input itself."""

    def __init__(self, process):
        super().__init__()
        self.process = process

    def forward(self, x_t, t):
        return x_t


def _cases(shape, n=3):
    g = torch.Generator().manual_seed(0)
    healthy = torch.rand((1, 1, *shape), generator=g) * 2 - 1
    lesions = torch.zeros((n, 1, *shape))
    for i in range(n):
        idx = (i, 0, *[slice(1 + i, 4 + i)] * len(shape))
        lesions[idx] = 0.5 * (-1) ** i
    return healthy, healthy + lesions, lesions


@pytest.mark.parametrize("shape", [(16, 12), (8, 8, 6)])
@pytest.mark.parametrize("method,sampler,steps", [("partial", "ddim", 4), ("partial", "ddpm", None),
                                                  ("partial", "dpm_solver_2m", 3), ("invert", "ddim", 3),
                                                  ("patch", "ddim", 2)])
def test_oracle_residual_is_the_inserted_lesion(shape, method, sampler, steps):
    process = DDPM(n_steps=40)
    healthy, x, lesions = _cases(shape)
    oracle = Oracle(healthy, process)
    rec, spread = reconstruct_healthy(oracle, x, method=method, t_levels=[0.25, 0.5], sampler=sampler, steps=steps,
                                      n_samples=2, batch_size=4, patch_size=[5] * len(shape), patch_margin=1)
    assert rec.shape == x.shape and spread.shape == x.shape
    torch.testing.assert_close(x - rec, lesions, atol=1e-5, rtol=0)
    assert float(spread.abs().max()) < 1e-5
    tiles = len(patch_tiles(shape, 5)) if method == "patch" else 1
    samples = 1 if method == "invert" else 2
    per_image = healthy_nfe(method=method, t_levels=[0.25, 0.5], sampler=sampler, steps=steps, n_samples=samples,
                            n_patches=tiles, process=process)
    expected = {"ddim": 4, "ddpm": 10 + 20, "dpm_solver_2m": 3}.get(sampler) if method == "partial" else None
    if method == "partial":
        assert per_image == (expected * 2 if sampler != "ddpm" else expected) * samples
    calls_images = sum(inp.shape[0] for inp, _ in oracle.inputs)
    assert calls_images == per_image * x.shape[0]  # every network call was counted


def test_patch_tiles_cover_every_pixel_once():
    for shape, size, margin in (((17, 12), (5, 4), 2), ((7, 9, 5), 3, 1)):
        count = torch.zeros(shape, dtype=torch.int64)
        for tile, region in patch_tiles(shape, size, margin):
            count[tile] += 1
            assert all(r.start <= t.start and r.stop >= t.stop for t, r in zip(tile, region))
        assert int(count.min()) == 1 and int(count.max()) == 1


def test_patch_noises_one_region_and_renoises_the_rest_consistently():
    process = DDPM(n_steps=50)
    healthy, x, _ = _cases((12, 12), n=1)
    oracle = Oracle(torch.zeros_like(healthy), process)  # heals to zero inside the patch
    rec, _ = reconstruct_healthy(oracle, x, method="patch", t_levels=[0.5], steps=4, patch_size=[12, 6],
                                 patch_margin=0, batch_size=8, n_samples=1)
    torch.testing.assert_close(rec, torch.zeros_like(rec))  # each tile's interior came from its own pass
    # outside its region a pass's state stays alpha x + sigma eps with one eps (DDIM re-noises it consistently)
    first_tile = [(inp[:1], t) for inp, t in oracle.inputs]
    implied = []
    for inp, t in first_tile:
        a, s = process.marginal(torch.tensor([t]))
        implied.append(((inp - a * x) / s)[..., 6:])
    for eps in implied[1:]:
        torch.testing.assert_close(eps, implied[0], atol=1e-4, rtol=0)


def test_median_of_seeds_and_spread_follow_the_seed_scheme():
    process = DDPM(n_steps=100)
    x = torch.linspace(-1, 1, 2 * 64).reshape(2, 1, 8, 8)
    rec, spread = reconstruct_healthy(Identity(process), x, t_levels=[0.3], steps=1, n_samples=5, seed=7,
                                      batch_size=3, spread="std")
    a, s = process.marginal(torch.tensor([0.3]))
    draws = torch.stack([torch.stack([torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(
        derived_seed(7, 0, k, i))) for i in range(2)]) for k in range(5)])
    noised = a * x + s * draws
    torch.testing.assert_close(rec, noised.median(dim=0).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(spread, noised.std(dim=0, correction=0), atol=1e-5, rtol=0)
    # independent of the batch size; mean and MAD on request
    again, _ = reconstruct_healthy(Identity(process), x, t_levels=[0.3], steps=1, n_samples=5, seed=7, batch_size=10)
    torch.testing.assert_close(again, rec)
    mean, mad = reconstruct_healthy(Identity(process), x, t_levels=[0.3], steps=1, n_samples=5, seed=7,
                                    reduce="mean", spread="mad")
    torch.testing.assert_close(mean, noised.mean(dim=0), atol=1e-5, rtol=0)
    med = noised.quantile(0.5, dim=0)
    torch.testing.assert_close(mad, (noised - med).abs().quantile(0.5, dim=0), atol=1e-5, rtol=0)


def test_the_model_sees_its_range_only():
    """Voxels beyond [-1, 1] (a lesion brighter than healthy tissue) are clipped before noising."""
    process = DDPM(n_steps=100)
    x = torch.linspace(-3, 3, 2 * 64).reshape(2, 1, 8, 8)
    options = {"t_levels": [0.3], "steps": 1, "n_samples": 2, "seed": 3}
    rec, _ = reconstruct_healthy(Identity(process), x, **options)
    clipped, _ = reconstruct_healthy(Identity(process), x.clamp(-1, 1), **options)
    torch.testing.assert_close(rec, clipped)
    a, s = process.marginal(torch.tensor([0.3]))
    assert float(rec.abs().max()) < float(a) + 5 * float(s)


def test_simplex_noise_and_bad_settings():
    process = DDPM(n_steps=100)
    x = torch.zeros(1, 1, 16, 16)
    rec, _ = reconstruct_healthy(Identity(process), x, t_levels=[0.5], steps=1, noise="simplex", n_samples=1)
    a, s = process.marginal(torch.tensor([0.5]))
    assert float((rec / s).std()) == pytest.approx(1.0, abs=0.05)  # normalised simplex noise
    with pytest.raises(ValueError, match="method"):
        reconstruct_healthy(Identity(process), x, method="dream")
    with pytest.raises(ValueError, match="t_levels"):
        reconstruct_healthy(Identity(process), x, t_levels=[1.5])
    with pytest.raises(ValueError, match="warp"):
        reconstruct_healthy(Identity(process), x, sampler="warp")
    with pytest.raises(ValueError, match="n_sample"):
        reconstruct_healthy(Identity(process), x, n_sample=3)  # a misspelt option is not ignored


def test_a_stochastic_sampler_draws_the_forward_noise_kind_in_every_reverse_step():
    """AnoDDPM: a simplex-noised reconstruction with ``ddpm`` is the ancestral chain whose posterior noise is simplex
    noise from each member's generator (replayed exactly); with Gaussian reverse noise it would differ."""
    from medidiff.core import samplers
    from medidiff.core.noise import noise_like

    process = DDPM(n_steps=100)
    x = torch.linspace(-1, 1, 2 * 256).reshape(2, 1, 16, 16)
    opts = {"octaves": 2, "frequency": 2.0}
    rec, _ = reconstruct_healthy(Identity(process), x, t_levels=[0.5], sampler="ddpm", steps=3, noise="simplex",
                                 noise_options=opts, n_samples=1, seed=4, bf16=False)

    def replay(reverse):
        gens = [torch.Generator().manual_seed(derived_seed(4, 0, 0, i)) for i in range(2)]
        t = float(process.snap(torch.tensor([0.5], dtype=torch.float64))[0])
        x_t = process.noised(x, torch.full((2,), t), noise_like(x, "simplex", gens, **opts))
        return samplers.ddpm(Identity(process), x_t, process, 3, t_start=t, generator=gens, noise=reverse)

    torch.testing.assert_close(rec, replay(lambda z, g: noise_like(z, "simplex", g, **opts)), atol=1e-5, rtol=0)
    assert (rec - replay(None)).abs().max() > 0.1


def test_bf16_evaluates_the_network_under_autocast_and_keeps_float32():
    """``bf16``: the network runs under autocast where the CPU computes bf16 natively; the maps stay float32
    and within bf16's precision of the float32 ones."""
    from medidiff.core.precision import bf16_native

    class Smoother(nn.Module):
        def __init__(self, process):
            super().__init__()
            self.process, self.autocast = process, []

        def forward(self, x_t, t):
            self.autocast.append(torch.is_autocast_enabled("cpu"))
            return torch.nn.functional.conv2d(x_t, torch.full((1, 1, 3, 3), 1 / 9), padding=1).clamp(-1, 1)

    process = DDPM(n_steps=100)
    x = torch.rand(2, 1, 12, 10, generator=torch.Generator().manual_seed(1)) * 2 - 1
    net = Smoother(process)
    runs = {bf16: reconstruct_healthy(net, x, steps=2, n_samples=3, bf16=bf16, seed=4) for bf16 in (False, True)}
    assert net.autocast == [False] * (len(net.autocast) // 2) + [bf16_native(x.device)] * (len(net.autocast) // 2)
    for fast, exact in zip(runs[True], runs[False]):
        assert fast.dtype == torch.float32 and torch.allclose(fast, exact, atol=3e-2)
