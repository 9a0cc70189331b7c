"""Latent anomaly detection (Pinaya et al. 2022): masked re-denoising keeps the unmasked latents exactly, the scores,
masks and threshold maps by hand, MONAI's VQ-VAE round trip in 2D and 3D, the VQ-VAE and latent denoiser trained
from recipes, and ``medidiff detect --method latent`` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import ROOT, single_thread, tiny_recipe  # noqa: F401

from medidiff.anomaly.config import AnomalySection, HealthyOptions, route
from medidiff.anomaly.healthy import healthy_evaluations, reconstruct_healthy
from medidiff.anomaly.latent import (
    calibrate_thresholds,
    latent_healthy,
    latent_mask,
    latent_scores,
    load_thresholds,
    open_codec,
    save_thresholds,
)
from medidiff.core.processes import DDPM, VPSDE
from medidiff.core.samplers import masked_ddim
from medidiff.errors import RecipeError
from medidiff.nets import LatentCodec, build_network, build_unet, build_vqvae
from medidiff.train_objectives import vqvae_loss

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_VQVAE = {"channels": [8, 8], "num_res_channels": [8, 8], "num_embeddings": 16, "embedding_dim": 2}
TINY_LATENT = {"channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 8, "num_head_channels": 8}


class Shrink(torch.nn.Module):
    """A stand-in denoiser ``x0_hat = c x_t`` that counts the images it evaluates."""

    def __init__(self, process, c=0.5):
        super().__init__()
        self.process, self.c, self.images = process, c, 0

    def forward(self, x, t):
        self.images += x.shape[0]
        return self.c * x


def _generators(n, seed):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("dims", [2, 3])
def test_masked_re_denoising_keeps_the_unmasked_latents_exactly_and_follows_repaint_by_hand(dims):
    """The defining step: the latents outside the mask end equal to the input's (bit for bit) while the masked ones
    change; each step is DDIM on the state whose kept entries were replaced by the input noised to that step."""
    process, steps, t_start = VPSDE(), 3, 0.6
    shape = (2, 3, *([4] * dims))
    g = torch.Generator().manual_seed(0)
    known = torch.randn(shape, generator=g)
    mask = torch.rand((2, 1, *([4] * dims)), generator=g) < 0.4  # the anomalous latents
    start = torch.randn(shape, generator=g)
    denoiser = Shrink(process)
    out = masked_ddim(denoiser, start, process, steps, known=known, keep=~mask.expand(shape), t_start=t_start,
                      generator=_generators(2, 5))
    keep = ~mask.expand(shape)
    assert torch.equal(out[keep], known[keep])
    assert (out[~keep] - known[~keep]).abs().min() > 1e-3
    assert denoiser.images == 2 * steps

    # by hand: x <- keep ? a_i known + s_i z : x ; x0 = 0.5 x ; DDIM to the next time; the last step returns x0
    gens = _generators(2, 5)
    grid = process.time_grid(steps, t_start=t_start).tolist()
    alpha, sigma = (v.tolist() for v in process.marginal(torch.tensor(grid, dtype=torch.float64)))
    x = start.clone()
    for i in range(steps):
        z = torch.cat([torch.randn((1, *shape[1:]), generator=gen) for gen in gens])
        x = torch.where(keep, alpha[i] * known + sigma[i] * z, x)
        x0 = 0.5 * x
        x = x0 if i == steps - 1 else alpha[i + 1] * x0 + sigma[i + 1] * (x - alpha[i] * x0) / sigma[i]
    torch.testing.assert_close(out[~keep], x[~keep], rtol=1e-5, atol=1e-6)


def test_latent_scores_average_the_pass_predictions_and_the_masks_threshold_them():
    """``s = mean_c |mean_i x0_hat_i - z|`` over a DDIM pass from ``z_t``; ``s > T`` per position with a map, above
    the scan's own quantile without one."""
    process, t_start = DDPM(100), float(DDPM(100).snap(torch.tensor([0.4], dtype=torch.float64))[0])
    z = torch.randn((3, 2, 4, 4), generator=torch.Generator().manual_seed(1))
    score, z_t = latent_scores(Shrink(process), z, process, 2, t_start, _generators(3, 7))
    eps = torch.cat([torch.randn((1, 2, 4, 4), generator=gen) for gen in _generators(3, 7)])
    grid = process.time_grid(2, t_start=t_start).tolist()
    (a0, a1, _), (s0, s1, _) = (v.tolist() for v in process.marginal(torch.tensor(grid, dtype=torch.float64)))
    expected_zt = a0 * z + s0 * eps
    p0 = 0.5 * expected_zt
    p1 = 0.5 * (a1 * p0 + s1 * (expected_zt - a0 * p0) / s0)
    torch.testing.assert_close(z_t, expected_zt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score, ((p0 + p1) / 2 - z).abs().mean(1, keepdim=True), rtol=1e-5, atol=1e-6)

    s = torch.arange(32.0).reshape(2, 1, 4, 4)
    assert int(latent_mask(s, None, 0.75).sum()) == 8 and bool(latent_mask(s, None, 0.75)[1].flatten()[-8:].all())
    thresholds = torch.full((1, 4, 4), 20.0)
    thresholds[0, 0, 0] = -1.0
    mask = latent_mask(s, thresholds)
    assert mask.shape == s.shape and int(mask.sum()) == 11 + 2  # 21-31, and position (0, 0) of both images
    assert bool(mask[0, 0, 0, 0]) and bool(mask[1, 0, 0, 0]) and not bool(mask[1, 0, 1, 0])
    with pytest.raises(ValueError, match="grid"):
        latent_mask(s, torch.zeros((1, 2, 2)))


@pytest.mark.parametrize("dims", [2, 3])
def test_the_vqvae_round_trip_keeps_shapes_and_dtype_and_its_codes_are_codebook_vectors(dims):
    torch.manual_seed(0)
    vqvae = build_vqvae(dims, **TINY_VQVAE).eval()
    assert build_network(**vqvae.config).config == vqvae.config and vqvae.factor == 4
    size = [16, 16] if dims == 2 else [8, 8, 8]
    x = torch.rand((2, 1, *size), generator=torch.Generator().manual_seed(2)) * 2 - 1
    codes = vqvae.encode(x)
    assert codes.shape == (2, 2, *[s // 4 for s in size]) and codes.dtype == torch.float32
    book = vqvae.net.quantizer.quantizer.embedding.weight  # (16, 2)
    flat = codes.movedim(1, -1).reshape(-1, 2)
    assert bool((torch.cdist(flat, book).min(dim=1).values < 1e-6).all())  # every latent is one of the 16 codes
    assert torch.equal(vqvae.snap(codes), codes)
    with torch.no_grad():
        image = vqvae.decode(codes)
        reconstruction, commitment = vqvae(x)
    assert image.shape == x.shape and image.dtype == torch.float32
    torch.testing.assert_close(reconstruction, image, rtol=1e-5, atol=1e-6)  # straight-through = the codes
    codec = LatentCodec(vqvae, scale=2.5)
    torch.testing.assert_close(codec.encode(x), 2.5 * codes)
    assert torch.equal(codec.decode(codec.encode(x)), image) and not codec.training

    # the objective: mean |x - x'| (or squared) plus the commitment loss MONAI returns
    vqvae = build_vqvae(dims, **TINY_VQVAE).train()  # (the codec froze the other one)
    before = vqvae.net.quantizer.quantizer.embedding.weight.clone()
    vqvae_loss(vqvae, x, "l2").backward()
    assert not torch.equal(before, vqvae.net.quantizer.quantizer.embedding.weight)  # the EMA codebook moved
    assert vqvae.net.encoder.blocks[0].conv.weight.grad.abs().sum() > 0  # the straight-through gradient reaches it
    vqvae.eval()
    with torch.no_grad():
        reconstruction, commitment = vqvae(x)
        l1, l2 = vqvae_loss(vqvae, x, "l1"), vqvae_loss(vqvae, x, "l2")
    assert float(commitment) > 0
    torch.testing.assert_close(l1, (reconstruction - x).abs().mean() + commitment)
    torch.testing.assert_close(l2, (reconstruction - x).square().mean() + commitment)


def _latent_model(tmp_path, dims=2):
    """A tiny VQ-VAE and a latent denoiser recording it, saved as training saves them."""
    from medidiff.core.processes import make_process
    from medidiff.manifest import sha256_file
    from medidiff.weights import save_model

    torch.manual_seed(0)
    vqvae = build_vqvae(dims, **TINY_VQVAE)
    size = [16] * dims
    prep = {"source": "test", "orientation": "RAS", "spacing_mm": [2.0] * dims, "size": size,
            "intensity": {"method": "percentile", "percentiles": [0.5, 99.5], "low": 0.0, "high": 100.0},
            **({"slicing_axis": 2} if dims == 2 else {})}
    process = make_process("ddpm", n_steps=50)
    weights = save_model(tmp_path / "vq", vqvae, process, "eps", {"data_prep": prep, "task": "autoencoder"})
    record = {"name": weights.name, "path": "vq", "sha256": sha256_file(weights), "scale": 2.0, "embedding_dim": 2,
              "factor": 4}
    save_model(tmp_path / "latent", build_unet(dims, in_channels=2, **TINY_LATENT), process, "eps",
               {"data_prep": prep, "autoencoder": record})
    return tmp_path / "latent", vqvae.eval()


def test_method_latent_heals_only_what_its_mask_lets_it_and_counts_its_evaluations(tmp_path):
    """With nothing masked (an infinite map) every sample is the decoded input codes; with everything masked it is
    not; the per-scan rule lies between; the network evaluations are ``2 k`` per sample and level."""
    from medidiff.weights import load_checked

    model, vqvae = _latent_model(tmp_path)
    denoiser, info, _ = load_checked(model)
    opts = HealthyOptions(method="latent", autoencoder=str(tmp_path / "vq"), t_levels=[0.3, 0.5], steps=3,
                          n_samples=2, bf16=False, batch_size=3)
    codec, digest = open_codec(opts, info)
    x = torch.rand((2, 1, 16, 16), generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        decoded = vqvae.decode(vqvae.encode(x))
    grid = (1, 4, 4)
    kept, spread = latent_healthy(denoiser, x, opts, codec=codec, thresholds=torch.full(grid, float("inf")))
    torch.testing.assert_close(kept, decoded, rtol=0, atol=1e-6)  # (decoded in other batches: rounding only)
    assert float(spread.abs().max()) < 1e-6
    healed, spread = latent_healthy(denoiser, x, opts, codec=codec, thresholds=torch.full(grid, -1.0))
    assert (healed - decoded).abs().mean() > 1e-3 and spread.any()
    counter = Shrink(denoiser.process, 0.9)
    rule, _ = reconstruct_healthy(counter, x, opts, codec=codec, seed=3)
    assert counter.images == len(x) * healthy_evaluations(opts).denoiser == 2 * 2 * 3 * 2 * 2
    assert rule.shape == x.shape and not torch.equal(rule, decoded)
    again, _ = reconstruct_healthy(counter, x, opts, codec=codec, seed=3)
    assert torch.equal(rule, again)

    # a threshold map: the quantile of the healthy scores per position, saved and read back without pickles
    thresholds, record = calibrate_thresholds(Shrink(denoiser.process, 0.9), [x, x[:1]], opts, codec=codec, seed=2)
    assert thresholds.shape == grid and record["n_scores"] == (2 + 1) * 2 * 2 and record["quantile"] == 0.95
    path = save_thresholds(tmp_path / "map.safetensors", thresholds, record)
    loaded, saved = load_thresholds(path)
    assert torch.equal(loaded, thresholds) and saved == record
    with pytest.raises(ValueError, match="needs the model's VQ-VAE"):
        reconstruct_healthy(denoiser, x, opts)
    with pytest.raises(ValueError, match="ddim or ddpm"):
        reconstruct_healthy(denoiser, x, opts, codec=codec, sampler="heun")
    other = tmp_path / "other"
    from medidiff.weights import save_model

    save_model(other, build_vqvae(2, **{**TINY_VQVAE, "num_embeddings": 8}), denoiser.process, "eps",
               {"data_prep": {"source": "test"}})
    with pytest.raises(ValueError, match="is not the VQ-VAE the model was trained on"):
        open_codec(opts.model_copy(update={"autoencoder": str(other)}), info)
    plain = info.model_copy(update={"autoencoder": None})
    with pytest.raises(ValueError, match="needs a latent diffusion model"):
        open_codec(opts, plain)


def test_method_latent_in_3d_keeps_the_unmasked_volume_and_heals_the_masked_one(tmp_path):
    from medidiff.weights import load_checked

    model, vqvae = _latent_model(tmp_path, dims=3)
    denoiser, info, _ = load_checked(model)
    opts = HealthyOptions(method="latent", t_levels=[0.4], steps=2, n_samples=1, bf16=False)
    codec, _ = open_codec(opts.model_copy(update={"autoencoder": str(tmp_path / "vq")}), info)
    x = torch.rand((1, 1, 16, 16, 16), generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        decoded = vqvae.decode(vqvae.encode(x))
    kept, _ = latent_healthy(denoiser, x, opts, codec=codec, thresholds=torch.full((1, 4, 4, 4), float("inf")))
    torch.testing.assert_close(kept, decoded, rtol=0, atol=1e-6)
    healed, _ = reconstruct_healthy(denoiser, x, opts, codec=codec)  # the per-scan rule: 5 % of 64 latents
    assert healed.shape == x.shape and (healed - decoded).abs().max() > 1e-4


def test_latent_options_route_and_leave_other_methods_settings_alone():
    assert route("latent_thresholds") == "reconstruction.latent_thresholds"
    assert route("autoencoder") == "reconstruction.autoencoder"
    assert "latent_quantile" not in AnomalySection().map_settings()["reconstruction"]  # saved thresholds stay valid
    section = AnomalySection().updated(method="latent", latent_quantile=0.9)
    assert section.map_settings()["reconstruction"]["latent_quantile"] == 0.9
    assert section.reconstruction.samples == section.reconstruction.n_samples
    assert healthy_evaluations(section.reconstruction, steps=4, n_samples=3) == (24, 0)
    with pytest.raises(ValueError):
        HealthyOptions(method="latent", latent_quantile=1.0)


def test_the_vqvae_recipe_trains_and_its_weights_load(tmp_path, monkeypatch):
    """``recipes/vqvae_brain_2d.yaml`` with tiny settings: a few steps on the IXI brains write a VQ-VAE that loads
    with its weights, and only objective vqvae trains arch vqvae."""
    from medidiff.recipes import load_recipe, parse_recipe
    from medidiff.train import run_recipe
    from medidiff.train_objectives import check_objective
    from medidiff.weights import load_autoencoder

    tiny = ["model.channels=[8, 8]", "model.num_res_blocks=1", "model.num_embeddings=16", "training.steps=2",
            "training.batch_size=4", "training.val_every=0", "training.checkpoint_every=0", "training.ema_decay=null",
            "data.augment=null", "device=cpu"]
    recipe = load_recipe(ROOT / "recipes" / "vqvae_brain_2d.yaml", overrides=tiny)
    result = run_recipe(recipe, tmp_path / "vq")
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.history["loss"])))
    vqvae, info, _ = load_autoencoder(tmp_path / "vq")
    assert info.task == "autoencoder" and info.net["arch"] == "vqvae" and vqvae.embedding_dim == 3
    assert info.data_prep.source == "path" and info.data_prep.size == [80, 96]  # the IXI datalist
    from safetensors.torch import load_file

    assert all(torch.equal(v, load_file(tmp_path / "vq" / "model.safetensors")[k])
               for k, v in vqvae.state_dict().items())
    with pytest.raises(RecipeError, match="objective denoising does not train a network of arch vqvae"):
        check_objective("denoising", vqvae.config, 0)
    with pytest.raises(RecipeError, match="sample_every"):
        parse_recipe(tiny_recipe(model={"arch": "vqvae"}, training={"objective": "vqvae", "sample_every": 5}))
    with pytest.raises(RecipeError, match="autoencoder belongs to the denoising objective"):
        parse_recipe(tiny_recipe(training={"objective": "classification", "autoencoder": "vq"}))


def test_the_latent_recipe_trains_on_the_codes_of_a_frozen_vqvae_and_records_it(tmp_path):
    """A tiny VQ-VAE from a recipe, then ``recipes/latent_brain_2d.yaml`` with tiny settings on its codes: the latent
    model's ``model.json`` names the VQ-VAE with its SHA-256 and the scale ``1 / std`` of the first images' codes, its
    channels are the codes', and the VQ-VAE's weights are unchanged by the run."""
    from medidiff.manifest import sha256_file
    from medidiff.recipes import load_recipe, parse_recipe
    from medidiff.train import LATENT_SCALE_IMAGES, run_recipe
    from medidiff.train_data import build_data
    from medidiff.weights import load_autoencoder, load_checked

    vq_recipe = tiny_recipe(model={"arch": "vqvae", "channels": [8, 8], "num_embeddings": 16, "embedding_dim": 2},
                            training={"objective": "vqvae", "steps": 3, "checkpoint_every": 0, "val_every": 0})
    run_recipe(parse_recipe(vq_recipe), tmp_path / "vq")
    digest = sha256_file(tmp_path / "vq" / "model.safetensors")
    vqvae, _, _ = load_autoencoder(tmp_path / "vq")

    tiny = ["data.source=synthetic", "data.size=[16, 16]", "data.num_samples=24", "data.holdout=[]",
            "data.augment=null", "model.channels=[8, 16]", "model.attention_levels=[false, false]",
            "model.norm_num_groups=8", "model.num_head_channels=8", "model.num_res_blocks=1", "training.steps=2",
            "training.batch_size=4", "training.val_every=0", "training.checkpoint_every=0",
            "training.sample_every=2", "training.sample_count=2", "training.sample_steps=2",
            f"training.autoencoder={tmp_path / 'vq'}", "device=cpu", "seed=3"]
    recipe = load_recipe(ROOT / "recipes" / "latent_brain_2d.yaml", overrides=tiny)
    result = run_recipe(recipe, tmp_path / "latent")
    assert result.step == 2 and model_file(tmp_path / "vq") in result.inputs
    denoiser, info, _ = load_checked(tmp_path / "latent")
    record = info.autoencoder
    assert (record.name, record.path, record.sha256) == ("model.safetensors", str(tmp_path / "vq"), digest)
    bundle = build_data(recipe.data, recipe.seed)
    first = torch.stack([bundle.train[i]["image"] for i in range(min(len(bundle.train), LATENT_SCALE_IMAGES))])
    assert record.scale == pytest.approx(1.0 / float(vqvae.encode(first).std()), rel=1e-6)
    assert (record.embedding_dim, record.factor) == (2, 4) and info.net["in_channels"] == 2
    assert info.data_prep.size == [16, 16]  # detection prepares images, the codec makes the latents
    assert sha256_file(tmp_path / "vq" / "model.safetensors") == digest
    assert (tmp_path / "latent" / "samples" / "step_0000002.png").is_file()  # decoded samples
    with pytest.raises(RecipeError, match="not divisible by the VQ-VAE's factor"):
        run_recipe(load_recipe(ROOT / "recipes" / "latent_brain_2d.yaml", overrides=[*tiny, "data.size=[18, 18]"]),
                   tmp_path / "bad")


def model_file(folder):
    return folder / "model.safetensors"


def test_detect_method_latent_end_to_end(tmp_path, monkeypatch, capsys):
    """``medidiff detect --method latent``: the VQ-VAE found beside the latent model from its record, the latent
    threshold map calibrated on the healthy scans and written, heatmap, healthy image and mask per case, the VQ-VAE's
    and the map's SHA-256 in ``detection.json`` and the VQ-VAE in the manifest's inputs; a model without an
    autoencoder is refused."""
    import numpy as np
    from anomaly_helpers import save_tiny_model, volume, write_nifti

    from medidiff.cli import EXIT_ERROR, main
    from medidiff.manifest import sha256_file

    model, _ = _latent_model(tmp_path)
    image, _, affine = volume((16, 16, 3))
    lesioned = image.copy()
    lesioned[6:10, 6:10, :] = 140.0
    write_nifti(tmp_path / "scan.nii.gz", lesioned, affine)
    (tmp_path / "healthy").mkdir()
    for k in range(2):
        write_nifti(tmp_path / "healthy" / f"h{k}.nii.gz", volume((16, 16, 3), seed=k + 1)[0], affine)
    out = tmp_path / "out"
    argv = ["detect", "--model", str(model), "-i", str(tmp_path / "scan.nii.gz"), "--device", "cpu", "--method",
            "latent", "--set", "t_levels=[0.4]", "--set", "steps=2", "--set", "n_samples=2", "--set", "erode=0",
            "--set", "median_size=3", "--quiet"]
    assert main([*argv, "-o", str(out), "--calibration", str(tmp_path / "healthy")]) == 0
    for kind in ("heatmap", "healthy", "anomaly_mask"):
        assert (out / f"scan_{kind}.nii.gz").is_file()
    thresholds, record = load_thresholds(out / "latent_thresholds.safetensors")
    assert thresholds.shape == (1, 4, 4) and record["cases"] == ["h0", "h1"]
    assert record["n_scores"] == 2 * 3 * 2  # scans x slices x seeds
    settings = json.loads((out / "detection.json").read_text())
    digest = sha256_file(tmp_path / "vq" / "model.safetensors")
    assert settings["autoencoder_sha256"] == digest
    assert settings["reconstruction"]["autoencoder"] == str(tmp_path / "vq")  # found beside the latent model
    assert settings["latent_thresholds_sha256"] == sha256_file(out / "latent_thresholds.safetensors")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][str(tmp_path / "vq" / "model.safetensors")] == digest
    import nibabel as nib

    heat = np.asarray(nib.load(out / "scan_heatmap.nii.gz").dataobj)
    assert heat.shape == (16, 16, 3) and np.isfinite(heat).all() and heat.max() > 0

    # the map given back, and the per-scan rule without one
    assert main([*argv, "-o", str(tmp_path / "o2"), "--threshold", "0.3", "--set",
                 f"latent_thresholds={out / 'latent_thresholds.safetensors'}"]) == 0
    assert main([*argv, "-o", str(tmp_path / "o3"), "--threshold", "0.3"]) == 0
    assert (tmp_path / "o3" / "scan_anomaly_mask.nii.gz").is_file()
    assert not (tmp_path / "o3" / "latent_thresholds.safetensors").exists()
    capsys.readouterr()
    plain = save_tiny_model(tmp_path / "plain")
    argv[2] = str(plain)
    assert main([*argv, "-o", str(tmp_path / "o4"), "--threshold", "0.3"]) == EXIT_ERROR
    assert "needs a latent diffusion model" in capsys.readouterr().err
