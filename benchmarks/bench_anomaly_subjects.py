"""Anomaly detection on real brains the models never saw; writes ``benchmarks/results/anomaly_subjects.md``.

    python benchmarks/bench_anomaly_subjects.py [--models a.safetensors,b.safetensors] [--only default,...]
        [--seeds 0,1,2] [--max-subjects N] [--threads N] [--device cpu] [--append] [--quick] [--out FILE]
        [--choose key,key] [--classifier PATH]

Cases: every subject of the validation and test splits of ``data/brains`` (IXI T1 brains, skull-stripped,
2 mm; ``medidiff.data.sample.brain_subjects``), the whole volume with 2 bright (hyperintense) and 2 dark
(hypointense) lesions inserted inside its brain mask by ``medidiff.data.lesions.insert_lesions`` (radius
3-8 mm, the relative contrast of the demo cases, ``scripts/make_demo_cases.py``), seeded by subject and seed
so that every model sees the same cases; labels 1 = bright, 2 = dark. Validation cases use seed 0, test
cases every seed of ``--seeds`` (the seed also seeds the reconstruction noise). The cases are written as
NIfTI with a datalist in a temporary folder and read through medidiff's own case path (``find_cases``,
``load_case``, ``prepare`` with the model's ``data_prep``, intensities matched), as ``medidiff detect``
prepares a user's scan; every axial slice with at least ``min_foreground`` (1 %) brain is processed, all of a
scan's slices in one call, as detect does.

Settings (per model): the default of ``recipes/demo.yaml``, DDIM inversion to t_L 0.25 and back (10+10
steps), DDIM-5 from t_L 0.4 with the median of 5 seeds (``benchmarks/bench_anomaly.py``'s settings applied
to the recipe), AnoDDPM for a simplex-trained model (DDIM-10, and ancestral DDPM drawing simplex noise in every
step as the paper samples), Pinaya et al.'s latent method, Wolleb et al.'s classifier guidance and Sanchez et al.'s
counterfactuals (candidate scales and weights: ``--choose`` maps each on the validation cases and runs only the best
on the test cases), a 3D model's whole-volume setting, and the no-model baseline (the mean of the two neighbouring
slices of the scan). Each
setting's threshold is calibrated at a 5 % voxel false-positive rate on the validation cases' brain voxels
outside the lesions dilated by 2 voxels; for the default setting the threshold saved with the model
(``<model>.thresholds.json``, calibrated for it) is applied as well. Test metrics per case: voxel AUROC and
AUPRC inside the brain for all lesions, bright lesions vs healthy tissue and dark lesions vs healthy tissue
(the other polarity's voxels left out), Dice at the validation threshold, the false-positive rate of both
thresholds on the healthy brain voxels (the calibration region), seconds per volume; each row is the mean
± std over seeds of the per-seed mean over test subjects. ``--quick`` is a smoke run (one subject whose
case calibrates and is tested, one seed, one denoising step from one noise draw, and the baseline) written to a
temporary folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from medidiff.anomaly import thresholds
from medidiff.anomaly.config import AnomalySection, HealthyOptions
from medidiff.anomaly.detect import latent_calibration, with_model_noise
from medidiff.anomaly.healthy import healthy_nfe, patch_tiles, reconstruct_healthy
from medidiff.anomaly.latent import open_codec
from medidiff.anomaly.maps import anomaly_map, per_scan
from medidiff.arrays import to_numpy
from medidiff.cases import find_cases, load_case, plain, prepare, slicewise
from medidiff.data import sample
from medidiff.data.discover import load_companion
from medidiff.data.lesions import insert_lesions
from medidiff.metrics import dice_at, voxel_auprc, voxel_auroc
from medidiff.outputs import write_json, write_text
from medidiff.recipes import load_recipe
from medidiff.runtime import resolve_device
from medidiff.weights import load_denoiser

ROOT = Path(__file__).resolve().parents[1]


def _script(path: Path) -> ModuleType:
    """A module of this checkout that is a script, not a package (the anomaly benchmark, the demo builder)."""
    spec = importlib.util.spec_from_file_location(f"_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _script(ROOT / "benchmarks" / "bench_anomaly.py")
DEMO = _script(ROOT / "scripts" / "make_demo_cases.py")

RECIPE = ROOT / "recipes" / "demo.yaml"
MODELS = [ROOT / "data" / "weights" / "demo_brain_2d.safetensors",
          ROOT / "data" / "weights" / "healthy_brain_2d.safetensors"]
FPR = BENCH.FPR
#: Largest tolerated distance of a test subject's false-positive rate from the nominal ``FPR``.
FPR_TOLERANCE = 0.02
#: The unseen subject reported on its own (test split).
FOCUS = "IXI012-HH-1211"
BRIGHT, DARK = 1, 2
#: label -> (``insert_lesions`` polarity, lesions per case, name).
LESIONS = {BRIGHT: ("hyper", 2, "bright"), DARK: ("hypo", 2, "dark")}
RADIUS_MM = (3.0, 8.0)
#: Voxels by which the lesions are dilated before the rest of the brain counts as healthy (calibration, FPR).
MARGIN = 2
VALIDATION_SEED = 0
DEFAULT = "default"
BASELINE = "neighbours_scan"
ANODDPM = "anoddpm_simplex"
ANODDPM_DDPM = "anoddpm_simplex_ddpm"
LATENT = "latent_t50"
VOLUME = "volume_ddim5_t40_x5"
#: Candidates of the guided methods, chosen among on the validation cases (``--choose``).
GUIDANCE_SCALES = (10, 100)
GUIDANCE_WEIGHTS = (1.5, 3)
#: The classifier of the ``guided`` settings (``--classifier``).
CLASSIFIER = ROOT / "runs" / "classifier_lesion_2d"
#: key -> (label, changes of the recipe's ``anomaly`` section); ``None``: the no-model baseline.
SETTINGS: dict[str, tuple[str, dict | None]] = {
    DEFAULT: ("", {}),  # the label is made from the recipe (``describe``)
    "invert10_t25": BENCH.SETTINGS["invert10_t25"],
    "ddim5_t40_x5": BENCH.SETTINGS["ddim5_t40_x5"],
    ANODDPM: ("AnoDDPM: simplex noise to t_L 0.25 (lambda 250), DDIM-10 back, one reconstruction (for a model "
              "trained on simplex noise: recipes/anoddpm_brain_2d.yaml)",
              {"sampler": "ddim", "steps": 10, "t_levels": [0.25], "noise": "simplex", "n_samples": 1}),
    LATENT: ("Pinaya et al.: latent DDPM on VQ-VAE codes, DDIM-10 from t_L 0.5 scores the latents, those above the "
             "95th percentile of the healthy validation brains' scores (per position) re-denoised, one seed "
             "(for a latent model: recipes/latent_brain_2d.yaml)",
             {"method": "latent", "sampler": "ddim", "steps": 10, "t_levels": [0.5], "n_samples": 1}),
    ANODDPM_DDPM: ("AnoDDPM as the paper samples: simplex noise to t_L 0.25 (lambda 250), ancestral DDPM back with "
                   "simplex noise in every step (25 steps skipping along the 250-step chain), one reconstruction (for "
                   "a model trained on simplex noise)",
                   {"sampler": "ddpm", "steps": 25, "t_levels": [0.25], "noise": "simplex", "n_samples": 1}),
    **{f"guided_s{s:g}": (f"Wolleb et al.: DDIM inversion to t_L 0.5 (10 steps), DDIM-10 back steered to 'healthy' by "
                          f"the noise-aware classifier's gradient, scale {s:g} (for the classifier: --classifier)",
                          {"method": "guided", "steps": 10, "t_levels": [0.5], "guidance_scale": float(s)})
       for s in GUIDANCE_SCALES},
    **{f"counterfactual_w{w:g}": (f"Sanchez et al.: DDIM inversion to t_L 0.5 with the null class (10 steps), "
                                  f"DDIM-10 back with classifier-free guidance to 'healthy', weight {w:g} (for a "
                                  "class-conditional model: recipes/counterfactual_lesion_2d.yaml)",
                                  {"method": "counterfactual", "steps": 10, "t_levels": [0.5],
                                   "guidance_weight": float(w)})
       for w in GUIDANCE_WEIGHTS},
    VOLUME: ("3D model, whole volume: DDIM-5 from t_L 0.4, median of 5 seeds (for a 3D model: "
             "recipes/healthy_brain_3d.yaml)",
             {"steps": 5, "t_levels": [0.4], "n_samples": 5}),
    BASELINE: (BENCH.BASELINES[BASELINE], None),
}
#: The healthy brains the latent threshold map is calibrated on (the validation subjects, without lesions).
CALIBRATION = ROOT / "data" / "brains" / "calibration.json"
QUICK = {"ddim1_t50_x1": ("one denoising step from t_L 0.5, one noise draw (smoke run)",
                          {"steps": 1, "t_levels": [0.5], "n_samples": 1}),
         BASELINE: SETTINGS[BASELINE]}
#: Per-case metrics averaged over subjects; ``_all``: every lesion, ``_bright``/``_dark``: one polarity.
POLARITIES = ("all", *(name for _, _, name in LESIONS.values()))
METRICS = (*(f"{m}_{p}" for p in POLARITIES for m in ("auroc", "auprc")), "dice", "fpr", "fpr_saved",
           "dice_saved", "s_per_volume")


# ------------------------------------------------------------------------------------------------ cases


def template_subject(split: str) -> dict:
    """The bundled MNI152 brain as a subject record (for smoke runs and tests without ``data/brains``)."""
    folder = sample.data_dir()
    return {"subject": "mni152", "split": split, "image": folder / sample.BRAIN_FILES["t1"],
            "mask": folder / sample.BRAIN_FILES["mask"]}


def brain_subjects(split: str) -> list[dict]:
    """The subjects of a split of ``data/brains``, sorted by name."""
    loader = getattr(sample, "brain_subjects", None)
    if loader is None:
        raise SystemExit("medidiff.data.sample.brain_subjects is missing: install data/brains first "
                         "(or use --quick, which falls back to the bundled template)")
    return sorted(loader(split=split), key=lambda s: s["subject"])


def pick(subjects: list[dict], limit: int, first: str | None = None) -> list[dict]:
    """At most ``limit`` subjects (0: all), ``first`` (when present) leading."""
    ordered = sorted(subjects, key=lambda s: s["subject"] != first)
    return ordered[:limit] if limit else ordered


def case_rng(subject: str, seed: int) -> np.random.Generator:
    """The generator of one subject's case for one seed (stable across runs and machines)."""
    return np.random.default_rng([zlib.crc32(subject.encode()), seed])


def lesion_case(image: np.ndarray, brain: np.ndarray, spacing, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with the ``LESIONS`` inserted inside ``brain``, and the label volume (0, ``BRIGHT``, ``DARK``).

    Each polarity's lesions keep ``MARGIN`` voxels away from those placed before (``insert_lesions``
    already keeps lesions of one call apart).
    """
    work = image[None].astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    for value, (polarity, n, _) in LESIONS.items():
        allowed = brain & ~ndimage.binary_dilation(label > 0, iterations=MARGIN)
        work, mask = insert_lesions(work, mask=allowed, spacing=spacing, n=n, radius_mm=RADIUS_MM,
                                    contrast=DEMO.CONTRAST, polarity=polarity, seed=rng)
        label[np.asarray(mask[0])] = value
    return work[0], label


def build_case(subject: dict, seed: int) -> dict:
    """One subject's case for one seed: ``image``, ``label``, ``brain`` arrays and the ``affine``."""
    scan, mask = nib.load(str(subject["image"])), nib.load(str(subject["mask"]))
    brain = np.asarray(mask.dataobj) > 0
    image, label = lesion_case(np.asarray(scan.dataobj, dtype=np.float32), brain, scan.header.get_zooms()[:3],
                               case_rng(subject["subject"], seed))
    return {"image": image, "label": label, "brain": brain, "affine": scan.affine}


def write_cases(folder: Path, plan: dict[str, list[tuple[dict, int]]]) -> Path:
    """Write every case of ``plan`` (split -> ``(subject, seed)`` pairs) as NIfTI and one datalist.

    Entries carry ``subject`` and ``seed`` beside ``image``, ``label`` (1 bright, 2 dark) and ``mask``.
    """
    listing = {}
    for split, pairs in plan.items():
        entries = []
        for subject, seed in pairs:
            case = build_case(subject, seed)
            name = f"{subject['subject']}_seed{seed}"
            for key, dtype in (("image", np.float32), ("label", np.uint8), ("brain", np.uint8)):
                suffix = "" if key == "image" else f"_{key}"
                nib.save(nib.Nifti1Image(case[key].astype(dtype), case["affine"]), folder / f"{name}{suffix}.nii.gz")
            entries.append({"image": f"{name}.nii.gz", "label": f"{name}_label.nii.gz",
                            "mask": f"{name}_brain.nii.gz", "subject": subject["subject"], "seed": seed})
        listing[split] = entries
    path = folder / "cases.json"
    path.write_text(json.dumps(listing, indent=1))
    return path


def load_cases(listing: Path, info, section: AnomalySection) -> list[dict]:
    """The cases of a datalist prepared for a model as detect prepares a scan, on the model's grid.

    Returns:
        Per case: ``subject``, ``seed``, ``split``, ``image`` ``(C, X, Y, Z)`` on the network scale, ``brain``
        and ``label`` (0/1/2) volumes ``(1, X, Y, Z)``, and ``cropped``: the share of the brain's voxels the
        preparation left outside the model's grid (they are not scored).
    """
    entries = {e["image"]: e for split in json.loads(listing.read_text()).values() for e in split}
    cases = []
    for source in find_cases(listing):
        entry = entries[Path(source.paths[0]).name]
        case = load_case(source)  # its label binarised (any lesion); the polarities travel as an extra
        labels = plain(load_companion(source, source.label, "label"))
        prepared = prepare(case, info.data_prep, spatial_dims=info.spatial_dims, intensity=section.intensity,
                           extra={"labels": labels})
        brain = prepared.foreground > 0.5
        cases.append({"subject": entry["subject"], "seed": entry["seed"], "split": source.split,
                      "image": plain(prepared.image).float(), "brain": brain,
                      "label": prepared.extra["labels"].round().to(torch.uint8),
                      "cropped": 1.0 - _volume(brain, prepared.image) / _volume(case.mask, case.image)})
    return cases


def _volume(mask, image) -> float:
    """A mask's volume in mm^3 on the grid of ``image`` (a MetaTensor with its affine)."""
    return float(mask.sum()) * abs(float(torch.linalg.det(torch.as_tensor(image.affine, dtype=torch.float64)[:3, :3])))


# ------------------------------------------------------------------------------------------------ maps


def recipe_section() -> AnomalySection:
    """The ``anomaly`` section of ``recipes/demo.yaml`` (the detect defaults), without progress bars."""
    return load_recipe(RECIPE).anomaly.updated(progress=False)


def setting_section(base: AnomalySection, changes: dict | None) -> AnomalySection:
    """The recipe's section with a setting's changes (``HealthyOptions`` names) applied."""
    return base.updated(**(changes or {}))


def describe(recon: HealthyOptions) -> str:
    """A setting's reconstruction in words."""
    levels = " and ".join(f"{t:g}" for t in recon.t_levels)
    if recon.method == "invert":
        return f"DDIM inversion to t_L {levels} and back, {recon.steps}+{recon.steps} steps"
    seeds = f", {recon.reduce} of {recon.n_samples} seeds" if recon.samples > 1 else ""
    patch = "patch-wise " if recon.method == "patch" else ""
    return f"{patch}{recon.sampler.upper()}-{recon.steps} from t_L {levels}{seeds}"


def with_latent_map(section: AnomalySection, loaded: tuple, work: Path, device) -> tuple[AnomalySection, object]:
    """For method ``latent``: the section naming a threshold map calibrated on ``CALIBRATION`` (as ``medidiff detect
    --calibration`` makes it) and the model's VQ-VAE codec; otherwise the section and ``None``."""
    if section.reconstruction.method != "latent":
        return section, None
    denoiser, info = loaded
    codec, digest = open_codec(section.reconstruction, info, device)
    path = latent_calibration(denoiser, info, section, CALIBRATION, work, 0, digest, device)
    return section.updated(latent_thresholds=str(path)), codec


def healer(key: str, denoiser, section: AnomalySection, seed: int, device, codec=None, spatial_dims: int = 2
           ) -> Callable:
    """``heal(stack, fg) -> (map,)`` for ``slicewise``: the setting's anomaly map of a scan's kept slices (of the
    whole volume for a 3D model)."""
    opts = section.map

    def baseline(stack, fg):
        if spatial_dims != 2:
            raise SystemExit("the neighbour-slice baseline runs on a 2D model's grid: leave it out for a 3D model")
        return (torch.from_numpy(anomaly_map(stack, BENCH.neighbours(stack), opts, mask=fg, spatial_dims=2)),)

    def model(stack, fg):
        healthy, spread = reconstruct_healthy(denoiser, stack.to(device), section.reconstruction, seed=seed,
                                              codec=codec)
        return (torch.from_numpy(anomaly_map(stack, healthy.cpu(), opts, mask=fg, spread=spread.cpu(),
                                             spatial_dims=spatial_dims)),)

    return baseline if key == BASELINE else model


def case_map(case: dict, heal: Callable, section: AnomalySection, axis: int, spatial_dims: int = 2
             ) -> tuple[np.ndarray, float, int]:
    """A case's anomaly map ``(1, X, Y, Z)`` (0 on skipped slices), the seconds it took and the slices processed
    (1 for a 3D model's whole volume)."""
    start = time.perf_counter()
    (score,), n = slicewise(heal, case["image"], case["brain"].float(), spatial_dims=spatial_dims, axis=axis,
                            min_foreground=section.min_foreground, fills=(0.0,))
    score = per_scan(score, case["brain"], section.map.scan_quantile)[0]  # as medidiff detect does
    return score, time.perf_counter() - start, n


def nfe_per_slice(key: str, denoiser, section: AnomalySection, plane) -> int:
    """Network evaluations per processed slice (0 for the baseline)."""
    if key == BASELINE:
        return 0
    recon = section.reconstruction
    tiles = len(patch_tiles(plane, recon.patch_size or [-(-s // 2) for s in plane]))
    return healthy_nfe(recon, n_patches=tiles, process=denoiser.process)


# ------------------------------------------------------------------------------------------------ metrics


def healthy_region(brain, label) -> np.ndarray:
    """Brain voxels outside the lesions dilated by ``MARGIN`` voxels: where a flagged voxel is a false positive."""
    lesions = to_numpy(label).squeeze() > 0
    near = ndimage.binary_dilation(lesions, iterations=MARGIN)
    return (to_numpy(brain).squeeze().astype(bool) & ~near).reshape(np.shape(to_numpy(brain)))


def polarity_metrics(score, label, brain) -> dict[str, float]:
    """Voxel AUROC and AUPRC inside the brain: every lesion, and each polarity against healthy tissue only."""
    score, label, brain = to_numpy(score), to_numpy(label), to_numpy(brain).astype(bool)
    out = {}
    for name, positive, other in (("all", label > 0, np.zeros_like(brain)),
                                  *((n, label == v, (label > 0) & (label != v)) for v, (_, _, n) in LESIONS.items())):
        region = brain & ~other
        out[f"auroc_{name}"] = voxel_auroc(score, positive, region)
        out[f"auprc_{name}"] = voxel_auprc(score, positive, region)
    return out


def false_positive_rate(score, label, brain, threshold: float | None) -> float:
    """Share of the healthy region's voxels (``healthy_region``) above ``threshold`` (NaN without one)."""
    if threshold is None:
        return float("nan")
    return thresholds.false_positive_rate([to_numpy(score)], [healthy_region(brain, label)], threshold)


def case_metrics(score, case: dict, threshold: float, saved: float | None) -> dict[str, float]:
    """Every per-case metric of ``METRICS`` but the time."""
    label, brain = to_numpy(case["label"]), to_numpy(case["brain"])
    return {**polarity_metrics(score, label, brain), "dice": dice_at(score, label > 0, threshold, brain),
            "fpr": false_positive_rate(score, label, brain, threshold),
            "fpr_saved": false_positive_rate(score, label, brain, saved),
            "dice_saved": float("nan") if saved is None else dice_at(score, label > 0, saved, brain)}


def dice_bound(case: dict, fpr: float) -> float:
    """The best Dice any map can reach on a case at a voxel false-positive rate ``fpr``: every lesion voxel found
    and a share ``fpr`` of the healthy region flagged, ``2 L / (2 L + fpr H)``."""
    lesion = float((to_numpy(case["label"]) > 0).sum())
    healthy = float(healthy_region(case["brain"], case["label"]).sum())
    return 2 * lesion / (2 * lesion + fpr * healthy)


def loo_fpr_deviation(maps: list[np.ndarray], cases: list[dict]) -> float:
    """How far a threshold transfers between validation subjects: each calibrated at ``FPR`` on the others, the
    worst absolute gap between the left-out subject's false-positive rate and ``FPR`` (NaN for one subject)."""
    if len(cases) < 2:
        return float("nan")
    regions = [healthy_region(c["brain"], c["label"]) for c in cases]  # once, not once per fold
    gaps = []
    for i in range(len(cases)):
        threshold = thresholds.calibrate([m for j, m in enumerate(maps) if j != i],
                                         [r for j, r in enumerate(regions) if j != i], fpr=FPR)
        gaps.append(abs(thresholds.false_positive_rate([maps[i]], [regions[i]], threshold) - FPR))
    return float(max(gaps))


def calibrate(maps: list[np.ndarray], cases: list[dict]) -> float:
    """The threshold at ``FPR`` over the validation cases' healthy regions."""
    return thresholds.calibrate(maps, [healthy_region(c["brain"], c["label"]) for c in cases], fpr=FPR)


def saved_threshold(model: Path, key: str, section: AnomalySection) -> float | None:
    """The threshold saved with the model, for the default setting only (the one it was calibrated for)."""
    if key != DEFAULT:
        return None
    return thresholds.saved_threshold(model, section.map_settings(), section.fpr)[0]


# ------------------------------------------------------------------------------------------------ runs


def run_setting(model: Path, loaded: tuple, key: str, section: AnomalySection, cases: list[dict], seeds: list[int],
                device, work: Path, *, test: bool = True, made: dict | None = None) -> list[dict]:
    """One row per test seed for one model and setting (validation maps, threshold, test metrics); ``test=False``:
    one validation-only row (seed ``None``), a candidate that was not chosen. ``made`` caches the maps of the cases
    (by subject and seed) between calls for the same model and setting."""
    denoiser, info = loaded
    section, codec = with_latent_map(with_model_noise(section, info), loaded, work, device)
    dims = info.spatial_dims
    axis = 2 if info.data_prep.slicing_axis is None else info.data_prep.slicing_axis
    made = {} if made is None else made

    def mapped(case: dict) -> tuple[np.ndarray, float, int]:  # a case in both splits (--quick) is mapped once
        if (case["subject"], case["seed"]) not in made:
            heal = healer(key, denoiser, section, case["seed"], device, codec, dims)
            made[case["subject"], case["seed"]] = case_map(case, heal, section, axis, dims)
        return made[case["subject"], case["seed"]]

    val = [c for c in cases if c["split"] == "validation"]
    val_maps = [mapped(c)[0] for c in val]
    threshold = calibrate(val_maps, val)
    saved = saved_threshold(model, key, section)
    val_metrics = [polarity_metrics(m, c["label"], c["brain"]) for m, c in zip(val_maps, val)]
    val_auprc = {f"val_auprc{'' if p == 'all' else '_' + p}": float(np.mean([v[f"auprc_{p}"] for v in val_metrics]))
                 for p in POLARITIES}
    plane = [s for i, s in enumerate(val[0]["image"].shape[1:]) if i != axis]
    common = {"model": _shown(model), "model_step": info.step, "setting": key, "threshold": threshold,
              "saved_threshold": saved, "saved_fpr": section.fpr if saved is not None else None, **val_auprc,
              "val_fpr_transfer": loo_fpr_deviation(val_maps, val), "scan_quantile": section.map.scan_quantile,
              "n_validation": len(val),
              "nfe": nfe_per_slice(key, denoiser, section, plane), "spatial_dims": dims}
    if not test:
        return [{**common, "seed": None, "validation_only": True}]
    rows = []
    for seed in seeds:
        per_subject, slices = {}, []
        for case in (c for c in cases if c["split"] == "test" and c["seed"] == seed):
            score, seconds, n = mapped(case)
            per_subject[case["subject"]] = {**case_metrics(score, case, threshold, saved), "s_per_volume": seconds}
            slices.append(n)
        means = {m: float(np.mean([s[m] for s in per_subject.values()])) for m in METRICS}
        worst = max(abs(s["fpr"] - FPR) for s in per_subject.values())
        rows.append({**common, "seed": seed, **means, "fpr_worst_deviation": worst,
                     "slices_per_volume": float(np.mean(slices)), "per_subject": per_subject})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_subject"}), flush=True)
    return rows


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ------------------------------------------------------------------------------------------------ report


def _cell(values: list[float], digits: int = 3, scale: float = 1.0) -> str:
    v = np.array([x * scale for x in values if x is not None and np.isfinite(x)])
    if not v.size:
        return "—"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if v.size > 1 else f"{v.mean():.{digits}f}"


COLUMNS = (("val AUPRC", "val_auprc", 3, 1.0), ("AUROC", "auroc_all", 3, 1.0), ("AUPRC", "auprc_all", 3, 1.0),
           ("AUROC bright", "auroc_bright", 3, 1.0), ("AUPRC bright", "auprc_bright", 3, 1.0),
           ("AUROC dark", "auroc_dark", 3, 1.0), ("AUPRC dark", "auprc_dark", 3, 1.0), ("Dice", "dice", 3, 1.0),
           ("threshold", "threshold", 4, 1.0), ("FPR % (val thr.)", "fpr", 2, 100.0),
           ("val FPR gap % (leave one out)", "val_fpr_transfer", 2, 100.0),
           ("saved thr.", "saved_threshold", 4, 1.0), ("saved thr. FPR % nominal", "saved_fpr", 0, 100.0),
           ("FPR % (saved thr.)", "fpr_saved", 2, 100.0), ("Dice (saved thr.)", "dice_saved", 3, 1.0),
           ("s / volume", "s_per_volume", 1, 1.0))


def selection_score(row: dict) -> float:
    """What a setting is chosen by: its validation AUPRC on the polarity it finds worse (a setting that finds only
    bright lesions is not chosen for a high pooled AUPRC); the pooled AUPRC for rows without per-polarity values."""
    per_polarity = [row[f"val_auprc_{p}"] for p in POLARITIES[1:] if f"val_auprc_{p}" in row]
    return min(per_polarity) if per_polarity else row["val_auprc"]


def chosen_settings(rows: list[dict]) -> dict[str, str]:
    """Per model, the tested model setting (not the baseline) with the best ``selection_score``."""
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        if r.get("validation_only"):
            continue
        if r["setting"] != BASELINE and selection_score(r) > best.get(r["model"], (-np.inf, ""))[0]:
            best[r["model"]] = (selection_score(r), r["setting"])
    return {m: k for m, (_, k) in best.items()}


def _model_name(model: str) -> str:
    """A model's name in the tables: its file stem, or its run folder's name for a run's ``model.safetensors``."""
    path = Path(model)
    return path.parent.name if path.stem == "model" else path.stem


def _table(rows: list[dict], labels: dict[str, str], chosen: dict[str, str], value) -> list[str]:
    """One line per model and setting: mean ± std over seeds of ``value(row, key)``."""
    lines = ["| model | setting | NFE / slice | " + " | ".join(c[0] for c in COLUMNS) + " | FPR within "
             f"{FPR_TOLERANCE:.0%} of {FPR:.0%} (every subject) | seeds |",
             "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for key in dict.fromkeys(r["setting"] for r in rows if r["model"] == model):
            group = sorted((r for r in rows if r["model"] == model and r["setting"] == key), key=lambda r: r["seed"])
            mark = " **(chosen)**" if chosen.get(model) == key else ""
            within = all(r["fpr_worst_deviation"] <= FPR_TOLERANCE for r in group)
            lines.append(f"| `{_model_name(model)}` | {labels.get(key, key)}{mark} | {group[0]['nfe']} | "
                         + " | ".join(_cell([value(r, k) for r in group], d, s) for _, k, d, s in COLUMNS)
                         + f" | {'yes' if within else 'no'} | {','.join(str(r['seed']) for r in group)} |")
    return lines


def _against_default(rows: list[dict], labels: dict[str, str]) -> list[str]:
    """The other methods' test AUPRC against the default's (of the model of many subjects), by how much each
    misses or beats it."""
    def mean(key: str, model: str | None = None) -> float | None:
        got = [r["auprc_all"] for r in rows if r["setting"] == key and (model is None or model in r["model"])]
        return float(np.mean(got)) if got else None

    default = mean(DEFAULT, "healthy_brain_2d")
    others = [k for k in dict.fromkeys(r["setting"] for r in rows) if k.split("_")[0] in ("guided", "counterfactual")
              or k in (LATENT, ANODDPM, ANODDPM_DDPM)]
    if default is None or not others:
        return []
    parts = [f"{labels.get(k, k).split(':')[0]} {mean(k):.3f} ({mean(k) - default:+.3f})" for k in others]
    return [f"- Test AUPRC against the default of healthy_brain_2d ({default:.3f}): " + "; ".join(parts) + "."]


def _bound_note(bounds: dict | None) -> list[str]:
    """The note on the best Dice reachable at the table's false-positive rates (none for older JSON)."""
    if not bounds:
        return []
    at = ", ".join(f"{v:.3f} at {float(k):.0%}" for k, v in sorted(bounds.items(), key=lambda kv: -float(kv[0])))
    return [f"- The best Dice any map can reach on the test cases (every lesion voxel found and the false-positive "
            f"rate spent on healthy brain): {at} FPR. The lesions fill a small share of each brain, so at 5 % the "
            "false positives alone cap Dice far below 0.3."]


def write_report(path: Path, rows: list[dict], meta: dict) -> None:
    """The markdown table of the test rows, the per-subject table of ``FOCUS``, and the candidates chosen among on
    validation only."""
    candidates = [r for r in rows if r.get("validation_only")]
    rows = [r for r in rows if not r.get("validation_only")]
    chosen, labels = chosen_settings(rows), meta["labels"]
    lines = [
        "# Anomaly detection on brains the models never saw", "",
        f"Data: {meta['data']}. Validation: {meta['n_subjects']['validation']} subject(s), lesion seed "
        f"{VALIDATION_SEED}; test: {meta['n_subjects']['test']} subject(s), seeds {meta['seeds']}. "
        f"Each case: the whole volume with {', '.join(f'{n} {name}' for _, n, name in LESIONS.values())} "
        f"lesions (radius {RADIUS_MM[0]:g}-{RADIUS_MM[1]:g} mm, relative contrast "
        f"{DEMO.CONTRAST[0]:g}-{DEMO.CONTRAST[1]:g}) inside its brain mask. Machine: {meta['machine']} "
        "(seconds are indicative: the machine is shared).", "",
    ]
    lines += _table(rows, labels, chosen, lambda r, k: r.get(k))
    focus = [r for r in rows if FOCUS in r["per_subject"]]
    if focus:
        lines += ["", f"Subject `{FOCUS}` (test split) alone, mean ± std over seeds:", ""]
        lines += _table(focus, labels, chosen,
                        lambda r, k: r["per_subject"][FOCUS][k] if k in r["per_subject"][FOCUS] else r.get(k))
    lines += [
        "", "Notes:",
        "- Each row: per seed, the mean over the test subjects of each case's metric; then mean ± std over "
        "the seeds. Metrics on the model's grid (the preparation's crop of the scan); voxel AUROC/AUPRC inside "
        "the brain mask; 'bright'/'dark': that polarity's lesions against healthy brain, the other polarity's "
        "voxels left out.",
        f"- threshold: calibrated at a {FPR:.0%} voxel false-positive rate on the validation cases' brain voxels "
        f"outside the lesions dilated by {MARGIN} voxels (one threshold per model and setting). FPR: the share "
        "of each test case's voxels in that same healthy region above the threshold. 'FPR within': every test "
        f"subject's FPR within {FPR_TOLERANCE:.0%} (absolute) of the nominal {FPR:.0%}.",
        "- saved thr.: the threshold shipped beside the model (`<model>.thresholds.json`), calibrated for the "
        "default setting only (on the data that model was made for) at the recipe's false-positive rate "
        "(nominal); '—' for other settings, or when the model has none or it was calibrated with other settings.",
        "- val FPR gap (leave one out): each validation subject's false-positive rate at a threshold calibrated "
        f"(at {FPR:.0%}) on the other validation subjects, the worst gap to {FPR:.0%}: how well a threshold "
        "transfers to a brain it was not calibrated on, measured without the test subjects.",
        *_bound_note(meta.get("dice_bound")),
        "- Dice at the validation threshold. val AUPRC: pooled lesions, mean over validation subjects; "
        "'(chosen)': the model setting with the best validation AUPRC of its worse polarity (bright or dark; the "
        "pooled val AUPRC for rows measured before per-polarity values were recorded); the baseline is not a "
        "candidate.",
        "- The no-model baseline maps |scan - mean of the neighbouring processed slices| with the same map "
        "filters; it needs no network (NFE 0).",
        f"- s / volume: reconstruction and map of one scan's processed slices (on average "
        f"{meta['slices_per_volume']:.0f} of them), after preparation.",
        f"- Brain voxels left outside the model's grid by the preparation: {meta['cropped_share']:.2%} on "
        "average (not scored).",
    ]
    present = {r["setting"] for r in rows}
    if any(r.get("scan_quantile") for r in rows):
        lines.append("- Maps on each scan's own scale (`map.scan_quantile`, the default now): rows measured with it "
                     "are labelled so; in the others the map is the residual in intensity units. AUROC and AUPRC "
                     "are per case, so the scale leaves them unchanged; the threshold columns differ.")
    if ANODDPM_DDPM in present:
        lines.append("- AnoDDPM as the paper samples: the same simplex-trained model, every reverse step drawing "
                     "simplex noise (`medidiff.core.samplers`' `noise`; the paper's 250 ancestral steps skipped to "
                     "25 along the same chain, for a CPU); not tuned on the validation subjects.")
    if any(r.get("spatial_dims") == 3 for r in rows):
        lines.append("- 3D: a 3D U-Net of whole brains at 4 mm trained from scratch on the IXI training brains "
                     "(recipes/healthy_brain_3d.yaml, on a CPU); its metrics are on its 4 mm grid (the lesions "
                     "resampled to it), its NFE per volume; lesions of 3-8 mm radius are 1-2 of its voxels across.")
    if any(k.startswith("counterfactual") for k in present):
        lines.append("- counterfactual (Sanchez et al. 2022): a class-conditional model fine-tuned from "
                     "healthy_brain_2d for 1,250 steps (recipes/counterfactual_lesion_2d.yaml) on the IXI training "
                     "brains with generated lesions labelled per image; the guidance weight chosen on the validation "
                     "cases among the candidates below, only the chosen one run on the test cases.")
    if any(k.startswith("guided") for k in present):
        lines.append("- guided (Wolleb et al. 2022): the noise-aware classifier of recipes/classifier_lesion_2d.yaml "
                     "(IXI training brains, generated lesions labelled per image), trained in two stages on a CPU: "
                     "large, strong lesions first (recipes/classifier_lesion_large_2d.yaml, 600 steps, validation "
                     "cross entropy 0.69 -> 0.46), then the real ones (1,000 steps; validation cross entropy 0.688 "
                     "against ln 2 = 0.693 at chance: it barely tells them apart, so its gradient steers little); "
                     "the guidance scale chosen on the validation cases among the candidates below, only the chosen "
                     "one run on the test cases.")
    else:
        lines.append("- guided (Wolleb et al. 2022): no row. Its noise-aware classifier (recipes/classifier_lesion_2d"
                     ".yaml) did not learn on a CPU: validation cross entropy stayed at ln 2 (chance), from scratch "
                     "on every time and from healthy_brain_2d's encoder on t <= 0.5.")
    if ANODDPM in present:
        lines.append("- AnoDDPM: the healthy model of many subjects fine-tuned on simplex noise for 1,200 steps on a "
                     "CPU (the paper trains from scratch) and decoded with DDIM-10 from lambda 250 (the paper: 250 "
                     "ancestral steps with simplex noise); one setting, not tuned on the validation subjects.")
    if LATENT in present:
        lines.append("- latent: a VQ-VAE (2,000 steps) and a latent DDPM (3,000 steps) trained on a CPU on the same "
                     "IXI training brains; the VQ-VAE's own reconstruction error (validation L1 ~0.07 on [-1, 1]) "
                     "is in every residual; one setting, not tuned on the validation subjects.")
    lines += _against_default(rows, labels)
    if candidates:
        lines += ["", "Candidates chosen among on the validation cases only (worse-polarity validation AUPRC; the "
                  "tested one is in the table):", ""]
        lines += [f"- `{_model_name(r['model'])}` {labels.get(r['setting'], r['setting'])}: "
                  f"{selection_score(r):.4f} (pooled {r['val_auprc']:.4f})" for r in candidates]
    lines.append("")
    write_text("\n".join(lines), path)


# ------------------------------------------------------------------------------------------------ main


def plan_cases(quick: bool, limit: int, seeds: list[int]) -> tuple[dict, str]:
    """Split -> ``(subject, seed)`` pairs, and the data in words.

    ``quick``: one test subject (``FOCUS`` when present; the bundled template without ``data/brains``), its
    case both calibrating the threshold and tested.
    """
    have = getattr(sample, "brain_subjects", None) is not None and (ROOT / "data" / "brains" / "subjects.csv").is_file()
    if quick:
        one = pick(brain_subjects("test"), 1, FOCUS) if have else [template_subject("test")]
        subjects = {"validation": one, "test": one}
        data = (f"`data/brains` subject {one[0]['subject']}" if have else
                "the bundled MNI152 template brain (data/brains is not installed)")
        data += ", calibrated and tested on its one case (a smoke run only)"
    else:
        subjects = {s: pick(brain_subjects(s), limit, FOCUS) for s in ("validation", "test")}
        data = "`data/brains` (IXI T1, skull-stripped, 2 mm), its validation and test splits"
    plan = {"validation": [(s, VALIDATION_SEED) for s in subjects["validation"]],
            "test": [(s, seed) for s in subjects["test"] for seed in seeds]}
    return plan, data


def _scale_text(section: AnomalySection) -> str:
    """How a setting's map is scaled, for its label (nothing for the residual in intensity units)."""
    q = section.map.scan_quantile
    return "" if q is None else f"; map over the scan's own {q:g}-quantile"


def _with_classifier(changes: dict | None, classifier: Path) -> dict | None:
    """A guided setting's changes with the classifier to steer by."""
    if changes and changes.get("method") == "guided":
        return {**changes, "classifier": str(classifier)}
    return changes


def merge(rows: list[dict], earlier: Path) -> list[dict]:
    """Rows of an earlier run's JSON not replaced by ``rows`` (same model, setting and seed), then ``rows``."""
    def key(r: dict) -> tuple:
        return r["model"], r["setting"], r["seed"]

    new = {key(r) for r in rows}
    return [r for r in json.loads(earlier.read_text())["rows"] if key(r) not in new] + rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model paths (default: the demo model and, if present, "
                                         "data/weights/healthy_brain_2d.safetensors)")
    parser.add_argument("--only", help=f"comma-separated setting keys (default: all of {', '.join(SETTINGS)})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated test seeds")
    parser.add_argument("--max-subjects", type=int, default=0, help="at most N subjects per split (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: PyTorch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--append", action="store_true",
                        help="merge into the rows of the JSON beside --out (same model, setting and seed replaced)")
    parser.add_argument("--choose", help="comma-separated setting keys among --only that are candidates: each model "
                                         "maps them on the validation cases and only the best one is run on the "
                                         "test cases")
    parser.add_argument("--classifier", type=Path, default=CLASSIFIER,
                        help="the noise-aware classifier of the guided settings")
    parser.add_argument("--quick", action="store_true", help="a smoke run (see the docstring)")
    parser.add_argument("--out", type=Path, help="the table (default: benchmarks/results/anomaly_subjects.md; "
                                                 "--quick: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_anomaly_subjects_"))
    out = args.out or (work / "anomaly_subjects.md" if args.quick else
                       ROOT / "benchmarks" / "results" / "anomaly_subjects.md")
    models = [Path(p) for p in args.models.split(",")] if args.models else [p for p in MODELS if p.is_file()]
    table = QUICK if args.quick else SETTINGS
    keys = [k for k in table if not args.only or k in args.only.split(",")]
    if args.only and not keys:
        raise SystemExit(f"no setting among {args.only}; choose from {', '.join(table)}")
    seeds = [VALIDATION_SEED] if args.quick else [int(s) for s in args.seeds.split(",")]  # quick: one case
    plan, data = plan_cases(args.quick, args.max_subjects, seeds)
    listing = write_cases(work, plan)
    base = recipe_section()
    sections = {k: setting_section(base, _with_classifier(table[k][1], args.classifier)) for k in keys}
    choose = [k for k in keys if args.choose and k in args.choose.split(",")]
    labels = {k: (table[k][0] or f"default of recipes/demo.yaml: {describe(sections[k].reconstruction)}")
              + _scale_text(sections[k]) for k in keys}
    rows, cropped = [], []
    for model in models:
        loaded = load_denoiser(model, device)
        cases = load_cases(listing, loaded[1], base)
        cropped += [c["cropped"] for c in cases]
        made: dict[str, dict] = {k: {} for k in keys}
        for key in (k for k in keys if k not in choose):
            rows += run_setting(model, loaded, key, sections[key], cases, seeds, device, work, made=made[key])
        if choose:
            tried = [run_setting(model, loaded, k, sections[k], cases, seeds, device, work, test=False,
                                 made=made[k])[0] for k in choose]
            best = max(tried, key=selection_score)["setting"]
            rows += [r for r in tried if r["setting"] != best]
            rows += run_setting(model, loaded, best, sections[best], cases, seeds, device, work, made=made[best])
    bounds = ({f"{f:g}": float(np.mean([dice_bound(c, f) for c in cases if c["split"] == "test"]))
               for f in (FPR, base.fpr)} if models else {})  # on the last model's grid, as before
    if args.append and out.with_suffix(".json").is_file():
        rows = merge(rows, out.with_suffix(".json"))
        labels = json.loads(out.with_suffix(".json").read_text())["meta"]["labels"] | labels
    meta = {"data": data, "seeds": ",".join(map(str, seeds)), "labels": labels,
            "n_subjects": {s: len({p[0]["subject"] for p in pairs}) for s, pairs in plan.items()},
            "machine": f"{platform.processor() or platform.machine()} ({device}), {torch.get_num_threads()} PyTorch "
                       f"thread(s), torch {torch.__version__}",
            "slices_per_volume": float(np.mean([r["slices_per_volume"] for r in rows if "slices_per_volume" in r])),
            "cropped_share": float(np.mean(cropped)) if cropped else 0.0, "dice_bound": bounds}
    write_json({"meta": meta, "rows": rows}, out.with_suffix(".json"))
    write_report(out, rows, meta)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
