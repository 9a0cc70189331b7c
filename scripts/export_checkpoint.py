"""Export the EMA (or raw) weights of a training checkpoint as ``model.safetensors`` + ``model.json``.

    python scripts/export_checkpoint.py runs/demo_train --out data/weights --name demo_brain_2d [--step N]

Uses the run's resolved ``recipe.yaml`` to rebuild the network and the data record, so the exported
model loads with ``medidiff.weights.load_denoiser`` like one written at the end of training; the model it
was fine-tuned from (``init_from``) is carried over from the run's ``model.json``. With ``--name``, a run
that did not finish (stopped at a checkpoint) gets ``<name>.manifest.json``: the run's manifest completed
with the exported step, the training inputs' SHA-256 (the recipe's data and ``init_from``) and the exported
weights'.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from medidiff.recipes import load_recipe
from medidiff.train import find_checkpoint
from medidiff.weights import CONFIG_NAME, WEIGHTS_NAME, load_meta, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="training output folder (holds recipe.yaml and checkpoints/)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    parser.add_argument("--name", default=None, help="file stem instead of 'model' (e.g. demo_brain_2d)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    args = parser.parse_args()

    if args.step is None:
        found = find_checkpoint(args.run)
        if found is None:
            raise SystemExit(f"{args.run}: no checkpoint found")
        path = found[0]
    else:
        path = args.run / "checkpoints" / f"step_{args.step:07d}.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    recipe = load_recipe(args.run / "recipe.yaml")
    net = recipe.model.build(spatial_dims=recipe.data.spatial_dims, **_channels(args.run))
    raw = args.raw or not state.get("ema")
    net.load_state_dict(state["model"] if raw else state["ema"]["shadow"])
    extra = {"step": int(state["step"]), "weights": "raw" if raw else "ema", "checkpoint": path.name,
             "data_prep": _data_prep(args.run), "noise": {"kind": recipe.training.noise},
             "loss_weighting": recipe.training.loss_weighting}
    if (args.run / CONFIG_NAME).exists():
        meta = load_meta(args.run / CONFIG_NAME)
        extra |= {k: v for k, v in (("init_from", meta.init_from), ("extra", meta.extra)) if v}
        extra["noise"] = meta.noise.model_dump()  # with the options the run learned (simplex octaves...)
    tmp = args.out / f".export_{path.stem}"
    save_model(tmp, net, recipe.process.build(), recipe.model.prediction, extra)
    stem = args.name or "model"
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.move(tmp / WEIGHTS_NAME, args.out / f"{stem}.safetensors")
    shutil.move(tmp / CONFIG_NAME, args.out / f"{stem}.json")
    tmp.rmdir()
    print(f"{args.out / (stem + '.safetensors')}: step {extra['step']} ({extra['weights']} weights)")
    if args.name and _unfinished(args.run):
        _complete_manifest(args.run, args.out / f"{stem}.manifest.json", args.out / f"{stem}.safetensors", extra)


def _unfinished(run: Path) -> bool:
    manifest = run / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text())["status"] != "finished"


def _complete_manifest(run: Path, target: Path, weights: Path, extra: dict) -> None:
    """The run's manifest for a model exported from a checkpoint of a run that was stopped there."""
    from medidiff.manifest import sha256_file
    from medidiff.outputs import write_json
    from medidiff.train_data import build_data
    from medidiff.weights import model_paths

    recipe = load_recipe(run / "recipe.yaml")
    inputs = list(build_data(recipe.data, recipe.seed).inputs)
    if recipe.training.init_from:
        inputs.append(model_paths(recipe.training.init_from)[0])
    record = json.loads((run / "manifest.json").read_text())
    record.update(status=f"stopped after step {extra['step']} (exported from {extra['checkpoint']})",
                  step=extra["step"], inputs={str(p): sha256_file(p) for p in inputs},
                  outputs={weights.name: sha256_file(weights)})
    write_json(record, target)


def _channels(run: Path) -> dict:
    """The channel counts the engine built the network with (from the run's model.json or manifest)."""
    meta_path = run / CONFIG_NAME
    if meta_path.exists():
        net = load_meta(meta_path).net
        classes = int(net.get("num_class_embeds", 0)) - 1 if net.get("num_class_embeds") else 0  # the null class
        return {"in_channels": net["in_channels"], "cond_channels": net["cond_channels"], "classes": classes}
    return {"in_channels": 1, "cond_channels": 0}


def _data_prep(run: Path) -> dict:
    """The data record of the run, rebuilt from its recipe (data preparation is deterministic).

    Rebuilding rather than copying the engine's record gives what the current code records (such as the
    reference quantiles that detection matches new scans to) for runs started before it did.
    """
    from medidiff.train_data import build_data

    recipe = load_recipe(run / "recipe.yaml")
    return build_data(recipe.data, recipe.seed).data_prep

if __name__ == "__main__":
    main()
