"""Recipes: schema, misspelt keys with suggestions, overrides, dispatch, and the training data sources."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import ROOT, tiny_recipe

from medidiff import recipes, runs
from medidiff.errors import RecipeError
from medidiff.results import TaskResult
from medidiff.train_data import DataConfig, build_data, synthetic_images


def _write(tmp_path: Path, raw: dict | str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", ["train_tiny_2d.yaml", "train_tiny_3d.yaml", "train_brain_2d.yaml"])
def test_example_recipes_validate(name):
    recipe = recipes.load_recipe(ROOT / "recipes" / name)
    assert recipe.task == "train"
    assert len(recipe.data.size) == recipe.data.spatial_dims


def test_misspelt_section_names_file_and_suggests(tmp_path):
    raw = tiny_recipe()
    raw["trainng"] = raw.pop("training")
    path = _write(tmp_path, raw)
    with pytest.raises(RecipeError) as err:
        recipes.load_recipe(path)
    assert str(path) in str(err.value)
    assert "unknown key 'trainng'" in str(err.value) and "did you mean 'training'" in str(err.value)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("training.lr_warmup", 10, "did you mean 'training.lr_warmup_steps'"),
    ("data.sise", [8, 8], "did you mean 'data.size'"),
    ("model.chanels", [8, 16], "did you mean 'model.channels'"),
    ("training.size", [8, 8], "'size' belongs under 'data.size'"),
    ("training.zzz", 1, "valid keys here: steps, batch_size"),
])
def test_unknown_keys_are_named_with_their_dotted_path(tmp_path, key, value, message):
    section, leaf = key.split(".")
    raw = tiny_recipe()
    raw[section][leaf] = value
    with pytest.raises(RecipeError, match="unknown key") as err:
        recipes.load_recipe(_write(tmp_path, raw))
    assert f"'{key}'" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize(("override", "where"), [
    ("training.lr=-1", "'training.lr'"),
    ("data.size=[16, 16, 16]", "size [16, 16, 16] has 3 entries"),
    ("model.norm_num_groups=3", "norm_num_groups=3 must divide"),
    ("model.num_head_channels=32", "num_head_channels=32 must divide"),
    ("process.sigma_min=0.1", "sigma_min do(es) not apply to process 'ddpm'"),
    ("process.schedule=cosine", None),  # valid
    ("task=sgement", "'task'"),
    ("training.precision=fp8", "'training.precision'"),
])
def test_invalid_values_are_named(override, where):
    if where is None:
        assert recipes.parse_recipe(tiny_recipe(), overrides=[override]).process.schedule == "cosine"
        return
    with pytest.raises(RecipeError) as err:
        recipes.parse_recipe(tiny_recipe(), source="r.yaml", overrides=[override])
    assert where in str(err.value) and "r.yaml" in str(err.value)


def test_overrides_are_yaml_typed_and_applied_before_validation():
    recipe = recipes.parse_recipe(tiny_recipe(), overrides=[
        "training.lr=1e-4", "data.size=[32, 32]", "model.attention_levels=[false, true]", "seed=7",
        "process.name=vesde", "process.n_steps=null", "process.sigma_max=20", "training.ema_decay=null",
        "anomaly.reconstruction.t_levels=[0.25]",
    ])
    assert recipe.training.lr == pytest.approx(1e-4) and isinstance(recipe.training.lr, float)
    assert recipe.data.size == [32, 32] and recipe.model.attention_levels == [False, True] and recipe.seed == 7
    assert recipe.training.ema_decay is None
    assert recipe.process.build().config() == {"name": "vesde", "sigma_min": 0.01, "sigma_max": 20.0, "t_min": 1e-5}
    assert recipe.anomaly.reconstruction.t_levels == [0.25]  # task sections are defined by their tasks
    for bad in ["training.lr", "=3", "training..lr=1", "seed.x=1"]:
        with pytest.raises(RecipeError, match="--set"):
            recipes.parse_recipe(tiny_recipe(), overrides=[bad])


def test_resolved_recipe_round_trips():
    recipe = recipes.parse_recipe(tiny_recipe(3))
    again = recipes.parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    assert recipes.parse_recipe(None) == recipes.Recipe()  # an empty recipe is all defaults


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        recipes.load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        recipes.load_recipe(_write(tmp_path, "training: [unclosed"))
    with pytest.raises(RecipeError, match="mapping"):
        recipes.load_recipe(_write(tmp_path, "- a\n- b\n"))


def test_dispatch_through_the_task_table(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="task 'registration' is not available"):
        recipes.parse_recipe({"task": "registration"})
    seen = {}

    def fake(section, out_dir, *, seed, device):
        seen["args"] = (section.inputs, out_dir, seed, device)
        output = out_dir / "anomaly_result.txt"
        output.write_text("done")
        return TaskResult(outputs=[output], summary="ok")

    import types

    monkeypatch.setitem(sys.modules, "fake_task", types.SimpleNamespace(run=fake))
    monkeypatch.setitem(runs.TASKS, "anomaly", "fake_task:run")
    recipe = recipes.parse_recipe({"task": "anomaly", "seed": 3, "device": "cpu", "anomaly": {"inputs": "x.nii.gz"},
                                   "training": {"steps": 7}})
    runs.run(recipe, tmp_path / "b")
    assert seen["args"] == ("x.nii.gz", tmp_path / "b", 3, "cpu")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["task"] == "anomaly"
    assert list(manifest["outputs"]) == ["anomaly_result.txt"] and manifest["end_time"]
    saved = yaml.safe_load((tmp_path / "b" / "recipe.yaml").read_text())
    # the saved recipe holds what applies to the run: no training sections in a detection run
    assert set(saved) == {"task", "description", "seed", "device", "anomaly"}
    assert saved["anomaly"]["inputs"] == "x.nii.gz" and saved["anomaly"]["reconstruction"]["n_samples"] == 24
    with pytest.raises(RecipeError, match="does not train"):
        runs.train(recipe, tmp_path / "c")
    train = recipes.parse_recipe({"task": "train"})
    assert set(train.applicable()) == {"task", "description", "seed", "device", "data", "model", "process",
                                       "training"}


def test_task_sections_forbid_unknown_keys():
    with pytest.raises(RecipeError, match="belongs under 'anomaly.reconstruction.t_levels'"):
        recipes.parse_recipe({"task": "anomaly", "anomaly": {"t_levels": [0.5]}})
    with pytest.raises(RecipeError, match="anomaly.map.median_sise"):
        recipes.parse_recipe({"task": "anomaly", "anomaly": {"map": {"median_sise": 3}}})


def test_synthetic_data_is_seeded_in_range_and_split(tmp_path):
    a, b = synthetic_images(6, [8, 8, 8], 2, seed=4), synthetic_images(6, [8, 8, 8], 2, seed=4)
    assert a.shape == (6, 2, 8, 8, 8) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
    assert not torch.equal(a, synthetic_images(6, [8, 8, 8], 2, seed=5))
    bundle = build_data(DataConfig(size=[16, 16], num_samples=20, val_fraction=0.25), seed=1)
    assert len(bundle.train) == 15 and len(bundle.val) == 5 and bundle.channels == 1
    assert not set(bundle.train.indices) & set(bundle.val.indices)
    assert bundle.train[0]["image"].shape == (1, 16, 16)


def test_unknown_source_suggests_a_known_one():
    with pytest.raises(RecipeError, match="Did you mean 'sample:brain'"):
        build_data(DataConfig(source="sample:brian"), seed=0)


def test_brain_sample_source():
    sample = pytest.importorskip("medidiff.data.sample")
    try:
        sample.data_dir()
    except Exception:
        pytest.skip("bundled brain sample not present")
    bundle = build_data(DataConfig(source="sample:brain", size=[80, 96], val_fraction=0.1), seed=0)
    images = torch.stack([bundle.train[i]["image"] for i in range(len(bundle.train))])
    assert images.shape[1:] == (1, 80, 96) and len(bundle.train) + len(bundle.val) == 58
    assert images.min() == -1 and images.max() == 1
    assert bundle.data_prep["orientation"] == "RAS" and bundle.data_prep["slicing_axis"] == 2
    assert bundle.inputs and bundle.inputs[0].is_file()
    # the reference quantiles that detection matches new scans to: those of the training brain voxels
    intensity = bundle.data_prep["intensity"]
    median = intensity["reference"][intensity["reference_levels"].index(0.5)]
    assert abs(median - float(images[images > -1].median())) < 0.03
    with pytest.raises(RecipeError, match="spatial_dims"):
        build_data(DataConfig(source="sample:brain", spatial_dims=3, size=[8, 8, 8]), seed=0)


def test_path_source_reads_volumes_as_slices_or_volumes(tmp_path):
    nib = pytest.importorskip("nibabel")
    import numpy as np

    for i in range(4):
        volume = synthetic_images(1, [12, 14, 6], seed=i)[0, 0].numpy() * 100 + 200  # MRI-like units
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([1.5, 1.5, 3.0, 1.0])),
                 tmp_path / f"case{i}.nii.gz")
    two = build_data(DataConfig(source=str(tmp_path), size=[16, 16], val_fraction=0.25, min_foreground=0), seed=0)
    assert two.channels == 1 and two.data_prep["cases"] == 4 and len(two.inputs) == 4
    assert len(two.train) == 3 * 6 and len(two.val) == 6  # split by case: no slice of a case on both sides
    assert {int(two.train[i]["volume"]) for i in range(18)} == {0, 1, 2}
    image = two.train[0]["image"]
    assert image.shape == (1, 16, 16) and image.min() >= -1.5 and image.max() <= 1.5
    assert float(image.min()) == -1.0  # padded about the 12 x 14 plane
    reference = two.data_prep["intensity"]["reference"]
    assert len(reference) == len(two.data_prep["intensity"]["reference_levels"]) and reference == sorted(reference)
    three = build_data(DataConfig(source=str(tmp_path), spatial_dims=3, size=[8, 8, 8], val_fraction=0.25), seed=0)
    assert len(three.train) == 3 and len(three.val) == 1 and three.train[0]["image"].shape == (1, 8, 8, 8)
