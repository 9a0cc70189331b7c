"""Counterfactual anomaly detection by classifier-free guidance (Sanchez et al. 2022): the null-class round trip and
the healthy counterfactual on an exact class-conditional model, the guidance formula against the network's own
noise estimates, the class dropout of training, a class-conditional model's weights, and method ``counterfactual``
through ``reconstruct_healthy``."""

from __future__ import annotations

import json

import pytest
import torch
from oracles import lesion_pair
from train_helpers import TINY_MODEL, single_thread, tiny_recipe  # noqa: F401

from medidiff.anomaly.config import AnomalySection, HealthyOptions
from medidiff.anomaly.healthy import healthy_evaluations, healthy_nfe, reconstruct_healthy
from medidiff.core.cfg import CFGDenoiser, WithClass, drop_classes
from medidiff.core.denoiser import Denoiser
from medidiff.core.processes import DDPM, VESDE, VPSDE
from medidiff.core.samplers import ddim, ddim_invert
from medidiff.core.utils import bcast
from medidiff.errors import RecipeError
from medidiff.nets import build_unet
from medidiff.train import TrainingConfig, fit
from medidiff.train_classifier import ClassDataset
from medidiff.weights import load_checked

pytestmark = pytest.mark.usefixtures("single_thread")

HEALTHY, LESION, NULL = 0, 1, 2


class ExactClassNet(torch.nn.Module):
    """The exact ``E[x0 | x_t, y]`` of a ``GaussianPair`` as an x0-predicting class-conditional network (``y = 2``,
    the null class, is the unconditional posterior mean): what classifier-free training converges to. It counts the
    images it evaluates."""

    null_class = NULL

    def __init__(self, toy):
        super().__init__()
        self.toy, self.images = toy, 0

    def forward(self, x, t, class_labels=None):
        self.images += x.shape[0]
        labels = torch.full((x.shape[0],), NULL) if class_labels is None else class_labels
        return self.toy.conditional(x, t, labels)


def _exact(process):
    """An exact class-conditional denoiser and three lesioned 4 x 4 inputs within the model's [-1, 1] range."""
    toy, x, lesion = lesion_pair(process, contrast=0.5, tau=0.1, spread=0.4)
    assert float(x.abs().max()) < 1.0  # reconstruct_healthy clips to [-1, 1]: nothing is clipped here
    net = ExactClassNet(toy)
    return Denoiser(net, process, "x0", scale_input=False, time_fn=lambda t: t), toy, x, lesion


def _round_trip(denoiser, x, process, steps, encode, decode, t_level=0.5, grid="logsnr"):
    latent = ddim_invert(WithClass(denoiser, encode), x, process, steps, t_end=t_level, grid=grid)
    return ddim(WithClass(denoiser, decode), latent, process, steps, t_start=t_level, grid=grid)


def test_null_inversion_then_null_decoding_returns_the_input():
    """DDIM is the Euler method of the probability-flow ODE (Song et al. 2021, DDIM eq. 14), its inversion the same
    method run forward: with the exact model, the round trip's error is first order, ``E(N) = C / N + O(1 / N^2)``
    on a grid of equal log-SNR steps. So the error halves with twice the steps, and the extrapolation
    ``2 E(2N) - E(N)`` (Richardson), which removes the ``C / N`` term, is the ``O(1 / N^2)`` remainder: the round trip
    converges to the input itself. Inverting with the healthy class instead converges elsewhere."""
    process = VPSDE()
    denoiser, _, x, _ = _exact(process)
    errors = {n: _round_trip(denoiser, x, process, n, NULL, NULL) - x for n in (100, 200)}
    norms = {n: float(e.norm()) for n, e in errors.items()}
    assert 0.48 < norms[200] / norms[100] < 0.52  # first order
    limit = 2 * errors[200] - errors[100]
    assert float(limit.norm()) < 0.02 * norms[100]  # what is left after the C / N term: O(1 / N^2)
    assert norms[200] < 0.02 * float(x.norm())
    wrong = {n: _round_trip(denoiser, x, process, n, HEALTHY, NULL) - x for n in (100, 200)}
    assert float((2 * wrong[200] - wrong[100]).norm()) > 0.5  # an inversion with another class is no round trip


def test_healthy_decoding_at_weight_one_is_the_healthy_class_flow():
    """At ``w = 1`` the guided model is the healthy class's own, a Gaussian whose probability flow keeps the
    standardised value ``(x_t - alpha mu_0) / sqrt(v_t)``: the decoding converges (first order) to that flow down to
    the grid's last time ``t_min``, whose healthy estimate it returns; the lesion is taken out. ``w = 0`` is the null
    model's decoding."""
    process, t_level = VPSDE(), 0.5
    denoiser, toy, x, lesion = _exact(process)
    latent = ddim_invert(WithClass(denoiser, NULL), x, process, 400, t_end=t_level, grid="logsnr")
    t_min = torch.tensor([process.t_min], dtype=torch.float64)  # every grid's last evaluation time
    expected = toy.class_means(toy.healthy_flow(latent, t_level, process.t_min), t_min)[HEALTHY]
    decoded = {n: ddim(CFGDenoiser(denoiser, HEALTHY, NULL, 1.0), latent, process, n, t_start=t_level, grid="logsnr")
               for n in (100, 200)}
    errors = {n: d - expected for n, d in decoded.items()}
    assert 0.45 < float(errors[200].norm()) / float(errors[100].norm()) < 0.55
    assert float((2 * errors[200] - errors[100]).norm()) < 0.05 * float(errors[100].norm())
    lesion_mean = [float(img[lesion].mean()) for img in (x, decoded[200], toy.mu[0].expand_as(x))]
    assert lesion_mean[2] - 0.05 < lesion_mean[1] < lesion_mean[0] - 0.3  # from ~mu_1 to ~mu_0
    null = ddim(WithClass(denoiser, NULL), latent, process, 200, t_start=t_level, grid="logsnr")
    torch.testing.assert_close(ddim(CFGDenoiser(denoiser, HEALTHY, NULL, 0.0), latent, process, 200, t_start=t_level,
                                    grid="logsnr"), null, rtol=0, atol=1e-12)


def _random_conditional_unet(prediction_channels: int = 1):
    """A tiny class-conditional U-Net with every weight drawn at random (MONAI zero-initialises the output layer,
    which would make every class's output 0)."""
    torch.manual_seed(0)
    net = build_unet(2, out_channels=prediction_channels, num_class_embeds=3, **TINY_MODEL).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    return net


def _eps_from_output(prediction, out, x_t, alpha, sigma):
    """The noise estimate of a network output, written out per parametrisation (independently of the library)."""
    if prediction == "eps":
        return out
    if prediction == "x0":
        return (x_t - alpha * out) / sigma
    return (sigma * x_t + alpha * out) / (alpha**2 + sigma**2)  # v = alpha eps - sigma x0


@pytest.mark.parametrize("process", [DDPM(100), VPSDE(), VESDE()], ids=["ddpm", "vpsde", "vesde"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_the_guided_estimate_is_the_combination_of_the_two_noise_estimates(process, prediction):
    """``CFGDenoiser`` returns the ``x0_hat`` of ``eps_null + w (eps_cls - eps_null)`` (the eps of the network's
    outputs for each class, converted per parametrisation); ``w = 0`` is the null model, ``w = 1`` the class's, and the
    estimate is affine in ``w``."""
    denoiser = Denoiser(_random_conditional_unet(), process, prediction)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn((3, 1, 16, 16), generator=g, dtype=torch.float64) * 1.5
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma = (bcast(v, x_t) for v in process.marginal(t))
    with torch.no_grad():
        eps = {y: _eps_from_output(prediction, denoiser.net_output(x_t, t, class_labels=y), x_t, alpha, sigma)
               for y in (LESION, NULL)}
        assert float((eps[LESION] - eps[NULL]).abs().max()) > 1e-3  # the classes differ
        guided = {w: CFGDenoiser(denoiser, LESION, NULL, w)(x_t, t) for w in (0.0, 1.0, 2.5)}
        torch.testing.assert_close(guided[0.0], denoiser(x_t, t, class_labels=NULL), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(guided[1.0], denoiser(x_t, t, class_labels=LESION), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(guided[2.5], guided[0.0] + 2.5 * (guided[1.0] - guided[0.0]), rtol=1e-10, atol=1e-10)
    for w, x0 in guided.items():
        implied = (x_t - alpha * x0) / sigma  # what every sampler derives from x0_hat
        torch.testing.assert_close(implied, eps[NULL] + w * (eps[LESION] - eps[NULL]), rtol=1e-8, atol=1e-8)


def test_a_conditional_unet_defaults_to_its_null_class_and_others_take_no_class():
    net = _random_conditional_unet()
    x, t = torch.randn((2, 1, 16, 16), dtype=torch.float64), torch.tensor([10.0, 500.0], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), net(x, t, torch.tensor([NULL, NULL])), rtol=0, atol=0)
        assert not torch.equal(net(x, t, torch.tensor([HEALTHY, HEALTHY])), net(x, t))
    plain = build_unet(2, **TINY_MODEL)
    assert "num_class_embeds" not in plain.config and plain.null_class is None  # existing configs are unchanged
    with pytest.raises(ValueError, match="without class embeddings"):
        plain(x.float(), t.float(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least 2"):
        build_unet(2, num_class_embeds=1, **TINY_MODEL)


def test_drop_classes_replaces_labels_by_the_null_class_at_the_rate():
    labels = torch.arange(200_000) % 2
    g = torch.Generator().manual_seed(0)
    dropped = drop_classes(labels, NULL, 0.15, g)
    rate = float((dropped == NULL).double().mean())
    assert abs(rate - 0.15) < 4 * (0.15 * 0.85 / len(labels)) ** 0.5
    kept = dropped != NULL
    assert torch.equal(dropped[kept], labels[kept])
    assert torch.equal(drop_classes(labels, NULL, 0.15, torch.Generator().manual_seed(0)), dropped)
    assert drop_classes(labels, NULL, 0.0) is labels
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_classes(labels, NULL, 1.5)


def _lesion_class_items(n: int) -> ClassDataset:
    g = torch.Generator().manual_seed(0)
    return ClassDataset(torch.rand((n, 1, 16, 16), generator=g) * 2 - 1, torch.full((n,), LESION))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_training_batches_drop_the_class_at_the_configured_rate(tmp_path, p):
    """The engine hands a class-conditional U-Net each item's class, replaced by the null class with probability
    ``training.class_dropout``: recorded at the network's input over 20 steps of 16 images."""
    torch.manual_seed(0)
    net = build_unet(2, num_class_embeds=3, **TINY_MODEL)
    seen = []
    net.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs["class_labels"].clone()),
                                  with_kwargs=True)
    config = TrainingConfig(steps=20, batch_size=16, class_dropout=p, ema_decay=None, log_every=10, val_every=0,
                            sample_every=0, checkpoint_every=0, tensorboard=False, progress=False)
    fit(net, DDPM(100), _lesion_class_items(64), config=config, out_dir=tmp_path, device="cpu",
        data_prep={"source": "synthetic", "size": [16, 16]})
    labels = torch.cat(seen)
    assert len(labels) == 20 * 16 and set(labels.tolist()) <= {LESION, NULL}  # the item's class or the null one
    rate = float((labels == NULL).double().mean())
    assert abs(rate - p) < 4 * (p * (1 - p) / len(labels)) ** 0.5 + 1e-12


def _conditional_recipe(**training) -> dict:
    return tiny_recipe(data={"source": "sample:lesion_classes", "size": [80, 96], "val_fraction": 0.0,
                             "holdout": [[0, 36], [40, 91]], "labels": {"variants": 2, "healthy_fraction": 0.5}},
                       model={**TINY_MODEL, "class_conditional": True},
                       training={"steps": 2, "batch_size": 4, "checkpoint_every": 0, "val_every": 0,
                                 "class_dropout": 0.15, **training})


def test_recipes_validate_and_refuse_what_does_not_fit():
    from train_helpers import ROOT

    from medidiff.recipes import load_recipe, parse_recipe

    recipe = load_recipe(ROOT / "recipes" / "counterfactual_lesion_2d.yaml")
    assert recipe.model.class_conditional and recipe.training.class_dropout == 0.15
    assert recipe.data.source == "sample:lesion_classes" and recipe.model.channels == [32, 64, 128]
    assert parse_recipe(_conditional_recipe()).model.class_conditional
    with pytest.raises(RecipeError, match="class_dropout belongs to the denoising objective"):
        parse_recipe(_conditional_recipe(objective="classification", sample_every=0))
    with pytest.raises(RecipeError, match="class_conditional needs model.arch diffusion_unet"):
        parse_recipe(tiny_recipe(model={"arch": "unet", "prediction": "x0", "class_conditional": True}))


def test_a_class_conditional_model_trains_from_a_recipe_round_trips_and_counterfactuals_run(tmp_path, monkeypatch):
    """``sample:lesion_classes`` with ``model.class_conditional`` trains through ``run_recipe``; the saved model
    rebuilds with the same weights and outputs per class; ``method: counterfactual`` runs on it as the null-class
    inversion then the guided decoding; a model without classes, or without the class asked for, is refused."""
    import medidiff.train_segment as train_segment
    from medidiff.recipes import parse_recipe
    from medidiff.train import run_recipe

    whole = train_segment.brain_volumes
    monkeypatch.setattr(train_segment, "brain_volumes", lambda: whole(with_1mm=False))  # the bundled brain only
    run_recipe(parse_recipe(_conditional_recipe()), tmp_path / "cf")
    meta = json.loads((tmp_path / "cf" / "model.json").read_text())
    assert meta["net"]["num_class_embeds"] == 3 and meta["extra"]["classes"] == ["healthy", "lesion", "null"]
    assert meta["data_prep"]["labels"]["classes"] == ["healthy", "lesion"]
    denoiser, info, _ = load_checked(tmp_path / "cf")
    assert info.net == meta["net"] and denoiser.net.null_class == NULL
    from safetensors.torch import load_file

    rebuilt = build_unet(**meta["net"])
    rebuilt.load_state_dict(load_file(tmp_path / "cf" / "model.safetensors"), strict=True)
    x = torch.rand((2, 1, 80, 96), generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([0.3, 0.6])
    with torch.no_grad():
        for y in (HEALTHY, LESION, NULL):
            assert torch.equal(Denoiser(rebuilt, denoiser.process)(x, t, class_labels=y),
                               denoiser(x, t, class_labels=y))

    common = {"method": "counterfactual", "t_levels": [0.3], "steps": 3, "bf16": False, "guidance_weight": 2.0}
    healthy, spread = reconstruct_healthy(denoiser, x, **common)
    with torch.no_grad():
        latent = ddim_invert(WithClass(denoiser, NULL), x, denoiser.process, 3, t_end=0.3)
        by_hand = ddim(CFGDenoiser(denoiser, HEALTHY, NULL, 2.0), latent, denoiser.process, 3, t_start=0.3)
    torch.testing.assert_close(healthy, by_hand, rtol=1e-5, atol=1e-6)
    assert healthy.shape == x.shape and not spread.any()
    with pytest.raises(ValueError, match="healthy_class: 2 is not one of the model's 2 classes"):
        reconstruct_healthy(denoiser, x, **common, healthy_class=2)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        reconstruct_healthy(Denoiser(build_unet(2, **TINY_MODEL), denoiser.process), x, **common)


def test_method_counterfactual_counts_its_evaluations_and_keeps_its_options_to_itself():
    """``3 k`` denoiser evaluations per image for ``k`` steps (``k`` null-class inversion steps, ``k`` guided steps of
    two), as the network counts them; with weight 0 it is the null model's ``invert``; its options shape the map
    only when it is the method."""
    process = DDPM(200)
    denoiser, _, x, _ = _exact(process)
    opts = {"t_levels": [0.3, 0.5], "steps": 4, "bf16": False, "batch_size": 2}
    out, _ = reconstruct_healthy(denoiser, x, method="counterfactual", guidance_weight=0.0, **opts)
    assert denoiser.net.images == len(x) * healthy_nfe(method="counterfactual", **opts) == len(x) * 3 * 8
    assert healthy_evaluations(method="counterfactual", **opts) == (24, 0)
    denoiser.net.images = 0
    null_invert, _ = reconstruct_healthy(WithClass(denoiser, NULL), x, method="invert", **opts)
    torch.testing.assert_close(out, null_invert, rtol=0, atol=1e-12)
    assert HealthyOptions(method="counterfactual").samples == 1
    assert "guidance_weight" not in AnomalySection().map_settings()["reconstruction"]  # saved thresholds stay valid
    section = AnomalySection().updated(method="counterfactual", guidance_weight=5.0)
    assert section.map_settings()["reconstruction"]["guidance_weight"] == 5.0
    assert "classifier" not in section.map_settings()["reconstruction"]
