"""The training engine: learning-rate schedule, data order, loss going down in 2D and 3D, NaN stops, weights files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import TINY_MODEL, single_thread  # noqa: F401

from medidiff.core.processes import make_process
from medidiff.errors import ModelError, TrainingError
from medidiff.nets import build_unet
from medidiff.runtime import Dist
from medidiff.train import TrainingConfig, _Batches, find_checkpoint, fit, lr_factor
from medidiff.train_data import TensorDataset, split, synthetic_images
from medidiff.weights import load_denoiser, save_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _net(dims: int = 2, **kw):
    torch.manual_seed(0)
    return build_unet(dims, **{**TINY_MODEL, **kw})


def _config(**kw) -> TrainingConfig:
    base = {"steps": 12, "batch_size": 4, "lr": 2e-3, "log_every": 4, "val_every": 0, "checkpoint_every": 0,
            "tensorboard": False, "progress": False}
    return TrainingConfig(**{**base, **kw})


def test_lr_factor_warmup_then_cosine_or_constant():
    kw = {"warmup": 4, "total": 12}
    assert [lr_factor(s, schedule="cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, schedule="cosine", **kw) == 1.0
    assert lr_factor(8, schedule="cosine", **kw) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(12, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12, schedule="cosine", min_ratio=0.1, **kw) == pytest.approx(0.1)
    assert lr_factor(10, schedule="constant", **kw) == 1.0
    assert lr_factor(0, warmup=0, total=10, schedule="cosine") == 1.0


def test_data_order_depends_only_on_seed_and_epoch():
    data = TensorDataset(torch.arange(10.0).reshape(10, 1, 1, 1))
    stream = _Batches(data, 3, seed=5, dist_=Dist())
    assert stream.per_epoch == 3  # 10 items: three full batches, the rest dropped
    seen = [next(stream)["image"].flatten().tolist() for _ in range(7)]
    resumed = _Batches(data, 3, seed=5, dist_=Dist(), epoch=1, position=1)  # after 4 batches
    assert [next(resumed)["image"].flatten().tolist() for _ in range(3)] == seen[4:]
    assert sorted(sum(seen[:3], [])) != sorted(sum(seen[3:6], [])) or seen[:3] != seen[3:6]  # reshuffled
    other = _Batches(data, 3, seed=6, dist_=Dist())
    assert [next(other)["image"].flatten().tolist() for _ in range(3)] != seen[:3]


@pytest.mark.parametrize("dims", [2, 3])
def test_loss_goes_down_on_toy_data(tmp_path, dims):
    size = [16, 16] if dims == 2 else [8, 8, 8]
    train, val = split(TensorDataset(synthetic_images(40, size, seed=1)), 0.2, seed=1)
    steps = 40 if dims == 2 else 30
    result = fit(_net(dims), make_process("ddpm", n_steps=100), train, val_set=val, out_dir=tmp_path,
                 config=_config(steps=steps, batch_size=8 if dims == 2 else 4, val_every=10, lr_warmup_steps=3),
                 device="cpu", seed=0)
    loss = result.history["loss"]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    val_loss = result.history["val_loss"]
    assert len(val_loss) == steps // 10 and val_loss[-1] < val_loss[0]
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["net"]["spatial_dims"] == dims and meta["weights"] == "ema" and meta["step"] == steps


class _NaNAfter(torch.utils.data.Dataset):
    """Good images for the first ``good`` items fetched, then NaN ones."""

    def __init__(self, images: torch.Tensor, good: int):
        self.images, self.good, self.calls = images, good, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.calls += 1
        image = self.images[i]
        return {"image": image if self.calls <= self.good else torch.full_like(image, math.nan)}


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    k, batch = 4, 4
    data = _NaNAfter(synthetic_images(16, [16, 16], seed=2), good=k * batch)
    with pytest.raises(TrainingError) as err:
        fit(_net(), make_process("ddpm", n_steps=100), data, out_dir=tmp_path, device="cpu",
            config=_config(steps=10, batch_size=batch, checkpoint_every=2))
    text = str(err.value)
    assert f"step {k + 1}" in text and "nan" in text.lower()
    assert "lower training.lr" in text and "NaN" in text and "step_0000004.pt" in text
    path, state = find_checkpoint(tmp_path)
    assert path.name == "step_0000004.pt" and state["step"] == k
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    denoiser, meta = load_denoiser(tmp_path)  # the weights written with that checkpoint are whole
    assert meta.step == k


def test_refuses_a_folder_with_checkpoints_unless_resuming(tmp_path):
    data = TensorDataset(synthetic_images(8, [16, 16], seed=0))
    fit(_net(), make_process("ddpm", n_steps=50), data, out_dir=tmp_path, config=_config(steps=2), device="cpu")
    with pytest.raises(TrainingError, match="--resume"):
        fit(_net(), make_process("ddpm", n_steps=50), data, out_dir=tmp_path, config=_config(steps=2), device="cpu")


def test_weights_round_trip_and_clear_errors(tmp_path):
    net = _net()
    process = make_process("vpsde", beta_max=15.0)
    path = save_model(tmp_path / "w", net, process, "v", {"data_prep": {"source": "test", "slicing_axis": 2}})
    denoiser, meta = load_denoiser(tmp_path / "w")
    assert meta.data_prep.slicing_axis == 2 and meta.data_prep.source == "test" and meta.process["beta_max"] == 15.0
    assert denoiser.prediction == "v" and not denoiser.training
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 0.7])
    from medidiff.core.denoiser import Denoiser

    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, t), Denoiser(net.eval(), process, "v")(x, t), rtol=0, atol=0)
    _, meta_file = load_denoiser(path)  # the .safetensors path works too
    assert meta_file == meta

    with pytest.raises(ModelError, match="not found"):
        load_denoiser(tmp_path / "missing")
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="model.safetensors"):
        load_denoiser(tmp_path / "w")
    with pytest.raises(ModelError, match="no data_prep"):  # a model that says nothing of its data is refused
        save_model(tmp_path / "w", net, process, "v")
    save_model(tmp_path / "w", net, process, "v", {"data_prep": {"source": "test"}})
    config = json.loads((tmp_path / "w" / "model.json").read_text())
    del config["data_prep"]
    (tmp_path / "w" / "model.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no data_prep"):
        load_denoiser(tmp_path / "w")
    config["data_prep"] = {"source": "test", "intensity": {"method": "gamma"}}  # a record of another layout
    (tmp_path / "w" / "model.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="data_prep.intensity"):
        load_denoiser(tmp_path / "w")
    config["data_prep"] = {"source": "test"}
    config["net"]["channels"] = [16, 32]
    config["net"]["num_head_channels"] = 16
    (tmp_path / "w" / "model.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="do not fit"):
        load_denoiser(tmp_path / "w")


def test_recipe_options_reach_the_loss(tmp_path):
    """v-prediction, Min-SNR weighting, accumulation and simplex noise (where medidiff.core.noise has it)."""
    from medidiff.core import noise

    data = TensorDataset(synthetic_images(8, [16, 16], seed=0))
    config = _config(steps=2, grad_accum_steps=2, loss_weighting="min_snr", noise="simplex", noise_options={})

    def run():
        return fit(_net(), make_process("vpsde"), data, out_dir=tmp_path, config=config, prediction="v", device="cpu")

    if not hasattr(noise, "noise_like"):
        with pytest.raises(TrainingError, match="training.noise"):
            run()
        return
    result = run()
    meta = json.loads((tmp_path / "model.json").read_text())
    assert result.step == 2 and all(math.isfinite(v) for v in result.history["loss"])
    assert meta["prediction"] == "v" and meta["noise"]["kind"] == "simplex" and meta["loss_weighting"] == "min_snr"


def test_fine_tuning_starts_from_the_saved_weights_and_records_them(tmp_path):
    """``training.init_from``: step 0 holds the saved weights exactly; a different network is refused."""
    from safetensors.torch import load_file
    from train_helpers import tiny_recipe

    from medidiff.recipes import parse_recipe
    from medidiff.train import initial_weights, run_recipe

    first = run_recipe(parse_recipe(tiny_recipe(training={"steps": 4})), tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    recipe = parse_recipe(tiny_recipe(training={"steps": 4, "init_from": str(tmp_path / "a")}))
    net = recipe.model.build(spatial_dims=2, in_channels=1, cond_channels=0)
    record = initial_weights(net, tmp_path / "a", "eps")
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    assert record["name"] == "model.safetensors" and record["step"] == first.step == 4 and len(record["sha256"]) == 64
    result = run_recipe(recipe, tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    assert meta["init_from"] == record and tmp_path / "a" / "model.safetensors" in result.inputs
    wider = parse_recipe(tiny_recipe(model={"channels": [8, 24]}))
    with pytest.raises(TrainingError, match="differs from the recipe"):
        initial_weights(wider.model.build(spatial_dims=2, in_channels=1, cond_channels=0), tmp_path / "a", "eps")
    with pytest.raises(TrainingError, match="predicts 'eps'"):
        initial_weights(net, tmp_path / "a", "v")
    # a class-conditional network starts from the unconditional one: shared weights copied, class embeddings zero,
    # so every class (the null class too) predicts exactly what the saved model does
    conditional = recipe.model.model_copy(update={"class_conditional": True}).build(
        spatial_dims=2, in_channels=1, cond_channels=0, classes=2)
    record = initial_weights(conditional, tmp_path / "a", "eps")
    assert record["zero_initialised"] == ["net.class_embedding.weight"]
    assert all(torch.equal(v, saved[k]) for k, v in conditional.state_dict().items() if "class_embedding" not in k)
    x, t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500, 900])
    with torch.no_grad():
        for c in range(3):
            assert torch.allclose(conditional(x, t, class_labels=torch.full((3,), c)), net(x, t), atol=1e-6)
