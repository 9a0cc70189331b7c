"""The ``medidiff`` command: ``info``, ``inspect``, ``convert``, ``train``, ``run``, ``detect``, ``reconstruct``,
``segment``.

Errors of the ``MedidiffError`` family print as one message on stderr (with the traceback only under
``--debug``) and exit with a status that says what kind of error it was: 2 for a usage or recipe error
(argparse's own status for a bad option), 4 for unusable data, 5 for an unusable model file, 6 for a
training that cannot go on; a batch in which some cases failed (listed in ``failures.csv``) exits with 3
(see ``EXIT_CODES``). A misspelt command, option or choice gets the closest valid one suggested. Every
command takes ``--quiet``/``--verbose``/``--debug``; task commands take ``-i/--input`` and ``-o/--out``;
``info`` and ``inspect`` print ``--json`` on request. Recipe commands share ``--out``, ``--device``,
``--set``, ``--seed`` and ``--resume``; these become recipe overrides, applied before validation.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import DataError, MedidiffError, ModelError, RecipeError, TrainingError

__all__ = ["main", "build_parser", "EXIT_CODES", "DETECT_METHODS"]

#: ``detect --method``: the healthy reconstructions of ``medidiff.anomaly`` (``HealthyOptions.method``), listed here
#: so that the parser does not import the task.
DETECT_METHODS = {
    "partial": "partial diffusion from t_L (AnoDDPM; the default)",
    "invert": "DDIM inversion to t_L and back",
    "patch": "partial diffusion one tile at a time (pDDPM)",
    "guided": "DDIM inversion, then decoding steered to healthy by a noise-aware classifier (Wolleb et al. 2022; "
              "--set classifier=PATH)",
    "counterfactual": "a class-conditional model's null-class inversion, then decoding toward healthy by "
                      "classifier-free guidance (Sanchez et al. 2022; --set guidance_weight=W)",
    "latent": "a latent DDPM on a VQ-VAE's codes re-denoises only the latents it finds anomalous (Pinaya et al. "
              "2022; a latent model, --calibration for its threshold map or --set latent_thresholds=PATH)",
}

#: Exit status of a usage or recipe error (a bad option, recipe key or value); argparse's own status.
EXIT_ERROR = 2
#: Exit status of a run that finished but skipped some cases (listed in ``<out>/failures.csv``).
EXIT_FAILURES = 3
#: Exit status of unusable data: an input, mask or label missing, damaged or inconsistent; an output folder
#: that holds earlier results.
EXIT_DATA = 4
#: Exit status of an unusable model file (missing, damaged, pickled or incompatible weights).
EXIT_MODEL = 5
#: Exit status of a training that cannot go on (e.g. a non-finite loss).
EXIT_TRAINING = 6
#: Exit status after Ctrl-C.
EXIT_INTERRUPTED = 130
#: Exit status when the reader of the output went away (``medidiff inspect ... | head``): 128 + SIGPIPE.
EXIT_PIPE = 141
#: Every exit status, as the help text and the README list them.
EXIT_CODES = (f"exit status: 0 all done; 1 an internal error (a bug: please report it); {EXIT_ERROR} a usage or "
              f"recipe error (bad option, recipe key or value); {EXIT_FAILURES} the run finished but some cases "
              f"failed (see failures.csv in the output folder); {EXIT_DATA} a data error (an input, mask or label "
              f"missing, damaged or inconsistent, or an output folder holding earlier results); {EXIT_MODEL} a model "
              f"error (weights missing, damaged or incompatible); {EXIT_TRAINING} training could not go on (e.g. a "
              f"non-finite loss); {EXIT_INTERRUPTED} interrupted; {EXIT_PIPE} the output pipe was closed (e.g. by "
              "`| head`). The error message says which file or key and how to fix it. Under torchrun, the "
              "launcher exits 1 when any rank does not exit 0.")
#: The exit status of each error class (the most specific class first).
_ERROR_STATUS = ((RecipeError, EXIT_ERROR), (DataError, EXIT_DATA), (ModelError, EXIT_MODEL),
                 (TrainingError, EXIT_TRAINING), (MedidiffError, EXIT_ERROR))


def exit_status(error: MedidiffError) -> int:
    """The exit status of a ``MedidiffError`` (see ``EXIT_CODES``)."""
    return next(code for kind, code in _ERROR_STATUS if isinstance(error, kind))


def _closest(word: str, choices: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors suggest the closest valid command or choice (difflib)."""

    def error(self, message: str):
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            close = _closest(match.group(1), re.findall(r"'([^']*)'", match.group(2)))
            if close:
                message += f"; did you mean '{close}'?"
        super().error(message)

    def suggest_options(self, extra: Sequence[str]) -> str:
        """``unrecognized arguments: ...`` with the closest option of this parser for each misspelt one."""
        options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        hints = []
        for item in extra:
            if item.startswith("--"):
                close = _closest(item.split("=", 1)[0], options)
                if close:
                    hints.append(f"did you mean {close}?")
        return f"unrecognized arguments: {' '.join(extra)}" + ("; " + "; ".join(hints) if hints else "")


def _common(parser: argparse.ArgumentParser) -> None:
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="print errors only (no progress bars or warnings)")
    noise.add_argument("-v", "--verbose", action="store_true", help="also print what each step does (info logs)")
    noise.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _input_path(parser: argparse.ArgumentParser, what: str) -> None:
    """The input as a positional PATH or as ``-i/--input``."""
    parser.add_argument("path", type=Path, nargs="?", help=what)
    parser.add_argument("-i", "--input", type=Path, help="the same as PATH")


def _recipe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="the recipe YAML file")
    parser.add_argument("-o", "--out", type=Path, help="output folder (default: runs/<recipe name>)")
    parser.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set training.lr=1e-4 (repeatable; values are YAML)")
    parser.add_argument("--seed", type=int, help="the run's seed")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    _common(parser)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``medidiff`` command."""
    parser = _Parser(
        prog="medidiff",
        description="Diffusion models for CT and MRI: reconstruction, segmentation with uncertainty and "
                    "anomaly detection, driven by YAML recipes.",
        epilog=EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"medidiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.set_defaults(_commands=sub.choices)

    p = sub.add_parser("info", help="versions, devices and optional decoders", epilog=EXIT_CODES)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(p)

    p = sub.add_parser("inspect", help="list the series and volumes found at a path, with any problems",
                       epilog=EXIT_CODES)
    _input_path(p, "a DICOM file or folder, DICOMDIR, NIfTI file or folder, datalist or CSV")
    p.add_argument("--select", default="all", help="DICOM series selection rule (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object per series (a list) instead of a table")
    _common(p)

    p = sub.add_parser("convert", help="write each series found at a path as NIfTI with its true geometry, a JSON "
                       "sidecar per series and a table of the files written", epilog=EXIT_CODES)
    _input_path(p, "a DICOM file or folder, DICOMDIR, NIfTI file or folder, datalist or CSV")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--select", default="all", help="DICOM series selection rule (default: all)")
    p.add_argument("--allow-unknown-geometry", action="store_true",
                   help="write series without ImagePositionPatient/ImageOrientationPatient too, marked as having no "
                        "world geometry (NIfTI qform/sform codes 0); by default they are refused")
    p.add_argument("--keep-identifiers", action="store_true",
                   help="write the patient's name, IDs, dates and institution into the sidecars (left out by default)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier conversion in --out")
    _common(p)

    p = sub.add_parser("train", help="train the model a recipe describes", epilog=EXIT_CODES)
    _recipe_options(p)

    p = sub.add_parser("run", help="run a recipe end to end, whatever its task", epilog=EXIT_CODES)
    _recipe_options(p)

    p = sub.add_parser("detect", help="anomaly heatmaps for the scans at a path (healthy reconstruction)",
                       epilog=EXIT_CODES)
    p.add_argument("--model", help="weights: a .safetensors file (its .json beside it) or a folder (default: "
                                   "data/weights/healthy_brain_2d.safetensors, the bundled model of healthy brain MRI)")
    p.add_argument("-i", "--input", required=True, help="a NIfTI file or folder, DICOM, or a JSON datalist")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--labels", help="lesion mask of a single scan (enables metrics.json)")
    p.add_argument("--mask", help="brain/foreground mask of a single scan")
    p.add_argument("--calibration", help="healthy scans to calibrate the threshold on")
    p.add_argument("--threshold", help="a fixed threshold in the heatmaps' units (each scan's map over its own "
                                       "0.9-quantile: one number for every scan), as thresholds.json records it, "
                                       "or a thresholds.json; with --set scan_quantile=null it is on the model's "
                                       "[-1, 1] scale and each case's value in its heatmap's units is in "
                                       "scores.csv (threshold_scan_units)")
    p.add_argument("--method", choices=tuple(DETECT_METHODS), metavar="METHOD",
                   help="the healthy reconstruction: " + "; ".join(f"{k}: {v}" for k, v in DETECT_METHODS.items())
                   + " (the same as --set method=METHOD)")
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, help="noise seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a detection option, e.g. --set t_levels=[0.25,0.5] (keys of the recipe's anomaly "
                        "section and of its reconstruction and map parts, by name; repeatable; values are YAML)")
    _common(p)

    p = sub.add_parser("reconstruct", help="MRI or CT reconstruction from images (simulated measurements), "
                       "fastMRI k-space (.h5) or sinograms (.npz)", epilog=EXIT_CODES)
    p.add_argument("-i", "--input", required=True, help="images (NIfTI, DICOM, a folder or datalist), a fastMRI .h5 "
                   "file or a sinogram .npz (sinogram, angles_deg, optional pixel_size_mm)")
    p.add_argument("--modality", required=True, choices=("mri", "ct"))
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
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
    p.add_argument("-i", "--input", required=True, help="a NIfTI file or folder, DICOM, or a JSON datalist")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
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


def _say(args: argparse.Namespace, *lines: str) -> None:
    """Print a progress or summary line unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        for line in lines:
            print(line)


def _info(args: argparse.Namespace) -> int:
    import torch

    from .manifest import environment, optional_packages

    env = {**environment(), "cpu_threads": torch.get_num_threads(), "optional_packages": optional_packages()}
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    width = 16
    for key in ("medidiff", "python", "torch", "monai", "platform"):
        print(f"{key:<{width}}{env[key]}")
    print(f"{'cuda':<{width}}{'available, CUDA ' + str(env['cuda_version']) if env['cuda_available'] else 'no'}")
    for i, name in enumerate(env["gpus"]):
        print(f"{'  cuda:' + str(i):<{width}}{name}")
    print(f"{'cpu threads':<{width}}{env['cpu_threads']}")
    for name, present in env["optional_packages"].items():
        print(f"{name:<{width}}{'installed' if present else 'not installed'}")
    return 0


def _announce_device(args: argparse.Namespace, spec: str) -> None:
    """Print the device a run uses, before it starts (rank 0 only; not under ``--quiet``)."""
    import torch

    from .runtime import env_rank, resolve_device

    device = resolve_device(spec)
    if env_rank()[0] != 0:
        return
    if device.type == "cuda":
        text = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        text = f"{device} ({torch.get_num_threads()} threads)"
    _say(args, f"device: {text}")


def _recipe_command(args: argparse.Namespace) -> int:
    from . import recipes, runs

    recipe = recipes.load_recipe(args.recipe, _overrides(args))
    if args.quiet:  # no progress bars either
        section = "training" if recipe.task == "train" else recipe.task
        recipe = recipes.load_recipe(args.recipe, [*_overrides(args), f"{section}.progress=false"])
    out = args.out or Path("runs") / args.recipe.stem
    _announce_device(args, recipe.device)
    result = (runs.train if args.command == "train" else runs.run)(recipe, out)
    weights = getattr(result, "weights", None)
    if weights is not None:
        _say(args, f"trained {result.step} steps; weights: {weights}")
    summary = getattr(result, "summary", None)
    if summary:
        _say(args, summary)
    _say(args, f"results in {out}")
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
    if args.quiet:
        overrides.append(f"{task}.{route('progress')}=false")
    recipe = recipes.parse_recipe({"task": task, task: section}, source=f"medidiff {args.command}",
                                  overrides=overrides)
    _announce_device(args, recipe.device)
    result = runs.run(recipe, args.out)
    _say(args, result.summary, f"results in {args.out}")
    return _status(result)


def _given(args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _detect_command(args: argparse.Namespace) -> int:
    section = {"inputs": args.input, **_given(args, ("model", "labels", "mask", "calibration", "threshold"))}
    return _task_command(args, "anomaly", section, _given(args, ("method",)))


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


def _path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """The input of ``inspect``/``convert``: PATH or ``-i/--input`` (one of them, once)."""
    if args.path is not None and args.input is not None and args.path != args.input:
        parser.error("give the input once: as PATH or as -i/--input")
    path = args.path if args.path is not None else args.input
    if path is None:
        parser.error("the input is required: give PATH or -i/--input")
    return path


def _inspect(args: argparse.Namespace, path: Path) -> int:
    from .data.inspect import format_inspection, inspect_path

    rows = inspect_path(path, select=args.select)
    print(json.dumps(rows, indent=2) if args.json else format_inspection(rows))
    return 0


def _convert(args: argparse.Namespace, path: Path) -> int:
    from . import runs

    result = runs.convert(path, args.out, select=args.select, allow_unknown_geometry=args.allow_unknown_geometry,
                          keep_identifiers=args.keep_identifiers, overwrite=args.overwrite)
    _say(args, *(str(p) for p in result.images))
    _say(args, f"{len(result.images)} series converted to {args.out} (NIfTI and a JSON sidecar each); every file "
               f"written is listed in {result.table}")
    if result.failures:
        _say(args, f"{result.failures} series skipped: see {result.failures_file}")
    return _status(result)


def _dispatch(args: argparse.Namespace) -> int:
    commands = args._commands
    if args.command == "info":
        return _info(args)
    if args.command == "inspect":
        return _inspect(args, _path(args, commands["inspect"]))
    if args.command == "convert":
        return _convert(args, _path(args, commands["convert"]))
    if args.command == "detect":
        return _detect_command(args)
    if args.command == "reconstruct":
        return _reconstruct_command(args)
    if args.command == "segment":
        return _segment_command(args)
    return _recipe_command(args)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the arguments; an unknown option is a usage error naming the closest valid one."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = args._commands.get(getattr(args, "command", None), parser)
        command.error(command.suggest_options(extra))
    return args


def _quiet_pipe() -> None:
    """Point stdout at /dev/null so that nothing more is written to a closed pipe (not even at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _flushed() -> bool:
    """Flush stdout; False (and stdout pointed at /dev/null) when its reader has gone away."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_pipe()
        return False
    return True


def _level(args: argparse.Namespace) -> int:
    if args.debug:
        return logging.DEBUG
    if args.verbose:
        return logging.INFO
    return logging.ERROR if args.quiet else logging.WARNING


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medidiff`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status (see ``EXIT_CODES``): 0; 2 for a usage or recipe error; 3 when some cases failed;
        4, 5, 6 for a data, model or training error; 130 when interrupted; 141 when the output pipe closed.
    """
    try:
        args = _parse(argv)
    except SystemExit:  # --help, --version or a usage error: argparse has printed
        if not _flushed():
            return EXIT_PIPE
        raise
    level = _level(args)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(lambda record: not getattr(record, "reraised", False))  # printed once, below
    logger = logging.getLogger("medidiff")
    old_level = logger.level
    if level < logging.WARNING:
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        status = _dispatch(args)
        return status if _flushed() else EXIT_PIPE
    except MedidiffError as e:
        if args.debug:
            traceback.print_exc()
        print(f"medidiff: error: {e}", file=sys.stderr)
        return exit_status(e)
    except BrokenPipeError:
        _quiet_pipe()
        return EXIT_PIPE
    except KeyboardInterrupt:
        print("medidiff: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


if __name__ == "__main__":
    sys.exit(main())
