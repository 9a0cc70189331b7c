"""Export the EMA (or raw) weights of a training checkpoint as ``model.safetensors`` + ``model.json``.

    python scripts/export_checkpoint.py runs/demo_train --out data/weights --name demo_brain_2d [--step N]

Uses the run's resolved ``recipe.yaml`` to rebuild the network and the data record, so the exported
model loads with ``medidiff.weights.load_denoiser`` like one written at the end of training.
"""

from __future__ import annotations

import argparse
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
             "data_prep": _data_prep(args.run), "noise": {"kind": recipe.training.noise}}
    tmp = args.out / f".export_{path.stem}"
    save_model(tmp, net, recipe.process.build(), recipe.model.prediction, extra)
    stem = args.name or "model"
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.move(tmp / WEIGHTS_NAME, args.out / f"{stem}.safetensors")
    shutil.move(tmp / CONFIG_NAME, args.out / f"{stem}.json")
    tmp.rmdir()
    print(f"{args.out / (stem + '.safetensors')}: step {extra['step']} ({extra['weights']} weights)")


def _channels(run: Path) -> dict:
    """The channel counts the engine built the network with (from the run's model.json or manifest)."""
    meta_path = run / CONFIG_NAME
    if meta_path.exists():
        net = load_meta(meta_path).net
        return {"in_channels": net["in_channels"], "cond_channels": net["cond_channels"]}
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
