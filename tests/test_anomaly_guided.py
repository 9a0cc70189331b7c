"""Classifier guidance for anomaly detection (Wolleb et al. 2022): the exact answer on a two-Gaussian toy, the
hook's x0 shift against the paper's noise-space formula, the noise-aware classifier trained by the engine, and
method ``guided`` from a recipe's options."""

from __future__ import annotations

import json

import pytest
import torch
from oracles import lesion_pair
from train_helpers import TINY_MODEL, single_thread, tiny_recipe  # noqa: F401

from medidiff.anomaly.config import AnomalySection, HealthyOptions, route
from medidiff.anomaly.healthy import healthy_evaluations, healthy_nfe, reconstruct_healthy
from medidiff.core.guidance import ClassifierGuidance, NoisyClassifier
from medidiff.core.processes import DDPM, VESDE, VPSDE
from medidiff.core.samplers import ddim, ddim_invert
from medidiff.core.utils import bcast
from medidiff.errors import RecipeError, TrainingError
from medidiff.nets import build_classifier
from medidiff.train import TrainingConfig, fit
from medidiff.train_classifier import ClassDataset
from medidiff.train_data import synthetic_images
from medidiff.weights import load_checked

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_CLASSIFIER = {"channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 8,
                   "num_head_channels": 8}


def test_exact_classifier_guidance_decodes_a_diseased_input_to_the_healthy_class():
    """With the exact classifier at scale 1, the guided score is the healthy class's own score (Bayes), so the
    guided DDIM decoding of the inversion is the healthy Gaussian's flow: ``mu_0 + tau z`` with ``z`` the
    latent's standardised value. Scale 0 is the plain inversion round trip; only the lesion's pixels move."""
    process, t_level = VPSDE(), 0.5
    toy, x, lesion = lesion_pair(process)
    errors = []
    for steps in (200, 400):  # DDIM is first order: the error halves with twice the steps
        latent = ddim_invert(toy.denoiser, x, process, steps, t_end=t_level)
        plain = ddim(toy.denoiser, latent, process, steps, t_start=t_level)
        guided = ddim(toy.denoiser, latent, process, steps, t_start=t_level,
                      hook=ClassifierGuidance(toy.logits, process, 1.0, target=0))
        expected = toy.healthy_flow(latent, t_level)
        errors.append(float((guided - expected).norm()))
    assert torch.allclose(plain, x, atol=0.03)  # the exact denoiser's inversion returns the input
    unguided = ddim(toy.denoiser, latent, process, steps, t_start=t_level,
                    hook=ClassifierGuidance(toy.logits, process, 0.0))
    assert torch.equal(unguided, plain)
    moved = float((expected - plain).norm())
    assert moved > 3.0  # the lesion (norm 3 on the means) is taken out
    assert errors[1] < 0.01 * moved and errors[1] < 0.6 * errors[0]
    assert torch.allclose(guided[~lesion], plain[~lesion], atol=1e-9)  # mu_0 = mu_1 there: nothing to change
    lesion_mean = [float(img[lesion].mean()) for img in (x, guided, toy.mu[0].expand_as(x))]
    assert lesion_mean[2] - 0.1 < lesion_mean[1] < lesion_mean[0] - 1.0  # from ~mu_1 to ~mu_0


@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_one_guided_step_shifts_x0_by_the_scaled_analytic_gradient(scale):
    """One DDIM step from ``t_L`` returns ``E[x0 | x_t] + s (sigma^2 / alpha) grad log p(healthy | x_t)``, the
    gradient being ``alpha p(diseased | x_t) (mu_0 - mu_1) / v_t`` for the two Gaussians."""
    process, t_level = VPSDE(), 0.4
    toy, x, _ = lesion_pair(process)
    x_t = process.noised(x, torch.full((3,), t_level, dtype=x.dtype), torch.randn_like(x))
    out = ddim(toy.denoiser, x_t, process, 1, t_start=t_level, hook=ClassifierGuidance(toy.logits, process, scale))
    t = torch.full((3,), t_level, dtype=torch.float64)
    alpha, sigma = (bcast(v, x) for v in process.marginal(t))
    v = alpha**2 * toy.tau**2 + sigma**2
    p_diseased = bcast(torch.softmax(toy.logits(x_t, t), dim=1)[:, 1], x)
    grad = alpha * p_diseased * (toy.mu[0] - toy.mu[1]) / v
    expected = toy.denoiser(x_t, t) + scale * sigma**2 / alpha * grad
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("process", [DDPM(100), VPSDE(), VESDE()], ids=["ddpm", "vpsde", "vesde"])
@pytest.mark.parametrize("dims", [2, 3])
def test_hook_shift_equals_the_noise_space_formula(process, dims):
    """``x0' = x0 + s (sigma^2 / alpha) g`` is Dhariwal & Nichol's ``eps' = eps - s sigma g`` (eq. 14), and a DDIM
    step with the hook is their Algorithm 2 (``x_s = alpha_s x0' + sigma_s eps'``), for a real classifier."""
    torch.manual_seed(0)
    shape = (2, 1, *([8] * dims))
    classifier = NoisyClassifier(build_classifier(dims, **TINY_CLASSIFIER), process)
    hook = ClassifierGuidance(classifier, process, 2.5, target=1)
    x_t = torch.randn(shape) * 2
    x0_hat = torch.randn(shape)
    t = torch.tensor([0.3, 0.7])

    def shifted(x0, x, t):  # the paper's eps shift, gradient by hand
        x_in = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.log_softmax(classifier(x_in, t), 1)[:, 1].sum(), x_in)
        alpha, sigma = (bcast(v, x) for v in process.marginal(t))
        eps = (x - alpha * x0) / sigma - 2.5 * sigma * g
        return (x - sigma * eps) / alpha, eps

    expected, _ = shifted(x0_hat, x_t, t)
    torch.testing.assert_close(hook(x0_hat, x_t, t), expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(expected, x0_hat)

    # two guided DDIM steps against Algorithm 2 by hand, with a stand-in denoiser
    def denoiser(x, t):
        return 0.5 * torch.tanh(x)

    grid = process.time_grid(2, t_start=0.6).tolist()
    (a0, a1), (s0, s1) = (v.tolist() for v in process.marginal(torch.tensor(grid[:2], dtype=torch.float64)))
    start = torch.randn(shape)
    t0, t1 = (torch.full((2,), v) for v in grid[:2])
    x0_0, eps_0 = shifted(denoiser(start, t0), start, t0)
    x_1 = a1 * x0_0 + s1 * eps_0
    by_hand = shifted(denoiser(x_1, t1), x_1, t1)[0]
    torch.testing.assert_close(ddim(denoiser, start, process, 2, t_start=0.6, hook=hook), by_hand, rtol=1e-4,
                               atol=1e-5)


def _two_class_images(n: int, seed: int) -> ClassDataset:
    """Blob images; class 1 has a bright 4 x 4 square at a random place."""
    images = synthetic_images(n, [16, 16], seed=seed) * 0.5 - 0.3
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(n) % 2
    for i in torch.nonzero(classes).flatten().tolist():
        r, c = torch.randint(0, 12, (2,), generator=g).tolist()
        images[i, :, r:r + 4, c:c + 4] = 1.0
    return ClassDataset(images, classes)


def test_the_engine_trains_a_noise_aware_classifier_and_its_weights_round_trip(tmp_path):
    """Cross entropy on noised images through ``fit``: well above chance on noisy held-out images at small t."""
    torch.manual_seed(0)
    process = DDPM(100)
    net = build_classifier(2, **TINY_CLASSIFIER)
    config = TrainingConfig(steps=40, batch_size=16, lr=3e-3, lr_warmup_steps=4, objective="classification",
                            ema_decay=None, log_every=10, val_every=0, checkpoint_every=0, tensorboard=False,
                            progress=False)
    result = fit(net, process, _two_class_images(128, seed=1), config=config, out_dir=tmp_path, device="cpu",
                 val_set=_two_class_images(16, seed=5),
                 data_prep={"source": "synthetic", "size": [16, 16], "labels": {"classes": ["healthy", "lesion"]}},
                 extra_meta={"task": "classifier"})
    assert result.step == 40 and len(result.history["loss"]) == 40
    assert result.history["val_step"] == [40] and result.history["val_loss"][0] < 0.5  # ln 2 = 0.69 is chance
    denoiser, info, _ = load_checked(tmp_path)
    assert info.net["arch"] == "classifier" and info.task == "classifier"
    assert info.data_prep.labels.classes == ["healthy", "lesion"]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in denoiser.net.state_dict().items())
    test = _two_class_images(64, seed=7)
    images, classes = test.images, test.classes
    t = torch.full((64,), 0.1)
    x_t = process.noised(images, t, torch.randn(images.shape, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        accuracy = float((NoisyClassifier(denoiser.net, process)(x_t, t).argmax(1) == classes).float().mean())
    assert accuracy >= 0.8


def _classifier_recipe(**training) -> dict:
    return tiny_recipe(data={"source": "sample:lesion_classes", "size": [80, 96], "val_fraction": 0.0,
                             "holdout": [[0, 36], [40, 91]],
                             "labels": {"variants": 2, "healthy_fraction": 0.5}},
                       model=dict(TINY_CLASSIFIER), training={"objective": "classification", "steps": 2,
                                                              "batch_size": 4, "checkpoint_every": 0, **training})


def test_classification_recipes_validate_and_refuse_what_does_not_fit():
    from train_helpers import ROOT

    from medidiff.recipes import load_recipe, parse_recipe
    from medidiff.train_objectives import check_objective

    recipe = load_recipe(ROOT / "recipes" / "classifier_lesion_2d.yaml")
    assert recipe.training.objective == "classification" and recipe.data.source == "sample:lesion_classes"
    assert parse_recipe(_classifier_recipe()).training.objective == "classification"
    with pytest.raises(RecipeError, match="objective"):
        parse_recipe(_classifier_recipe(objectiv="classification"))
    with pytest.raises(RecipeError, match="sample_every"):
        parse_recipe(_classifier_recipe(sample_every=5))
    with pytest.raises(RecipeError, match="objective denoising does not train a network of arch classifier"):
        check_objective("denoising", build_classifier(2, **TINY_CLASSIFIER).config, 0)
    with pytest.raises(RecipeError, match="objective classification does not train a network of arch unet"):
        check_objective("classification", {"arch": "unet"}, 1)
    with pytest.raises(RecipeError, match="no_such_option"):
        parse_recipe(tiny_recipe(anomaly={"reconstruction": {"method": "guided", "no_such_option": 1}}, task="anomaly"))


def test_guided_options_route_and_leave_other_methods_settings_alone():
    assert route("guidance_scale") == "reconstruction.guidance_scale"
    assert route("classifier") == "reconstruction.classifier" and route("target_class") == "reconstruction.target_class"
    with pytest.raises(ValueError, match="needs a classifier"):
        HealthyOptions(method="guided")
    assert "classifier" not in AnomalySection().map_settings()["reconstruction"]  # saved thresholds stay valid
    guided = AnomalySection().updated(method="guided", classifier="c.safetensors", guidance_scale=20.0)
    assert guided.map_settings()["reconstruction"]["guidance_scale"] == 20.0
    assert guided.reconstruction.samples == 1 and healthy_nfe(guided.reconstruction, steps=5) == 10
    # the classifier's gradients are counted apart from the denoiser's evaluations (none at scale 0)
    assert healthy_evaluations(guided.reconstruction, steps=5, t_levels=[0.2, 0.4]) == (20, 10)
    assert healthy_evaluations(guided.reconstruction, steps=5, guidance_scale=0.0) == (10, 0)


class _Shrink(torch.nn.Module):
    """A stand-in denoiser on the classifier's process: ``x0_hat = 0.9 x_t``."""

    def __init__(self, process):
        super().__init__()
        self.process = process

    def forward(self, x_t, t):
        return 0.9 * x_t


def test_a_recipe_trained_classifier_guides_the_healthy_reconstruction(tmp_path, monkeypatch):
    """``sample:lesion_classes`` trains through ``run_recipe``; ``method: guided`` loads the result, equals
    ``invert`` at scale 0 and moves the image at a positive scale; a model that is not a classifier is refused."""
    import medidiff.train_segment as train_segment
    from medidiff.recipes import parse_recipe
    from medidiff.train import run_recipe

    whole = train_segment.brain_volumes
    monkeypatch.setattr(train_segment, "brain_volumes", lambda: whole(with_1mm=False))  # the bundled brain only
    result = run_recipe(parse_recipe(_classifier_recipe()), tmp_path / "clf")
    meta = json.loads((tmp_path / "clf" / "model.json").read_text())
    assert result.step == 2 and meta["net"]["arch"] == "classifier" and meta["net"]["num_classes"] == 2
    assert meta["task"] == "classifier" and meta["extra"]["classes"] == ["healthy", "lesion"]
    assert meta["data_prep"]["source"] == "sample:lesion_classes" and meta["data_prep"]["cases"] == 8

    x = torch.rand((2, 1, 80, 96), generator=torch.Generator().manual_seed(0)) * 2 - 1
    denoiser = _Shrink(DDPM(100))
    common = {"t_levels": [0.3], "steps": 3, "bf16": False}
    invert, _ = reconstruct_healthy(denoiser, x, method="invert", **common)
    guided0, spread = reconstruct_healthy(denoiser, x, method="guided", classifier=str(tmp_path / "clf"),
                                          guidance_scale=0.0, **common)
    assert torch.equal(guided0, invert) and not spread.any()
    guided, _ = reconstruct_healthy(denoiser, x, method="guided", classifier=str(tmp_path / "clf"),
                                    guidance_scale=50.0, **common)
    assert (guided - invert).abs().max() > 1e-4
    with pytest.raises(ValueError, match="process"):
        reconstruct_healthy(_Shrink(DDPM(200)), x, method="guided", classifier=str(tmp_path / "clf"), **common)
    with pytest.raises(ValueError, match="target_class"):
        reconstruct_healthy(denoiser, x, method="guided", classifier=str(tmp_path / "clf"), target_class=2, **common)
    run_recipe(parse_recipe(tiny_recipe(training={"steps": 1, "checkpoint_every": 0})), tmp_path / "den")
    with pytest.raises(ValueError, match="not a noise-aware classifier"):
        reconstruct_healthy(denoiser, x, method="guided", classifier=str(tmp_path / "den"), **common)


def test_detect_resolves_the_classifier_like_the_model_and_records_its_checksum(tmp_path, monkeypatch, capsys):
    """``medidiff detect --method guided``: a relative ``classifier`` is found as the model is (the working folder,
    else the medidiff checkout), its SHA-256 is in the run's manifest and ``detection.json``, and its gradients are
    counted in ``scores.csv``, ``metrics.json`` and the report beside the denoiser's evaluations."""
    import csv

    import numpy as np
    from anomaly_helpers import save_tiny_model, volume, write_nifti

    import medidiff.data.paths as paths
    from medidiff.cli import EXIT_DATA, main
    from medidiff.core.processes import make_process
    from medidiff.manifest import sha256_file
    from medidiff.weights import save_model

    checkout = tmp_path / "checkout"
    model = save_tiny_model(tmp_path / "model")
    save_model(checkout / "clf", build_classifier(2, **TINY_CLASSIFIER), make_process("ddpm", n_steps=50), "eps",
               {"data_prep": {"source": "test", "size": [16, 16]}, "task": "classifier"})
    monkeypatch.setattr(paths, "CHECKOUT", checkout)  # "clf" is not in the working folder, but in the checkout
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    image, brain, affine = volume((16, 16, 3))
    lesion = np.zeros_like(brain)
    lesion[6:9, 6:9, :] = 1
    write_nifti(tmp_path / "scan.nii.gz", image, affine)
    write_nifti(tmp_path / "lesion.nii.gz", lesion, affine)
    out = tmp_path / "out"
    argv = ["detect", "--model", str(model), "-i", str(tmp_path / "scan.nii.gz"), "--labels",
            str(tmp_path / "lesion.nii.gz"), "--threshold", "0.3", "--device", "cpu", "--method", "guided", "--set",
            "t_levels=[0.3]", "--set", "steps=2", "--set", "guidance_scale=10", "--quiet"]
    assert main([*argv, "-o", str(out), "--set", "classifier=clf"]) == 0
    weights = checkout / "clf" / "model.safetensors"
    digest = sha256_file(weights)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][str(weights)] == digest
    settings = json.loads((out / "detection.json").read_text())
    assert settings["classifier_sha256"] == digest and settings["reconstruction"]["classifier"] == str(checkout / "clf")
    (row,) = csv.DictReader((out / "scores.csv").open())
    assert (int(row["nfe"]), int(row["classifier_nfe"])) == (2 * 2 * 3, 2 * 3)  # 2 steps on each of 3 slices
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["nfe_per_slice"], metrics["classifier_nfe_per_slice"]) == (4, 2)
    assert "12 + 6 classifier gradients" in (out / "report.md").read_text()
    assert main([*argv, "-o", str(tmp_path / "o2"), "--set", "classifier=missing"]) == EXIT_DATA
    assert "classifier weights not found" in capsys.readouterr().err


def test_a_classifier_starts_from_a_diffusion_unets_encoder_and_learns_the_low_times_only(tmp_path, monkeypatch):
    """``training.init_from`` a U-Net of the same levels: the classifier's encoder holds its weights exactly, the head
    starts fresh; other levels are refused. ``training.max_time``: every time the loss sees is on the process's grid
    and at most ``max_time``."""
    import medidiff.train as train
    from medidiff.nets import build_unet
    from medidiff.weights import save_model

    unet = build_unet(spatial_dims=2, in_channels=1, out_channels=1, **TINY_CLASSIFIER)
    save_model(tmp_path / "u", unet, DDPM(100), "eps", {"data_prep": {"source": "synthetic"}})
    net = build_classifier(2, **TINY_CLASSIFIER)
    head = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("head.")}
    record = train.initial_weights(net, tmp_path / "u", "eps")
    saved = unet.state_dict()
    assert record["parts"] == list(train.ENCODER_PARTS) and len(record["sha256"]) == 64
    encoder = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    assert encoder and all(torch.equal(v, saved[f"net.{k}"]) for k, v in encoder.items())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in head.items())
    with pytest.raises(TrainingError, match="channels"):
        train.initial_weights(build_classifier(2, **{**TINY_CLASSIFIER, "channels": [8, 24]}), tmp_path / "u", "eps")

    seen = []
    real = train.objective_loss

    def recording(config, denoiser, x0, cond, *, t, **kw):
        seen.append(t.clone())
        return real(config, denoiser, x0, cond, t=t, **kw)

    monkeypatch.setattr(train, "objective_loss", recording)
    config = TrainingConfig(steps=6, batch_size=16, objective="classification", max_time=0.3, ema_decay=None,
                            val_every=0, checkpoint_every=0, tensorboard=False, progress=False)
    fit(net, DDPM(100), _two_class_images(32, seed=1), config=config, out_dir=tmp_path / "c", device="cpu",
        data_prep={"source": "synthetic", "size": [16, 16], "labels": {"classes": ["healthy", "lesion"]}},
        extra_meta={"task": "classifier"})
    times = torch.cat(seen)
    assert len(times) == 96 and float(times.max()) <= 0.3 + 1e-6 and float(times.min()) >= 0.01 - 1e-6
    assert torch.allclose(times * 100, (times * 100).round(), atol=1e-4) and len(times.unique()) > 10
    # the next stage of a curriculum: a classifier from the saved classifier, every weight
    again = build_classifier(2, **TINY_CLASSIFIER)
    record = train.initial_weights(again, tmp_path / "c", "eps")
    assert record["step"] == 6 and "parts" not in record
    trained = json.loads((tmp_path / "c" / "model.json").read_text())
    assert trained["net"]["arch"] == "classifier"
    from medidiff.weights import load_checked

    reference = load_checked(tmp_path / "c")[0].net.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in again.state_dict().items())
    with pytest.raises(TrainingError, match="differs from the recipe"):
        train.initial_weights(build_classifier(2, **{**TINY_CLASSIFIER, "channels": [8, 24]}), tmp_path / "c", "eps")
