"""The ``medidiff`` command: ``info``, ``inspect``, ``convert``, ``train``, ``run``, ``detect``, ``reconstruct``,
``segment``.

Errors of the ``MedidiffError`` family print as one message on stderr (with the traceback only under
``--debug``) and exit with status 2; a batch run in which some cases failed (listed in ``failures.csv``)
exits with status 3 (see ``EXIT_CODES``). Recipe commands share ``--out``, ``--device``, ``--set``, ``--seed``
and ``--resume``; these become recipe overrides, applied before validation.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from .errors import MedidiffError

__all__ = ["main", "build_parser"]

#: Exit status for user-facing errors (bad recipe, bad data, bad model file).
EXIT_ERROR = 2
#: Exit status of a run that finished but skipped some cases (listed in ``<out>/failures.csv``).
EXIT_FAILURES = 3
#: Every exit status, as the help text lists them.
EXIT_CODES = (f"exit status: 0 all done; 1 an internal error (a bug: please report it); {EXIT_ERROR} an error "
              f"(bad recipe, data or model file; the message says which and how to fix it); {EXIT_FAILURES} "
              "the run finished but some cases failed (see failures.csv in the output folder); 130 interrupted. "
              "Under torchrun, the launcher exits 1 when any rank does not exit 0.")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _recipe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="the recipe YAML file")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<recipe name>)")
    parser.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set training.lr=1e-4 (repeatable; values are YAML)")
    parser.add_argument("--seed", type=int, help="the run's seed")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    _common(parser)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``medidiff`` command."""
    parser = argparse.ArgumentParser(
        prog="medidiff",
        description="Diffusion models for CT and MRI: reconstruction, segmentation with uncertainty and "
                    "anomaly detection, driven by YAML recipes.",
        epilog=EXIT_CODES,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="versions, devices and optional decoders")
    _common(p)

    p = sub.add_parser("inspect", help="list the series and volumes found at a path, with any problems")
    p.add_argument("path", type=Path)
    p.add_argument("--select", default="all", help="DICOM series selection rule (default: all)")
    _common(p)

    p = sub.add_parser("convert", help="write each series found at a path as NIfTI with its true geometry")
    p.add_argument("path", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--select", default="all", help="DICOM series selection rule (default: all)")
    _common(p)

    p = sub.add_parser("train", help="train the model a recipe describes")
    _recipe_options(p)

    p = sub.add_parser("run", help="run a recipe end to end, whatever its task", epilog=EXIT_CODES)
    _recipe_options(p)

    p = sub.add_parser("detect", help="anomaly heatmaps for the scans at a path (healthy reconstruction)",
                       epilog=EXIT_CODES)
    p.add_argument("--model", required=True, help="weights: a .safetensors file (its .json beside it) or a folder")
    p.add_argument("--input", required=True, help="a NIfTI file or folder, DICOM, or a JSON datalist")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--labels", help="lesion mask of a single scan (enables metrics.json)")
    p.add_argument("--mask", help="brain/foreground mask of a single scan")
    p.add_argument("--calibration", help="healthy scans to calibrate the threshold on")
    p.add_argument("--threshold", help="a fixed threshold: a number or a thresholds.json")
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, help="noise seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a detection option, e.g. --set t_levels=[0.25,0.5] (keys of the recipe's anomaly "
                        "section and of its reconstruction and map parts, by name; repeatable; values are YAML)")
    _common(p)

    p = sub.add_parser("reconstruct", help="MRI or CT reconstruction from images (simulated measurements), "
                       "fastMRI k-space (.h5) or sinograms (.npz)", epilog=EXIT_CODES)
    p.add_argument("--input", required=True, help="images (NIfTI, DICOM, a folder or datalist), a fastMRI .h5 file "
                   "or a sinogram .npz (sinogram, angles_deg, optional pixel_size_mm)")
    p.add_argument("--modality", required=True, choices=("mri", "ct"))
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--model", help="the prior (default: data/weights/mri_brain_2d or ct_2d.safetensors)")
    p.add_argument("--solver", choices=("dds", "dps", "pc", "merge"), help="diffusion solver (default: dds)")
    p.add_argument("--steps", type=int, help="solver steps (default: the solver's own)")
    for flag, kind, text in (("--acceleration", float, "MRI acceleration (default 4)"),
                             ("--center-fraction", float, "MRI fully sampled centre fraction (fastMRI's default)"),
                             ("--coils", int, "MRI simulated coils (default 1)"),
                             ("--views", int, "CT views (default 60)"),
                             ("--limited-angle", float, "CT arc in degrees (default 180: sparse view)"),
                             ("--dose", float, "CT incident photons per detector bin (default: noiseless)")):
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--mask", choices=("random", "equispaced", "gaussian", "poisson"),
                   help="MRI mask: fastMRI random or equispaced columns, 2D gaussian or Poisson-disc (default random)")
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, help="seed of the simulated measurements and the solver")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a recon option by name, e.g. --set t_start=0.5 (repeatable; values are YAML)")
    _common(p)

    p = sub.add_parser("segment", help="segmentation ensembles and uncertainty maps for the scans at a path",
                       epilog=EXIT_CODES)
    p.add_argument("--input", required=True, help="a NIfTI file or folder, DICOM, or a JSON datalist")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--model", help="weights (default: data/weights/seg_lesion_2d.safetensors)")
    p.add_argument("--members", type=int, help="masks sampled per image (default 10)")
    p.add_argument("--steps", type=int, help="sampler steps per member (default 10)")
    p.add_argument("--labels", help="reference label map of a single scan (enables metrics.json)")
    p.add_argument("--mask", help="brain/foreground mask of a single scan")
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, help="seed of the members")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a segment option by name, e.g. --set fusion=staple (repeatable; values are YAML)")
    _common(p)
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.device is not None:
        extra.append(f"device={args.device}")
    if args.seed is not None:
        extra.append(f"seed={args.seed}")
    if args.resume:
        extra.append("training.resume=true")
    return [*args.overrides, *extra]


def _info() -> int:
    import torch

    from .manifest import environment, optional_packages

    env = environment()
    width = 16
    for key in ("medidiff", "python", "torch", "monai", "platform"):
        print(f"{key:<{width}}{env[key]}")
    print(f"{'cuda':<{width}}{'available, CUDA ' + str(env['cuda_version']) if env['cuda_available'] else 'no'}")
    for i, name in enumerate(env["gpus"]):
        print(f"{'  cuda:' + str(i):<{width}}{name}")
    print(f"{'cpu threads':<{width}}{torch.get_num_threads()}")
    for name, present in optional_packages().items():
        print(f"{name:<{width}}{'installed' if present else 'not installed'}")
    return 0


def _recipe_command(args: argparse.Namespace) -> int:
    from . import recipes, runs

    recipe = recipes.load_recipe(args.recipe, _overrides(args))
    out = args.out or Path("runs") / args.recipe.stem
    result = (runs.train if args.command == "train" else runs.run)(recipe, out)
    weights = getattr(result, "weights", None)
    if weights is not None:
        print(f"trained {result.step} steps; weights: {weights}")
    summary = getattr(result, "summary", None)
    if summary:
        print(summary)
    print(f"results in {out}")
    return _status(result)


def _task_command(args: argparse.Namespace, task: str, section: dict, flags: dict) -> int:
    """Run a task command: its section, its flags and ``--set`` items (options named plainly) as a recipe."""
    import importlib

    from . import recipes, runs

    route = importlib.import_module(f"medidiff.{task}.config").route
    overrides = [f"{task}.{route(k)}={v}" for k, v in flags.items() if v is not None]
    for item in args.overrides:
        key = item.split("=", 1)[0]
        top = key.split(".")[0]
        overrides.append(item if top in (task, "seed", "device") else f"{task}.{route(key)}{item[len(key):]}")
    overrides += _overrides(argparse.Namespace(overrides=[], device=args.device, seed=args.seed, resume=False))
    recipe = recipes.parse_recipe({"task": task, task: section}, source=f"medidiff {args.command}",
                                  overrides=overrides)
    result = runs.run(recipe, args.out)
    print(result.summary)
    print(f"results in {args.out}")
    return _status(result)


def _given(args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _detect_command(args: argparse.Namespace) -> int:
    section = {"model": args.model, "inputs": args.input,
               **_given(args, ("labels", "mask", "calibration", "threshold"))}
    return _task_command(args, "anomaly", section, {})


def _reconstruct_command(args: argparse.Namespace) -> int:
    section = {"inputs": args.input, "modality": args.modality, **_given(args, ("model",))}
    flags = _given(args, ("solver", "steps", "acceleration", "center_fraction", "mask", "coils", "views",
                          "limited_angle", "dose"))
    return _task_command(args, "recon", section, flags)


def _segment_command(args: argparse.Namespace) -> int:
    section = {"inputs": args.input, **_given(args, ("model", "labels", "mask"))}
    return _task_command(args, "segment", section, _given(args, ("members", "steps")))


def _status(result) -> int:
    """``EXIT_FAILURES`` when some cases failed (reported by rank 0 alone, which gathers them), else 0."""
    return EXIT_FAILURES if getattr(result, "failures", 0) else 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "info":
        return _info()
    if args.command == "inspect":
        from .data.inspect import format_inspection, inspect_path

        print(format_inspection(inspect_path(args.path, select=args.select)))
        return 0
    if args.command == "convert":
        from .data.inspect import convert_path

        written = convert_path(args.path, args.out, select=args.select)
        for path in written:
            print(path)
        print(f"{len(written)} file(s) written to {args.out}")
        return 0
    if args.command == "detect":
        return _detect_command(args)
    if args.command == "reconstruct":
        return _reconstruct_command(args)
    if args.command == "segment":
        return _segment_command(args)
    return _recipe_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medidiff`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, 2 for a ``MedidiffError``, 3 when some cases failed (see ``EXIT_CODES``).
    """
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if args.debug else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("medidiff").addHandler(handler)
    try:
        return _dispatch(args)
    except MedidiffError as e:
        if args.debug:
            traceback.print_exc()
        print(f"medidiff: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("medidiff: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.getLogger("medidiff").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
