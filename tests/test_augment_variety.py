"""Augmentations that mimic other subjects and scanners: elastic warps, resolution, bias field, contrast, noise."""

from __future__ import annotations

import math

import pytest
import torch

from medidiff.data.augment import (
    Augmented,
    _random_theta,
    gaussian_blur,
    lower_resolution,
    random_affine,
    random_bias_field,
    random_contrast,
    random_displacement,
    random_gamma,
    random_noise,
    random_resolution,
    random_warp,
    rician_noise,
    smooth_field,
    warp,
)
from medidiff.train_data import AugmentConfig, TensorDataset
from medidiff.train_segment import PairedAugmented

SHAPES = [(24, 20), (12, 10, 8)]


def _brain(shape: tuple[int, ...]) -> torch.Tensor:
    """A ``(1, *shape)`` smooth textured blob in [-1, 1] inside an exact -1 background."""
    coords = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(c ** 2 for c in coords) < 0.6
    texture = 0.2 + 0.6 * torch.cos(3 * coords[0]) * torch.sin(2 * coords[-1])
    return torch.where(inside, texture, torch.tensor(-1.0))[None]


def _summary(t: torch.Tensor) -> list[float]:
    w = torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape) / t.numel()
    return [float(t.double().sum()), float((t.double() * w).sum())]


def _assert_close(got: list, expected: list) -> None:
    """Reference values were recorded to 5 decimals."""
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                          rtol=0.0, atol=2e-5), got


def _high_frequency_energy(x: torch.Tensor) -> float:
    """Energy of the spectrum beyond half the Nyquist frequency along any axis, mean removed."""
    spectrum = torch.fft.fftn(x - x.mean()).abs() ** 2
    freqs = torch.meshgrid(*[torch.fft.fftfreq(n).abs() for n in x.shape], indexing="ij")
    return float(spectrum[torch.stack(freqs).amax(0) > 0.25].sum())


OLD_BLOCK = {"rotate_deg": 10.0, "scale": 0.1, "translate": 0.05, "gamma": 0.2, "flip": 0.5}


def test_an_old_recipe_block_validates_and_draws_exactly_as_before():
    """Reference sums from the implementation before the new augmentations existed (same seeds, same items)."""
    cfg = AugmentConfig.model_validate(OLD_BLOCK)
    assert (cfg.elastic, cfg.resolution, cfg.bias_field, cfg.contrast, cfg.noise) == (0, 0, 0, 0, 0)
    expected = {(12, 10): [[-76.98625, -37.46936], [-66.8235, -32.37535], [-75.04753, -37.80525]],
                (8, 7, 6): [[-279.38306, -141.48385], [-289.37554, -144.96816], [-285.97563, -142.69031]]}
    for shape, sums in expected.items():
        ds = Augmented(TensorDataset(_brain(shape)[None]), **cfg.model_dump())
        torch.manual_seed(0)
        _assert_close([_summary(ds[0]["image"]) for _ in range(3)], sums)
    image = _brain((12, 10))
    mask = torch.where(image > 0.3, 1.0, -1.0)
    pairs = PairedAugmented(TensorDataset(mask[None], image[None]), **cfg.model_dump())
    torch.manual_seed(1)
    got = [(_summary(p["image"]), _summary(p["cond"])) for p in (pairs[0], pairs[0], pairs[0])]
    _assert_close(got, [([-94.0, -45.55], [-73.34668, -34.21111]), ([-94.0, -46.75], [-66.05424, -33.53418]),
                        ([-92.0, -45.3], [-67.9306, -33.81084])])


def test_the_new_keys_are_off_by_default_and_reach_the_dataset():
    cfg = AugmentConfig()
    assert (cfg.elastic, cfg.resolution, cfg.bias_field, cfg.contrast, cfg.noise) == (0, 0, 0, 0, 0)
    ds = Augmented(TensorDataset(_brain((8, 8))[None]), **AugmentConfig(elastic=0.03, noise=0.02).model_dump())
    assert (ds.elastic, ds.noise, ds.resolution_factor) == (0.03, 0.02, 2.0)
    for bad in ({"elastic": -0.1}, {"resolution": 1.5}, {"resolution_factor": 0.5}, {"noise": 0.6}, {"blur": 1}):
        with pytest.raises(ValueError):
            AugmentConfig.model_validate(bad)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_augmentation_at_zero_strength_is_the_identity_and_draws_nothing(shape):
    x = _brain(shape)
    state = torch.random.get_rng_state()
    for out in (random_warp(x), random_resolution(x, p=0.0, factor=3.0), random_resolution(x, p=1.0, factor=1.0),
                lower_resolution(x, [1.0] * len(shape)), random_bias_field(x, bias_field=0.0),
                random_gamma(x, gamma=0.0), random_contrast(x, contrast=0.0), random_noise(x, noise=0.0),
                gaussian_blur(x, [0.0] * len(shape))):
        assert out is x
    assert torch.equal(torch.random.get_rng_state(), state)
    off = dict(rotate_deg=0.0, scale=0.0, translate=0.0, gamma=0.0)
    assert torch.equal(Augmented(TensorDataset(x[None]), **off)[0]["image"], x)


def test_the_bspline_field_reproduces_constant_and_linear_control_values():
    """Cubic B-splines reproduce polynomials of degree 1: control values k give the voxel's control coordinate."""
    n, cells = 10, 4
    u = 1 + (torch.arange(n, dtype=torch.float64) + 0.5) / n * cells
    ramp = torch.arange(cells + 3, dtype=torch.float64)
    assert torch.allclose(smooth_field(ramp[None], [n])[0], u, atol=1e-12)
    coarse = ramp[:, None] + 2 * ramp[None, :]  # c(k, l) = k + 2l
    assert torch.allclose(smooth_field(coarse[None], [n, 7])[0], u[:, None] + 2 * (1 + (torch.arange(7) + 0.5) / 7
                                                                                  * cells)[None], atol=1e-12)
    assert torch.allclose(smooth_field(torch.full((1, 7, 7, 7), 0.3), [5, 6, 4]), torch.tensor(0.3), atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_elastic_displacement_is_bounded_smooth_and_uses_its_range(shape):
    elastic = 0.05
    torch.manual_seed(0)
    fields = torch.stack([random_displacement(shape, elastic=elastic) for _ in range(20)])
    assert fields.shape == (20, *shape, len(shape))
    bound = 2 * elastic  # grid coordinates span 2 across the image
    assert float(fields.abs().max()) <= bound + 1e-6
    assert float(fields.abs().max()) > 0.5 * bound
    # control values uniform (variance bound^2 / 3), each voxel a weighted sum of them: variance times sum(w^2),
    # a product over the axes (the weights are separable), and so is its mean over the voxels
    weights = [smooth_field(torch.eye(7, dtype=torch.float64), [n]) for n in shape]  # (control, voxel) per axis
    squares = math.prod(float((w ** 2).sum(0).mean()) for w in weights)
    assert float(fields.std()) == pytest.approx(bound * math.sqrt(squares / 3), rel=0.2)
    for axis, n in enumerate(shape):
        second = fields.diff(n=2, dim=1 + axis).abs().max()
        assert float(second) <= 4 * bound * (4 / n) ** 2 + 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_the_elastic_warp_composes_with_the_affine_one_in_one_interpolation(shape):
    x, dims = _brain(shape), len(shape)
    theta = torch.cat([torch.eye(dims) * 0.95, torch.full((dims, 1), 0.1)], dim=1)
    assert torch.equal(warp(x, theta, torch.zeros(*shape, dims)), warp(x, theta))
    shift = torch.linspace(-0.2, 0.3, dims)
    constant = warp(x, torch.eye(dims, dims + 1), shift.expand(*shape, dims))
    assert torch.allclose(constant, warp(x, torch.cat([torch.eye(dims), shift[:, None]], dim=1)), atol=1e-5)
    torch.manual_seed(4)
    affine = random_affine(x, rotate_deg=10.0, scale=0.1, translate=0.05)
    torch.manual_seed(4)
    assert torch.equal(random_warp(x, rotate_deg=10.0, scale=0.1, translate=0.05), affine)
    torch.manual_seed(4)
    both = random_warp(x, rotate_deg=10.0, scale=0.1, translate=0.05, elastic=0.05)
    torch.manual_seed(4)
    theta = _random_theta(dims, 10.0, 0.1, 0.05)  # the affine draws first, then the field's
    assert torch.equal(both, warp(x, theta, random_displacement(shape, elastic=0.05)))
    assert float((both - affine).abs().max()) > 0.05


@pytest.mark.parametrize("shape", SHAPES)
def test_the_bias_field_is_smooth_bounded_and_keeps_the_background(shape):
    strength = 0.4
    x = torch.zeros(1, *shape)  # 0.5 on the [0, 1] scale: no clamping up to exp(0.69)
    x[(0, 0)] = -1.0  # a background face
    torch.manual_seed(2)
    out = random_bias_field(x, bias_field=strength)
    assert torch.equal(out[(0, 0)], x[(0, 0)])
    log_field = torch.log((out[0, 1:] + 1) / 2 / 0.5).double()
    assert float(log_field.abs().max()) <= strength + 1e-5
    assert float(log_field.std()) > 0.03
    for axis, n in enumerate(log_field.shape):
        assert float(log_field.diff(n=2, dim=axis).abs().max()) <= 4 * strength * (2 / n) ** 2 + 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_the_gaussian_blur_matches_white_noise_variance_reduction(shape):
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(noise, [1.0] * len(shape))
    t = torch.arange(-3, 4, dtype=torch.float64)
    kernel = torch.exp(-t ** 2 / 2) / torch.exp(-t ** 2 / 2).sum()
    interior = blurred[0][tuple(slice(3, n - 3) for n in shape)]  # edges replicated: correlated there
    expected = float((kernel ** 2).sum()) ** len(shape)  # 0.2821 per axis for sigma 1 (1 / (2 sqrt(pi)) untruncated)
    assert float(interior.var()) == pytest.approx(expected * float(noise.var()), rel=0.3)
    assert _high_frequency_energy(blurred[0]) < 0.1 * _high_frequency_energy(noise[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_a_lower_resolution_removes_fine_detail_along_the_chosen_axes_only(shape):
    dims = len(shape)
    index = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    along_first = (index[0] % 2 * 2 - 1).float()[None] * 0.5  # the finest pattern along axis 0
    along_last = torch.cos(index[-1] * 1.3).float()[None] * 0.5
    factors = [2.0] + [1.0] * (dims - 1)
    low = lower_resolution(along_first, factors)
    assert _high_frequency_energy(low[0]) < 0.05 * _high_frequency_energy(along_first[0])
    assert torch.allclose(lower_resolution(along_last, factors), along_last, atol=1e-5)
    # 2.5 voxels do not divide the pattern: sampled without the anti-aliasing blur, a quarter of its variance
    # would alias into the result
    aliased = lower_resolution(along_first, [2.5] + [1.0] * (dims - 1))
    assert float(aliased.var()) < 0.03 * float(along_first.var())
    x = -torch.ones(1, *shape)
    x[(0, *[slice(s // 2 - 1, s // 2 + 1) for s in shape])] = 0.8
    low = lower_resolution(x, [3.0] * dims)
    assert torch.equal(low[x == -1], x[x == -1])  # no halo: the background stays exactly background
    assert float(low.max()) < 0.8 - 0.3 and float(low.min()) >= -1.0
    torch.manual_seed(5)
    drawn = random_resolution(x, p=1.0, factor=3.0)
    torch.manual_seed(5)
    torch.rand(())  # the draw deciding whether; then one factor per axis
    assert torch.equal(drawn, lower_resolution(x, (1 + torch.rand(dims) * 2).tolist()))
    torch.manual_seed(5)
    changed = sum(not torch.equal(random_resolution(x, p=0.3, factor=3.0), x) for _ in range(400))
    assert abs(changed / 400 - 0.3) < 0.07


def test_rician_noise_has_the_requested_level_and_spares_the_background():
    x = torch.zeros(1, 256, 256)
    x[0, :, :16] = -1.0
    level = 0.1
    torch.manual_seed(6)
    expected = float(torch.rand(())) * level
    torch.manual_seed(6)
    out = random_noise(x, noise=level)
    tissue = (out[0, :, 16:] + 1) / 2
    assert float(tissue.std()) == pytest.approx(expected, rel=0.03)
    assert float(tissue.mean()) == pytest.approx(0.5 + expected ** 2 / (2 * 0.5), abs=0.002)  # Rician bias
    assert torch.equal(out[0, :, :16], x[0, :, :16])
    faint = torch.full((1, 128, 128), -1 + 2e-6)  # signal 1e-6: the magnitude of noise alone is Rayleigh
    torch.manual_seed(7)
    rayleigh = (rician_noise(faint, 0.05) + 1) / 2
    assert float(rayleigh.mean()) == pytest.approx(0.05 * math.sqrt(math.pi / 2), rel=0.03)


def test_gamma_and_contrast_follow_their_formulas():
    x = _brain((16, 12))
    unit = (x + 1) / 2
    torch.manual_seed(8)
    factor = float(torch.exp((torch.rand(()) * 2 - 1) * 0.3))
    torch.manual_seed(8)
    out = random_contrast(x, contrast=0.3)
    assert torch.allclose(out, (unit * factor).clamp(0, 1) * 2 - 1, atol=1e-6)
    assert torch.equal(out[x == -1], x[x == -1])
    torch.manual_seed(9)
    g = float(torch.exp((torch.rand(()) * 2 - 1) * 0.3))
    torch.manual_seed(9)
    assert torch.allclose(random_gamma(x, gamma=0.3), unit ** g * 2 - 1, atol=1e-6)


ALL_ON = dict(rotate_deg=8.0, scale=0.08, translate=0.04, gamma=0.15, flip=0.5, elastic=0.04, resolution=0.5,
              resolution_factor=2.5, bias_field=0.3, contrast=0.1, noise=0.03)


def test_the_dataset_applies_them_in_acquisition_order():
    x = _brain((24, 20))
    torch.manual_seed(12)
    got = Augmented(TensorDataset(x[None]), **ALL_ON)[0]["image"]
    torch.manual_seed(12)
    y = random_warp(x.flip(1) if float(torch.rand(())) < ALL_ON["flip"] else x, rotate_deg=8.0, scale=0.08,
                    translate=0.04, elastic=0.04)
    y = random_resolution(y, p=0.5, factor=2.5)
    y = random_bias_field(y, bias_field=0.3)
    y = random_contrast(random_gamma(y, gamma=0.15), contrast=0.1)
    assert torch.equal(got, random_noise(y, noise=0.03))


@pytest.mark.parametrize("shape", SHAPES)
def test_everything_on_keeps_shape_dtype_range_and_repeats_under_a_seed(shape):
    x = torch.stack([_brain(shape), _brain(shape).flip(1)])
    ds = Augmented(TensorDataset(x), **AugmentConfig(**ALL_ON).model_dump())
    torch.manual_seed(10)
    first = [ds[i % 2]["image"] for i in range(6)]
    torch.manual_seed(10)
    again = [ds[i % 2]["image"] for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[2])
    for out in first:
        assert out.shape == (1, *shape) and out.dtype == torch.float32
        assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
        assert float((out == -1).float().mean()) > 0.2  # noise, bias and contrast leave the background at -1


def test_pairs_share_the_warp_and_only_the_image_gets_the_intensity_changes():
    image = _brain((24, 20))
    mask = torch.where(image > 0.3, 1.0, -1.0)
    data = TensorDataset(mask[None], image[None])
    geometric = {k: v for k, v in ALL_ON.items() if k in ("rotate_deg", "scale", "translate", "flip", "elastic")}
    torch.manual_seed(11)
    full = PairedAugmented(data, **ALL_ON)[0]
    torch.manual_seed(11)
    warped = PairedAugmented(data, **geometric, gamma=0.0)[0]
    assert torch.equal(full["image"], warped["image"])
    assert set(full["image"].unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(full["cond"], warped["cond"])
    inside = warped["image"][0] > 0  # the re-binarised mask still covers the warped bright tissue
    assert float(warped["cond"][0][inside].mean()) > 0.3
