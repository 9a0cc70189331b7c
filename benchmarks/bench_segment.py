"""Segmentation ensembles side by side with the deterministic U-Net; writes ``benchmarks/results/segment.md``.

    python benchmarks/bench_segment.py [--model data/weights/seg_lesion_2d.safetensors]
        [--unet data/weights/seg_unet_2d.safetensors] [--seeds 0,1,2] [--only 10x10,unet] [--quick]

Cases: whole brains, the bundled 2 mm MNI152 and, at its own 1 mm resolution (the task resamples it),
nilearn's 1 mm MNI152, each with 1-3 bright or dark 3D lesions outlined by 3 raters at relative contrast
levels 0.3-0.7 (``medidiff.data.raters``), or none (a healthy case), in the axial slab the training recipes
hold out (``recipes/seg_lesion_2d.yaml``: 2 mm slices 24-29 for validation, 36-41 for testing). Every setting
segments every case through the task's own path (``medidiff.segment.predict.analyse``: preparation of the
whole scan, the slab's slices segmented, members back on the input grid, fusion, uncertainty) and is scored
in the slab against the middle rater (Dice, HD95 in mm, ECE and uncertainty-error AUROC inside the brain)
and against all raters (GED). The slab's tissue and lesions were never seen in training; the rest of the
brain was (without lesions): it sets the intensity matching and the centring, as any whole scan does.
Settings: members x DDIM steps in {5 x 1000 (Wolleb et al. 2022's published setting), 10 x 10, 10 x 20,
5 x 5} and the deterministic U-Net (one member, one step); each ensemble over 3 seeds (mean +- std over
the seeds of the mean over cases). The ensemble setting with the best validation Dice is marked; the
table reports test cases. ``--quick`` is a smoke run: one small case per split, two tiny settings, one
seed, untrained tiny models when the trained ones are missing, written to a temporary folder.

The 5 x 1000 rows dominate the run time (1,000 network evaluations per member and slice): on a CPU, run
them separately with ``--only 5x1000``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medidiff.cases import find_cases, load_case
from medidiff.data import packaged, sample
from medidiff.data.raters import annotated_lesion_case
from medidiff.errors import DataError
from medidiff.outputs import write_json, write_text
from medidiff.segment.config import SegmentSection
from medidiff.segment.predict import analyse, case_metrics
from medidiff.weights import load_denoiser

ROOT = Path(__file__).resolve().parents[1]
#: Axial 2 mm slices of each split (the training recipes' holdout) and their world z in mm (MNI152).
SLABS = {"validation": (24, 30), "test": (36, 42)}
Z0 = -72.0
#: label -> (members, DDIM steps, model): ``model`` "diffusion" or "unet".
SETTINGS = {"5x1000": (5, 1000, "diffusion"), "10x10": (10, 10, "diffusion"), "10x20": (10, 20, "diffusion"),
            "5x5": (5, 5, "diffusion"), "unet": (1, 1, "unet")}
QUICK = {"2x2": (2, 2, "diffusion"), "unet": (1, 1, "unet")}
METRICS = ("dice", "hd95", "ged", "ece", "uncertainty_error_auroc", "seconds")
#: Slices (mm) either side of a slab that lesions may extend into while they are placed (> the largest reach).
LESION_MARGIN_MM = 16.0


def _brains(quick: bool) -> list[dict]:
    """The brains at their own resolution: ``t1`` (X, Y, Z), ``brain``, ``affine`` (voxel to MNI mm), ``mm``."""
    out = [{"name": "mni2mm", "t1": sample.brain_volume().as_tensor()[0].numpy(),
            "brain": sample.brain_mask().as_tensor()[0].numpy() > 0,
            "affine": sample.brain_volume().affine.numpy(), "mm": 2.0}]
    if not quick:
        try:
            t1, brain = packaged.mni152_1mm()
        except DataError:
            return out
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        affine[:3, 3] = [-98.0, -134.0, -72.0]
        out.append({"name": "mni1mm", "t1": t1.numpy() * 255.0, "brain": brain.numpy(), "affine": affine, "mm": 1.0})
    return out


def make_cases(folder: Path, draws: int, quick: bool, seed: int = 2024) -> dict[str, Path]:
    """Write each split's cases and a datalist each.

    A case is a whole brain (the model is applied as a user would apply it: the whole scan sets the
    intensity matching and the centring, as in training) whose lesions lie in the split's held-out slab:
    ``label`` the middle rater, ``annotations`` the other two, and ``region`` (a datalist key medidiff
    ignores) the slab, the only slices segmented and scored.
    """
    listings = {}
    for s, (split, (lo, hi)) in enumerate(SLABS.items()):
        entries = []
        for brain in _brains(quick):
            z_lo, z_hi = Z0 + 2.0 * lo - 1.0, Z0 + 2.0 * hi - 1.0  # the 2 mm slices' extent in mm
            z = brain["affine"][2, 3] + brain["mm"] * np.arange(brain["t1"].shape[2])
            ks = np.flatnonzero((z >= z_lo) & (z < z_hi))
            if quick:
                ks = ks[:2]
            # lesions are placed in the slab with LESION_MARGIN_MM of its neighbouring slices on each side (a
            # lesion must lie wholly inside the region it is placed in: in the thin slab alone there is no
            # room for most radii, and every case would be healthy); the labels are cut back to the slab
            wide = np.flatnonzero((z >= z[ks[0]] - LESION_MARGIN_MM) & (z <= z[ks[-1]] + LESION_MARGIN_MM))
            slab = np.zeros(brain["t1"].shape, bool)
            slab[..., ks] = True
            wide_slab, wide_mask = brain["t1"][..., wide].astype(np.float32), brain["brain"][..., wide]
            for d in range(draws):
                rng = np.random.default_rng([seed, s, d, int(brain["mm"])])
                n = 0 if d % 4 == 3 else int(rng.integers(1, 4))  # every fourth case is healthy
                image = brain["t1"].astype(np.float32).copy()
                raters = np.zeros((3, *image.shape), bool)
                tries = 0
                while n > 0:
                    try:
                        case = annotated_lesion_case(wide_slab[None], n_raters=3, levels=(0.3, 0.7),
                                                     boundary_mm=0.5, spacing=brain["mm"], seed=rng, n=n,
                                                     mask=wide_mask, radius_mm=(3.0, 9.0), contrast=(0.2, 0.6),
                                                     polarity="both")
                    except DataError:
                        n -= 1
                        continue
                    drawn = np.zeros_like(raters)
                    drawn[..., wide] = np.asarray(case.annotations)[:, 0]
                    drawn &= slab
                    tries += 1
                    if drawn[1].any() or tries >= 20:  # the middle rater's lesions reach into the slab
                        image[..., wide], raters = np.asarray(case.image)[0], drawn
                        break
                name = f"{split}_{brain['name']}_{d}"
                files = {"image": image, "mask": brain["brain"].astype(np.uint8), "region": slab.astype(np.uint8),
                         **{f"r{k}": raters[k].astype(np.uint8) for k in range(3)}}
                for key, volume in files.items():
                    suffix = "" if key == "image" else f"_{key}"
                    nib.save(nib.Nifti1Image(volume, brain["affine"]), folder / f"{name}{suffix}.nii.gz")
                entries.append({"image": f"{name}.nii.gz", "label": f"{name}_r1.nii.gz", "mask": f"{name}_mask.nii.gz",
                                "annotations": [f"{name}_r0.nii.gz", f"{name}_r2.nii.gz"],
                                "region": f"{name}_region.nii.gz"})
        listings[split] = folder / f"{split}.json"
        listings[split].write_text(json.dumps({"test": entries}, indent=1))
    return listings


def regions(listing: Path) -> dict[str, torch.Tensor]:
    """Each case's region ``(1, X, Y, Z)`` by its image's file name."""
    entries = json.loads(listing.read_text())["test"]
    return {e["image"]: torch.from_numpy(np.asarray(nib.load(listing.parent / e["region"]).dataobj) > 0)[None]
            for e in entries}


def _tiny_models(folder: Path) -> tuple[Path, Path]:
    """Untrained tiny models with the bundled model's data record (for ``--quick`` without trained weights)."""
    from medidiff.core.processes import make_process
    from medidiff.nets import build_segmentation_unet, build_unet
    from medidiff.weights import save_model

    prep = {"source": "sample:lesions", "orientation": "RAS", "spacing_mm": [2.0, 2.0], "slicing_axis": 2,
            "size": [80, 96], "intensity": {"method": "percentile", "percentiles": [0.5, 99.5]},
            "labels": {"classes": ["background", "lesion"]}}
    torch.manual_seed(0)
    diffusion = build_unet(in_channels=1, cond_channels=1, channels=(8, 16), attention_levels=(False, False),
                           norm_num_groups=8, num_head_channels=8)
    save_model(folder / "diffusion", diffusion, make_process("ddpm", n_steps=1000), "x0", {"data_prep": prep})
    unet = build_segmentation_unet(in_channels=1, cond_channels=1, channels=(4, 8), num_res_units=1)
    save_model(folder / "unet", unet, make_process("ddpm", n_steps=1000), "x0", {"data_prep": prep})
    return folder / "diffusion", folder / "unet"


def run_setting(model, info, cases: list, members: int, steps: int, seed: int,
                where: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean metrics over the cases for one setting and seed (seconds: per case); ``where``: each case's region."""
    options = SegmentSection(progress=False).updated(members=members, steps=steps)
    scores = []
    for case in cases:
        region = where[Path(case.source.paths[0]).name]
        r = analyse(model, info, case, options, seed=seed, region=region)
        m = case_metrics(r, case.label, [case.label, *case.annotations], region=region)
        m["seconds"] = r.time_s
        scores.append(m)
    with warnings.catch_warnings():  # a metric no case defines (HD95 of empty masks) is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: float(np.nanmean([s.get(k, np.nan) for s in scores])) for k in METRICS}


def _cell(values: list[float], digits: int = 3) -> str:
    v = np.array([x for x in values if np.isfinite(x)])
    if not v.size:
        return "—"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if v.size > 1 else f"{v.mean():.{digits}f}"


def _table(rows: list[dict], settings: dict, chosen: str | None, test_split: str, with_val: bool) -> list[str]:
    lines = ["| setting | NFE per slice | " + ("val Dice | " if with_val else "") + "test Dice | HD95 | GED | ECE | "
             "unc.-error AUROC | s / case (fastest seed) | seeds |",
             "|---|---|" + ("---|" if with_val else "") + "---|---|---|---|---|---|---|"]
    for key, (members, steps, _) in settings.items():
        test = [r for r in rows if r["setting"] == key and r["split"] == test_split]
        vals = [r for r in rows if r["setting"] == key and r["split"] == "validation"]
        if not test:
            continue
        label = f"{members} × {steps}" if key != "unet" else "U-Net (deterministic)"
        label += " (chosen on validation)" if key == chosen else ""
        val_cell = f"{_cell([r['dice'] for r in vals])} | " if with_val else ""
        lines.append(f"| {label} | {members * steps} | " + val_cell
                     + " | ".join(_cell([r[m] for r in test], 2 if m == "hd95" else 3)
                                  for m in ("dice", "hd95", "ged", "ece", "uncertainty_error_auroc"))
                     + f" | {min(r['seconds'] for r in test):.2f}"
                     + f" | {len(test)} |")
    return lines


def write_report(path: Path, rows: list[dict], settings: dict, meta: dict) -> None:
    """The table of test rows (and validation Dice); rows on a subset of the test cases get their own table."""
    ensembles = [k for k, (_, _, kind) in settings.items() if kind == "diffusion"]
    val = {k: np.mean([r["dice"] for r in rows if r["setting"] == k and r["split"] == "validation"])
           for k in ensembles if any(r["setting"] == k and r["split"] == "validation" for r in rows)}
    chosen = max(val, key=lambda k: val[k]) if val else None
    lines = ["# Segmentation: ensembles of a conditional diffusion model vs a deterministic U-Net", "",
             f"Models: `{meta['model']}` (step {meta['model_step']}), `{meta['unet']}` (step {meta['unet_step']}). "
             f"{meta['n_cases'].get('validation', 0)} validation and {meta['n_cases'].get('test', 0)} test cases "
             "(whole MNI152 brains at 2 mm and 1 mm with lesions inserted in a held-out slab, 3 raters; see the "
             "script's docstring). Mean ± std over seeds of the mean over cases; seconds are the fastest seed's (the "
             "machine is shared: slower seeds measured other jobs). Dice, HD95 (mm) and ECE against "
             "the middle rater, GED against all three, uncertainty-error AUROC of the predictive entropy inside "
             f"the brain, all within the slab. {meta['machine']}.", ""]
    lines += _table(rows, settings, chosen, "test", with_val=True)
    for split in sorted({r["split"] for r in rows} - {"validation", "test"}):
        lines += ["", f"On `{split}` (a subset of the test cases, where a setting is too slow for all):", ""]
        lines += _table(rows, settings, None, split, with_val=False)
    write_text("\n".join(lines) + "\n", path)


def _shown(path: Path) -> str:
    """The path as the table shows it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "data" / "weights" / "seg_lesion_2d.safetensors")
    parser.add_argument("--unet", type=Path, default=ROOT / "data" / "weights" / "seg_unet_2d.safetensors")
    parser.add_argument("--out", type=Path, default=None, help="the table (default: benchmarks/results/segment.md)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the ensembles")
    parser.add_argument("--only", help="comma-separated setting keys (default: all)")
    parser.add_argument("--draws", type=int, default=4, help="cases per brain and split")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: PyTorch's default)")
    parser.add_argument("--splits", default="validation,test", help="comma-separated splits to run")
    parser.add_argument("--max-cases", type=int, default=0, help="only the first N cases of each split (0: all)")
    parser.add_argument("--append", action="store_true",
                        help="merge into the rows of an earlier run's JSON beside --out (same setting, split and "
                             "seed replaced)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (see the docstring)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else SETTINGS
    if args.only:
        settings = {k: v for k, v in settings.items() if k in args.only.split(",")}
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_segment_"))
    out = args.out or (work / "segment.md" if args.quick else ROOT / "benchmarks" / "results" / "segment.md")
    model_path, unet_path = args.model, args.unet
    if args.quick and not (model_path.with_suffix(".json").is_file() and unet_path.with_suffix(".json").is_file()):
        model_path, unet_path = _tiny_models(work / "models")
    models = {"diffusion": load_denoiser(model_path), "unet": load_denoiser(unet_path)}
    listings = make_cases(work, 1 if args.quick else args.draws, args.quick)
    cases = {split: [load_case(s) for s in find_cases(p)] for split, p in listings.items()}
    where = {name: r for p in listings.values() for name, r in regions(p).items()}
    cases = {(f"{k}[:{args.max_cases}]" if args.max_cases else k): (v[:args.max_cases] if args.max_cases else v)
             for k, v in cases.items() if k in args.splits.split(",")}
    rows = []
    for key, (members, steps, kind) in settings.items():
        model, info = models[kind]
        for seed in seeds if kind == "diffusion" else seeds[:1]:
            for split, group in cases.items():
                start = time.perf_counter()
                result = run_setting(model, info, group, members, steps, seed, where)
                rows.append({"setting": key, "split": split, "seed": seed, "n_cases": len(group), **result})
                print(f"{key} seed {seed} {split}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items())
                      + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    meta = {"model": _shown(model_path), "unet": _shown(unet_path), "model_step": models["diffusion"][1].step,
            "unet_step": models["unet"][1].step, "seeds": seeds, "n_cases": {k: len(v) for k, v in cases.items()},
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    if args.append and out.with_suffix(".json").is_file():
        earlier = json.loads(out.with_suffix(".json").read_text())
        new = {(r["setting"], r["split"], r["seed"]) for r in rows}
        rows = [r for r in earlier["rows"] if (r["setting"], r["split"], r["seed"]) not in new] + rows
        settings = {k: v for k, v in sorted((SETTINGS | QUICK).items(), key=lambda kv: kv[0] == "unet")
                    if any(r["setting"] == k for r in rows)}
        meta["n_cases"] = earlier["meta"]["n_cases"] | meta["n_cases"]
    write_json({"meta": meta, "rows": rows}, out.with_suffix(".json"))
    write_report(out, rows, settings, meta)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
