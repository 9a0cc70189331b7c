"""The anomaly benchmark on other subjects: its cases, the calibration region and the per-polarity metrics."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from script_helpers import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_anomaly_subjects.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH, "bench_anomaly_subjects_under_test")


@pytest.fixture(scope="module")
def template_case(bench):
    return bench.build_case(bench.template_subject("test"), 0)


def test_case_has_both_polarities_inside_the_brain(bench, template_case):
    label, brain = template_case["label"], template_case["brain"]
    assert set(np.unique(label)) == {0, bench.BRIGHT, bench.DARK}
    assert not label[~brain].any(), "a lesion voxel outside the brain mask"
    source = np.asarray(nib.load(str(bench.template_subject("test")["image"])).dataobj, np.float32)
    changed = template_case["image"] - source
    assert changed[label == bench.BRIGHT].mean() > 0 > changed[label == bench.DARK].mean()


def test_same_seed_same_case_other_seed_other_case(bench, template_case):
    subject = bench.template_subject("test")
    again = bench.build_case(subject, 0)
    assert np.array_equal(again["image"], template_case["image"])
    assert np.array_equal(again["label"], template_case["label"])
    other = bench.build_case(subject, 1)
    assert not np.array_equal(other["label"], template_case["label"])


def test_plan_validation_seed_zero_test_every_seed(bench, monkeypatch):
    fake = {"validation": [{"subject": "IXI002"}, {"subject": "IXI013"}],
            "test": [{"subject": "IXI003"}, {"subject": bench.FOCUS}]}
    monkeypatch.setattr(bench, "brain_subjects", lambda split: fake[split])
    plan, _ = bench.plan_cases(False, 0, [0, 1, 2])
    assert [(s["subject"], k) for s, k in plan["validation"]] == [("IXI002", 0), ("IXI013", 0)]
    assert sorted(k for s, k in plan["test"] if s["subject"] == bench.FOCUS) == [0, 1, 2]
    plan, _ = bench.plan_cases(False, 1, [0])
    assert [s["subject"] for s, _ in plan["test"]] == [bench.FOCUS], "the unseen subject leads a short run"


def test_real_splits_disjoint_focus_only_in_test(bench):
    if not (bench.ROOT / "data" / "brains" / "subjects.csv").is_file():
        pytest.skip("data/brains is not installed")
    val = {s["subject"] for s in bench.brain_subjects("validation")}
    test = {s["subject"] for s in bench.brain_subjects("test")}
    assert val and test and not val & test
    assert bench.FOCUS in test and bench.FOCUS not in val


def test_calibration_region_leaves_out_dilated_lesions(bench):
    brain = np.ones((1, 11, 11, 11), bool)
    label = np.zeros_like(brain, np.uint8)
    label[0, 5, 5, 5] = bench.BRIGHT
    region = bench.healthy_region(brain, label)
    assert region.shape == brain.shape
    distance = np.abs(np.indices(brain.shape[1:]) - 5).sum(0)  # face-connected dilation: city-block distance
    assert np.array_equal(region[0], distance > bench.MARGIN)
    # a map that is high only on the lesion and its ring calibrates to the healthy voxels' values
    score = np.where(distance <= bench.MARGIN, 100.0, np.linspace(0, 1, distance.size).reshape(distance.shape))[None]
    case = {"brain": brain, "label": label}
    threshold = bench.calibrate([score], [case])
    assert threshold < 1.0
    assert bench.false_positive_rate(score, label, brain, threshold) == pytest.approx(bench.FPR, abs=0.01)


def test_polarity_metrics_of_a_map_that_finds_only_bright_lesions(bench):
    label = np.zeros((1, 20, 20, 4), np.uint8)
    label[0, 2:6, 2:6] = bench.BRIGHT
    label[0, 12:16, 12:16] = bench.DARK
    brain = np.zeros_like(label, bool)
    brain[0, 1:19, 1:19] = True
    score = (label == bench.BRIGHT).astype(float)
    score[0, 0, 0] = 5.0  # outside the brain: not scored
    m = bench.polarity_metrics(score, label, brain)
    assert m["auroc_bright"] == 1.0 and m["auprc_bright"] == 1.0
    assert m["auroc_dark"] == 0.5  # dark lesions score as healthy tissue
    assert m["auroc_all"] == pytest.approx(0.75)  # half the lesion voxels ranked first, half tied with healthy
    dice = bench.case_metrics(score, {"label": label, "brain": brain}, 0.5, None)
    assert dice["dice"] == pytest.approx(2 / 3) and dice["fpr"] == 0.0 and np.isnan(dice["fpr_saved"])


def test_chosen_setting_is_a_model_setting_and_append_replaces(bench, tmp_path):
    rows = [{"model": "m", "setting": bench.BASELINE, "seed": 0, "val_auprc": 0.9},
            {"model": "m", "setting": bench.DEFAULT, "seed": 0, "val_auprc": 0.5},
            {"model": "m", "setting": "ddim5_t40_x5", "seed": 0, "val_auprc": 0.4}]
    assert bench.chosen_settings(rows) == {"m": bench.DEFAULT}
    # with per-polarity values, the weaker polarity decides: a bright-only setting loses despite its pooled AUPRC
    polar = [{"model": "p", "setting": "invert10_t25", "seed": 0, "val_auprc": 0.16, "val_auprc_bright": 0.30,
              "val_auprc_dark": 0.01},
             {"model": "p", "setting": bench.DEFAULT, "seed": 0, "val_auprc": 0.08, "val_auprc_bright": 0.07,
              "val_auprc_dark": 0.09}]
    assert bench.chosen_settings(polar) == {"p": bench.DEFAULT}
    assert bench.selection_score(polar[0]) == 0.01 and bench.selection_score(rows[1]) == 0.5
    earlier = tmp_path / "rows.json"
    earlier.write_text(json.dumps({"rows": rows}))
    merged = bench.merge([{"model": "m", "setting": bench.DEFAULT, "seed": 0, "val_auprc": 0.1}], earlier)
    assert len(merged) == 3 and [r["val_auprc"] for r in merged if r["setting"] == bench.DEFAULT] == [0.1]


def test_anoddpm_row_noises_with_the_simplex_options_the_model_learned(bench):
    from types import SimpleNamespace

    section = bench.setting_section(bench.recipe_section(), bench.SETTINGS[bench.ANODDPM][1])
    learned = {"octaves": 5, "persistence": 0.8, "frequency": 4.0}
    simplex_model = SimpleNamespace(noise=SimpleNamespace(kind="simplex", options=learned))
    recon = bench.with_model_noise(section, simplex_model).reconstruction
    assert (recon.noise, recon.noise_options, recon.t_levels, recon.samples) == ("simplex", learned, [0.25], 1)
    # a Gaussian setting keeps its noise; options a setting names win over the model's
    assert bench.with_model_noise(bench.recipe_section(), simplex_model).reconstruction.noise_options == {}
    named = section.updated(noise_options={"octaves": 3})
    assert bench.with_model_noise(named, simplex_model).reconstruction.noise_options == {"octaves": 3}


def test_candidates_are_mapped_on_validation_and_only_the_best_is_tested(bench, tmp_path, monkeypatch):
    """``--choose``: every candidate gets a validation-only row, only the one with the best worse-polarity validation
    AUPRC is run on the test cases; the report's tables leave the candidates out and list them in a note."""
    from types import SimpleNamespace

    scores = {"counterfactual_w1.5": (0.30, 0.02), "counterfactual_w3": (0.10, 0.08)}  # (bright, dark) val AUPRC
    calls = []

    def fake_run(model, loaded, key, section, cases, seeds, device, work, *, test=True, made=None):
        calls.append((key, test))
        bright, dark = scores[key]
        common = {"model": str(model), "setting": key, "val_auprc": (bright + dark) / 2, "val_auprc_bright": bright,
                  "val_auprc_dark": dark, "nfe": 30, "threshold": 0.1, "saved_threshold": None}
        if not test:
            return [{**common, "seed": None, "validation_only": True}]
        metrics = {m: 0.5 for m in bench.METRICS}
        return [{**common, **metrics, "seed": s, "fpr_worst_deviation": 0.0, "slices_per_volume": 60.0,
                 "per_subject": {}} for s in seeds]

    monkeypatch.setattr(bench, "run_setting", fake_run)
    monkeypatch.setattr(bench, "load_denoiser", lambda path, device: (None, SimpleNamespace()))
    monkeypatch.setattr(bench, "load_cases", lambda listing, info, base: [])
    monkeypatch.setattr(bench, "plan_cases", lambda quick, limit, seeds: ({"validation": [], "test": []}, "data"))
    monkeypatch.setattr(bench, "write_cases", lambda work, plan: work / "cases.json")
    out = tmp_path / "table.md"
    bench.main(["--models", str(tmp_path / "cf.safetensors"), "--only", ",".join(scores),
                "--choose", ",".join(scores), "--seeds", "0,1", "--out", str(out)])
    assert calls == [("counterfactual_w1.5", False), ("counterfactual_w3", False), ("counterfactual_w3", True)]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["setting"], r["seed"]) for r in rows] == [("counterfactual_w1.5", None), ("counterfactual_w3", 0),
                                                          ("counterfactual_w3", 1)]
    table = out.read_text()
    assert table.count("weight 3 (") == 1 and "**(chosen)**" in table
    assert "weight 1.5 (for a class-conditional model: recipes/counterfactual_lesion_2d.yaml); map over the scan's " \
           "own 0.9-quantile: 0.0200 (pooled 0.1600)" in table


def test_guided_settings_steer_with_the_given_classifier(bench, tmp_path):
    changes = bench._with_classifier(bench.SETTINGS["guided_s100"][1], tmp_path / "clf")
    section = bench.setting_section(bench.recipe_section(), changes)
    assert section.reconstruction.method == "guided" and section.reconstruction.classifier == str(tmp_path / "clf")
    assert section.reconstruction.guidance_scale == 100.0
    assert bench._with_classifier(bench.SETTINGS[bench.DEFAULT][1], tmp_path) == {}


def test_a_3d_model_maps_the_whole_volume_in_one_call(bench):
    """A 3D model's healer gets the whole prepared volume ``(1, C, X, Y, Z)`` once (one 'slice' processed); the map
    comes back as the volume; the neighbour-slice baseline refuses a 3D grid."""
    import torch

    calls = []

    def heal(stack, fg):
        calls.append(tuple(stack.shape))
        return (stack * 2,)

    image = torch.rand(1, 8, 10, 6)
    case = {"image": image, "brain": torch.ones(1, 8, 10, 6, dtype=torch.bool)}
    section = bench.recipe_section()
    raw, _, n = bench.case_map(case, heal, section.updated(scan_quantile=None), axis=2, spatial_dims=3)
    assert calls == [(1, 1, 8, 10, 6)] and n == 1 and np.allclose(raw, image.numpy() * 2)
    score = bench.case_map(case, heal, section, axis=2, spatial_dims=3)[0]  # the recipe's per-scan scale
    assert np.allclose(score, raw / np.quantile(raw, section.map.scan_quantile), rtol=1e-5)
    baseline = bench.healer(bench.BASELINE, None, section, 0, "cpu", spatial_dims=3)
    with pytest.raises(SystemExit, match="2D model"):
        baseline(image[None], torch.ones(1, 1, 8, 10, 6))


def test_dice_bound_and_threshold_transfer_between_validation_subjects(bench):
    brain = np.zeros((1, 20, 20, 5), bool)
    brain[0, 2:18, 2:18] = True  # 1,280 brain voxels
    label = np.zeros(brain.shape, np.uint8)
    label[0, 9:11, 9:11, 2] = 1  # 4 lesion voxels
    case = {"brain": brain, "label": label}
    healthy = float(bench.healthy_region(brain, label).sum())
    assert bench.dice_bound(case, 0.05) == pytest.approx(8 / (8 + 0.05 * healthy))
    assert bench.dice_bound(case, 0.01) > bench.dice_bound(case, 0.05)
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 1.0, brain.shape)
    same = [base * brain, rng.permutation(base.ravel()).reshape(brain.shape) * brain]  # one distribution
    assert bench.loo_fpr_deviation(same, [case, case]) < 0.01
    scaled = [same[0], same[1] * 3.0]  # a brighter second subject: a threshold calibrated on one misses the other
    assert bench.loo_fpr_deviation(scaled, [case, case]) > 0.04
    assert np.isnan(bench.loo_fpr_deviation(same[:1], [case]))


def test_other_methods_are_set_against_the_default(bench):
    rows = [{"model": "data/weights/healthy_brain_2d.safetensors", "setting": "default", "auprc_all": a}
            for a in (0.10, 0.14)]
    rows += [{"model": "data/weights/healthy_brain_2d.safetensors", "setting": "guided_s100", "auprc_all": 0.03},
             {"model": "runs/cf", "setting": "counterfactual_w3", "auprc_all": 0.15},
             {"model": "data/weights/healthy_brain_2d.safetensors", "setting": "ddim5_t40_x5", "auprc_all": 0.2}]
    labels = {"guided_s100": "Wolleb et al.: guided", "counterfactual_w3": "Sanchez et al.: cf"}
    assert bench._against_default(rows, labels) == [
        "- Test AUPRC against the default of healthy_brain_2d (0.120): Wolleb et al. 0.030 (-0.090); "
        "Sanchez et al. 0.150 (+0.030)."]
    assert bench._against_default(rows[2:], labels) == []  # no default row: nothing to set against
