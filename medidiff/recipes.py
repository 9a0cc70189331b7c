"""Recipes: the validated YAML schema, ``--set`` overrides, and dispatch of a recipe to its task.

A recipe has the sections ``task``, ``seed``, ``device``, ``data`` (``medidiff.train_data.DataConfig``),
``model``, ``process``, ``training`` (``medidiff.train.TrainingConfig``) and one section per task
(``anomaly``, ``recon``, ``segment``). Unknown keys are errors that name the full dotted key and suggest
the closest valid one. ``run(recipe, out_dir)`` looks the task up in ``TASKS``; task packages add
themselves with ``register_task`` when imported. Every run's folder gets the resolved ``recipe.yaml``,
a ``manifest.json`` and a log named for the task (``train.log``, ``anomaly.log``...).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from .core.processes import Process, make_process
from .errors import MedidiffError, RecipeError
from .io import write_text
from .manifest import Manifest, sha256_file
from .runtime import env_rank, resolve_device
from .train import TrainingConfig
from .train_data import DataConfig

__all__ = [
    "ModelConfig",
    "ProcessConfig",
    "TaskSection",
    "Recipe",
    "load_recipe",
    "parse_recipe",
    "apply_overrides",
    "TASKS",
    "TRAINERS",
    "register_task",
    "run",
    "train",
    "RECIPE_NAME",
    "LOG_NAME",
]

RECIPE_NAME = "recipe.yaml"
#: The run log in a run's folder, named for its task.
LOG_NAME = "{task}.log"
log = logging.getLogger("medidiff.recipes")


class ModelConfig(BaseModel):
    """The ``model`` section: the U-Net (``medidiff.nets.build_unet``) and its parametrisation.

    Image and conditioning channels and the spatial dimensions come from the data.

    Attributes:
        channels: feature channels per level; image sizes must be divisible by ``2 ** (levels - 1)``.
        attention_levels: self-attention per level.
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head (must divide the last level's channels, where the
            U-Net always has attention, and those of the attention levels).
        norm_num_groups: group-norm groups (must divide every entry of ``channels``).
        resblock_updown: residual blocks for down/up-sampling.
        prediction: what the network predicts: ``eps``, ``x0``, ``v`` or ``score``.
    """

    model_config = ConfigDict(extra="forbid")

    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, True])
    num_res_blocks: PositiveInt = 1
    num_head_channels: PositiveInt = 32
    norm_num_groups: PositiveInt = 16
    resblock_updown: bool = False
    prediction: Literal["eps", "x0", "v", "score"] = "eps"

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(f"attention_levels has {len(self.attention_levels)} entries for "
                             f"{len(self.channels)} channels entries")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every channel count, not {bad}")
        # the U-Net's middle block always has attention, besides the levels asked for
        heads = [c for c, a in zip(self.channels, self.attention_levels) if a] + [self.channels[-1]]
        bad = [c for c in heads if c % self.num_head_channels]
        if bad:
            raise ValueError(f"num_head_channels={self.num_head_channels} must divide the channels of every "
                             f"attention level and of the last level, not {bad}")
        return self

    def build(self, *, spatial_dims: int, in_channels: int, cond_channels: int = 0):
        """The network, for images of ``in_channels`` (plus ``cond_channels``) in ``spatial_dims`` dimensions."""
        from .nets import build_unet

        return build_unet(spatial_dims=spatial_dims, in_channels=in_channels, cond_channels=cond_channels,
                          channels=self.channels, attention_levels=self.attention_levels,
                          num_res_blocks=self.num_res_blocks, num_head_channels=self.num_head_channels,
                          norm_num_groups=self.norm_num_groups, resblock_updown=self.resblock_updown)


#: The keys each process takes (unset keys keep the process's defaults).
PROCESS_KEYS = {
    "ddpm": ("n_steps", "schedule", "beta_start", "beta_end", "s", "max_beta"),
    "vpsde": ("beta_min", "beta_max", "t_min"),
    "subvpsde": ("beta_min", "beta_max", "t_min"),
    "vesde": ("sigma_min", "sigma_max", "t_min"),
}


class ProcessConfig(BaseModel):
    """The ``process`` section: the forward process (``medidiff.core.processes``) by name and parameters.

    Attributes:
        name: ``ddpm``, ``vpsde``, ``subvpsde`` or ``vesde``.
        n_steps, schedule, beta_start, beta_end, s, max_beta: DDPM steps and beta schedule.
        beta_min, beta_max, t_min: VP and sub-VP SDE parameters.
        sigma_min, sigma_max: VE SDE noise levels (with ``t_min``).
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["ddpm", "vpsde", "subvpsde", "vesde"] = "ddpm"
    n_steps: PositiveInt | None = None
    schedule: Literal["linear", "scaled_linear", "cosine", "sigmoid"] | None = None
    beta_start: PositiveFloat | None = None
    beta_end: PositiveFloat | None = None
    s: PositiveFloat | None = None
    max_beta: PositiveFloat | None = None
    beta_min: PositiveFloat | None = None
    beta_max: PositiveFloat | None = None
    sigma_min: PositiveFloat | None = None
    sigma_max: PositiveFloat | None = None
    t_min: PositiveFloat | None = None

    @model_validator(mode="after")
    def _applies(self) -> ProcessConfig:
        allowed = PROCESS_KEYS[self.name]
        given = [k for k in type(self).model_fields if k != "name" and getattr(self, k) is not None]
        stray = [k for k in given if k not in allowed]
        if stray:
            raise ValueError(f"{', '.join(stray)} do(es) not apply to process {self.name!r}; "
                             f"its keys are {', '.join(allowed)}")
        try:
            self.build()
        except (TypeError, ValueError) as e:
            raise ValueError(f"process {self.name!r} rejects these parameters: {e}") from None
        return self

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``make_process`` that are set."""
        return {k: getattr(self, k) for k in PROCESS_KEYS[self.name] if getattr(self, k) is not None}

    def build(self) -> Process:
        """The process."""
        return make_process(self.name, **self.kwargs())


class TaskSection(BaseModel):
    """Options of a task's own recipe section; the task's module defines and checks its keys."""

    model_config = ConfigDict(extra="allow")


class AnomalySection(TaskSection):
    """The ``anomaly`` section: anomaly detection by healthy reconstruction (``medidiff.anomaly``).

    The reconstruction defaults (one denoising step from ``t_L = 0.5``, median of 24 noise seeds: 24
    network evaluations per slice) are those of ``recipes/demo.yaml``, chosen with
    ``benchmarks/bench_anomaly.py`` (best AUPRC within 25 evaluations).

    Relative paths are read from the working folder, else from the medidiff checkout (for the demo).

    Attributes:
        model: weights (``.safetensors`` with its ``.json``, or a folder with ``model.safetensors``).
        inputs: the scans: a NIfTI file or folder, DICOM, or a JSON datalist of ``image``/``label``/``mask``.
        calibration: healthy scans (same forms) on which the threshold is calibrated.
        threshold: a fixed threshold (a number or a ``thresholds.json``); overrides ``calibration``.
        fpr: voxel false-positive rate the threshold is calibrated for.
        mask: a brain/foreground mask for a single input (a datalist gives one per case).
        labels: a ground-truth lesion mask for a single input (a datalist gives one per case).
        method: ``partial`` (AnoDDPM), ``invert`` (DDIM inversion) or ``patch`` (pDDPM).
        t_levels: noise levels ``t_L`` in ``(0, 1]`` reconstructed from and averaged.
        sampler: reverse sampler (``ddim``, ``dpm_solver_2m``, ``ddpm``...).
        steps: sampler steps from each level (``null``: the whole DDPM chain, as AnoDDPM).
        noise: forward noise, ``gaussian`` or ``simplex``.
        noise_options: options of the noise (simplex ``octaves``, ``frequency``...).
        n_samples: reconstructions per level from other noise seeds, reduced by ``reduce``.
        reduce: ``median`` or ``mean``; spread: ``std`` or ``mad`` between the samples.
        patch_size, patch_margin: tiles and their noised context (``patch``).
        residual: ``abs`` or ``squared``.
        median_size: median filter window (0 or 1: none); smooth_sigma: Gaussian smoothing in voxels.
        spread_floor: weight each voxel's residual by ``f / (f + spread)``, the spread between the
            ``n_samples`` reconstructions (less where the model is unsure of the healthy anatomy); ``null``
            or 0 turns it off.
        erode: voxels eroded from the foreground mask's rim.
        top_k: share of the highest voxels averaged into the case score.
        intensity: ``match`` the scans' middle foreground quantiles to the training data's (default), scale
            by their ``own`` foreground percentiles, or by the ``model``'s training range (same scanner only).
        min_foreground: least foreground share of a slice for it to be processed (others are skipped).
        batch_size: slices (times samples and tiles) per network call.
        overlay_slices: slices shown in each case's overlay PNG.
        dicom: for DICOM scans, also write the heatmap as a derived DICOM series.
        select: DICOM series selection rule.
        progress: show progress bars.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = "data/weights/demo_brain_2d.safetensors"
    inputs: str | None = None
    calibration: str | None = None
    threshold: float | str | None = None
    fpr: float = Field(0.05, gt=0.0, lt=1.0)
    mask: str | None = None
    labels: str | None = None
    method: Literal["partial", "invert", "patch"] = "partial"
    t_levels: list[float] = Field(default_factory=lambda: [0.5], min_length=1)
    sampler: str = "ddim"
    steps: PositiveInt | None = 1
    noise: Literal["gaussian", "simplex"] = "gaussian"
    noise_options: dict[str, Any] = Field(default_factory=dict)
    n_samples: PositiveInt = 24
    reduce: Literal["median", "mean"] = "median"
    spread: Literal["std", "mad"] = "std"
    patch_size: list[PositiveInt] | None = None
    patch_margin: int = Field(8, ge=0)
    residual: Literal["abs", "squared"] = "abs"
    median_size: int = Field(5, ge=0)
    smooth_sigma: float = Field(1.0, ge=0.0)
    spread_floor: float | None = Field(0.2, ge=0.0)
    erode: int = Field(2, ge=0)
    top_k: float = Field(0.01, gt=0.0, le=1.0)
    intensity: Literal["match", "own", "model"] = "match"
    min_foreground: float = Field(0.01, ge=0.0, le=1.0)
    batch_size: PositiveInt = 16
    overlay_slices: PositiveInt = 6
    dicom: bool = True
    select: str = "all"
    progress: bool = True

    @model_validator(mode="after")
    def _levels(self) -> AnomalySection:
        bad = [t for t in self.t_levels if not 0 < t <= 1]
        if bad:
            raise ValueError(f"t_levels must lie in (0, 1], not {bad}")
        return self


class ReconSection(TaskSection):
    """The ``recon`` section, defined by the reconstruction task."""


class SegmentSection(TaskSection):
    """The ``segment`` section, defined by the segmentation task."""


class Recipe(BaseModel):
    """A whole recipe.

    Attributes:
        task: ``train``, ``anomaly``, ``recon`` or ``segment``.
        description: free text.
        seed: the run's seed.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        data, model, process, training: the sections of the same names.
        anomaly, recon, segment: task sections.
    """

    model_config = ConfigDict(extra="forbid")

    task: Literal["train", "anomaly", "recon", "segment"] = "train"
    description: str = ""
    seed: int = 0
    device: str = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    process: ProcessConfig = Field(default_factory=ProcessConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    anomaly: AnomalySection | None = None
    recon: ReconSection | None = None
    segment: SegmentSection | None = None

    def to_yaml(self) -> str:
        """The resolved recipe (every default filled in) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


# -- key checking ----------------------------------------------------------------------------------
def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The ``BaseModel`` subclass inside ``annotation`` (``X``, ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
    return None


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        keys.append(prefix + name)
        sub = _section_model(info.annotation)
        if sub is not None:
            keys += _all_keys(sub, f"{prefix}{name}.")
    return keys


def _unknown_keys(raw: Any, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One message per key of ``raw`` that ``model`` (recursively) does not define."""
    if not isinstance(raw, dict):
        return []
    fields = model.model_fields
    messages = []
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key in fields:
            sub = _section_model(fields[key].annotation)
            if sub is not None:
                messages += _unknown_keys(value, sub, dotted + ".")
        elif model.model_config.get("extra") == "forbid":
            messages.append(f"unknown key '{dotted}'" + _suggest(str(key), fields, prefix))
    return messages


def _suggest(key: str, fields: Iterable[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    elsewhere = [k for k in _all_keys(Recipe) if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; '{key}' belongs under '{elsewhere[0]}'"
    return f"; valid keys here: {', '.join(fields)}"


def _validation_message(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        text = e["msg"].removeprefix("Value error, ")
        lines.append(f"'{where}': {text} (got {e['input']!r})" if "input" in e and where != "(top level)"
                     else f"'{where}': {text}")
    return "; ".join(lines)


def parse_recipe(raw: Any, *, source: str | Path = "recipe", overrides: Iterable[str] = ()) -> Recipe:
    """Validate a recipe given as a mapping (after applying ``overrides``).

    Args:
        raw: the recipe as loaded from YAML.
        source: what to name in errors (the recipe file).
        overrides: ``key.path=value`` strings (values parsed as YAML).

    Raises:
        RecipeError: unknown keys (with suggestions) or invalid values, naming ``source``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping of sections, not a {type(raw).__name__}", where=source)
    raw = apply_overrides(raw, overrides)
    unknown = _unknown_keys(raw, Recipe)
    if unknown:
        raise RecipeError("; ".join(unknown), where=source, fix="correct the key(s); see the recipes/ examples.")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"invalid recipe: {_validation_message(e)}", where=source) from None


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override and validate a YAML recipe.

    Args:
        path: the recipe file.
        overrides: ``key.path=value`` strings, applied before validation.

    Returns:
        The validated ``Recipe``.

    Raises:
        RecipeError: the file is missing, not YAML, or not a valid recipe.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError("recipe file not found", where=path, fix="check the path (examples are in recipes/).")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"not valid YAML: {e}", where=path) from None
    return parse_recipe(raw, source=path, overrides=overrides)


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """A copy of ``raw`` with ``key.path=value`` overrides set (values parsed as YAML, e.g. ``1e-4``, ``[8, 8]``).

    Raises:
        RecipeError: an override without ``=`` or one that descends into a non-section.
    """
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise RecipeError(f"override {item!r} is not of the form key.path=value", where="--set")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"'{'.'.join(parts[:i + 1])}' is a value, not a section", where=f"--set {item}")
            node = child
        node[parts[-1]] = value
    return out


# -- dispatch --------------------------------------------------------------------------------------
TaskFn = Callable[[Recipe, Path], Any]


def _train_task(recipe: Recipe, out_dir: Path) -> Any:
    from .train import run_recipe

    return run_recipe(recipe, out_dir)


#: ``run(recipe)`` calls ``TASKS[recipe.task](recipe, out_dir)``.
TASKS: dict[str, TaskFn] = {"train": _train_task}
#: ``train(recipe)`` calls ``TRAINERS[recipe.task](recipe, out_dir)``: how each task trains its model.
TRAINERS: dict[str, TaskFn] = {"train": _train_task}
#: Packages imported on first use of a task; importing them registers the task.
TASK_PACKAGES = {"anomaly": "medidiff.anomaly", "recon": "medidiff.recon", "segment": "medidiff.segment"}


def register_task(name: str, run: TaskFn, *, train: TaskFn | None = None) -> None:
    """Register a task's runner (and, if it trains a model of its own kind, its trainer).

    Args:
        name: the recipe's ``task`` value.
        run: ``run(recipe, out_dir)``, returning a result (``outputs``/``inputs`` lists are recorded).
        train: ``train(recipe, out_dir)`` for ``medidiff train`` on this task's recipes.
    """
    TASKS[name] = run
    if train is not None:
        TRAINERS[name] = train


def _lookup(registry: dict[str, TaskFn], task: str, what: str) -> TaskFn:
    if task not in registry and task in TASK_PACKAGES:
        importlib.import_module(TASK_PACKAGES[task])
    if task not in registry:
        raise RecipeError(f"task {task!r} cannot be {what} by this installation of medidiff",
                          where="task", fix=f"use a task that can: {', '.join(sorted(registry))}.")
    return registry[task]


def _result_files(result: Any, key: str) -> list[Path]:
    files = result.get(key, []) if isinstance(result, dict) else getattr(result, key, [])
    return [Path(p) for p in files or [] if Path(p).is_file()]


def _execute(recipe: Recipe, out_dir: str | Path, fn: TaskFn) -> Any:
    out_dir = Path(out_dir)
    rank = env_rank()[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank != 0:
        return fn(recipe, out_dir)
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
        result = fn(recipe, out_dir)
    except MedidiffError as e:
        log.error("%s", e)
        manifest.update(status="failed", error=str(e))
        manifest.write(finished=True)
        raise
    except BaseException as e:
        log.exception("run failed")
        manifest.update(status="failed", error=f"{type(e).__name__}: {e}")
        manifest.write(finished=True)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
    manifest.data["inputs"] = {str(p): sha256_file(p) for p in _result_files(result, "inputs")}
    manifest.add_outputs(_result_files(result, "outputs"))
    for key in ("step", "world_size", "replica_checksums"):
        value = result.get(key) if isinstance(result, dict) else getattr(result, key, None)
        if value is not None:
            manifest.update(**{key: value})
    manifest.update(status="finished")
    manifest.write(finished=True)
    return result


def run(recipe: Recipe, out_dir: str | Path) -> Any:
    """Run a recipe end to end, whatever its task.

    Args:
        recipe: the validated recipe.
        out_dir: the run's folder (receives ``recipe.yaml``, ``manifest.json``, ``<task>.log`` and results).

    Returns:
        The task's result.

    Raises:
        RecipeError: the task is not available.
    """
    return _execute(recipe, out_dir, _lookup(TASKS, recipe.task, "run"))


def train(recipe: Recipe, out_dir: str | Path) -> Any:
    """Train the model a recipe describes (``medidiff train``), with the task's own trainer.

    Args:
        recipe: the validated recipe.
        out_dir: the run's folder.

    Returns:
        The trainer's result (a ``medidiff.train.TrainResult`` for the generic trainer).
    """
    return _execute(recipe, out_dir, _lookup(TRAINERS, recipe.task, "trained"))
