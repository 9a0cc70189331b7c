"""Running a recipe: the task table, the run folder, its manifest and log.

``run(recipe, out_dir)`` looks the recipe's task up in ``TASKS`` (a module path and function, imported
on first use: tasks never import this module) and calls it with the task's own section, the seed and the
device; ``train(recipe, out_dir)`` runs the training engine. Every run's folder gets the resolved
``recipe.yaml`` (only the sections that apply to the task), a ``manifest.json`` (versions, seed, recipe
hash, checksums of inputs and outputs) and a log named for the task (``train.log``, ``anomaly.log``). Rank 0
holds the folder's lock (``medidiff.outputs.lock``) for the whole run, so two runs never interleave.
``convert(path, out_dir, ...)`` records a ``medidiff convert`` folder the same way (its options stand for the
recipe).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import MedidiffError, RecipeError
from .manifest import Manifest, sha256_file
from .outputs import write_text
from .outputs.lock import RunLock
from .recipes import Recipe
from .runtime import env_rank, resolve_device

__all__ = ["TASKS", "RECIPE_NAME", "LOG_NAME", "convert", "run", "train"]

RECIPE_NAME = "recipe.yaml"
#: The run log in a run's folder, named for its task.
LOG_NAME = "{task}.log"
#: ``task: name`` runs ``module.function(section, out_dir, seed=..., device=...)``.
TASKS: dict[str, str] = {"anomaly": "medidiff.anomaly.task:run", "recon": "medidiff.recon.task:run",
                         "segment": "medidiff.segment.task:run"}

log = logging.getLogger("medidiff.runs")


def _task_function(task: str) -> Callable[..., Any]:
    if task not in TASKS:
        raise RecipeError(f"task {task!r} cannot be run by this installation of medidiff", where="task",
                          fix=f"use one of: {', '.join(sorted(TASKS))} (or 'medidiff train' for training).")
    module, _, name = TASKS[task].partition(":")
    return getattr(importlib.import_module(module), name)


def _files(result: Any, key: str) -> list[Path]:
    return [Path(p) for p in getattr(result, key, None) or [] if Path(p).is_file()]


def _execute(recipe: Recipe, out_dir: str | Path, fn: Callable[[Path], Any]) -> Any:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if env_rank()[0] != 0:
        return fn(out_dir)
    with RunLock(out_dir):  # one run at a time in a folder; rank 0 holds it
        return _recorded(recipe, out_dir, fn)


def _recorded(recipe: Recipe, out_dir: Path, fn: Callable[[Path], Any]) -> Any:
    """Run ``fn`` with the run folder's ``recipe.yaml``, log and manifest (rank 0, holding the lock)."""
    text = recipe.to_yaml()
    write_text(text, out_dir / RECIPE_NAME)
    handler = logging.FileHandler(out_dir / LOG_NAME.format(task=recipe.task), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("medidiff")
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(min(old_level or logging.INFO, logging.INFO))
    manifest = Manifest(out_dir, recipe_text=text, seed=recipe.seed, device=str(resolve_device(recipe.device)),
                        task=recipe.task, status="running")
    manifest.write()
    log.info("%s run in %s (recipe sha256 %s)", recipe.task, out_dir, manifest.data["recipe_sha256"])
    try:
        result = fn(out_dir)
    except BaseException as e:
        if isinstance(e, MedidiffError):  # the command prints it; the console handler skips this record
            log.error("%s", e, extra={"reraised": True})
        else:
            log.exception("run failed")
        manifest.update(status="failed", error=str(e) if isinstance(e, MedidiffError) else f"{type(e).__name__}: {e}")
        manifest.write(finished=True)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
    manifest.data["inputs"] = {str(p): sha256_file(p) for p in _files(result, "inputs")}
    manifest.add_outputs(_files(result, "outputs"))
    for key in ("step", "world_size", "replica_checksums"):
        value = getattr(result, key, None)
        if value is not None:
            manifest.update(**{key: value})
    manifest.update(status="finished")
    manifest.write(finished=True)
    return result


def run(recipe: Recipe, out_dir: str | Path) -> Any:
    """Run a recipe end to end, whatever its task (``train`` recipes train).

    Args:
        recipe: the validated recipe.
        out_dir: the run's folder (receives ``recipe.yaml``, ``manifest.json``, ``<task>.log`` and results).

    Returns:
        The task's result (``medidiff.results.TaskResult``; ``medidiff.train.TrainResult`` for training).

    Raises:
        RecipeError: the task is not available.
    """
    if recipe.task == "train":
        return train(recipe, out_dir)
    fn = _task_function(recipe.task)
    section = getattr(recipe, recipe.task)
    return _execute(recipe, out_dir, lambda out: fn(section, out, seed=recipe.seed, device=recipe.device))


def train(recipe: Recipe, out_dir: str | Path) -> Any:
    """Train the model a recipe describes (``medidiff train``).

    Returns:
        The ``medidiff.train.TrainResult``.

    Raises:
        RecipeError: the recipe is not a training recipe.
    """
    if recipe.task != "train":
        raise RecipeError(f"a {recipe.task!r} recipe does not train a model", where="task",
                          fix="use a training recipe (task: train), e.g. recipes/demo_train.yaml.")
    from .train import run_recipe

    return _execute(recipe, out_dir, lambda out: run_recipe(recipe, out))


def convert(path: str | Path, out_dir: str | Path, *, select: str | None = "all", allow_unknown_geometry: bool = False,
            keep_identifiers: bool = False, overwrite: bool = False) -> Any:
    """Convert the series at a path to NIfTI (``medidiff convert``), with the folder's manifest.

    The folder gets what :func:`medidiff.data.inspect.convert` writes (images, sidecars, ``converted.csv``,
    ``failures.csv``) and a ``manifest.json`` (versions, the options and their hash, checksums of every
    input and output, status), under the folder's lock. A folder holding an earlier conversion is left
    untouched unless ``overwrite``.

    Args:
        path: the DICOM or NIfTI input.
        out_dir: the output folder.
        select: DICOM series selection rule.
        allow_unknown_geometry, keep_identifiers, overwrite: see :func:`medidiff.data.inspect.convert`.

    Returns:
        The :class:`medidiff.data.inspect.Conversion`.

    Raises:
        DataError: see :func:`medidiff.data.inspect.convert`.
    """
    import json

    from .data.inspect import EarlierResults
    from .data.inspect import convert as convert_series

    options = {"input": str(path), "select": select, "allow_unknown_geometry": allow_unknown_geometry,
               "keep_identifiers": keep_identifiers, "overwrite": overwrite}
    out_dir = Path(out_dir)
    with RunLock(out_dir):
        manifest = Manifest(out_dir, recipe_text=json.dumps(options, sort_keys=True), seed=None, device="cpu",
                            task="convert", options=options, status="running")
        try:
            result = convert_series(path, out_dir, select, allow_unknown_geometry=allow_unknown_geometry,
                                    keep_identifiers=keep_identifiers, overwrite=overwrite)
        except EarlierResults:
            raise  # nothing was written, the earlier manifest stays
        except MedidiffError as e:
            manifest.update(status="failed", error=str(e))
            manifest.write(finished=True)
            raise
        manifest.data["inputs"] = {str(p): sha256_file(p) for p in result.inputs}
        manifest.add_outputs(result.outputs)
        manifest.update(status="finished", series_converted=len(result.images), series_failed=result.failures)
        manifest.write(finished=True)
    return result
