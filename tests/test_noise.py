"""Gaussian and simplex noise: reproducibility, independence, normalisation, spectra, and a scalar oracle."""

from __future__ import annotations

import math

import pytest
import torch

from medidiff.core.noise import (
    gaussian,
    gaussian_like,
    make_generators,
    make_noise,
    noise_like,
    simplex,
    simplex_like,
)
from medidiff.core.simplex import PERIOD, SCALE, gradients, lattice_noise, skew_factors


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one intra-op thread: these tensors are small, and on a shared 2-core machine a second
    OpenMP thread waiting for a busy core makes each op many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHAPES = {2: (3, 2, 24, 20), 3: (2, 2, 12, 10, 8)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def off_diagonal_corr(x: torch.Tensor) -> torch.Tensor:
    """Pearson correlations between the rows of ``x`` (flattened fields), without the diagonal."""
    r = torch.corrcoef(x.reshape(x.shape[0], -1).double())
    return r[~torch.eye(len(r), dtype=torch.bool)]


# --- Gaussian -----------------------------------------------------------------------------------


def test_gaussian_per_sample_generators_match_alone_and_in_batch():
    batch = gaussian((3, 2, 8, 8), make_generators([11, 12, 13]))
    alone = gaussian((1, 2, 8, 8), make_generators([12]))
    assert torch.equal(batch[1:2], alone)
    assert not torch.equal(batch[0], batch[1])
    x = torch.zeros(2, 1, 4, 4, 4, dtype=torch.float64)
    assert gaussian_like(x, make_generators([1, 2])).dtype == torch.float64
    with pytest.raises(ValueError, match="generators"):
        gaussian((3, 1, 4, 4), make_generators([1, 2]))


# --- simplex: shapes, seeds, independence ---------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simplex_shape_dtype_device(ndim, dtype):
    x = simplex(SHAPES[ndim], generator=gen(0), dtype=dtype, octaves=3)
    assert x.shape == SHAPES[ndim] and x.dtype == dtype and x.device.type == "cpu"
    assert torch.isfinite(x).all()
    like = simplex_like(torch.empty(SHAPES[ndim], dtype=dtype), generator=gen(0), octaves=3)
    assert like.dtype == dtype and like.shape == x.shape


@pytest.mark.parametrize("shape", [(2, 16, 16), (1, 1, 4, 4, 4, 4)])
def test_simplex_rejects_other_dims(shape):
    with pytest.raises(ValueError, match="2 or 3 spatial"):
        simplex(shape)


@pytest.mark.parametrize("ndim", [2, 3])
def test_simplex_reproducible_and_seed_dependent(ndim):
    a = simplex(SHAPES[ndim], generator=gen(7))
    b = simplex(SHAPES[ndim], generator=gen(7))
    c = simplex(SHAPES[ndim], generator=gen(8))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.5  # independent unit-variance fields differ by ~1.13 on average


@pytest.mark.parametrize("ndim", [2, 3])
def test_simplex_per_sample_generators_match_alone_and_in_batch(ndim):
    shape = SHAPES[ndim]
    batch = simplex(shape, generator=make_generators([5, 6, 7][: shape[0]]))
    alone = simplex((1, *shape[1:]), generator=make_generators([6]))
    assert torch.equal(batch[1:2], alone)
    with pytest.raises(ValueError, match="generators"):
        simplex(shape, generator=make_generators([1] * (shape[0] + 1)))


def test_simplex_samples_and_channels_uncorrelated_2d():
    x = simplex((8, 2, 96, 96), frequency=8, generator=gen(0))
    fields = x.reshape(16, -1)  # every (sample, channel) pair against every other
    r = off_diagonal_corr(fields)
    assert r.abs().max() < 0.1
    assert r.abs().mean() < 0.03


def test_simplex_samples_uncorrelated_3d():
    x = simplex((6, 1, 32, 32, 32), generator=gen(1))
    assert off_diagonal_corr(x[:, 0]).abs().max() < 0.1


@pytest.mark.parametrize("ndim", [2, 3])
def test_simplex_normalised_per_sample_and_channel(ndim):
    x = simplex(SHAPES[ndim], generator=gen(3)).double()
    dims = tuple(range(2, 2 + ndim))
    assert x.mean(dims).abs().max() < 1e-4
    assert (x.std(dims, correction=0) - 1).abs().max() < 1e-4


# --- simplex: raw values and spectra ------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_raw_single_octave_bounded_and_zero_mean(ndim):
    shape = (16, 1, 64, 64) if ndim == 2 else (8, 1, 24, 24, 24)
    x = simplex(shape, octaves=1, frequency=8, normalise=False, generator=gen(4))
    assert x.abs().max() <= 1.0
    assert x.abs().max() > 0.75  # the scale is used: peaks reach near the bound
    assert abs(x.mean().item()) < 0.02
    assert 0.15 < x.std().item() < 0.6
    multi = simplex(shape, octaves=4, normalise=False, generator=gen(4))
    assert multi.abs().max() <= 1.0


def spectral_summary(x: torch.Tensor, cutoff: float) -> tuple[float, float]:
    """(spectral centroid in cycles/pixel, fraction of power below ``cutoff``), over a batch of fields."""
    dims = tuple(range(2, x.ndim))
    power = torch.fft.fftn(x.double(), dim=dims).abs().square().sum((0, 1))
    freqs = torch.meshgrid(*[torch.fft.fftfreq(x.shape[d], dtype=torch.float64) for d in dims], indexing="ij")
    radius = torch.sqrt(sum(f * f for f in freqs))
    total = power.sum()
    return float((radius * power).sum() / total), float(power[radius < cutoff].sum() / total)


@pytest.mark.parametrize("ndim", [2, 3])
def test_lower_frequency_gives_lower_spatial_frequencies(ndim):
    shape = (4, 1, 64, 64) if ndim == 2 else (2, 1, 32, 32, 32)
    stats = [spectral_summary(simplex(shape, frequency=f, generator=gen(2)), cutoff=0.1) for f in (1, 2, 4)]
    centroids, low = zip(*stats)
    assert centroids[0] < centroids[1] < centroids[2]
    assert low[0] > low[1] > low[2]
    assert centroids[2] > 1.2 * centroids[0]


def test_frequency_sets_cells_per_side():
    """A single octave at f cells per side has its spectral peak near f / side cycles/pixel."""
    side = 128
    for f in (4, 8):
        x = simplex((8, 1, side, side), octaves=1, frequency=f, generator=gen(5))
        power = torch.fft.fft2(x.double()).abs().square().sum((0, 1))
        fy, fx = torch.meshgrid(torch.fft.fftfreq(side), torch.fft.fftfreq(side), indexing="ij")
        radius = torch.sqrt(fx * fx + fy * fy)
        bins = (radius * side).round().long()
        radial = torch.zeros(bins.max() + 1, dtype=torch.float64).index_add_(0, bins.flatten(), power.flatten())
        radial /= torch.bincount(bins.flatten())
        peak = int(radial.argmax())
        assert 0.5 * f <= peak <= 2.5 * f, (f, peak)


# --- simplex: the octave sum -----------------------------------------------------------------------


@pytest.mark.parametrize("persistence", [0.5, 0.8])
def test_octaves_are_weighted_by_powers_of_persistence(monkeypatch, persistence):
    """With each octave's lattice noise replaced by the constant ``10^k``, the unnormalised sum is exactly
    ``sum_k p^k 10^k / sum_k p^k``, and octave ``k`` is sampled at ``frequency * 2^k`` cells per longest side."""
    import medidiff.core.simplex as lattice

    spacing = []

    def constant_octave(coords, perm):
        k = len(spacing)
        spacing.append((coords[-1][0, 1] - coords[-1][0, 0]).item())  # one pixel along the last axis
        return torch.full_like(coords[0], 10.0**k)

    monkeypatch.setattr(lattice, "lattice_noise", constant_octave)
    out = simplex((2, 1, 16, 8), octaves=3, persistence=persistence, frequency=2.0, normalise=False,
                  generator=gen(0), dtype=torch.float64)
    weights = [persistence**k for k in range(3)]
    expected = sum(w * 10.0**k for k, w in enumerate(weights)) / sum(weights)
    torch.testing.assert_close(out, torch.full_like(out, expected), rtol=1e-12, atol=0)
    assert spacing == pytest.approx([2 / 16, 4 / 16, 8 / 16], rel=1e-6)


# --- simplex: the lattice against a scalar oracle -------------------------------------------------


def reference_simplex(p: list[float], perm: list[int], grads: list[list[float]]) -> float:
    """Textbook scalar simplex noise (Gustavson 2005) at one point, with explicit case branches."""
    n = len(p)
    skew, unskew = skew_factors(n)
    s = sum(p) * skew
    i = [math.floor(v + s) for v in p]
    t = sum(i) * unskew
    x0 = [v - (c - t) for v, c in zip(p, i)]
    order = sorted(range(n), key=lambda a: (-x0[a], a))  # axes by decreasing x0, ties to the lower axis
    corners = [[0] * n]
    for a in order:
        corners.append(list(corners[-1]))
        corners[-1][a] = 1
    perm2 = perm + perm
    total = 0.0
    for k, o in enumerate(corners):
        d = [x0[a] - o[a] + k * unskew for a in range(n)]
        w = 0.5 - sum(v * v for v in d)
        if w <= 0:
            continue
        lattice = [(i[a] + o[a]) for a in range(n)]
        h = perm2[lattice[-1] % PERIOD]
        for a in range(n - 2, 0, -1):
            h = perm2[h + lattice[a] % PERIOD]
        g = grads[perm2[h + lattice[0] % PERIOD] % len(grads)]
        total += w**4 * sum(gv * dv for gv, dv in zip(g, d))
    return total * SCALE[n]


@pytest.mark.parametrize("ndim", [2, 3])
def test_lattice_noise_matches_scalar_oracle(ndim):
    g = gen(9)
    perm = torch.stack([torch.randperm(PERIOD, generator=g) for _ in range(2)])
    points = torch.rand(2, 200, ndim, generator=g, dtype=torch.float64) * 20 - 3
    got = lattice_noise([points[..., a].clone() for a in range(ndim)], perm)
    grads = gradients(ndim).tolist()
    want = torch.tensor(
        [[reference_simplex(points[f, n].tolist(), perm[f].tolist(), grads) for n in range(200)] for f in range(2)],
        dtype=torch.float64,
    )
    assert (want != 0).float().mean() > 0.9
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_lattice_noise_zero_at_vertices_and_continuous(ndim):
    perm = torch.randperm(PERIOD, generator=gen(1)).unsqueeze(0)
    _, unskew = skew_factors(ndim)
    vertices = torch.randint(0, 50, (1, 100, ndim), generator=gen(2)).double()
    vertices = vertices - unskew * vertices.sum(-1, keepdim=True)  # lattice points in unskewed space
    at = lattice_noise([vertices[..., a].clone() for a in range(ndim)], perm)
    assert at.abs().max() < 1e-9
    line = torch.linspace(0, 12, 120001, dtype=torch.float64)
    direction = torch.tensor([0.6, 0.8, 0.3][:ndim], dtype=torch.float64)
    values = lattice_noise([(line * direction[a] + 0.1).unsqueeze(0) for a in range(ndim)], perm)[0]
    assert values.diff().abs().max() < 2e-3  # no jumps across simplex faces (slope ~ 10 per unit)


# --- dispatch -----------------------------------------------------------------------------------


def test_noise_like_dispatch():
    x = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    s = noise_like(x, "simplex", generator=make_generators([1, 2]), octaves=2)
    assert torch.equal(s, simplex_like(x, generator=make_generators([1, 2]), octaves=2))
    n = noise_like(x, generator=make_generators([1, 2]))
    assert torch.equal(n, gaussian_like(x, make_generators([1, 2])))
    assert make_noise("simplex") is simplex_like
    with pytest.raises(ValueError, match="simplex"):
        make_noise("perlin")


# --- gradients, seeds, options --------------------------------------------------------------------


def test_gradient_sets():
    """2D: 16 unit vectors at angles ``2 pi k / 16``; 3D: the 12 cube-edge midpoints ``(+-1, +-1, 0)`` and
    permutations, normalised (Gustavson 2005)."""
    g2 = gradients(2)
    assert g2.dtype == torch.float64 and g2.shape == (16, 2)
    angles = torch.atan2(g2[:, 1], g2[:, 0]).remainder(2 * math.pi)
    torch.testing.assert_close(angles, torch.arange(16, dtype=torch.float64) * (2 * math.pi / 16), rtol=0, atol=1e-12)
    g3 = gradients(3)
    assert g3.dtype == torch.float64 and g3.shape == (12, 3)
    torch.testing.assert_close(g3.norm(dim=1), torch.ones(12, dtype=torch.float64))
    edges = {tuple(v) for v in (g3 * math.sqrt(2)).round().long().tolist()}
    expected = {v for v in {(a, b, 0) for a in (-1, 1) for b in (-1, 1)} for v in (v, (v[0], 0, v[1]), (0, v[0], v[1]))}
    assert edges == expected
    with pytest.raises(ValueError, match="2 or 3 spatial dimensions, got 4"):
        gradients(4)


def test_seeds_options_and_errors():
    one = make_generators(5)
    assert len(one) == 1 and torch.equal(torch.rand(3, generator=one[0]), torch.rand(3, generator=gen(5)))
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        simplex((3, 1, 8, 8), generator=make_generators([1, 2]))
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        gaussian((3, 1, 8, 8), make_generators([1, 2]))
    for bad in ({"octaves": 0}, {"frequency": 0.0}):
        with pytest.raises(ValueError, match="need octaves >= 1 and frequency > 0"):
            simplex((1, 1, 8, 8), **bad)
    x = torch.zeros(2, 1, 16, 16)
    # AnoDDPM's settings are the defaults: 6 octaves, persistence 0.8, 64-pixel period on 256 pixels
    torch.testing.assert_close(simplex_like(x, generator=gen(3)),
                               simplex_like(x, generator=gen(3), octaves=6, persistence=0.8, frequency=4.0))
    torch.testing.assert_close(simplex_like(x, generator=gen(3), octaves=2),
                               simplex(x.shape, generator=gen(3), octaves=2))
    assert not torch.allclose(simplex_like(x, generator=gen(3), octaves=2), simplex_like(x, generator=gen(3)))
    assert simplex((1, 1, 8, 8), generator=gen(0), dtype=torch.float16).dtype == torch.float16


def test_a_seed_gives_the_same_simplex_noise_as_recorded():
    """Recorded values: a seed's noise must not change between versions (runs are reproducible from their
    recorded seeds); this also pins the random sub-cell offsets and permutation keys (float64 draws)."""
    x = simplex((2, 1, 6, 5), generator=[gen(0), gen(1)], dtype=torch.float64, octaves=2)
    expected = [[-0.5586109189035959, 0.06260927661204202, 0.3155896281498741, 0.06692107391450874,
                 0.06421823120342363],
                [0.5089941294847333, 1.5248580409410672, 1.2618703046031006, -0.16524658470208003,
                 0.4041934053730279]]
    torch.testing.assert_close(x[:, 0, 1, :], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    y = simplex((1, 1, 4, 4, 3), generator=gen(2), dtype=torch.float64, octaves=2, normalise=False)
    torch.testing.assert_close(y[0, 0, 1, 1, :], torch.tensor([-0.0012815430607245075, 0.10233104850584644,
                                                                -0.1817715261430051], dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)


def test_noise_is_made_on_the_inputs_device():
    x = torch.zeros(2, 1, 8, 8, device="meta")
    assert gaussian_like(x).device == simplex_like(x).device == x.device
