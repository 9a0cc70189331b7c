"""Typed model metadata: what a model file records about its network, its process and its training data.

``model.json`` beside every ``.safetensors`` file is one ``ModelInfo``. Training writes it; every task
reads it (``medidiff.weights.load_denoiser``) and prepares new data exactly as ``ModelInfo.data_prep``
says the training data was prepared (``medidiff.cases.prepare``). The intensity record is one of:

- ``percentile``: each volume's foreground percentiles mapped to ``[-1, 1]`` (MRI); ``reference`` holds
  the training foreground's quantiles on the network scale, which new scans are matched to;
- ``hu_window``: a fixed CT window in Hounsfield units mapped to ``[-1, 1]``, clipped;
- ``fixed``: data already on the network scale (synthetic images);
- ``complex``: complex images (MRI k-space reconstructions) as real and imaginary channels, divided by
  a percentile of the magnitude (``scale_percentile``) so the magnitude lies in ``[0, 1]``.

Files of the first layout (``medidiff.model/1``, whose ``data_prep`` was free-form) are read through
``migrate``; a file without ``data_prep`` is refused with a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ModelError

__all__ = [
    "FORMAT",
    "PercentileIntensity",
    "WindowIntensity",
    "FixedIntensity",
    "ComplexIntensity",
    "Intensity",
    "LabelInfo",
    "DataPrep",
    "NoiseInfo",
    "AutoencoderInfo",
    "ModelInfo",
    "migrate",
    "parse_model_info",
]

#: Identifies the layout of ``model.json``; bumped when it changes incompatibly.
FORMAT = "medidiff.model/2"
_FORMAT_V1 = "medidiff.model/1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PercentileIntensity(_Strict):
    """Each volume's foreground percentiles mapped to ``[-1, 1]`` (MRI).

    Attributes:
        percentiles: the lower and upper percentile.
        of: which voxels the percentiles are taken over.
        low, high: the training volume's values at those percentiles (one volume's training data), in
            the scan's units; ``None`` when the training data held many volumes.
        reference: the training foreground's quantiles at ``reference_levels`` on the network scale.
        reference_levels: the quantile levels of ``reference``.
    """

    method: Literal["percentile"] = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    of: Literal["foreground"] = "foreground"
    low: float | None = None
    high: float | None = None
    range: tuple[float, float] = (-1.0, 1.0)
    reference: list[float] | None = None
    reference_levels: list[float] | None = None

    @model_validator(mode="after")
    def _pairs(self) -> PercentileIntensity:
        if (self.reference is None) != (self.reference_levels is None):
            raise ValueError("reference and reference_levels go together")
        if self.reference is not None and len(self.reference) != len(self.reference_levels):
            raise ValueError(f"{len(self.reference)} reference quantiles for {len(self.reference_levels)} levels")
        return self


class WindowIntensity(_Strict):
    """A CT window ``(low, high)`` in HU mapped to ``[-1, 1]``, clipped."""

    method: Literal["hu_window"] = "hu_window"
    window: tuple[float, float]
    range: tuple[float, float] = (-1.0, 1.0)


class FixedIntensity(_Strict):
    """Data already on the network scale (e.g. synthetic images in ``[-1, 1]``)."""

    method: Literal["fixed"] = "fixed"
    range: tuple[float, float] = (-1.0, 1.0)


class ComplexIntensity(_Strict):
    """Complex images as ``(real, imaginary)`` channels, divided by a percentile of their magnitude."""

    method: Literal["complex"] = "complex"
    scale_percentile: float = Field(99.5, gt=0.0, le=100.0)
    channels: tuple[str, str] = ("real", "imag")
    range: tuple[float, float] = (-1.0, 1.0)


Intensity = Annotated[PercentileIntensity | WindowIntensity | FixedIntensity | ComplexIntensity,
                      Field(discriminator="method")]


class LabelInfo(_Strict):
    """What a segmentation model generates: label maps as one-hot channels scaled to ``[-1, 1]``.

    Attributes:
        classes: label names, background first (``["background", "lesion"]``).
        one_hot: one channel per class (else one channel for the foreground of a binary task).
    """

    classes: list[str] = Field(default_factory=lambda: ["background", "foreground"], min_length=2)
    one_hot: bool = False


class DataPrep(_Strict):
    """How the training data were prepared: what a task repeats on new data.

    Attributes:
        source: where the data came from (``synthetic``, ``sample:brain``, ``path``...).
        modality: free text (``MR T1``, ``CT``, ``mri``...).
        orientation: axis codes the volumes were reoriented to (``None``: kept as read).
        spacing_mm: voxel size resampled to: in-plane (2 entries, the axes other than ``slicing_axis``
            in order) for a 2D model, all 3 axes for a 3D model; ``None``: kept as read. A 3-entry
            spacing given for a 2D model is reduced to its in-plane entries.
        slicing_axis: the axis volumes were sliced along for a 2D model (``None`` for 3D).
        size: the network's grid (in-plane for a 2D model).
        patch: the model learned patches of ``size`` and applies to images of any size.
        intensity: the intensity record (see the module docstring).
        labels: for a segmentation model, what it generates.
        cases: number of training (and validation) cases.
        holdout, slices: provenance of a single-volume source (held-out and used slice ranges).
        brains: the healthy brains generated lesions were drawn on (``sample:lesions``, ``sample:lesion_classes``).
    """

    source: str
    modality: str = ""
    orientation: str | None = "RAS"
    spacing_mm: list[float] | None = None
    slicing_axis: Literal[0, 1, 2] | None = None
    size: list[int] | None = None
    patch: bool = False
    intensity: Intensity = Field(default_factory=FixedIntensity)
    labels: LabelInfo | None = None
    cases: int | None = None
    holdout: list[list[int]] | None = None
    slices: list[int] | None = None
    brains: list[str] | None = None

    @model_validator(mode="after")
    def _spacing(self) -> DataPrep:
        if self.spacing_mm is not None and self.slicing_axis is not None and len(self.spacing_mm) == 3:
            self.spacing_mm = [s for i, s in enumerate(self.spacing_mm) if i != self.slicing_axis]
        return self

    def grid(self, spatial_dims: int) -> tuple[list[float] | None, list[int] | None]:
        """The target spacing and size over all three volume axes, ``-1`` on a 2D model's slicing axis.

        Args:
            spatial_dims: the model's spatial dimensions (2 or 3).

        Returns:
            ``(pixdim, spatial_size)``, each ``None`` when not recorded.
        """
        axis = (2 if self.slicing_axis is None else self.slicing_axis) if spatial_dims == 2 else None
        expected = 2 if axis is not None else 3
        for name, value in (("spacing_mm", self.spacing_mm), ("size", self.size)):
            if value is not None and len(value) != expected:
                raise ModelError(f"data_prep.{name} has {len(value)} entries for a {spatial_dims}D model",
                                 fix=f"record {expected} entries ({'in-plane' if axis is not None else 'x, y, z'}).")
        spacing = None if self.spacing_mm is None else [float(s) for s in self.spacing_mm]
        size = None if self.size is None else [int(s) for s in self.size]
        if axis is not None:
            if spacing is not None:
                spacing.insert(axis, -1.0)
            if size is not None:
                size.insert(axis, -1)
        return spacing, size


class NoiseInfo(_Strict):
    """The training noise: ``gaussian`` or ``simplex`` with its options."""

    kind: Literal["gaussian", "simplex"] = "gaussian"
    options: dict[str, Any] = Field(default_factory=dict)


class AutoencoderInfo(_Strict):
    """The frozen autoencoder a latent denoiser was trained on (``training.autoencoder``): the denoiser models
    ``scale * codes`` of its images, and only these weights decode them.

    Attributes:
        name: the weights file's name.
        path: the path the recipe gave (detection looks a relative one up from the working folder, else beside the
            latent model by its last name, else in the medidiff checkout).
        sha256: the weights file's SHA-256; detection refuses an autoencoder with another.
        scale: the factor the codes were multiplied by (one over their standard deviation on the training data,
            as Rombach et al. 2022 scale their latents), so the latents have about unit variance.
        embedding_dim: the codes' channels.
        factor: how many times coarser the latent grid is than the image's, per axis.
        step: the autoencoder's training step.
    """

    name: str
    path: str
    sha256: str
    scale: float = Field(gt=0.0)
    embedding_dim: int = Field(ge=1)
    factor: int = Field(ge=1)
    step: int | None = None


class ModelInfo(_Strict):
    """Everything ``model.json`` records.

    Attributes:
        format: the layout (``FORMAT``).
        net: ``medidiff.nets.build_unet`` keyword arguments.
        process: ``medidiff.core.processes.make_process`` keyword arguments.
        prediction: the network's parametrisation.
        scale_input: the ``Denoiser``'s input scaling.
        data_prep: how the training data were prepared.
        noise: the training noise.
        step, weights, checkpoint, loss_weighting: provenance of the weights.
        init_from: the model training started from (fine-tuning): ``name``, ``sha256`` and ``step``.
        task: what the model is for (``healthy``, ``prior``, ``segment``, ``autoencoder``...), free text.
        autoencoder: for a latent denoiser, the autoencoder whose codes it models.
        extra: anything else a task records.
    """

    format: str = FORMAT
    net: dict[str, Any]
    process: dict[str, Any]
    prediction: Literal["eps", "x0", "v", "score"]
    scale_input: bool = True
    data_prep: DataPrep
    noise: NoiseInfo = Field(default_factory=NoiseInfo)
    step: int | None = None
    weights: Literal["ema", "raw"] | None = None
    checkpoint: str | None = None
    loss_weighting: str | None = None
    init_from: dict[str, Any] | None = None
    task: str | None = None
    autoencoder: AutoencoderInfo | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        """The network's spatial dimensions."""
        return int(self.net.get("spatial_dims", 2))

    def to_json(self) -> dict[str, Any]:
        """The JSON-able record written as ``model.json``."""
        return self.model_dump(mode="json", exclude_none=True)


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """A ``medidiff.model/1`` record in the current layout (other layouts are returned as they are).

    The first layout wrote ``data_prep`` as a free-form dict: a synthetic source's intensity had no
    ``method``, a CT window had no range, and a path source carried ``per``.
    """
    if raw.get("format") != _FORMAT_V1:
        return raw
    out = dict(raw)
    out["format"] = FORMAT
    prep = dict(out.get("data_prep") or {})
    if prep:
        intensity = dict(prep.get("intensity") or {})
        intensity.setdefault("method", "fixed")
        intensity.pop("per", None)
        if intensity["method"] == "fixed":
            intensity = {k: v for k, v in intensity.items() if k in ("method", "range")}
        prep["intensity"] = intensity
        prep.setdefault("source", "unknown")
        out["data_prep"] = prep
    known = set(ModelInfo.model_fields)
    extra = {k: v for k, v in out.items() if k not in known}
    if extra:
        out = {k: v for k, v in out.items() if k in known}
        out["extra"] = {**out.get("extra", {}), **extra}
    return out


def parse_model_info(raw: Any, where: str | Path) -> ModelInfo:
    """Validate a ``model.json`` record (migrating older layouts).

    Args:
        raw: the parsed JSON.
        where: the file, for messages.

    Returns:
        The ``ModelInfo``.

    Raises:
        ModelError: not a medidiff model record, no ``data_prep``, or invalid entries.
    """
    if not isinstance(raw, dict):
        raise ModelError("model config is not a JSON object", where=where)
    missing = [k for k in ("net", "process", "prediction") if k not in raw]
    if missing:
        raise ModelError(f"model config lacks {', '.join(missing)}; it was not written by medidiff", where=where)
    if not raw.get("data_prep"):
        raise ModelError("model config has no data_prep: nothing says how to prepare data for this model",
                         where=where, fix="train it with a medidiff recipe (which records data_prep), or add a "
                                          "data_prep section (see medidiff.modelinfo.DataPrep).")
    try:
        return ModelInfo.model_validate(migrate(raw))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:4])
        raise ModelError(f"model config is invalid ({problems})", where=where,
                         fix="check that it was written by this version of medidiff.") from None
