"""Recipes: the validated YAML schema and ``--set`` overrides.

A recipe has the sections ``task``, ``seed``, ``device``, ``data`` (``medidiff.train_data.DataConfig``),
``model``, ``process``, ``training`` (``medidiff.train.TrainingConfig``) and one section per task, defined
by the task's own package (``anomaly``: ``medidiff.anomaly.config.AnomalySection``). Unknown keys are
errors that name the full dotted key and suggest the closest valid one. Running a recipe is
``medidiff.runs``'s job.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .anomaly.config import AnomalySection
from .core.processes import Process, make_process
from .errors import RecipeError
from .recon.config import ReconSection
from .segment.config import SegmentSection
from .train_config import TrainingConfig
from .train_data import DataConfig

__all__ = [
    "ModelConfig",
    "ProcessConfig",
    "Recipe",
    "TASK_SECTIONS",
    "TRAINING_SECTIONS",
    "load_recipe",
    "parse_recipe",
    "apply_overrides",
]


class ModelConfig(BaseModel):
    """The ``model`` section: the U-Net (``medidiff.nets.build_unet``) and its parametrisation.

    Image and conditioning channels and the spatial dimensions come from the data.

    Attributes:
        arch: ``diffusion_unet`` (MONAI's ``DiffusionModelUNet``, a denoiser) or ``unet`` (MONAI's deterministic
            ``UNet`` segmenting the conditioning image, ``medidiff.nets.build_segmentation_unet``: trained with
            ``training.objective: segmentation``, ``prediction: x0``; it uses ``channels`` and
            ``num_res_blocks`` as residual units per level only) or ``vqvae`` (MONAI's ``VQVAE``, the autoencoder
            of latent diffusion, ``medidiff.nets.build_vqvae``: trained with ``training.objective: vqvae``; it uses
            ``channels`` (each level halves the grid), ``num_res_blocks`` as residual layers per level and the
            codebook settings).
        channels: feature channels per level; image sizes must be divisible by ``2 ** (levels - 1)``.
        attention_levels: self-attention per level.
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head (must divide the last level's channels, where the
            U-Net always has attention, and those of the attention levels).
        norm_num_groups: group-norm groups (must divide every entry of ``channels``).
        resblock_updown: residual blocks for down/up-sampling.
        class_conditional: a class-conditional U-Net for classifier-free guidance (``medidiff.nets.build_unet``'s
            class embeddings: one per class of the data, e.g. ``sample:lesion_classes``, and a null class; see
            ``training.class_dropout``); Sanchez et al. 2022's counterfactual anomaly detection.
        num_embeddings: ``vqvae``: the codebook's size.
        embedding_dim: ``vqvae``: a code's channels (the latent channels; the latent denoiser's image channels).
        commitment_cost: ``vqvae``: the weight of the commitment loss.
        codebook_decay: ``vqvae``: the decay of the codebook's exponential moving average.
        prediction: what the network predicts: ``eps``, ``x0``, ``v`` or ``score``.
    """

    model_config = ConfigDict(extra="forbid")

    arch: Literal["diffusion_unet", "unet", "vqvae"] = "diffusion_unet"
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, True])
    num_res_blocks: PositiveInt = 1
    num_head_channels: PositiveInt = 32
    norm_num_groups: PositiveInt = 16
    resblock_updown: bool = False
    class_conditional: bool = False
    num_embeddings: PositiveInt = 256
    embedding_dim: PositiveInt = 3
    commitment_cost: float = Field(0.25, ge=0.0)
    codebook_decay: float = Field(0.99, gt=0.0, lt=1.0)
    prediction: Literal["eps", "x0", "v", "score"] = "eps"

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.arch == "unet":
            if self.prediction != "x0":
                raise ValueError("model.arch unet predicts the mask itself: set model.prediction: x0")
            if self.class_conditional:
                raise ValueError("model.class_conditional needs model.arch diffusion_unet")
            return self
        if self.arch == "vqvae":
            if self.class_conditional:
                raise ValueError("model.class_conditional needs model.arch diffusion_unet")
            return self
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

    def build(self, *, spatial_dims: int, in_channels: int, cond_channels: int = 0, classes: int = 0):
        """The network, for images of ``in_channels`` (plus ``cond_channels``) in ``spatial_dims`` dimensions;
        ``classes`` (the data's) give a class-conditional U-Net ``classes + 1`` embeddings (the null class last).

        Raises:
            ValueError: a class-conditional model without classes.
        """
        from .nets import build_segmentation_unet, build_unet, build_vqvae

        if self.arch == "vqvae":
            return build_vqvae(spatial_dims=spatial_dims, in_channels=in_channels, channels=self.channels,
                               num_res_layers=self.num_res_blocks, num_embeddings=self.num_embeddings,
                               embedding_dim=self.embedding_dim, commitment_cost=self.commitment_cost,
                               decay=self.codebook_decay)
        if self.arch == "unet":
            return build_segmentation_unet(spatial_dims=spatial_dims, in_channels=in_channels,
                                           cond_channels=cond_channels, channels=self.channels,
                                           num_res_units=self.num_res_blocks)
        return build_unet(spatial_dims=spatial_dims, in_channels=in_channels, cond_channels=cond_channels,
                          channels=self.channels, attention_levels=self.attention_levels,
                          num_res_blocks=self.num_res_blocks, num_head_channels=self.num_head_channels,
                          norm_num_groups=self.norm_num_groups, resblock_updown=self.resblock_updown,
                          num_class_embeds=self._class_embeds(classes))

    def _class_embeds(self, classes: int) -> int:
        if not self.class_conditional:
            return 0
        if classes < 1:
            raise ValueError("model.class_conditional needs data labelled with classes (e.g. data.source: "
                             "sample:lesion_classes)")
        return classes + 1


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


class Recipe(BaseModel):
    """A whole recipe.

    Attributes:
        task: ``train``, or a task: ``anomaly``, ``recon`` or ``segment``.
        description: free text.
        seed: the run's seed.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        data, model, process, training: what ``train`` uses (the sections of the same names).
        anomaly: the anomaly task's section.
        recon: the recon task's section.
        segment: the segment task's section.
    """

    model_config = ConfigDict(extra="forbid")

    task: str = "train"
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

    @field_validator("task")
    @classmethod
    def _task(cls, task: str) -> str:
        known = ("train", *TASK_SECTIONS)
        if task not in known:
            raise ValueError(f"task {task!r} is not available in this installation of medidiff; use one of "
                             f"{', '.join(known)}")
        return task

    def applicable(self) -> dict[str, Any]:
        """The resolved recipe (every default filled in), holding only the sections its task uses."""
        keep = {"task", "description", "seed", "device"} | set(
            TRAINING_SECTIONS if self.task == "train" else TASK_SECTIONS[self.task])
        return self.model_dump(mode="json", include=keep)

    def to_yaml(self) -> str:
        """``applicable()`` as YAML: what a run's ``recipe.yaml`` records."""
        return yaml.safe_dump(self.applicable(), sort_keys=False, default_flow_style=None)


#: The sections each task runs on (besides task, description, seed, device).
TASK_SECTIONS: dict[str, tuple[str, ...]] = {"anomaly": ("anomaly",), "recon": ("recon",), "segment": ("segment",)}
#: The sections training uses.
TRAINING_SECTIONS = ("data", "model", "process", "training")


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
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as e:  # e.g. !!float x
        raise RecipeError(_yaml_message(e), where=path,
                          fix="write the recipe as plain YAML data (see the examples in recipes/).") from None
    return parse_recipe(raw, source=path, overrides=overrides)


def _yaml_message(error: Exception) -> str:
    """What is wrong with a recipe's YAML, naming the line (a ``!!python`` tag is refused, never run)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    line = f"line {mark.line + 1}: " if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if isinstance(error, yaml.constructor.ConstructorError) and "tag" in str(problem):
        return f"{line}{problem}: recipes are read with a safe loader, which builds no Python objects"
    return f"{line}not valid YAML ({problem})"


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
